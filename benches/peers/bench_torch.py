#!/usr/bin/env python3
"""Prefill/decode benchmark of the official THUDM ChatGLM3 PyTorch code (transformers trust_remote_code).

usage: bench_torch.py MODEL_DIR [--threads 2] [--prompt-tokens 32] [--gen-tokens 32] [--dtype f32|bf16] [--runs 3]

Prompt: [gMASK] sop <|user|> "\n" + filler text tokens + <|assistant|>, exactly --prompt-tokens ids.
Prefill = one forward over the whole prompt (use_cache=True, return_last_logit=True, as generate() does)
          + greedy argmax -> first generated token.  ttft_ms = that time.
Decode  = (gen_tokens - 1) greedy single-token forwards with past_key_values (EOS ignored).
          decode_tokens_per_s = (gen_tokens - 1) / decode time.
One untimed warm-up run (--warmup) precedes --runs timed runs; the JSON reports medians and every run.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch


def build_prompt(tok, n):
    head = [tok.get_command("[gMASK]"), tok.get_command("sop"), tok.get_command("<|user|>")]
    head += tok.tokenizer.encode("\n")
    tail = [tok.get_command("<|assistant|>")]
    need = n - len(head) - len(tail)
    if need < 0:
        raise SystemExit(f"--prompt-tokens must be >= {len(head) + len(tail)}")
    text = "The quick brown fox jumps over the lazy dog. "
    filler = []
    while len(filler) < need:
        filler += tok.tokenizer.encode(text * 8)
    ids = head + filler[:need] + tail
    assert len(ids) == n
    return ids


@torch.inference_mode()
def one_run(model, ids, gen_tokens):
    input_ids = torch.tensor([ids], dtype=torch.long)
    n = input_ids.shape[1]
    position_ids = torch.arange(n, dtype=torch.long).unsqueeze(0)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, position_ids=position_ids, use_cache=True, return_last_logit=True,
                return_dict=True)
    next_id = int(torch.argmax(out.logits[0, -1]))
    t1 = time.perf_counter()
    past = out.past_key_values
    generated = [next_id]
    for step in range(gen_tokens - 1):
        pos = n + step
        out = model(input_ids=torch.tensor([[next_id]], dtype=torch.long),
                    position_ids=torch.tensor([[pos]], dtype=torch.long),
                    past_key_values=past, use_cache=True, return_last_logit=True, return_dict=True)
        past = out.past_key_values
        next_id = int(torch.argmax(out.logits[0, -1]))
        generated.append(next_id)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, generated


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from transformers import AutoModel, AutoTokenizer
    import transformers
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import st_metadata_patch  # noqa: F401  (fixture safetensors have no metadata; see that file)

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # after importing torch+transformers
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    model = AutoModel.from_pretrained(args.model_dir, trust_remote_code=True, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t
    ids = build_prompt(tok, args.prompt_tokens)

    for _ in range(args.warmup):
        one_run(model, ids, args.gen_tokens)
    runs = []
    for _ in range(args.runs):
        pf, dc, gen = one_run(model, ids, args.gen_tokens)
        runs.append({"prefill_s": pf, "decode_s": dc,
                     "prefill_tokens_per_s": len(ids) / pf,
                     "decode_tokens_per_s": (args.gen_tokens - 1) / dc if args.gen_tokens > 1 else None,
                     "ttft_ms": pf * 1000.0})
    med = lambda k: statistics.median(r[k] for r in runs) if runs and runs[0][k] is not None else None
    res = {
        "engine": "pytorch-official-chatglm3",
        "model_dir": os.path.abspath(args.model_dir),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": args.threads, "dtype": args.dtype,
        "prompt_tokens": len(ids), "gen_tokens": args.gen_tokens, "decode_steps": args.gen_tokens - 1,
        "runs": args.runs, "warmup": args.warmup, "load_s": load_s,
        "prefill_tokens_per_s": med("prefill_tokens_per_s"),
        "decode_tokens_per_s": med("decode_tokens_per_s"),
        "ttft_ms": med("ttft_ms"),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "baseline_rss_bytes": base_rss,
        "per_run": runs,
        "prompt_ids": ids,
        "generated_ids": gen if runs else None,
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
