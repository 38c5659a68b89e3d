//! The `chathub` binary, as a user runs it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn chathub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chathub"))
}

/// Writes `case`'s request, greedy and as long as the fixture's reply, as a `generate
/// --request` file in `dir`.
fn greedy_request_file(dir: &std::path::Path, case: &common::Case) -> std::path::PathBuf {
    let request = dir.join(format!("{}.json", case.id));
    std::fs::write(
        &request,
        serde_json::json!({
            "prompt": case.request.prompt,
            "history": case.request.history,
            "max_new_tokens": case.max_new_tokens,
            "greedy": true,
        })
        .to_string(),
    )
    .expect("write");
    request
}

#[test]
fn generate_json_reproduces_every_reference_case() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in common::all_cases() {
        let request = greedy_request_file(tmp.path(), &case);
        let out = chathub()
            .args(["generate", "--json", "--model"])
            .arg(common::model_dir(&case.model))
            .arg("--request")
            .arg(&request)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let ids =
            |key: &str| -> Vec<u32> { serde_json::from_value(report[key].clone()).expect(key) };
        assert_eq!(
            ids("prompt_token_ids"),
            case.prompt_token_ids,
            "{}",
            case.id
        );
        assert_eq!(
            ids("completion_token_ids"),
            case.greedy_token_ids_until_stop,
            "{}",
            case.id
        );
        assert_eq!(report["finish_reason"], "length");
        assert_eq!(report["family"], case.family.as_str());
        assert_eq!(report["usage"]["completion_tokens"], 20);
        assert!(report["timings"]["ttft_ms"].as_f64().expect("number") > 0.0);
        assert_eq!(report["raw_text"], case.greedy_text_until_stop.as_str());
        // `response` is what the official chat() returns, where the fixture records it.
        let dir = if case.family == "glm4" {
            "glm4/expected"
        } else {
            "expected"
        };
        let fixture: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                common::fixtures()
                    .join(dir)
                    .join(format!("{}.json", case.id)),
            )
            .expect("fixture"),
        )
        .expect("json");
        if let Some(expected) = fixture.get("chat_response") {
            assert_eq!(&report["response"], expected, "{}", case.id);
            assert_eq!(
                report["response_kind"], fixture["chat_response_kind"],
                "{}",
                case.id
            );
        }
        assert!(report["text"].is_string());
    }
}

/// `--kv-cache-dtype f16` reaches the engine (the fixtures' greedy replies survive the
/// rounding), and a dtype the cache cannot hold is refused with its name.
#[test]
fn generate_takes_the_kv_cache_dtype() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let case = &common::all_cases()[0];
    let request = greedy_request_file(tmp.path(), case);
    let run = |dtype: &str| {
        chathub()
            .args(["generate", "--json", "--kv-cache-dtype", dtype, "--model"])
            .arg(common::model_dir(&case.model))
            .arg("--request")
            .arg(&request)
            .output()
            .expect("runs")
    };
    let out = run("f16");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let ids: Vec<u32> =
        serde_json::from_value(report["completion_token_ids"].clone()).expect("ids");
    assert_eq!(ids, case.greedy_token_ids_until_stop, "{}", case.id);

    let out = run("bf16");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--kv-cache-dtype") && stderr.contains("f32 or f16"),
        "{stderr}"
    );

    // The engine stores what was asked for: `bench` reports the loaded model's cache.
    let out = chathub()
        .args([
            "bench",
            "--json",
            "--runs",
            "1",
            "--turns",
            "0",
            "--gen-tokens",
            "2",
        ])
        .args(["--prompt-tokens", "4", "--kv-cache-dtype", "f16", "--model"])
        .arg(common::model_dir(&case.model))
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["kv_cache_dtype"], "f16");
}

#[test]
fn generate_reports_a_bad_model_path_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let request = tmp.path().join("r.json");
    std::fs::write(&request, r#"{"prompt": "hi"}"#).expect("write");
    let out = chathub()
        .args(["generate", "--model", "/no/such/dir", "--request"])
        .arg(&request)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/no/such/dir"), "{stderr}");
}

