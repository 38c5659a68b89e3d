// The public entry point: a loaded ChatGLM model, with the call shapes of AIHub's gRPC client.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using ChatHub.Native;

namespace ChatHub
{
    /// <summary>
    /// A ChatGLM model loaded in this process. Thread-safe: any number of threads may chat with
    /// one model at once (each call has its own cache; weights are shared, and concurrent calls
    /// are batched into shared forward passes, each getting the reply it would get alone). Dispose
    /// it to free the weights; calls still running keep it alive until they return.
    /// </summary>
    public sealed unsafe class ChatModel : IDisposable
    {
        readonly SafeModelHandle handle;

        ChatModel(SafeModelHandle handle) { this.handle = handle; }

        /// <summary>The native library's version.</summary>
        public static string NativeVersion { get { return Interop.NativeVersion; } }

        /// <summary>
        /// Loads a model directory as THUDM publishes it on Hugging Face (config.json, weights,
        /// tokenizer.model). Blocks while the weights load.
        /// </summary>
        /// <exception cref="DirectoryNotFoundException">The directory does not exist.</exception>
        /// <exception cref="ChatHubException">The files are missing, malformed or inconsistent.</exception>
        public static ChatModel Load(string modelDir, ModelFamily family = ModelFamily.Auto,
            Quantization quantization = Quantization.None)
        {
            return Load(modelDir, LoadOptions.Default.WithFamily(family).WithQuantization(quantization));
        }

        /// <summary>
        /// Loads a model directory (or a .gguf file) with every load option: weight format,
        /// device, multi-turn reuse. Blocks while the weights load.
        /// </summary>
        /// <exception cref="DirectoryNotFoundException">Neither a directory nor a file has that name.</exception>
        /// <exception cref="ChatHubException">The files are missing, malformed or inconsistent, an
        /// option is out of range, or a GPU was asked of a library built without CUDA.</exception>
        public static ChatModel Load(string modelDir, LoadOptions options)
        {
            if (modelDir == null) throw new ArgumentNullException(nameof(modelDir));
            if (options == null) throw new ArgumentNullException(nameof(options));
            if (!Directory.Exists(modelDir) && !File.Exists(modelDir))
                throw new DirectoryNotFoundException("model directory not found: " + Path.GetFullPath(modelDir));
            Interop.EnsureLoaded();
            var h = new SafeModelHandle();
            ChathubModel* model = null;
            var dir = Interop.ToUtf8Z(modelDir);
            int status;
            var native = new ChathubLoadOptions
            {
                family = (int)options.Family,
                quantization = (int)options.Quantization,
                dtype = (int)options.WeightType,
                device = (int)options.Device,
                device_ordinal = (uint)options.DeviceOrdinal,
                prefix_cache_bytes = options.PrefixCacheBytes,
                disable_next_turn_warmup = (byte)(options.WarmNextTurn ? 0 : 1),
                kv_cache_dtype = (int)options.KvCacheType,
            };
            fixed (byte* d = dir)
            {
                status = NativeMethods.chathub_model_load_with(d, &native, &model);
            }
            Interop.Check(status);
            h.Set(model);
            return new ChatModel(h);
        }

        /// <summary>
        /// Loads the built-in demo model: random weights, so its replies are meaningless, but the
        /// whole pipeline runs without a download.
        /// </summary>
        public static ChatModel LoadDemo()
        {
            Interop.EnsureLoaded();
            var h = new SafeModelHandle();
            ChathubModel* model = null;
            Interop.Check(NativeMethods.chathub_model_load_demo(&model));
            h.Set(model);
            return new ChatModel(h);
        }

        /// <summary>Generates a whole reply. Blocks the calling thread.</summary>
        /// <exception cref="ChatHubException">Invalid parameters, unknown role, prompt too long.</exception>
        public string Chat(string prompt, IList<Message> history = null, GenerationOptions options = null)
        {
            return ChatWithStats(prompt, history, options).Text;
        }

        /// <summary>Generates a whole reply and reports token counts and timings.</summary>
        public ChatResult ChatWithStats(string prompt, IList<Message> history = null, GenerationOptions options = null)
        {
            using (var request = new NativeRequest(prompt, history, options))
            {
                bool added = false;
                try
                {
                    AddRef(ref added);
                    byte* reply = null;
                    UIntPtr length;
                    ChathubStats stats;
                    var p = request.Params;
                    int status = NativeMethods.chathub_chat(handle.Pointer, request.Prompt, request.History,
                        request.HistoryLength, &p, &reply, &length, &stats);
                    Interop.Check(status);
                    try
                    {
                        return new ChatResult(Encoding.UTF8.GetString(reply, (int)length.ToUInt64()), new ChatStats(stats));
                    }
                    finally
                    {
                        NativeMethods.chathub_string_free(reply);
                    }
                }
                finally
                {
                    if (added) handle.DangerousRelease();
                }
            }
        }

