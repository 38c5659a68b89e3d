"""Throughput of N concurrent OpenAI-API streams against one, through a running
`chathub serve --http` (or any OpenAI-compatible server).

    python benches/clients/openai_throughput.py --base-url http://127.0.0.1:8000/v1 --streams 4 [--distinct] [--rounds 3]

Each stream asks for the same number of tokens with `ignore_eos` (a vLLM/llama.cpp extension
chathub accepts), so every reply is the same length, and counts them from the usage chunk
(`stream_options.include_usage`): what a model holds back (ChatGLM's metadata line, a tool
call) streams late or never, so chunks are not tokens. Reports, for 1 stream and then N: reply
tokens per second in all, from the release of the streams to the last one's end (prompts
included), and per stream, and the time to the first chunk with text. With `--rounds R`, runs
the pair R times (a VM's speed drifts: do not trust one round) and ends with the medians. Needs
the `openai` package.
"""

import argparse
import statistics
import threading
import time

from openai import OpenAI


def stream_once(client, model, prompt, tokens, zero, out):
    started = time.perf_counter() - zero
    first = None
    completion = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - zero
        if chunk.usage is not None:
            completion = chunk.usage.completion_tokens
    out.append((started, first, time.perf_counter() - zero, completion))


def run(client, model, prompt, tokens, streams, distinct=False):
    zero = time.perf_counter()
    out = []
    # Distinct prompts share no prefix beyond the chat template: users asking different things.
    prompts = [f"{prompt} (user {i})" if distinct else prompt for i in range(streams)]
    threads = [
        threading.Thread(target=stream_once, args=(client, model, p, tokens, zero, out))
        for p in prompts
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(s[3] for s in out)
    aggregate = total / (max(s[2] for s in out) - min(s[0] for s in out))
    per_stream = statistics.median(s[3] / (s[2] - s[0]) for s in out)
    firsts = [s[1] - s[0] for s in out if s[1] is not None]
    first = statistics.median(firsts) * 1e3 if firsts else float("nan")
    return aggregate, per_stream, first


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", default="Tell me a long story about the sea.")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="give each stream its own prompt (no prefix to share between them)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="pairs of runs (then medians)")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    run(client, model, args.prompt, 4, 1)  # warm-up
    rounds = []
    for _ in range(args.rounds):
        one, _, one_ttft = run(client, model, args.prompt, args.tokens, 1)
        many, per_stream, ttft = run(
            client, model, args.prompt, args.tokens, args.streams, args.distinct
        )
        rounds.append((one, many))
        print(f"1 stream: {one:.2f} tokens/s, first text after {one_ttft:.0f} ms")
        print(
            f"{args.streams} streams: {many:.2f} tokens/s in all ({many / one:.2f}x), "
            f"{per_stream:.2f} per stream, first text after {ttft:.0f} ms (median)"
        )
    if args.rounds > 1:
        one = statistics.median(r[0] for r in rounds)
        many = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[1] / r[0] for r in rounds)
        print(
            f"medians of {args.rounds} rounds: 1 stream {one:.2f}, {args.streams} streams "
            f"{many:.2f} tokens/s in all, {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
