#!/usr/bin/env python3
"""Runs every reference case through `chathub generate --json` on a GPU and compares token ids.

Usage: check_fixtures.py CHATHUB_BINARY [extra chathub flags, e.g. --cuda --dtype bf16]

Prints one line per case: whether the prompt ids match (they must: tokenization is on the CPU)
and how many of the greedy reply ids match the official PyTorch ones before the first
difference. f32 on a GPU sums in another order than the CPU, so a case whose top two logits are
close may part ways; the fixtures record those margins, and the line shows the margin at the
first difference. Exits non-zero if a prompt differs or a run fails.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def main() -> int:
    binary, flags = sys.argv[1], sys.argv[2:]
    failed = False
    for path in sorted((FIXTURES / "expected").glob("*.json")):
        case = json.loads(path.read_text())
        request = {
            "prompt": case["request"]["prompt"],
            "history": case["request"]["history"],
            "max_new_tokens": case["max_new_tokens"],
            "greedy": True,
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(request, f)
        run = subprocess.run(
            [binary, "generate", "--json", "--model", str(FIXTURES / case["model"]),
             "--request", f.name, *flags],
            capture_output=True, text=True)
        if run.returncode != 0:
            print(f"{case['id']}: FAILED\n" + "\n".join(run.stderr.splitlines()[-12:]))
            failed = True
            continue
        report = json.loads(run.stdout)
        prompt_ok = report["prompt_token_ids"] == case["prompt_token_ids"]
        want, got = case["greedy_token_ids_until_stop"], report["completion_token_ids"]
        same = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        margin = case["top2_margins"][same] if same < len(case["top2_margins"]) else None
        print(f"{case['id']}: prompt {'same' if prompt_ok else 'DIFFERENT'}, "
              f"greedy ids same for {same}/{len(want)}"
              + (f" (margin at the first difference {margin:.4f})" if same < len(want) else ""))
        failed |= not prompt_ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