        /// <summary>
        /// Generates a reply and returns it as the official chat() does: text, a call of one of
        /// <see cref="GenerationOptions.Tools"/>, or a metadata reply. History may hold earlier
        /// calls (<see cref="Message.AssistantToolCalls"/>) and their results
        /// (<see cref="Message.Tool"/>). Blocks the calling thread.
        /// </summary>
        /// <exception cref="ChatHubException">Invalid parameters or tools, unknown role, prompt too long.</exception>
        public ChatReply Generate(string prompt, IList<Message> history = null, GenerationOptions options = null)
        {
            using (var request = new NativeRequest(prompt, history, options))
            {
                bool added = false;
                ChathubReply* reply = null;
                try
                {
                    AddRef(ref added);
                    ChathubStats stats;
                    var p = request.Params;
                    int status = NativeMethods.chathub_chat_reply(handle.Pointer, request.Prompt, request.History,
                        request.HistoryLength, &p, null, null, &reply, &stats);
                    Interop.Check(status);
                    var kind = (ReplyKind)NativeMethods.chathub_reply_kind(reply);
                    string name = Interop.Utf8ToString(NativeMethods.chathub_reply_tool_name(reply));
                    string arguments = Interop.Utf8ToString(NativeMethods.chathub_reply_arguments_json(reply));
                    return new ChatReply(
                        kind,
                        Interop.Utf8ToString(NativeMethods.chathub_reply_text(reply)),
                        kind == ReplyKind.ToolCall ? new ToolCall(name, arguments) : null,
                        kind == ReplyKind.Metadata ? name : null,
                        Interop.Utf8ToString(NativeMethods.chathub_reply_json(reply)),
                        Interop.Utf8ToString(NativeMethods.chathub_reply_raw_text(reply)),
                        new ChatStats(stats));
                }
                finally
                {
                    NativeMethods.chathub_reply_free(reply);
                    if (added) handle.DangerousRelease();
                }
            }
        }

        /// <summary>
        /// Generates a whole reply on a worker thread. Cancelling the token stops generation within
        /// one token and throws <see cref="OperationCanceledException"/>.
        /// </summary>
        public Task<string> ChatAsync(string prompt, IList<Message> history = null, GenerationOptions options = null,
            CancellationToken cancellationToken = default(CancellationToken))
        {
            if (prompt == null) throw new ArgumentNullException(nameof(prompt));
            ThrowIfDisposed();
            return Task.Run(() =>
            {
                var sink = new TextSink(cancellationToken);
                Stream(prompt, history, options, sink);
                cancellationToken.ThrowIfCancellationRequested();
                return sink.Text.ToString();
            }, cancellationToken);
        }

        /// <summary>
        /// Streams a reply like AIHub's gRPC StreamingChat: each item is the whole text so far.
        /// Cancelling the token, or disposing the enumerator (leaving an <c>await foreach</c>),
        /// stops generation within one token.
        /// </summary>
        public IAsyncEnumerable<string> StreamingChat(string prompt, IList<Message> history = null,
            GenerationOptions options = null, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (prompt == null) throw new ArgumentNullException(nameof(prompt));
            ThrowIfDisposed();
            return new ChatStream(this, prompt, history, options, true, cancellationToken);
        }

        /// <summary>Streams a reply as the new text of each step only.</summary>
        public IAsyncEnumerable<string> StreamingChatDeltas(string prompt, IList<Message> history = null,
            GenerationOptions options = null, CancellationToken cancellationToken = default(CancellationToken))
        {
            if (prompt == null) throw new ArgumentNullException(nameof(prompt));
            ThrowIfDisposed();
            return new ChatStream(this, prompt, history, options, false, cancellationToken);
        }

        /// <summary>
        /// Runs one native streaming call on the current thread, feeding <paramref name="sink"/>.
        /// Rethrows an exception the sink threw, after the native call has returned.
        /// </summary>
        internal ChatStats Stream(string prompt, IList<Message> history, GenerationOptions options, IDeltaSink sink)
        {
            using (var request = new NativeRequest(prompt, history, options))
            {
                var holder = new SinkHolder(sink);
                var gc = GCHandle.Alloc(holder);
                bool added = false;
                try
                {
                    AddRef(ref added);
                    ChathubStats stats;
                    var p = request.Params;
                    int status = NativeMethods.chathub_chat_stream(handle.Pointer, request.Prompt, request.History,
                        request.HistoryLength, &p, StreamCallback.Delegate, (void*)GCHandle.ToIntPtr(gc), &stats);
                    Interop.Check(status);
                    if (holder.Failure != null)
                        throw new ChatHubException(ChatHubStatus.Internal,
                            "the streaming consumer failed: " + holder.Failure.Message, holder.Failure);
                    return new ChatStats(stats);
                }
                finally
                {
                    gc.Free();
                    if (added) handle.DangerousRelease();
                }
            }
        }

        void AddRef(ref bool added)
        {
            if (handle.IsClosed) throw new ObjectDisposedException(nameof(ChatModel));
            handle.DangerousAddRef(ref added);
        }

        void ThrowIfDisposed()
        {
            if (handle.IsClosed) throw new ObjectDisposedException(nameof(ChatModel));
        }

        /// <summary>Frees the model once no call is using it.</summary>
        public void Dispose() { handle.Dispose(); }

        sealed class TextSink : IDeltaSink
        {
            readonly CancellationToken token;
            internal readonly StringBuilder Text = new StringBuilder();
            internal TextSink(CancellationToken token) { this.token = token; }
            public bool OnDelta(string delta)
            {
                Text.Append(delta);
                return !token.IsCancellationRequested;
            }
        }
    }
}
