#!/usr/bin/env python3
"""chathub against llama.cpp on the same synthetic model, interleaved: in every round and mode,
`chathub bench` and `llama-bench` run back to back, so both see the same swings of this
machine's memory bandwidth (each chathub run reports the bandwidth its probe measured).

    python run_llamacpp.py --chathub PATH/TO/chathub --llama-bench PATH/TO/llama-bench \
        --gguf-dir DIR [--model /tmp/chathub-bench-785m-v2] [--rounds 3] [--modes f16,q8_0,q4_0]

DIR holds `bench-MODE.gguf` for each mode (see README.md here). A mode with `+q8out` (e.g.
`q4_0+q8out`) runs chathub as the plain mode and llama.cpp on `bench-q4_0+q8out.gguf`, its file
with the output layer in q8_0 as chathub keeps it (`llama-quantize --output-tensor-type q8_0`),
so both read the same bytes per token. Prints
one JSON line per run and then a table of medians per mode: prefill tokens/s at 32 and 512
tokens and decode tokens/s, llama.cpp / chathub, with the ratio of each same-round pair.
Both use 2 threads and generate 32 tokens.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def chathub(args, mode: str, prompt: int) -> dict:
    mode = mode.split("+")[0]
    flags = ["--dtype", "f16"] if mode == "f16" else ["--quant", mode]
    cmd = [args.chathub, "bench", "--model", str(args.model), "--json", "--runs", "3",
           "--turns", "0", "--gen-tokens", "32", "--prompt-tokens", str(prompt), *flags]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def llama(args, mode: str) -> dict:
    cmd = [args.llama_bench, "-m", str(args.gguf_dir / f"bench-{mode}.gguf"), "-t", "2",
           "-p", "32,512", "-n", "32", "-r", "3", "-o", "json"]
    runs = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    result = {}
    for run in runs:
        key = f"prefill_{run['n_prompt']}" if run["n_prompt"] else "decode"
        result[key] = run["avg_ts"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chathub", required=True)
    parser.add_argument("--llama-bench", required=True)
    parser.add_argument("--gguf-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("/tmp/chathub-bench-785m-v2"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="f16,q8_0,q4_0")
    args = parser.parse_args()
    modes = args.modes.split(",")
    pairs = {mode: [] for mode in modes}
    for round_ in range(1, args.rounds + 1):
        for mode in modes:
            short = chathub(args, mode, 32)
            long = chathub(args, mode, 512)
            ours = {
                "prefill_32": short["prefill_tokens_per_s"],
                "prefill_512": long["prefill_tokens_per_s"],
                "decode": statistics.median(
                    [short["decode_tokens_per_s"], long["decode_tokens_per_s"]]),
                "bandwidth_gb_s": short["machine_read_gb_per_s"],
            }
            theirs = llama(args, mode)
            pairs[mode].append((theirs, ours))
            line = {"round": round_, "mode": mode, "llama_cpp": theirs, "chathub": ours}
            print(json.dumps(line), flush=True)
    print()
    print("| mode | metric | llama.cpp | chathub | chathub / llama.cpp (same-round pairs) |")
    print("|---|---|---|---|---|")
    for mode in modes:
        for metric in ["decode", "prefill_32", "prefill_512"]:
            theirs = [t[metric] for t, _ in pairs[mode]]
            ours = [o[metric] for _, o in pairs[mode]]
            ratios = sorted(o / t for t, o in zip(theirs, ours))
            print(f"| {mode} | {metric} | {statistics.median(theirs):.1f} | "
                  f"{statistics.median(ours):.1f} | "
                  + ", ".join(f"{r:.2f}" for r in ratios) + " |")
    bandwidth = [o["bandwidth_gb_s"] for m in modes for _, o in pairs[m]]
    print(f"\nbandwidth probe: {min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s", file=sys.stderr)


if __name__ == "__main__":
    main()
