// Tests of the C# wrapper against the real native library and the reference fixtures.
// Compiled with mcs and run on Mono and on CoreCLR by .ci/run (bindings/dotnet/run-tests.sh).
//
// Usage: ChatHubTests.exe FIXTURES_DIR CONV1_TEXT CONV2_TEXT GLM4_TEXT META_NAME META_CONTENT [SOAK_CALLS]
// CONV1_TEXT and CONV2_TEXT are the official replies of expected/chatglm2_conv4_zh.json and
// expected/chatglm3_conv2_zh.json, GLM4_TEXT the official greedy decode of
// glm4/expected/glm4_hf_user_only_en.json, META_NAME and META_CONTENT the official chat() value
// of expected/chatglm3_conv1_en.json (a metadata reply).
using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using ChatHub;

static class ChatHubTests
{
    static string fixtures, conv1Text, conv2Text, glm4Text, metaName, metaContent;
    static int soakCalls = 2000;
    static ChatModel model;

    // chatglm2_conv4_zh, on the ChatGLM2 fixture: a text reply that streams token by token.
    static readonly List<Message> Conv1History = new List<Message>
    {
        Message.User("你好"),
        Message.Assistant("你好👋！我是人工智能助手，很高兴见到你，欢迎问我任何问题。"),
    };
    const string Conv1Prompt = "晚上睡不着应该怎么办？";

    static GenerationOptions Greedy(int n)
    {
        return new GenerationOptions { Greedy = true, MaxNewTokens = n };
    }

    static void Assert(bool condition, string what)
    {
        if (!condition) throw new Exception("assertion failed: " + what);
    }

    static void Equal<T>(T expected, T actual, string what)
    {
        if (!EqualityComparer<T>.Default.Equals(expected, actual))
            throw new Exception(what + ": expected <" + expected + "> but got <" + actual + ">");
    }

    static T Throws<T>(Action action, string what) where T : Exception
    {
        try
        {
            action();
        }
        catch (T e)
        {
            return e;
        }
        catch (AggregateException e)
        {
            var inner = e.Flatten().InnerExceptions.OfType<T>().FirstOrDefault();
            if (inner != null) return inner;
            throw new Exception(what + ": expected " + typeof(T).Name + " but got " + e);
        }
        catch (Exception e)
        {
            throw new Exception(what + ": expected " + typeof(T).Name + " but got " + e.GetType().Name + ": " + e.Message);
        }
        throw new Exception(what + ": expected " + typeof(T).Name + " but nothing was thrown");
    }

