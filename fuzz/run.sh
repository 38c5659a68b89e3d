#!/usr/bin/env bash
# Runs every fuzz target from the committed seed corpora; new inputs go to a scratch corpus, not
# to fuzz/corpus. Exits non-zero on the first finding (its input is in fuzz/artifacts/TARGET/).
# Needs cargo-fuzz and the nightly toolchain.
#
#   fuzz/run.sh [SECONDS]  explore: each target for SECONDS (default 30) from a random seed
#   fuzz/run.sh --ci       repeatable: every committed input, then RUNS (default 100000) inputs
#                          from seed 1 per target, so a red CI means a regression, not bad luck
#
# CHATHUB_FUZZ_TARGETS="a b" runs only those targets. Keep a finding's input as
# fuzz/corpus/TARGET/regression-WHAT, beside a test that names it.
set -euo pipefail
cd "$(dirname "$0")"
if [[ ${1:-} == --ci ]]; then
  budget=(-seed=1 -runs="${RUNS:-100000}")
else
  budget=(-max_total_time="${1:-30}")
fi
scratch=${CHATHUB_FUZZ_SCRATCH:-$(mktemp -d)}
cargo +nightly fuzz build --sanitizer none
for target in ${CHATHUB_FUZZ_TARGETS:-$(cargo +nightly fuzz list)}; do
  mkdir -p "$scratch/$target"
  echo "== fuzz $target (${budget[*]})"
  start=$SECONDS
  cargo +nightly fuzz run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
    "${budget[@]}" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY|artifact" || true
  echo "   $((SECONDS - start)) s"
  # libFuzzer leaves crash-*, timeout-* or oom-* files when it finds something.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz $target found a failing input: fuzz/artifacts/$target/"
    exit 1
  fi
done
