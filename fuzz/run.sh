#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 30) from the committed seed corpora; new
# inputs go to a scratch corpus, not to fuzz/corpus. Exits non-zero on the first finding
# (its input is in fuzz/artifacts/TARGET/). Needs cargo-fuzz and the nightly toolchain.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
scratch=${CHATHUB_FUZZ_SCRATCH:-$(mktemp -d)}
cargo +nightly fuzz build --sanitizer none
for target in $(cargo +nightly fuzz list); do
  mkdir -p "$scratch/$target"
  echo "== fuzz $target for ${seconds}s"
  cargo +nightly fuzz run --sanitizer none "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=20 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked|SUMMARY|artifact" || true
  # libFuzzer leaves crash-*, timeout-* or oom-* files when it finds something.
  if compgen -G "artifacts/$target/*" >/dev/null; then
    echo "fuzz $target found a failing input: fuzz/artifacts/$target/"
    exit 1
  fi
done
