// An AIHub-style console chat on the ChatHub wrapper: load a model (or the demo), keep a
// List<Message> history, stream each reply as it arrives, Ctrl+C cancels the current reply.
//
// Usage: ChatHubSample [MODEL_DIR]   (no directory: the built-in demo model, meaningless text)
// Written in C# 7.2 so CI compiles it with Mono's mcs; on .NET 8 the loop reads
//   await foreach (var delta in model.StreamingChatDeltas(line, history, options, cts.Token)) ...
using System;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using ChatHub;

static class Program
{
    static int Main(string[] args)
    {
        Console.OutputEncoding = new UTF8Encoding(false);
        return RunAsync(args).GetAwaiter().GetResult();
    }

    static async Task<int> RunAsync(string[] args)
    {
        string modelDir = args.Length > 0 ? args[0] : Environment.GetEnvironmentVariable("CHATHUB_MODEL");
        ChatModel model;
        try
        {
            if (string.IsNullOrEmpty(modelDir))
            {
                Console.Error.WriteLine("No model directory given: using the built-in demo model " +
                                        "(random weights, its replies are meaningless).");
                model = ChatModel.LoadDemo();
            }
            else
            {
                model = ChatModel.Load(modelDir);
            }
        }
        catch (Exception e)
        {
            Console.Error.WriteLine("Could not load the model: " + e.Message);
            return 1;
        }

        // The values AIHub's GetRequest sends to its gRPC backend.
        var options = new GenerationOptions { MaxLength = 2048, TopP = 0.75f, Temperature = 0.95f };
        int maxNew;
        if (int.TryParse(Environment.GetEnvironmentVariable("CHATHUB_MAX_NEW_TOKENS"), out maxNew))
            options.MaxNewTokens = maxNew;

        var history = new List<Message>();
        CancellationTokenSource current = null;
        Console.CancelKeyPress += (sender, e) =>
        {
            var reply = current;
            if (reply != null)
            {
                e.Cancel = true; // keep the program, stop the reply
                reply.Cancel();
            }
        };

        using (model)
        {
            Console.Error.WriteLine("chathub " + ChatModel.NativeVersion + ": type a message, /reset clears the history, /exit quits.");
            while (true)
            {
                Console.Write("> ");
                string line = Console.ReadLine();
                if (line == null || line == "/exit") break;
                if (line.Trim().Length == 0) continue;
                if (line == "/reset")
                {
                    history.Clear();
                    continue;
                }

                current = new CancellationTokenSource();
                var reply = new StringBuilder();
                var stream = model.StreamingChatDeltas(line, history, options, current.Token).GetAsyncEnumerator();
                try
                {
                    while (await stream.MoveNextAsync())
                    {
                        Console.Write(stream.Current);
                        reply.Append(stream.Current);
                    }
                }
                catch (OperationCanceledException)
                {
                    Console.Write(" [cancelled]");
                }
                catch (ChatHubException e)
                {
                    Console.Error.WriteLine("error: " + e.Message);
                    continue;
                }
                finally
                {
                    await stream.DisposeAsync();
                    current = null;
                }
                Console.WriteLine();
                history.Add(Message.User(line));
                history.Add(Message.Assistant(reply.ToString()));
            }
        }
        return 0;
    }
}
