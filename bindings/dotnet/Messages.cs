// Small value types of the ChatHub API: messages, tools, options, results, errors.
// C# 7.2 so that Mono's mcs compiles it (see DESIGN.md): no nullable annotations, records,
// async iterators or local functions.
using System;
using System.Collections.Generic;

namespace ChatHub
{
    /// <summary>One chat message, OpenAI-style. Immutable.</summary>
    public sealed class Message
    {
        static readonly ToolCall[] NoCalls = new ToolCall[0];

        /// <summary>"system", "user", "assistant", "observation" or "tool" (a tool's result).</summary>
        public string Role { get; }

        /// <summary>The text.</summary>
        public string Content { get; }

        /// <summary>The tools an assistant message called (empty otherwise).</summary>
        public IReadOnlyList<ToolCall> ToolCalls { get; }

        /// <summary>For a tool's result, the id of the call it answers (null when unknown).</summary>
        public string ToolCallId { get; }

        /// <summary>A message with a role given as text (checked by the native library).</summary>
        public Message(string role, string content)
            : this(role, content, null, null)
        {
        }

        Message(string role, string content, IReadOnlyList<ToolCall> toolCalls, string toolCallId)
        {
            if (role == null) throw new ArgumentNullException(nameof(role));
            if (content == null) throw new ArgumentNullException(nameof(content));
            Role = role;
            Content = content;
            ToolCalls = toolCalls ?? NoCalls;
            ToolCallId = toolCallId;
        }

        /// <summary>An assistant message that called tools (<paramref name="content"/>: any text
        /// written before the calls).</summary>
        public static Message AssistantToolCalls(IList<ToolCall> calls, string content = "")
        {
            if (calls == null) throw new ArgumentNullException(nameof(calls));
            var copy = new List<ToolCall>(calls);
            if (copy.Contains(null)) throw new ArgumentException("a tool call is null", nameof(calls));
            return new Message("assistant", content, copy.AsReadOnly(), null);
        }

        /// <summary>A tool's result, answering the call <paramref name="toolCallId"/> (OpenAI's
        /// "tool" message; an observation for the model).</summary>
        public static Message Tool(string content, string toolCallId = null)
        {
            return new Message("tool", content, null, toolCallId);
        }

        /// <summary>A user message.</summary>
        public static Message User(string content) { return new Message("user", content); }

        /// <summary>An assistant (model) message.</summary>
        public static Message Assistant(string content) { return new Message("assistant", content); }

        /// <summary>A system prompt (honoured by ChatGLM3).</summary>
        public static Message System(string content) { return new Message("system", content); }

        /// <summary>A tool result (ChatGLM3 tool calling).</summary>
        public static Message Observation(string content) { return new Message("observation", content); }

        /// <inheritdoc/>
        public override string ToString() { return Role + ": " + Content; }
    }

    /// <summary>A function the model may call. Immutable.</summary>
    public sealed class Tool
    {
        /// <summary>The function's name, as the model writes it when calling.</summary>
        public string Name { get; }
        /// <summary>What it does, for the model.</summary>
        public string Description { get; }
        /// <summary>Its parameters as a JSON schema object (JSON text).</summary>
        public string ParametersJson { get; }

        /// <summary>A function tool.</summary>
        public Tool(string name, string description, string parametersJson)
        {
            if (string.IsNullOrEmpty(name)) throw new ArgumentException("a tool needs a name", nameof(name));
            Name = name;
            Description = description ?? "";
            ParametersJson = string.IsNullOrWhiteSpace(parametersJson) ? "{}" : parametersJson;
        }

        /// <summary>OpenAI's {"type": "function", "function": {...}}.</summary>
        internal string ToJson()
        {
            return "{\"type\": \"function\", \"function\": {\"name\": " + Json.Quote(Name) +
                ", \"description\": " + Json.Quote(Description) + ", \"parameters\": " + ParametersJson + "}}";
        }
    }

