#!/usr/bin/env python3
"""Prefill/decode benchmark of chatglm.cpp 0.4.2 on a converted GGML .bin.

usage: bench_chatglmcpp.py MODEL.bin [--prompt-tokens 32] [--gen-tokens 32] [--runs 3] [--warmup 1]
                           [--max-length 2048] [--main build-main/bin/main]

Default (Python API, chatglm_cpp._C): the same prompt ids as bench_torch.py
([gMASK] sop <|user|> sp("\n") + filler + <|assistant|>, exactly --prompt-tokens), then
Pipeline.model.generate_next_token() greedy (do_sample=False) exactly like chatglm_cpp's own
_stream_generate_ids loop, but EOS is ignored so every run decodes --gen-tokens tokens.
  ttft_ms / prefill = first generate_next_token over the whole prompt (incl. argmax)
  decode_tokens_per_s = (gen_tokens - 1) / time of the remaining single-token steps
  peak_rss_bytes = getrusage(RUSAGE_SELF).ru_maxrss of this process (python + mmapped model + buffers);
  baseline_rss_bytes = same, measured before the model was loaded.
Threads: chatglm.cpp 0.4.2 has no thread option; it uses hardware_concurrency() (<=4 -> all, else half)
for both prefill and decode, i.e. 2 on this 2-core machine.

--main PATH additionally runs the standalone C++ binary once per run
(`main -m X --mode generate -p TEXT --temp 0 --max_new_tokens N -v` under /usr/bin/time -v) and parses
its PerfStreamer lines "prompt time: A ms / P tokens (a ms/token)" and "output time: B ms / G tokens (b ms/token)"
(prompt time = TTFT incl. first token; output time spans G-1 decode steps but is divided by G; main stops at EOS).
"""
import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time


def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FILLER = "The quick brown fox jumps over the lazy dog. "


def build_prompt(tokenizer, n):
    pre = tokenizer.encode("\n", 1 << 20)  # [gMASK, sop] + sp("\n")
    gmask, sop = pre[0], pre[1]
    user, assistant = gmask + 5, gmask + 6  # ChatGLM3 specials: [MASK] [gMASK] [sMASK] sop eop system user assistant
    head = [gmask, sop, user] + pre[2:]
    tail = [assistant]
    need = n - len(head) - len(tail)
    if need < 0:
        raise SystemExit(f"--prompt-tokens must be >= {len(head) + len(tail)}")
    filler = []
    while len(filler) < need:
        filler += tokenizer.encode(FILLER * 8, 1 << 20)[2:]
    ids = head + filler[:need] + tail
    assert len(ids) == n
    return ids