#[test]
fn chat_reads_piped_messages_and_keeps_history() {
    let mut child = chathub()
        .args([
            "chat",
            "--demo",
            "--greedy",
            "--max-new-tokens",
            "4",
            "--system",
            "be brief",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all("你好\n/reset\nsecond turn\n".as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("> 你好"), "{stdout}");
    assert!(stdout.contains("> second turn"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("demo model"),
        "says the demo is meaningless: {stderr}"
    );
    assert!(stderr.contains("history cleared"), "{stderr}");
    assert_eq!(stderr.matches("reply tokens").count(), 2, "{stderr}");
}

/// A request file with OpenAI-shaped tools and a past call in its history gives the official
/// prompt (`expected_tools/`).
#[test]
fn generate_takes_tools_and_tool_calls_from_the_request_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (model, case) in [
        (
            "chatglm3-tiny",
            "expected_tools/chatglm3_tools_own_system.json",
        ),
        (
            "glm4-hf-tiny",
            "glm4/expected_tools/glm4_hf_tools_weather.json",
        ),
    ] {
        let fixture: serde_json::Value =
            serde_json::from_slice(&std::fs::read(common::fixtures().join(case)).expect("read"))
                .expect("json");
        let request = tmp.path().join("request.json");
        std::fs::write(
            &request,
            serde_json::json!({
                "prompt": fixture["request"]["prompt"],
                "history": fixture["request"]["history"],
                "tools": fixture["tools"],
                "max_new_tokens": 1,
                "greedy": true,
            })
            .to_string(),
        )
        .expect("write");
        let out = chathub()
            .args(["generate", "--json", "--model"])
            .arg(common::model_dir(model))
            .arg("--request")
            .arg(&request)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(
            report["prompt_token_ids"], fixture["prompt_token_ids"],
            "{case}"
        );
    }
}

/// `generate --request /dev/zero` stops at the size limit instead of filling the memory.
#[test]
fn generate_refuses_a_request_beyond_the_size_limit() {
    let out = chathub()
        .args(["generate", "--demo", "--request", "/dev/zero"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("larger than"), "{stderr}");
}

/// A line that is too long or not UTF-8 is reported and skipped; the session goes on.
#[test]
fn chat_skips_bad_lines_and_goes_on() {
    let mut child = chathub()
        .args([
            "chat",
            "--demo",
            "--greedy",
            "--max-new-tokens",
            "2",
            "--max-line-bytes",
            "1000",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let mut input = Vec::new();
    input.extend(std::iter::repeat_n(b'x', 300_000));
    input.extend(b"\nfirst\n\xff\xfe bad bytes\nsecond\n");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("exits");
    writer.join().expect("joins").expect("written");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("line 1 is longer than 1000 bytes"),
        "{stderr}"
    );
    assert!(stderr.contains("line 3 is not valid UTF-8"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("> first"), "{stdout}");
    assert!(stdout.contains("> second"), "{stdout}");
    assert_eq!(stderr.matches("reply tokens").count(), 2, "{stderr}");
}

/// `convert --out` never replaces what is not a regular file, follows no link, and leaves no
/// staging file behind when it fails.
#[cfg(unix)]
#[test]
fn convert_refuses_outputs_that_are_not_regular_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let model = common::model_dir("chatglm2-tiny");
    let convert = |out: &std::path::Path| {
        chathub()
            .args(["convert", "--model"])
            .arg(&model)
            .arg("--out")
            .arg(out)
            .output()
            .expect("runs")
    };
    let target = tmp.path().join("precious.txt");
    std::fs::write(&target, b"keep me").expect("write");
    let link = tmp.path().join("link.gguf");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let fifo = tmp.path().join("fifo.gguf");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo")
        .success());
    let dir = tmp.path().join("dir.gguf");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut refused = vec![link.clone(), fifo.clone(), dir.clone()];
    if std::path::Path::new("/dev/full").exists() {
        refused.push("/dev/full".into());
    }
    for out in &refused {
        let result = convert(out);
        assert!(!result.status.success(), "{}", out.display());
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(
            stderr.contains("refusing to write"),
            "{}: {stderr}",
            out.display()
        );
    }
    assert_eq!(std::fs::read(&target).expect("read"), b"keep me");
    assert!(std::fs::symlink_metadata(&link)
        .expect("link")
        .file_type()
        .is_symlink());
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo)
        .expect("fifo")
        .file_type()
        .is_fifo());
    if std::path::Path::new("/dev/full").exists() {
        assert!(std::fs::metadata("/dev/full")
            .expect("dev")
            .file_type()
            .is_char_device());
    }

    // A directory that does not exist: a write error that says so, and nothing left behind.
    let missing = tmp.path().join("no/such/dir/model.gguf");
    let result = convert(&missing);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("writing"), "{stderr}");

    // A regular file is replaced, and no staging file stays beside it.
    let out = tmp.path().join("model.gguf");
    std::fs::write(&out, b"old").expect("write");
    let result = convert(&out);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(std::fs::metadata(&out).expect("written").len() > 1000);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