    /// <summary>A call of a tool by the model, in a reply or in history. Immutable.</summary>
    public sealed class ToolCall
    {
        /// <summary>The call's id (OpenAI's call_...), or null.</summary>
        public string Id { get; }
        /// <summary>The function called.</summary>
        public string Name { get; }
        /// <summary>Its arguments as a JSON object (JSON text).</summary>
        public string ArgumentsJson { get; }

        /// <summary>A call of <paramref name="name"/> with <paramref name="argumentsJson"/>.</summary>
        public ToolCall(string name, string argumentsJson, string id = null)
        {
            if (string.IsNullOrEmpty(name)) throw new ArgumentException("a tool call needs a name", nameof(name));
            Name = name;
            ArgumentsJson = string.IsNullOrWhiteSpace(argumentsJson) ? "{}" : argumentsJson;
            Id = id;
        }

        /// <summary>OpenAI's {"id", "type": "function", "function": {"name", "arguments"}}.</summary>
        internal string ToJson()
        {
            var id = Id == null ? "" : "\"id\": " + Json.Quote(Id) + ", ";
            return "{" + id + "\"type\": \"function\", \"function\": {\"name\": " + Json.Quote(Name) +
                ", \"arguments\": " + Json.Quote(ArgumentsJson) + "}}";
        }
    }

    /// <summary>The shape of a reply, as the official chat() returns it.</summary>
    public enum ReplyKind
    {
        /// <summary>An answer: <see cref="ChatReply.Text"/>.</summary>
        Text = 0,
        /// <summary>A call of one of the request's tools: <see cref="ChatReply.ToolCall"/>.</summary>
        ToolCall = 1,
        /// <summary>A reply with a metadata line but no tools offered: its name and content.</summary>
        Metadata = 2,
    }

    /// <summary>A reply as the official chat() returns it, from <see cref="ChatModel.Generate"/>.</summary>
    public sealed class ChatReply
    {
        internal ChatReply(ReplyKind kind, string text, ToolCall toolCall, string metadataName, string json,
            string rawText, ChatStats stats)
        {
            Kind = kind;
            Text = text;
            ToolCall = toolCall;
            MetadataName = metadataName;
            Json = json;
            RawText = rawText;
            Stats = stats;
        }

        /// <summary>Text, tool call or metadata reply.</summary>
        public ReplyKind Kind { get; }
        /// <summary>An answer's text, or a metadata reply's content; empty for a tool call.</summary>
        public string Text { get; }
        /// <summary>The call, for a tool-call reply (null otherwise).</summary>
        public ToolCall ToolCall { get; }
        /// <summary>A metadata reply's metadata line (null otherwise).</summary>
        public string MetadataName { get; }
        /// <summary>The official chat() value as JSON: a string, or {"name", "parameters"} or
        /// {"name", "content"}.</summary>
        public string Json { get; }
        /// <summary>What the model wrote, metadata line included (for debugging).</summary>
        public string RawText { get; }
        /// <summary>Token counts, finish reason and timings.</summary>
        public ChatStats Stats { get; }
    }

