// The bridge between the friendly API and the generated NativeMethods: library loading and
// version check, UTF-8 marshalling, status codes to exceptions, the streaming callback.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;
using ChatHub.Native;

namespace ChatHub
{
    /// <summary>Owns a native ChathubModel and frees it exactly once.</summary>
    internal sealed unsafe class SafeModelHandle : SafeHandle
    {
        public SafeModelHandle() : base(IntPtr.Zero, true) { }

        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }

        internal ChathubModel* Pointer { get { return (ChathubModel*)handle; } }

        internal void Set(ChathubModel* model) { SetHandle((IntPtr)model); }

        protected override bool ReleaseHandle()
        {
            NativeMethods.chathub_model_free((ChathubModel*)handle);
            return true;
        }
    }

    internal static unsafe class Interop
    {
        static readonly object LoadLock = new object();
        static Exception loadFailure;
        static bool loaded;

        /// <summary>The native library's version string.</summary>
        internal static string NativeVersion
        {
            get
            {
                EnsureLoaded();
                return Utf8ToString(NativeMethods.chathub_version());
            }
        }

        /// <summary>
        /// Makes one cheap native call so a missing or mismatched library fails early, with a
        /// message that says what to do.
        /// </summary>
        internal static void EnsureLoaded()
        {
            lock (LoadLock)
            {
                if (loaded) return;
                if (loadFailure == null) loadFailure = TryLoad();
                if (loadFailure != null) throw loadFailure;
                loaded = true;
            }
        }

        static Exception TryLoad()
        {
            uint version;
            try
            {
                version = NativeMethods.chathub_abi_version();
            }
            catch (DllNotFoundException e)
            {
                return new DllNotFoundException(
                    "The native library libchathub.so (chathub.dll on Windows, libchathub.dylib on macOS) " +
                    "could not be loaded. Likely causes:\n" +
                    "  1. It was not built: run `cargo build --release` in the chathub repository.\n" +
                    "  2. It is not where the runtime looks: copy target/release/libchathub.so next to your " +
                    "application (" + AppDomain.CurrentDomain.BaseDirectory + ") or add its folder to " +
                    "LD_LIBRARY_PATH (now: " + (Environment.GetEnvironmentVariable("LD_LIBRARY_PATH") ?? "unset") + ").\n" +
                    "  3. It was built for another OS or CPU architecture than this process (" +
                    (IntPtr.Size * 8) + "-bit).",
                    e);
            }
            catch (EntryPointNotFoundException e)
            {
                return new ChatHubException(ChatHubStatus.Internal,
                    "The loaded chathub library is not a chathub build (chathub_abi_version is missing).", e);
            }
            if (version != NativeMethods.CHATHUB_ABI_VERSION)
            {
                return new ChatHubException(ChatHubStatus.Internal,
                    "The native chathub library implements ABI version " + version + " but these bindings need " +
                    NativeMethods.CHATHUB_ABI_VERSION + ": rebuild the library and the bindings from the same commit.");
            }
            return null;
        }

        /// <summary>Throws the native failure as an exception; call right after the failing call,
        /// on the same thread (the message is per thread).</summary>
        internal static void Check(int status)
        {
            if (status == NativeMethods.CHATHUB_OK) return;
            string message = Utf8ToString(NativeMethods.chathub_last_error_message());
            throw new ChatHubException((ChatHubStatus)status, message ?? ("chathub status " + status));
        }

        internal static string Utf8ToString(byte* text)
        {
            if (text == null) return null;
            int len = 0;
            while (text[len] != 0) len++;
            return Encoding.UTF8.GetString(text, len);
        }

        internal static byte[] ToUtf8Z(string text)
        {
            int n = Encoding.UTF8.GetByteCount(text);
            var bytes = new byte[n + 1];
            Encoding.UTF8.GetBytes(text, 0, text.Length, bytes, 0);
            return bytes;
        }

        internal static ChathubParams ToNative(GenerationOptions o)
        {
            var p = new ChathubParams();
            if (o == null) return p;
            p.max_length = o.MaxLength;
            p.top_p = o.TopP;
            p.temperature = o.Temperature;
            p.top_k = o.TopK;
            p.repetition_penalty = o.RepetitionPenalty;
            p.max_new_tokens = o.MaxNewTokens;
            p.has_seed = (byte)(o.Seed.HasValue ? 1 : 0);
            p.seed = o.Seed.HasValue ? o.Seed.Value : 0;
            p.greedy = (byte)(o.Greedy ? 1 : 0);
            return p;
        }
    }

    /// <summary>
    /// The arguments of one native chat call in unmanaged memory: the prompt, the history
    /// strings and the message array stay put for the whole call, and are freed on Dispose.
    /// </summary>
    internal sealed unsafe class NativeRequest : IDisposable
    {
        readonly List<IntPtr> allocations = new List<IntPtr>();

        internal byte* Prompt;
        internal ChathubMessage* History;
        internal UIntPtr HistoryLength;
        internal ChathubParams Params;

        internal NativeRequest(string prompt, IList<Message> history, GenerationOptions options)
        {
            if (prompt == null) throw new ArgumentNullException(nameof(prompt));
            try
            {
                Prompt = Copy(prompt);
                int count = history == null ? 0 : history.Count;
                if (count > 0)
                {
                    var array = Marshal.AllocHGlobal(sizeof(ChathubMessage) * count);
                    allocations.Add(array);
                    History = (ChathubMessage*)array;
                    for (int i = 0; i < count; i++)
                    {
                        var m = history[i];
                        if (m == null) throw new ArgumentException("history[" + i + "] is null", nameof(history));
                        History[i].role = Copy(m.Role);
                        History[i].content = Copy(m.Content);
                        History[i].tool_calls_json = m.ToolCalls.Count == 0
                            ? null
                            : Copy(Json.Array(m.ToolCalls, c => c.ToJson()));
                        History[i].tool_call_id = m.ToolCallId == null ? null : Copy(m.ToolCallId);
                    }
                }
                HistoryLength = (UIntPtr)count;
                Params = Interop.ToNative(options);
                var stop = options == null ? null : options.Stop;
                if (stop != null && stop.Count > 0)
                {
                    var array = Marshal.AllocHGlobal(IntPtr.Size * stop.Count);
                    allocations.Add(array);
                    var texts = (byte**)array;
                    for (int i = 0; i < stop.Count; i++)
                    {
                        if (stop[i] == null) throw new ArgumentException("Stop[" + i + "] is null", nameof(options));
                        texts[i] = Copy(stop[i]);
                    }
                    Params.stop = texts;
                    Params.stop_count = (UIntPtr)stop.Count;
                }
                var tools = options == null ? null : options.Tools;
                if (tools != null && tools.Count > 0)
                    Params.tools_json = Copy(Json.Array(tools, t => t.ToJson()));
                var promptRole = options == null ? null : options.PromptRole;
                if (promptRole != null)
                    Params.prompt_role = Copy(promptRole);
            }
            catch
            {
                Dispose();
                throw;
            }
        }

        byte* Copy(string text)
        {
            var bytes = Interop.ToUtf8Z(text);
            var p = Marshal.AllocHGlobal(bytes.Length);
            allocations.Add(p);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            return (byte*)p;
        }

        public void Dispose()
        {
            foreach (var p in allocations) Marshal.FreeHGlobal(p);
            allocations.Clear();
        }
    }

    /// <summary>Receives the text of one streaming call; reached from the native callback
    /// through a GCHandle passed as user_data.</summary>
    internal interface IDeltaSink
    {
        /// <summary>Returns false to stop generation.</summary>
        bool OnDelta(string delta);
    }

    internal static unsafe class StreamCallback
    {
        /// <summary>Kept in static fields so the GC never collects the marshalled delegates.</summary>
        internal static readonly NativeMethods.chathub_chat_stream_callback_delegate Delegate = Invoke;
        internal static readonly NativeMethods.chathub_chat_reply_callback_delegate ReplyDelegate = Invoke;

        /// <summary>Runs on the native generating thread after every token (with an empty piece
        /// when the token showed nothing, so cancellation still takes effect within one token).
        /// Never lets an exception escape into Rust: it is recorded on the sink's state and
        /// generation stops.</summary>
        static bool Invoke(void* userData, byte* utf8, UIntPtr len)
        {
            var holder = (SinkHolder)GCHandle.FromIntPtr((IntPtr)userData).Target;
            try
            {
                return holder.Sink.OnDelta(Encoding.UTF8.GetString(utf8, (int)len.ToUInt64()));
            }
            catch (Exception e)
            {
                holder.Failure = e;
                return false;
            }
        }
    }

    internal sealed class SinkHolder
    {
        internal readonly IDeltaSink Sink;
        internal Exception Failure;
        internal SinkHolder(IDeltaSink sink) { Sink = sink; }
    }
}
