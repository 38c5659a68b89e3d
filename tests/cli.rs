//! The `chathub` binary, as a user runs it.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn chathub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chathub"))
}

#[test]
fn generate_json_reproduces_every_reference_case() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in common::all_cases() {
        let request = tmp.path().join(format!("{}.json", case.id));
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
