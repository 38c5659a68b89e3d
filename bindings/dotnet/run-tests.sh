#!/usr/bin/env bash
# Compiles the C# wrapper, its tests and the sample with Mono's mcs (C# 7.2), then runs the
# tests and the sample on Mono and on CoreCLR 3.1 (PyPI's dotnetcore2 runtime).
#
# An mcs build against Mono's mscorlib cannot load IAsyncEnumerable<T> on CoreCLR, so each
# runtime gets its own build of the same sources: Mono's against mscorlib, CoreCLR's against
# the runtime's own assemblies.
#
# Usage: bindings/dotnet/run-tests.sh [NATIVE_LIB_DIR]   (default: target/debug)
# Needs: mcs and mono (apt: mono-mcs), python3 -m pip install dotnetcore2==3.1.23
set -euo pipefail
cd "$(dirname "$0")/../.."
lib_dir=${1:-target/debug}
out=target/dotnet
soak=${CHATHUB_SOAK_CALLS:-2000}

dotnet=$(python3 -c 'import dotnetcore2.runtime as r; print(r.get_runtime_path())')
fx=$(ls -d "$(dirname "$dotnet")"/shared/Microsoft.NETCore.App/3.1.* | sort -V | tail -n 1)
core_refs=(-nostdlib -noconfig)
for asm in System.Private.CoreLib System.Runtime System.Console System.Collections \
  System.Collections.Concurrent System.Linq System.Threading System.Threading.Tasks \
  System.Runtime.InteropServices System.Runtime.Extensions System.Text.Encoding.Extensions \
  System.IO.FileSystem System.Diagnostics.Process; do
  core_refs+=("-r:$fx/$asm.dll")
done

build() { # build FLAVOR [REFERENCES...]
  local flavor=$1
  shift
  local dir=$out/$flavor
  mkdir -p "$dir"
  mcs -langversion:7.2 -unsafe -target:library -nowarn:1702 "$@" \
    -out:"$dir/ChatHub.dll" bindings/dotnet/*.cs
  mcs -langversion:7.2 -nowarn:1702 "$@" -r:"$dir/ChatHub.dll" -out:"$dir/ChatHubTests.exe" bindings/dotnet/tests/*.cs
  mcs -langversion:7.2 -nowarn:1702 "$@" -r:"$dir/ChatHub.dll" -out:"$dir/ChatHubSample.exe" dotnet-sample/*.cs
  cp "$lib_dir/libchathub.so" "$dir/"
}

echo "-- compiling with $(mcs --version)"
build mono
build core "${core_refs[@]}"
for exe in ChatHubTests ChatHubSample; do
  cat > "$out/core/$exe.runtimeconfig.json" <<'JSON'
{"runtimeOptions": {"tfm": "netcoreapp3.1",
  "framework": {"name": "Microsoft.NETCore.App", "version": "3.1.0"},
  "configProperties": {"System.Globalization.Invariant": true}}}
JSON
done
export DOTNET_SYSTEM_GLOBALIZATION_INVARIANT=1

field() { python3 -c "import json,sys; v=json.load(open(sys.argv[1])); [v := v[k] for k in sys.argv[2:]]; print(v, end='')" "$@"; }
fixtures=tests/fixtures
conv1=$(field $fixtures/expected/chatglm2_conv4_zh.json chat_response)
conv2=$(field $fixtures/expected/chatglm3_conv2_zh.json chat_response)
glm4=$(field $fixtures/glm4/expected/glm4_hf_user_only_en.json greedy_text_until_stop)
meta_name=$(field $fixtures/expected/chatglm3_conv1_en.json chat_response name)
meta_content=$(field $fixtures/expected/chatglm3_conv1_en.json chat_response content)
args=("$fixtures" "$conv1" "$conv2" "$glm4" "$meta_name" "$meta_content" "$soak")

echo "-- tests on Mono"
mono "$out/mono/ChatHubTests.exe" "${args[@]}"
echo "-- tests on CoreCLR ($fx)"
"$dotnet" "$out/core/ChatHubTests.exe" "${args[@]}"

sample_input=$'你好\nWhat can you do?\n/reset\nhello again\n/exit\n'
for runtime in mono core; do
  echo "-- sample on $runtime"
  if [ $runtime = mono ]; then run=(mono "$out/mono/ChatHubSample.exe"); else run=("$dotnet" "$out/core/ChatHubSample.exe"); fi
  transcript=$(printf '%s' "$sample_input" | CHATHUB_MAX_NEW_TOKENS=6 "${run[@]}" "$fixtures/chatglm3-tiny")
  replies=$(grep -c '^> ' <<<"$transcript" || true)
  [ "$replies" -ge 3 ] || { echo "sample produced $replies prompts:"; echo "$transcript"; exit 1; }
  printf '%s' "$sample_input" | CHATHUB_MAX_NEW_TOKENS=4 "${run[@]}" >/dev/null # the demo model
done
echo "sample: 2 passed, 0 failed"
