#!/bin/bash
# The side-by-side in README's Measured section: chathub, chatglm.cpp and PyTorch on the same
# synthetic 785M model, interleaved mode by mode, two rounds, so that both see the same swings of
# this machine's memory bandwidth. Run from benches/peers after the setup in README.md here.
#   ./run_interleaved.sh PATH/TO/chathub OUT_DIR
set -u
ch=$1 out=$2
mkdir -p "$out"
bench() { "$ch" bench --json --runs 3 --gen-tokens 32 "$@" 2>/dev/null; }
for round in 1 2; do
  for mode in f32 f16 q8_0 q4_0; do
    case $mode in f32) flags=();; f16) flags=(--dtype f16);; *) flags=(--quant "$mode");; esac
    bench --turns 0 "${flags[@]}" > "$out/ch_${mode}_$round.json"
    venv/bin/python bench_chatglmcpp.py "models/bench-$mode.bin" --prompt-tokens 32 --gen-tokens 32 \
      --runs 3 > "$out/cpp_${mode}_$round.json" 2>/dev/null
  done
  bench --turns 0 --quant q4k > "$out/ch_q4k_$round.json"
  bench --turns 0 --dtype bf16 > "$out/ch_bf16_$round.json"
  venv/bin/python bench_torch.py models/bench-hf --threads 2 --prompt-tokens 32 --gen-tokens 32 \
    --dtype f32 --runs 3 > "$out/torch_f32_$round.json" 2>/dev/null
done
bench --turns 5 > "$out/ch_f32_turns.json"
bench --turns 0 --context 2048 > "$out/ch_f32_ctx2048.json"
bench --turns 0 --dtype f16 --context 2048 > "$out/ch_f16_ctx2048.json"