    /// <summary>Drains an async stream the way `await foreach` does, optionally stopping early.</summary>
    static List<string> Collect(IAsyncEnumerable<string> stream, int stopAfter, out ChatStreamEnumerator enumerator)
    {
        var items = new List<string>();
        var e = stream.GetAsyncEnumerator();
        enumerator = e as ChatStreamEnumerator;
        try
        {
            while (e.MoveNextAsync().AsTask().GetAwaiter().GetResult())
            {
                items.Add(e.Current);
                if (stopAfter > 0 && items.Count == stopAfter) break;
            }
        }
        finally
        {
            e.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
        return items;
    }

    static long RssBytes()
    {
        foreach (var line in File.ReadAllLines("/proc/self/status"))
            if (line.StartsWith("VmRSS:"))
                return long.Parse(line.Split(new[] { ' ', '\t' }, StringSplitOptions.RemoveEmptyEntries)[1]) * 1024;
        return 0;
    }

    // ---- tests ------------------------------------------------------------------------------

    static void NativeVersionIsReported()
    {
        Assert(!string.IsNullOrEmpty(ChatModel.NativeVersion), "version string");
    }

    static void ChatReproducesTheReference()
    {
        var result = model.ChatWithStats(Conv1Prompt, Conv1History, Greedy(20));
        Equal(conv1Text, result.Text, "greedy reply");
        Equal(60, result.Stats.PromptTokens, "prompt tokens");
        Equal(20, result.Stats.CompletionTokens, "completion tokens");
        Equal(FinishReason.Length, result.Stats.FinishReason, "finish reason");
        var again = model.ChatWithStats(Conv1Prompt, Conv1History, Greedy(20));
        Equal(conv1Text, again.Text, "repeated chat");
        Assert(again.Stats.CachedPromptTokens > 0, "the repeated prompt reuses the cached prefix");
    }

    static void ChineseAndEmojiRoundTrip()
    {
        // chatglm3_conv2_zh: Chinese text and an emoji in the history.
        var history = new List<Message>
        {
            Message.System("你是一个人工智能助手，请用中文回答问题。"),
            Message.User("你好"),
            Message.Assistant("你好👋！我是人工智能助手，很高兴见到你，欢迎问我任何问题。"),
        };
        const string prompt = "晚上睡不着应该怎么办？";
        using (var glm3 = ChatModel.Load(Path.Combine(fixtures, "chatglm3-tiny")))
        {
            var result = glm3.ChatWithStats(prompt, history, Greedy(20));
            Equal(55, result.Stats.PromptTokens, "prompt tokens (UTF-8 reached the tokenizer intact)");
            Equal(conv2Text, result.Text, "greedy reply");
            var deltas = Collect(glm3.StreamingChatDeltas(prompt, history, Greedy(20)), 0, out _);
            Equal(conv2Text, string.Concat(deltas), "streamed deltas");
        }
    }

    static void StreamingIsCumulativeLikeTheGrpcServer()
    {
        ChatStreamEnumerator e;
        var items = Collect(model.StreamingChat(Conv1Prompt, Conv1History, Greedy(20)), 0, out e);
        Assert(items.Count > 1, "several items");
        for (int i = 1; i < items.Count; i++)
            Assert(items[i].StartsWith(items[i - 1], StringComparison.Ordinal), "item " + i + " extends the previous");
        Equal(conv1Text, items[items.Count - 1], "last item is the whole reply");
        Equal(FinishReason.Length, e.Stats.FinishReason, "stats after the end");
    }

    static void DeltasAddUpToTheReply()
    {
        var deltas = Collect(model.StreamingChatDeltas(Conv1Prompt, Conv1History, Greedy(20)), 0, out _);
        Equal(conv1Text, string.Concat(deltas), "deltas");
    }

    static void BreakingOutOfTheLoopStopsGeneration()
    {
        ChatStreamEnumerator e;
        var items = Collect(model.StreamingChatDeltas(Conv1Prompt, Conv1History, Greedy(200)), 2, out e);
        Equal(2, items.Count, "items before break");
        Equal(FinishReason.Cancelled, e.Stats.FinishReason, "native generation was cancelled");
        Assert(e.Stats.CompletionTokens < 2 + 64 + 2, "stopped within the queue bound: " + e.Stats.CompletionTokens);
        Assert(e.Stats.CompletionTokens < 200, "did not run to the end");
    }

    static void CancellingTheTokenStopsGeneration()
    {
        var cts = new CancellationTokenSource();
        var stream = model.StreamingChatDeltas(Conv1Prompt, Conv1History, Greedy(200), cts.Token);
        var e = (ChatStreamEnumerator)stream.GetAsyncEnumerator();
        int n = 0;
        Throws<OperationCanceledException>(() =>
        {
            while (e.MoveNextAsync().AsTask().GetAwaiter().GetResult())
            {
                if (++n == 3) cts.Cancel();
            }
        }, "MoveNextAsync after Cancel");
        e.DisposeAsync().AsTask().GetAwaiter().GetResult();
        Equal(FinishReason.Cancelled, e.Stats.FinishReason, "native generation was cancelled");
        Assert(e.Stats.CompletionTokens < 200, "stopped early: " + e.Stats.CompletionTokens);

        var cts2 = new CancellationTokenSource();
        cts2.Cancel();
        Throws<OperationCanceledException>(() => model.ChatAsync(Conv1Prompt, Conv1History, Greedy(200), cts2.Token).GetAwaiter().GetResult(),
            "ChatAsync with a cancelled token");
        // The model is fine afterwards.
        Equal(conv1Text, model.ChatAsync(Conv1Prompt, Conv1History, Greedy(20)).GetAwaiter().GetResult(), "ChatAsync");
    }

    static void ChatGlm2HistoryRule()
    {
        using (var glm2 = ChatModel.Load(Path.Combine(fixtures, "chatglm2-tiny")))
        {
            // chatglm2_system_consecutive_users: system skipped, two users joined.
            var history = new List<Message>
            {
                Message.System("You are a helpful assistant."),
                Message.User("我想学习编程。"),
                Message.User("Which language should I start with?"),
                Message.Assistant("Python is a good first language. 它简单易学。"),
            };
            var result = glm2.ChatWithStats("那 Rust 呢？", history, Greedy(3));
            Equal(102, result.Stats.PromptTokens, "prompt tokens");
        }
    }

    static void QuantizedModelsLoad()
    {
        using (var q8 = ChatModel.Load(Path.Combine(fixtures, "chatglm2-tiny"), ModelFamily.Auto, Quantization.Q8_0))
        {
            var result = q8.ChatWithStats(Conv1Prompt, Conv1History, Greedy(5));
            Equal(60, result.Stats.PromptTokens, "prompt tokens");
            Equal(5, result.Stats.CompletionTokens, "completion tokens");
        }
        var bad = Throws<ChatHubException>(() => ChatModel.Load(Path.Combine(fixtures, "chatglm3-tiny"), ModelFamily.Auto, (Quantization)9), "bad quantization");
        Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
    }

    static void LoadOptionsReachTheLibrary()
    {
        var dir = Path.Combine(fixtures, "chatglm2-tiny");
        using (var half = ChatModel.Load(dir, LoadOptions.Default.WithWeightType(WeightType.F16)))
        {
            Equal(conv1Text, half.Chat(Conv1Prompt, Conv1History, Greedy(20)), "f16 greedy reply");
        }
        using (var noReuse = ChatModel.Load(dir, LoadOptions.Default.WithPrefixCacheBytes(-1).WithWarmNextTurn(false)))
        {
            for (int i = 0; i < 2; i++)
            {
                var result = noReuse.ChatWithStats(Conv1Prompt, Conv1History, Greedy(20));
                Equal(conv1Text, result.Text, "reply without reuse");
                Equal(0, result.Stats.CachedPromptTokens, "cached tokens without reuse");
            }
        }
        using (var halfCache = ChatModel.Load(dir, LoadOptions.Default.WithKvCacheType(KvCacheType.F16)))
        {
            Equal(conv1Text, halfCache.Chat(Conv1Prompt, Conv1History, Greedy(20)), "f16 cache greedy reply");
        }
        var badCache = Throws<ChatHubException>(() => ChatModel.Load(dir, LoadOptions.Default.WithKvCacheType((KvCacheType)3)), "bad cache type");
        Equal(ChatHubStatus.InvalidArgument, badCache.Status, "status");
        Assert(badCache.Message.Contains("kv_cache_dtype"), "message names the option: " + badCache.Message);
        var bad = Throws<ChatHubException>(() => ChatModel.Load(dir, LoadOptions.Default.WithWeightType((WeightType)9)), "bad weight type");
        Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
        Assert(bad.Message.Contains("dtype"), "message names the option: " + bad.Message);
        try
        {
            ChatModel.Load(dir, LoadOptions.Default.WithCuda()).Dispose();
        }
        catch (ChatHubException e)
        {
            // A library built without CUDA, or no GPU here: said plainly.
            Equal(ChatHubStatus.InvalidArgument, e.Status, "status without a GPU");
            Assert(e.Message.Contains("CUDA"), "message names CUDA: " + e.Message);
        }
    }

    static void StopStringsEndTheReply()
    {
        var options = Greedy(20);
        options.Stop = new[] { "not in the reply", "晚上睡" };
        var result = model.ChatWithStats(Conv1Prompt, Conv1History, options);
        Equal(conv1Text.Substring(0, conv1Text.IndexOf("晚上睡", StringComparison.Ordinal)), result.Text, "reply before the stop text");
        Equal(FinishReason.Stop, result.Stats.FinishReason, "finish reason");
        options.Stop = new[] { "" };
        var bad = Throws<ChatHubException>(() => model.Chat(Conv1Prompt, Conv1History, options), "empty stop text");
        Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
    }

    static void RepliesAreTheOfficialValue()
    {
        using (var glm3 = ChatModel.Load(Path.Combine(fixtures, "chatglm3-tiny")))
        {
            // chatglm3_conv1_en: the reply's first line is metadata, so chat() returns a dict.
            var history = new List<Message>
            {
                Message.System("You are a helpful assistant."),
                Message.User("Hello! How are you today?"),
                Message.Assistant("I am fine, thank you. What can I do for you?"),
            };
            var reply = glm3.Generate("What is the capital of France?", history, Greedy(20));
            Equal(ReplyKind.Metadata, reply.Kind, "kind");
            Equal(metaName, reply.MetadataName, "metadata line");
            Equal(metaContent, reply.Text, "content");
            Assert(reply.ToolCall == null, "no tool call");
            Assert(reply.Json.Contains("\"name\"") && reply.Json.Contains("\"content\""), "json " + reply.Json);
            Assert(reply.RawText.StartsWith(metaName + "\n"), "raw text " + reply.RawText);
            Equal(ReplyKind.Metadata, reply.Stats.ReplyKind, "stats kind");
            Equal("", glm3.Chat("What is the capital of France?", history, Greedy(20)), "Chat shows no text of it");
        }
    }

    static void ToolsReachThePrompt()
    {
        // expected_tools/chatglm3_tools_*: THUDM's OpenAI demo's prompts (970 and 1011 tokens).
        var tools = new[]
        {
            new Tool("get_weather", "查询城市的实时天气",
                "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\", \"description\": \"城市名\"}, " +
                "\"unit\": {\"type\": \"string\", \"enum\": [\"c\", \"f\"]}}, \"required\": [\"city\"]}"),
            new Tool("add", "Add two integers",
                "{\"type\": \"object\", \"properties\": {\"a\": {\"type\": \"integer\"}, \"b\": {\"type\": \"integer\"}}, " +
                "\"required\": [\"a\", \"b\"]}"),
        };
        var options = Greedy(1);
        options.Tools = tools;
        using (var glm3 = ChatModel.Load(Path.Combine(fixtures, "chatglm3-tiny")))
        {
            Equal(970, glm3.Generate("北京今天天气怎么样？", null, options).Stats.PromptTokens, "tools, no history");
            var history = new List<Message>
            {
                Message.System("You are a careful assistant."),
                Message.User("What is 2 + 40?"),
                Message.AssistantToolCalls(new[] { new ToolCall("add", "{\"a\": 2, \"b\": 40}", "call_1") }),
                Message.Tool("{\"result\": 42}", "call_1"),
            };
            Equal(1011, glm3.Generate("Thanks. And the weather in Paris, in f?", history, options).Stats.PromptTokens,
                "a past call and its result");
            // The result as the new message: the fixture's prompt up to its next <|user|> turn
            // (position 988), then <|assistant|>.
            options.PromptRole = "tool";
            Equal(989, glm3.Generate("{\"result\": 42}", history.GetRange(0, 3), options).Stats.PromptTokens,
                "a tool's result as the new message");
            options.PromptRole = "robot";
            var role = Throws<ChatHubException>(() => glm3.Generate("hi", null, options), "unknown prompt role");
            Assert(role.Message.Contains("prompt_role"), "message names the field: " + role.Message);
            options.PromptRole = null;
            options.Tools = new[] { new Tool("broken", "", "{not json") };
            var bad = Throws<ChatHubException>(() => glm3.Generate("hi", null, options), "bad parameters JSON");
            Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
            Assert(bad.Message.Contains("tools_json"), "message names the field: " + bad.Message);
        }
        Throws<ArgumentException>(() => new Tool("", "x", "{}"), "a tool needs a name");
    }

    static void Glm4RoundTrip()
    {
        using (var glm4 = ChatModel.Load(Path.Combine(fixtures, "glm4", "glm4-hf-tiny"), ModelFamily.Glm4))
        {
            var reply = glm4.Generate("What is the capital of France?", null, Greedy(20));
            Equal(12, reply.Stats.PromptTokens, "prompt tokens");
            Equal(20, reply.Stats.CompletionTokens, "completion tokens");
            Equal(glm4Text, reply.RawText, "greedy decode");
        }
    }

    static void BadInputGivesClearErrors()
    {
        Throws<DirectoryNotFoundException>(() => ChatModel.Load("/no/such/model"), "missing directory");
        var empty = Path.Combine(Path.GetTempPath(), "chathub-empty-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(empty);
        try
        {
            var e = Throws<ChatHubException>(() => ChatModel.Load(empty), "directory without a model");
            Equal(ChatHubStatus.NotFound, e.Status, "status");
            Assert(e.Message.Contains("config.json"), e.Message);
        }
        finally
        {
            Directory.Delete(empty);
        }
        Throws<ArgumentNullException>(() => model.Chat(null), "null prompt");
        Throws<ArgumentNullException>(() => Message.User(null), "null content");
        var bad = Throws<ChatHubException>(() => model.Chat("hi", null, new GenerationOptions { TopP = 1.5f }), "top_p");
        Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
        Assert(bad.Message.Contains("top_p"), bad.Message);
        bad = Throws<ChatHubException>(() => model.Chat("hi", null, new GenerationOptions { MaxLength = -1 }), "max_length");
        Assert(bad.Message.Contains("max_length"), bad.Message);
        bad = Throws<ChatHubException>(() => model.Chat("hi", null, new GenerationOptions { Temperature = float.NaN }), "NaN");
        Assert(bad.Message.Contains("temperature"), bad.Message);
        bad = Throws<ChatHubException>(() => model.Chat("hi", new[] { new Message("wizard", "x") }), "role");
        Assert(bad.Message.Contains("wizard"), bad.Message);
        bad = Throws<ChatHubException>(() => model.Chat(""), "empty prompt");
        Equal(ChatHubStatus.InvalidArgument, bad.Status, "status");
        bad = Throws<ChatHubException>(() => model.Chat("hi", null, new GenerationOptions { MaxLength = 4 }), "too long");
        Equal(ChatHubStatus.PromptTooLong, bad.Status, "status");
        // Errors from the stream surface from MoveNextAsync.
        Throws<ChatHubException>(() => Collect(model.StreamingChat("hi", null, new GenerationOptions { TopP = 2 }), 0, out _), "stream error");

        var disposed = ChatModel.LoadDemo();
        Assert(disposed.Chat("hi", null, Greedy(2)) != null, "demo chats");
        disposed.Dispose();
        disposed.Dispose();
        Throws<ObjectDisposedException>(() => disposed.Chat("hi"), "use after Dispose");
        Throws<ObjectDisposedException>(() => disposed.StreamingChat("hi"), "stream after Dispose");
    }

    static void ManyThreadsShareOneModel()
    {
        var tasks = Enumerable.Range(0, 6)
            .Select(i => Task.Run(() => model.Chat(Conv1Prompt, Conv1History, Greedy(20))))
            .ToArray();
        Task.WaitAll(tasks);
        foreach (var t in tasks) Equal(conv1Text, t.Result, "thread reply");
    }

    static void SoakKeepsMemoryFlat()
    {
        var options = Greedy(1);
        var history = new List<Message> { Message.User("你好"), Message.Assistant("你好👋") };
        for (int i = 0; i < 200; i++) model.Chat("warm up", history, options);
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long managedBefore = GC.GetTotalMemory(true);
        long before = RssBytes();
        var watch = System.Diagnostics.Stopwatch.StartNew();
        for (int i = 0; i < soakCalls; i++)
        {
            model.Chat("soak " + i, history, options);
            if (i % 4 == 0) Collect(model.StreamingChatDeltas("stream " + i, history, options), 0, out _);
        }
        GC.Collect();
        GC.WaitForPendingFinalizers();
        long managedAfter = GC.GetTotalMemory(true);
        long after = RssBytes();
        Console.WriteLine("  soak: {0} chat + {1} streaming calls in {2:F1} s, RSS {3:F1} MB -> {4:F1} MB, managed heap {5:F1} MB -> {6:F1} MB",
            soakCalls, (soakCalls + 3) / 4, watch.Elapsed.TotalSeconds, before / 1e6, after / 1e6,
            managedBefore / 1e6, managedAfter / 1e6);
        Assert(after - before < 32L * 1024 * 1024, "RSS grew by " + (after - before) / 1e6 + " MB");
    }

    // ---- runner -----------------------------------------------------------------------------

    static int Main(string[] args)
    {
        Console.OutputEncoding = new UTF8Encoding(false);
        if (args.Length < 6)
        {
            Console.Error.WriteLine("usage: ChatHubTests.exe FIXTURES_DIR CONV1_TEXT CONV2_TEXT GLM4_TEXT META_NAME META_CONTENT [SOAK_CALLS]");
            return 2;
        }
        fixtures = args[0];
        conv1Text = args[1];
        conv2Text = args[2];
        glm4Text = args[3];
        metaName = args[4];
        metaContent = args[5];
        if (args.Length > 6) soakCalls = int.Parse(args[6]);

        var tests = new List<KeyValuePair<string, Action>>
        {
            new KeyValuePair<string, Action>("NativeVersionIsReported", NativeVersionIsReported),
            new KeyValuePair<string, Action>("ChatReproducesTheReference", ChatReproducesTheReference),
            new KeyValuePair<string, Action>("ChineseAndEmojiRoundTrip", ChineseAndEmojiRoundTrip),
            new KeyValuePair<string, Action>("StreamingIsCumulativeLikeTheGrpcServer", StreamingIsCumulativeLikeTheGrpcServer),
            new KeyValuePair<string, Action>("DeltasAddUpToTheReply", DeltasAddUpToTheReply),
            new KeyValuePair<string, Action>("BreakingOutOfTheLoopStopsGeneration", BreakingOutOfTheLoopStopsGeneration),
            new KeyValuePair<string, Action>("CancellingTheTokenStopsGeneration", CancellingTheTokenStopsGeneration),
            new KeyValuePair<string, Action>("ChatGlm2HistoryRule", ChatGlm2HistoryRule),
            new KeyValuePair<string, Action>("QuantizedModelsLoad", QuantizedModelsLoad),
            new KeyValuePair<string, Action>("LoadOptionsReachTheLibrary", LoadOptionsReachTheLibrary),
            new KeyValuePair<string, Action>("StopStringsEndTheReply", StopStringsEndTheReply),
            new KeyValuePair<string, Action>("RepliesAreTheOfficialValue", RepliesAreTheOfficialValue),
            new KeyValuePair<string, Action>("ToolsReachThePrompt", ToolsReachThePrompt),
            new KeyValuePair<string, Action>("Glm4RoundTrip", Glm4RoundTrip),
            new KeyValuePair<string, Action>("BadInputGivesClearErrors", BadInputGivesClearErrors),
            new KeyValuePair<string, Action>("ManyThreadsShareOneModel", ManyThreadsShareOneModel),
            new KeyValuePair<string, Action>("SoakKeepsMemoryFlat", SoakKeepsMemoryFlat),
        };
        int passed = 0, failed = 0;
        try
        {
            model = ChatModel.Load(Path.Combine(fixtures, "chatglm2-tiny"));
        }
        catch (Exception e)
        {
            Console.WriteLine("cannot load the fixture model: " + e);
            Console.WriteLine("0 passed, " + tests.Count + " failed");
            return 1;
        }
        foreach (var test in tests)
        {
            try
            {
                test.Value();
                passed++;
                Console.WriteLine("ok   " + test.Key);
            }
            catch (Exception e)
            {
                failed++;
                Console.WriteLine("FAIL " + test.Key + ": " + e);
            }
        }
        model.Dispose();
        Console.WriteLine(passed + " passed, " + failed + " failed");
        return failed == 0 ? 0 : 1;
    }
}
