// Streaming replies as IAsyncEnumerable<string>, written out by hand: C# 7.2 has no async
// iterators. The native call runs on its own thread and feeds a bounded queue; MoveNextAsync
// awaits the next item. .NET 8 callers simply `await foreach` over it.
using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace ChatHub
{
    internal sealed class ChatStream : IAsyncEnumerable<string>
    {
        readonly ChatModel model;
        readonly string prompt;
        readonly IList<Message> history;
        readonly GenerationOptions options;
        readonly bool cumulative;
        readonly CancellationToken token;

        internal ChatStream(ChatModel model, string prompt, IList<Message> history, GenerationOptions options,
            bool cumulative, CancellationToken token)
        {
            this.model = model;
            this.prompt = prompt;
            // A snapshot, so the caller may keep editing its list while the reply streams.
            this.history = history == null ? null : new List<Message>(history);
            this.options = options;
            this.cumulative = cumulative;
            this.token = token;
        }

        public IAsyncEnumerator<string> GetAsyncEnumerator(CancellationToken cancellationToken = default(CancellationToken))
        {
            return new ChatStreamEnumerator(model, prompt, history, options, cumulative, token, cancellationToken);
        }
    }

    /// <summary>
    /// The enumerator behind <see cref="ChatModel.StreamingChat"/>. Besides the items, it reports
    /// the call's <see cref="Stats"/> once the stream has ended or been disposed.
    /// </summary>
    public sealed class ChatStreamEnumerator : IAsyncEnumerator<string>, IDeltaSink
    {
        /// <summary>Deltas the generating thread may run ahead of the consumer.</summary>
        const int Capacity = 64;

        readonly ChatModel model;
        readonly string prompt;
        readonly IList<Message> history;
        readonly GenerationOptions options;
        readonly bool cumulative;
        readonly CancellationTokenSource linked;
        readonly CancellationToken token;
        readonly ConcurrentQueue<string> queue = new ConcurrentQueue<string>();
        readonly SemaphoreSlim items = new SemaphoreSlim(0);
        readonly SemaphoreSlim space = new SemaphoreSlim(Capacity);
        readonly StringBuilder soFar = new StringBuilder();
        CancellationTokenRegistration registration;
        Task producer;
        volatile bool stopRequested;
        Exception failure;
        bool ended;

        internal ChatStreamEnumerator(ChatModel model, string prompt, IList<Message> history, GenerationOptions options,
            bool cumulative, CancellationToken first, CancellationToken second)
        {
            this.model = model;
            this.prompt = prompt;
            this.history = history;
            this.options = options;
            this.cumulative = cumulative;
            linked = CancellationTokenSource.CreateLinkedTokenSource(first, second);
            token = linked.Token;
        }

        /// <summary>The current item: the whole text so far, or the latest delta.</summary>
        public string Current { get; private set; }

        /// <summary>Finish reason, token counts and timings; null until the stream has ended.</summary>
        public ChatStats Stats { get; private set; }

        /// <summary>Waits for the next piece of the reply.</summary>
        /// <exception cref="OperationCanceledException">The token was cancelled.</exception>
        public ValueTask<bool> MoveNextAsync()
        {
            return new ValueTask<bool>(MoveNextCore());
        }

        async Task<bool> MoveNextCore()
        {
            if (ended) return false;
            if (producer == null) Start();
            await items.WaitAsync(token).ConfigureAwait(false);
            string item;
            queue.TryDequeue(out item);
            space.Release();
            if (item == null)
            {
                ended = true;
                await producer.ConfigureAwait(false);
                if (failure != null) throw failure;
                return false;
            }
            if (cumulative)
            {
                soFar.Append(item);
                Current = soFar.ToString();
            }
            else
            {
                Current = item;
            }
            return true;
        }

        void Start()
        {
            token.ThrowIfCancellationRequested();
            registration = token.Register(() => stopRequested = true);
            // A pool thread, not a new thread per reply: the pool reuses its threads, where
            // creating one per call grew CoreCLR's RSS by about 4 KB a call in the soak test.
            producer = Task.Run((Action)Produce);
        }

        void Produce()
        {
            try
            {
                Stats = model.Stream(prompt, history, options, this);
            }
            catch (Exception e)
            {
                failure = e;
            }
            finally
            {
                // The end marker needs no room: it must get through even if nobody reads.
                queue.Enqueue(null);
                items.Release();
            }
        }

        /// <summary>Called on the generating thread for every delta; false stops generation.</summary>
        bool IDeltaSink.OnDelta(string delta)
        {
            if (delta.Length == 0) return !stopRequested;
            while (!space.Wait(50))
            {
                if (stopRequested) return false;
            }
            if (stopRequested) return false;
            queue.Enqueue(delta);
            items.Release();
            return true;
        }

        /// <summary>Stops generation (within one token) and waits for the native call to return.</summary>
        public ValueTask DisposeAsync()
        {
            stopRequested = true;
            return new ValueTask(DisposeCore());
        }

        async Task DisposeCore()
        {
            if (producer != null)
            {
                try
                {
                    await producer.ConfigureAwait(false);
                }
                finally
                {
                    registration.Dispose();
                }
            }
            linked.Dispose();
        }
    }
}