    /// <summary>JSON text for the native library's tool fields.</summary>
    internal static class Json
    {
        /// <summary>A JSON string literal of <paramref name="text"/>.</summary>
        internal static string Quote(string text)
        {
            var sb = new System.Text.StringBuilder(text.Length + 2);
            sb.Append('"');
            foreach (char c in text)
            {
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < ' ') sb.Append("\\u").Append(((int)c).ToString("x4"));
                        else sb.Append(c);
                        break;
                }
            }
            sb.Append('"');
            return sb.ToString();
        }

        /// <summary>A JSON array of the items' JSON.</summary>
        internal static string Array<T>(IEnumerable<T> items, Func<T, string> toJson)
        {
            var parts = new List<string>();
            foreach (var item in items)
            {
                if (item == null) throw new ArgumentException("a list item is null");
                parts.Add(toJson(item));
            }
            return "[" + string.Join(", ", parts) + "]";
        }
    }

    /// <summary>
    /// Generation parameters. Zero (the default) in any number means "the model's default",
    /// exactly as in AIHub's gRPC ChatRequest: MaxLength 8192, TopP 0.8, Temperature 0.8 for ChatGLM.
    /// </summary>
    public sealed class GenerationOptions
    {
        /// <summary>Prompt plus reply tokens (0: model default).</summary>
        public int MaxLength { get; set; }

        /// <summary>Nucleus sampling threshold in (0, 1] (0: model default).</summary>
        public float TopP { get; set; }

        /// <summary>Softmax temperature &gt; 0 (0: model default).</summary>
        public float Temperature { get; set; }

        /// <summary>Sample among the k most likely tokens only (0: no limit).</summary>
        public int TopK { get; set; }

        /// <summary>Repetition penalty (0: off).</summary>
        public float RepetitionPenalty { get; set; }

        /// <summary>At most this many reply tokens (0: limited by MaxLength only).</summary>
        public int MaxNewTokens { get; set; }

        /// <summary>Sampling seed, for reproducible replies (null: random).</summary>
        public ulong? Seed { get; set; }

        /// <summary>Always pick the most likely token (deterministic).</summary>
        public bool Greedy { get; set; }

        /// <summary>Texts that end the reply when it produces one; the text itself is left out
        /// (null or empty: only the model's own stop tokens). Each must be non-empty.</summary>
        public System.Collections.Generic.IReadOnlyList<string> Stop { get; set; }

        /// <summary>Functions the model may call (null or empty: none); its calls come back from
        /// <see cref="ChatModel.Generate"/>.</summary>
        public IReadOnlyList<Tool> Tools { get; set; }

        /// <summary>Who wrote the prompt: null or "user" for a question, "tool" for a tool's
        /// result answering the assistant's last call (the official chat(role="observation");
        /// ChatGLM3 and GLM-4 only).</summary>
        public string PromptRole { get; set; }
    }

    /// <summary>
    /// How to load a model. Immutable: each With... method returns a changed copy. The defaults
    /// are the library's: the family detected from the files, dense f32 weights on the CPU,
    /// 512 MiB of caches kept for multi-turn reuse, the next turn pre-filled in the background.
    /// </summary>
    public sealed class LoadOptions
    {
        /// <summary>Chat format (Auto: detected from the files).</summary>
        public ModelFamily Family { get; private set; }
        /// <summary>Quantized weight format, or None for dense weights.</summary>
        public Quantization Quantization { get; private set; }
        /// <summary>What dense weight matrices are stored in.</summary>
        public WeightType WeightType { get; private set; }
        /// <summary>CPU or an NVIDIA GPU (the native library must be built with CUDA).</summary>
        public ComputeDevice Device { get; private set; }
        /// <summary>Which GPU, counted from 0, when Device is Cuda.</summary>
        public int DeviceOrdinal { get; private set; }
        /// <summary>Bytes of caches kept from finished calls so that a chat's next turn only runs its
        /// new tokens: 0 for the default (512 MiB), negative to turn reuse off.</summary>
        public long PrefixCacheBytes { get; private set; }
        /// <summary>After a reply, run it in the background as the next turn's prompt will hold it,
        /// so the next turn starts at once (default true).</summary>
        public bool WarmNextTurn { get; private set; } = true;
        /// <summary>What conversations' key/value caches store (Default: the compute type, f32 on
        /// a CPU).</summary>
        public KvCacheType KvCacheType { get; private set; }

        /// <summary>The defaults.</summary>
        public static readonly LoadOptions Default = new LoadOptions();

        LoadOptions Copy() { return (LoadOptions)MemberwiseClone(); }

        /// <summary>A copy with another chat format.</summary>
        public LoadOptions WithFamily(ModelFamily family) { var o = Copy(); o.Family = family; return o; }
        /// <summary>A copy with weights quantized at load.</summary>
        public LoadOptions WithQuantization(Quantization quantization) { var o = Copy(); o.Quantization = quantization; return o; }
        /// <summary>A copy with dense weights stored as <paramref name="weightType"/>.</summary>
        public LoadOptions WithWeightType(WeightType weightType) { var o = Copy(); o.WeightType = weightType; return o; }
        /// <summary>A copy computing on GPU number <paramref name="ordinal"/>.</summary>
        public LoadOptions WithCuda(int ordinal = 0)
        {
            if (ordinal < 0) throw new ArgumentOutOfRangeException(nameof(ordinal));
            var o = Copy(); o.Device = ComputeDevice.Cuda; o.DeviceOrdinal = ordinal; return o;
        }
        /// <summary>A copy keeping <paramref name="bytes"/> of caches (0: default, negative: off).</summary>
        public LoadOptions WithPrefixCacheBytes(long bytes) { var o = Copy(); o.PrefixCacheBytes = bytes; return o; }
        /// <summary>A copy with the next-turn pre-fill on or off.</summary>
        public LoadOptions WithWarmNextTurn(bool warm) { var o = Copy(); o.WarmNextTurn = warm; return o; }
        /// <summary>A copy whose conversations cache their keys and values as <paramref name="type"/>.</summary>
        public LoadOptions WithKvCacheType(KvCacheType type) { var o = Copy(); o.KvCacheType = type; return o; }
    }

    /// <summary>What conversations' key/value caches store.</summary>
    public enum KvCacheType
    {
        /// <summary>The compute type (f32 on a CPU).</summary>
        Default = 0,
        /// <summary>32-bit floats: exact.</summary>
        F32 = 1,
        /// <summary>16-bit floats: half the memory per token of a conversation; keys and values
        /// rounded, so replies can differ slightly from F32's.</summary>
        F16 = 2,
    }

    /// <summary>What dense weight matrices are stored in.</summary>
    public enum WeightType
    {
        /// <summary>The library's choice (f32).</summary>
        Default = 0,
        /// <summary>32-bit floats: exact, the most memory.</summary>
        F32 = 1,
        /// <summary>16-bit floats: half the memory and bytes read per token (activations stay
        /// f32 on a CPU).</summary>
        F16 = 2,
        /// <summary>bfloat16: as F16 with f32's range and fewer mantissa bits.</summary>
        BF16 = 3,
    }

    /// <summary>Where a model computes.</summary>
    public enum ComputeDevice
    {
        /// <summary>Every CPU core.</summary>
        Cpu = 0,
        /// <summary>An NVIDIA GPU.</summary>
        Cuda = 1,
    }

    /// <summary>Which chat format a model uses.</summary>
    public enum ModelFamily
    {
        /// <summary>Detect it from the model's files.</summary>
        Auto = 0,
        /// <summary>THUDM/chatglm2-6b.</summary>
        ChatGlm2 = 2,
        /// <summary>THUDM/chatglm3-6b.</summary>
        ChatGlm3 = 3,
        /// <summary>THUDM/glm-4-9b-chat (and its -hf layout) and GLM-4-9B-0414.</summary>
        Glm4 = 4,
    }

    /// <summary>Weight format chosen at load: smaller and faster on a CPU, slightly less exact.</summary>
    public enum Quantization
    {
        /// <summary>Dense weights (f32 on the CPU).</summary>
        None = 0,
        /// <summary>8-bit blocks: nearly lossless, a quarter of f32's memory.</summary>
        Q8_0 = 1,
        /// <summary>4-bit blocks.</summary>
        Q4_0 = 2,
        /// <summary>4-bit k-quant (falls back to Q8_0 for rows it cannot take).</summary>
        Q4K = 3,
    }

    /// <summary>Why a reply ended.</summary>
    public enum FinishReason
    {
        /// <summary>The model said it was done.</summary>
        Stop = 0,
        /// <summary>MaxLength or MaxNewTokens was reached.</summary>
        Length = 1,
        /// <summary>The caller cancelled.</summary>
        Cancelled = 2,
        /// <summary>The reply calls one of the request's tools.</summary>
        ToolCalls = 3,
    }

    /// <summary>What one chat call did.</summary>
    public sealed class ChatStats
    {
        internal ChatStats(ChatHub.Native.ChathubStats s)
        {
            FinishReason = (FinishReason)s.finish_reason;
            PromptTokens = (int)s.prompt_tokens;
            CompletionTokens = (int)s.completion_tokens;
            DroppedHistoryMessages = (int)s.dropped_history_messages;
            TimeToFirstTokenMs = s.ttft_ms;
            PrefillTokensPerSecond = s.prefill_tokens_per_s;
            DecodeTokensPerSecond = s.decode_tokens_per_s;
            TotalMs = s.total_ms;
            CachedPromptTokens = (int)s.cached_prompt_tokens;
            ReplyKind = (ReplyKind)s.reply_kind;
        }

        /// <summary>Why the reply ended.</summary>
        public FinishReason FinishReason { get; }
        /// <summary>Prompt tokens run (after trimming old history).</summary>
        public int PromptTokens { get; }
        /// <summary>Reply tokens generated.</summary>
        public int CompletionTokens { get; }
        /// <summary>History messages left out to fit the context.</summary>
        public int DroppedHistoryMessages { get; }
        /// <summary>Milliseconds until the first reply token.</summary>
        public double TimeToFirstTokenMs { get; }
        /// <summary>Prompt tokens per second.</summary>
        public double PrefillTokensPerSecond { get; }
        /// <summary>Reply tokens per second after the first.</summary>
        public double DecodeTokensPerSecond { get; }
        /// <summary>Milliseconds for the whole call.</summary>
        public double TotalMs { get; }
        /// <summary>Prompt tokens taken from an earlier call's cache (multi-turn reuse).</summary>
        public int CachedPromptTokens { get; }
        /// <summary>Text, tool call or metadata reply.</summary>
        public ReplyKind ReplyKind { get; }
    }

    /// <summary>A reply and what it took.</summary>
    public sealed class ChatResult
    {
        internal ChatResult(string text, ChatStats stats) { Text = text; Stats = stats; }

        /// <summary>The reply.</summary>
        public string Text { get; }
        /// <summary>Token counts, finish reason and timings.</summary>
        public ChatStats Stats { get; }
    }

    /// <summary>Status codes of the native library (CHATHUB_ERR_* in chathub.h).</summary>
    public enum ChatHubStatus
    {
        /// <summary>Success.</summary>
        Ok = 0,
        /// <summary>An argument is invalid (bad number, unknown role, empty prompt, bad UTF-8).</summary>
        InvalidArgument = 2,
        /// <summary>A model file or directory is missing.</summary>
        NotFound = 3,
        /// <summary>The model files are malformed or inconsistent.</summary>
        InvalidModel = 4,
        /// <summary>The prompt does not fit in the context.</summary>
        PromptTooLong = 5,
        /// <summary>The computation failed.</summary>
        Internal = 6,
        /// <summary>A bug in the native library was caught at the boundary.</summary>
        Panic = 7,
    }

    /// <summary>A failure reported by the native library.</summary>
    public sealed class ChatHubException : Exception
    {
        /// <summary>Creates the exception.</summary>
        public ChatHubException(ChatHubStatus status, string message)
            : base(message)
        {
            Status = status;
        }

        /// <summary>Creates the exception with a cause.</summary>
        public ChatHubException(ChatHubStatus status, string message, Exception inner)
            : base(message, inner)
        {
            Status = status;
        }

        /// <summary>The native status code.</summary>
        public ChatHubStatus Status { get; }
    }
}