def one_run(model, ids, gen_tokens, cfg):
    ids = list(ids)
    n_ctx = len(ids)
    t0 = time.perf_counter()
    tok = model.generate_next_token(ids, None, cfg, 0, n_ctx)
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(gen_tokens - 1):
        n_past = len(ids)  # == model.count_tokens(ids, None) for text-only models
        ids.append(tok)
        tok = model.generate_next_token(ids, None, cfg, n_past, n_ctx)
        out.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def main_text_prompt(tokenizer, n):
    """Text whose `--mode generate` encoding ([gMASK] sop + sp(text)) has exactly n tokens, if one exists."""
    text = FILLER * (n // 4 + 4)
    best = None
    for end in range(1, len(text) + 1):
        k = len(tokenizer.encode(text[:end], 1 << 20))
        if k == n:
            return text[:end].rstrip() if len(tokenizer.encode(text[:end].rstrip(), 1 << 20)) == n else text[:end]
        if k > n:
            break
        best = text[:end]
    return best


def run_main(main_bin, model, text, gen_tokens, max_length):
    cmd = ["/usr/bin/time", "-v", main_bin, "-m", model, "--mode", "generate", "-p", text, "--temp", "0",
           "--max_new_tokens", str(gen_tokens), "-l", str(max_length), "-v"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    out, err = p.stdout, p.stderr
    m1 = re.search(r"prompt time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)", out)
    m2 = re.search(r"output time: ([\d.]+) ms / (\d+) tokens \(([\d.]+) ms/token\)", out)
    m3 = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    if p.returncode != 0 or not (m1 and m2):
        return {"error": f"rc={p.returncode}", "stdout_tail": out[-800:], "stderr_tail": err[-800:]}
    pt_ms, pn = float(m1.group(1)), int(m1.group(2))
    ot_ms, on = float(m2.group(1)), int(m2.group(2))
    return {"prompt_time_ms": pt_ms, "prompt_tokens": pn, "output_time_ms": ot_ms, "output_tokens": on,
            "ttft_ms": pt_ms, "prefill_tokens_per_s": pn / pt_ms * 1000.0,
            "decode_tokens_per_s": (on - 1) / ot_ms * 1000.0 if on > 1 and ot_ms > 0 else None,
            "decode_tokens_per_s_as_printed": 1000.0 / float(m2.group(3)) if float(m2.group(3)) > 0 else None,
            "peak_rss_bytes": int(m3.group(1)) * 1024 if m3 else None,
            "perf_lines": [m1.group(0), m2.group(0)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=2048, help="KV-cache length (main's default is 2048)")
    ap.add_argument("--main", default=None, help="path of chatglm.cpp's main binary to also time")
    args = ap.parse_args()

    base_rss = rss()
    import chatglm_cpp
    t = time.perf_counter()
    pipe = chatglm_cpp.Pipeline(args.model, max_length=args.max_length)
    load_s = time.perf_counter() - t
    model = pipe.model
    ids = build_prompt(pipe.tokenizer, args.prompt_tokens)
    cfg = chatglm_cpp._C.GenerationConfig(max_length=args.max_length, max_new_tokens=args.gen_tokens,
                                          do_sample=False, top_k=1, top_p=1.0, temperature=1.0,
                                          repetition_penalty=1.0)
    for _ in range(args.warmup):
        one_run(model, ids, args.gen_tokens, cfg)
    runs = []
    gen = None
    for _ in range(args.runs):
        pf, dc, gen = one_run(model, ids, args.gen_tokens, cfg)
        runs.append({"prefill_s": pf, "decode_s": dc, "prefill_tokens_per_s": len(ids) / pf,
                     "decode_tokens_per_s": (args.gen_tokens - 1) / dc if args.gen_tokens > 1 else None,
                     "ttft_ms": pf * 1000.0})
    med = lambda k: statistics.median(r[k] for r in runs) if runs and runs[0][k] is not None else None
    res = {
        "engine": "chatglm.cpp-python", "chatglm_cpp": chatglm_cpp.__version__, "model": os.path.abspath(args.model),
        "threads": "auto (hardware_concurrency=%d)" % os.cpu_count(),
        "prompt_tokens": len(ids), "gen_tokens": args.gen_tokens, "decode_steps": args.gen_tokens - 1,
        "runs": args.runs, "warmup": args.warmup, "max_length": args.max_length, "load_s": load_s,
        "prefill_tokens_per_s": med("prefill_tokens_per_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
        "ttft_ms": med("ttft_ms"), "peak_rss_bytes": rss(), "baseline_rss_bytes": base_rss,
        "per_run": runs, "prompt_ids": ids, "generated_ids": gen,
    }
    if args.main:
        text = main_text_prompt(pipe.tokenizer, args.prompt_tokens)
        del pipe, model
        mruns = [run_main(args.main, args.model, text, args.gen_tokens, args.max_length)
                 for _ in range(args.warmup + args.runs)][args.warmup:]
        ok = [r for r in mruns if "error" not in r]
        mm = lambda k: statistics.median(r[k] for r in ok) if ok and ok[0][k] is not None else None
        res["main"] = {"binary": os.path.abspath(args.main), "prompt_text": text,
                       "ttft_ms": mm("ttft_ms"), "prefill_tokens_per_s": mm("prefill_tokens_per_s"),
                       "decode_tokens_per_s": mm("decode_tokens_per_s"),
                       "peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in ok) if ok else None,
                       "per_run": mruns}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
