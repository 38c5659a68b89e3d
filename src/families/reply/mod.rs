//! What the official `chat()` returns for a model's raw decoded reply, per model family.
//!
//! Follows the THUDM remote code's `process_response`:
//!
//! - ChatGLM2 (`THUDM/chatglm2-6b` `modeling_chatglm.py`): `response.strip()`, then
//!   `"[[训练时间]]"` → `"2023年"`.
//! - ChatGLM3 (`THUDM/chatglm3-6b` `modeling_chatglm.py`, revision of 2023-12-07 and later, which
//!   added the "no newline" case): the raw text is split at the text `<|assistant|>`; for the **last**
//!   segment, `metadata, content = segment.split("\n", 1)` (or `"", segment` when it has no `"\n"`).
//!   A blank metadata line (Python `not metadata.strip()`) gives the content stripped, with
//!   `"[[训练时间]]"` → `"2023年"`. Otherwise, when the conversation offered tools (the history
//!   starts with a system message that has `tools`), the first and last lines of the content (the
//!   code fence) are dropped and the rest is `eval`ed as `tool_call(**kwargs)` →
//!   `{"name": metadata.strip(), "parameters": kwargs}`; without tools it is
//!   `{"name": metadata.strip(), "content": content}` (content not stripped).
//! - GLM-4 (`THUDM/glm-4-9b-chat` `modeling_chatglm.py`, July 2024): the same, except that a tool
//!   call's content is JSON: `{"name": metadata.strip(), "parameters": json.loads(content)}`, with no
//!   fence removal. Its replacement text is also `"2023年"`.
//!
//! "Stripped" means Python's `str.strip()` (see [`crate::families::python::strings`]), not Rust's `trim()`.
//!
//! # Where this deliberately differs from the official code
//!
//! - **Tool calls are never evaluated.** ChatGLM3 code is read by [`crate::families::python::literal`] (one
//!   `tool_call(...)` or dict literal, literals only); GLM-4 arguments by `serde_json` (build it
//!   with the `float_roundtrip` feature so floats parse exactly as Python's `json.loads` does). When that fails (malformed, or anything that would need
//!   evaluation), the official code raises; here the reply becomes the **metadata form**
//!   [`Reply::Metadata`] `{name, content}` (what the official code returns for the same text when no
//!   tools were offered, content un-fenced and unstripped) and [`ParsedReply::tool_call_error`] says
//!   why. That keeps the function name for logs and clients, shows the raw text instead of losing
//!   it, and never turns a model mistake into a server error. A caller that prefers a text reply can
//!   build one from the metadata's content.
//! - **Arguments must be an object.** GLM-4's `json.loads` may return a list, string or number and
//!   the official code passes it on; OpenAI-style `arguments` must be an object, so anything else is
//!   a [`ToolCallError::NotAnObject`] (and the metadata fallback above).
//! - **JSON that Python accepts but JSON text cannot carry** — `NaN`, `Infinity`, lone surrogate
//!   escapes — is an error; integers beyond `u64`/`i64` become the nearest `f64`; nesting is limited
//!   to serde_json's 128 levels and the text to [`MAX_INPUT_BYTES`].
//! - **Only the last segment is looked at.** The official loop also processes earlier segments (and
//!   can raise while doing so); their results are discarded, so only the failure mode differs.

pub(crate) mod stream;

use serde_json::{Map, Value};

pub(crate) use crate::chat::reply::Reply;
use crate::families::python::literal::{parse_tool_call, LiteralError, MAX_INPUT_BYTES};
use crate::families::python::strings::{python_is_blank, python_strip};

/// The special token text that starts a new assistant segment in ChatGLM3/GLM-4 output.
pub const ASSISTANT_TOKEN: &str = "<|assistant|>";

/// The placeholder the official code replaces in text replies.
pub const TRAINING_TIME_MARKER: &str = "[[训练时间]]";

/// What [`TRAINING_TIME_MARKER`] is replaced with (ChatGLM2, ChatGLM3 and glm-4-9b-chat alike).
pub const TRAINING_TIME_REPLACEMENT: &str = "2023年";

/// Which official `process_response` a reply follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplyStyle {
    /// ChatGLM2: strip and replace, no metadata line, no tools.
    ChatGlm2,
    /// ChatGLM3: metadata line; tool calls are Python `tool_call(...)` code in a fence.
    ChatGlm3,
    /// GLM-4 (all three layouts): metadata line; tool calls are JSON.
    Glm4,
}

/// Why a tool call's arguments could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ToolCallError {
    /// ChatGLM3: the code is not a literal-only `tool_call(...)`.
    #[error("invalid ChatGLM3 tool call: {0}")]
    Python(#[from] LiteralError),
    /// GLM-4: the arguments are longer than [`MAX_INPUT_BYTES`].
    #[error("GLM-4 tool-call arguments are {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// GLM-4: the arguments are not valid JSON (as `serde_json` reads it).
    #[error(
        "GLM-4 tool-call arguments are not valid JSON at line {line}, column {column}: {message}"
    )]
    Json {
        /// serde_json's description.
        message: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// The arguments are valid but not an object.
    #[error("tool-call arguments must be an object, found {found}")]
    NotAnObject {
        /// The JSON type found: `array`, `string`, `number`, `boolean` or `null`.
        found: &'static str,
    },
}

/// A parsed reply, plus why a tool call fell back to the metadata form (if it did).
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedReply {
    /// The reply to return.
    pub reply: Reply,
    /// `Some` when the reply looked like a tool call but its arguments could not be read; `reply`
    /// is then the [`Reply::Metadata`] fallback.
    pub tool_call_error: Option<ToolCallError>,
}

/// Turn a model's raw decoded reply into what the official `chat()` returns.
///
/// `tools_given` is whether the conversation offered tools (official: the history starts with a
/// system message that has a `tools` key); it only matters for ChatGLM3 and GLM-4.
///
/// # Examples
///
/// ```text
/// use reply::reply::{parse_reply, Reply, ReplyStyle};
/// let p = parse_reply(ReplyStyle::ChatGlm3, "\n 截至[[训练时间]]。\u{1c}", false);
/// assert_eq!(p.reply, Reply::Text("截至2023年。".into()));
///
/// let p = parse_reply(ReplyStyle::ChatGlm3, "add\n```python\ntool_call(a=2, b=40)\n```", true);
/// assert_eq!(p.reply.to_official_json().to_string(), r#"{"name":"add","parameters":{"a":2,"b":40}}"#);
///
/// let p = parse_reply(ReplyStyle::Glm4, "add\n{\"a\": 2, \"b\": 40}", true);
/// assert_eq!(p.reply.to_official_json().to_string(), r#"{"name":"add","parameters":{"a":2,"b":40}}"#);
/// ```
#[must_use]
pub fn parse_reply(style: ReplyStyle, raw: &str, tools_given: bool) -> ParsedReply {
    let text = |t: String| ParsedReply {
        reply: Reply::Text(t),
        tool_call_error: None,
    };
    if style == ReplyStyle::ChatGlm2 {
        return text(clean_text(raw));
    }
    let (metadata, content) = split_metadata(last_segment(raw));
    if python_is_blank(metadata) {
        return text(clean_text(content));
    }
    let name = python_strip(metadata).to_owned();
    if !tools_given {
        return ParsedReply {
            reply: Reply::Metadata {
                name,
                content: content.to_owned(),
            },
            tool_call_error: None,
        };
    }
    let parsed = match style {
        ReplyStyle::Glm4 => parse_json_arguments(content),
        _ => parse_tool_call(&strip_code_fence(content)).map_err(ToolCallError::from),
    };
    match parsed {
        Ok(arguments) => ParsedReply {
            reply: Reply::ToolCall { name, arguments },
            tool_call_error: None,
        },
        Err(e) => ParsedReply {
            reply: Reply::Metadata {
                name,
                content: content.to_owned(),
            },
            tool_call_error: Some(e),
        },
    }
}

/// The text after the last [`ASSISTANT_TOKEN`] (the whole text if there is none).
#[must_use]
pub fn last_segment(raw: &str) -> &str {
    match raw.rfind(ASSISTANT_TOKEN) {
        Some(i) => &raw[i + ASSISTANT_TOKEN.len()..],
        None => raw,
    }
}

/// Split a segment into its metadata line and content at the first `"\n"`; a segment without one
/// is all content (`("", segment)`), as in the official code.
#[must_use]
pub fn split_metadata(segment: &str) -> (&str, &str) {
    segment.split_once('\n').unwrap_or(("", segment))
}

/// A text reply's final form: Python-stripped, then [`TRAINING_TIME_MARKER`] replaced.
#[must_use]
pub fn clean_text(content: &str) -> String {
    python_strip(content).replace(TRAINING_TIME_MARKER, TRAINING_TIME_REPLACEMENT)
}

/// ChatGLM3's fence removal, `"\n".join(content.split("\n")[1:-1])`: drops the first and the last
/// line whatever they contain (normally ```` ```python ```` and ```` ``` ````).
#[must_use]
pub fn strip_code_fence(content: &str) -> String {
    let lines: Vec<&str> = content.split('\n').collect();
    if lines.len() <= 2 {
        return String::new();
    }
    lines[1..lines.len() - 1].join("\n")
}

/// GLM-4's tool-call arguments: the content as one JSON object (JSON whitespace around it allowed,
/// as Python's `json.loads` allows).
///
/// # Errors
///
/// [`ToolCallError::TooLarge`], [`ToolCallError::Json`] or [`ToolCallError::NotAnObject`].
pub fn parse_json_arguments(content: &str) -> Result<Map<String, Value>, ToolCallError> {
    if content.len() > MAX_INPUT_BYTES {
        return Err(ToolCallError::TooLarge {
            len: content.len(),
            max: MAX_INPUT_BYTES,
        });
    }
    let value: Value = serde_json::from_str(content).map_err(|e| {
        let full = e.to_string();
        let position = format!(" at line {} column {}", e.line(), e.column());
        ToolCallError::Json {
            message: full.strip_suffix(&position).unwrap_or(&full).to_owned(),
            line: e.line(),
            column: e.column(),
        }
    })?;
    match value {
        Value::Object(m) => Ok(m),
        Value::Array(_) => Err(ToolCallError::NotAnObject { found: "array" }),
        Value::String(_) => Err(ToolCallError::NotAnObject { found: "string" }),
        Value::Number(_) => Err(ToolCallError::NotAnObject { found: "number" }),
        Value::Bool(_) => Err(ToolCallError::NotAnObject { found: "boolean" }),
        Value::Null => Err(ToolCallError::NotAnObject { found: "null" }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::reply::ReplyKind;
    use serde_json::json;

    fn text(style: ReplyStyle, raw: &str) -> String {
        match parse_reply(style, raw, false).reply {
            Reply::Text(t) => t,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn chatglm2_strips_and_replaces() {
        let s = ReplyStyle::ChatGlm2;
        assert_eq!(text(s, "\u{1c} 你好[[训练时间]]\n\u{3000}"), "你好2023年");
        assert_eq!(text(s, "a\nb"), "a\nb");
        // No metadata line and no segments for ChatGLM2.
        assert_eq!(text(s, "x<|assistant|>y"), "x<|assistant|>y");
        assert_eq!(text(s, ""), "");
    }

    #[test]
    fn chatglm3_text_and_metadata() {
        let s = ReplyStyle::ChatGlm3;
        assert_eq!(text(s, "\n  hello \n"), "hello");
        assert_eq!(text(s, " \u{1f}\t\nhello"), "hello");
        assert_eq!(text(s, "no newline at all "), "no newline at all");
        assert_eq!(text(s, "first<|assistant|>\nsecond"), "second");
        assert_eq!(text(s, "\nfirst<|assistant|>"), "");
        assert_eq!(text(s, "\n[[训练时间]][[训练时间]]"), "2023年2023年");
        assert_eq!(text(s, "\n[[[训练时间]]]"), "[2023年]");
        let p = parse_reply(s, "  ad in \n rest \n", false);
        assert_eq!(
            p.reply,
            Reply::Metadata {
                name: "ad in".into(),
                content: " rest \n".into()
            }
        );
        assert_eq!(p.reply.kind().as_str(), "metadata");
        assert_eq!(
            p.reply.to_official_json(),
            json!({"name": "ad in", "content": " rest \n"})
        );
    }

    #[test]
    fn chatglm3_tool_call() {
        let raw = "get_weather\n```python\ntool_call(city='北京', unit=\"c\")\n```";
        let p = parse_reply(ReplyStyle::ChatGlm3, raw, true);
        assert_eq!(p.tool_call_error, None);
        assert_eq!(
            p.reply.to_official_json(),
            json!({"name": "get_weather", "parameters": {"city": "北京", "unit": "c"}})
        );
        assert_eq!(p.reply.kind(), ReplyKind::ToolCall);
        // Thought text, then the tool call in a new segment: the last segment wins.
        let raw2 = format!("\nLet me check.<|assistant|>{raw}");
        assert_eq!(
            parse_reply(ReplyStyle::ChatGlm3, &raw2, true).reply,
            p.reply
        );
        // Without tools the same text is a metadata reply.
        let q = parse_reply(ReplyStyle::ChatGlm3, raw, false);
        assert_eq!(
            q.reply,
            Reply::Metadata {
                name: "get_weather".into(),
                content: "```python\ntool_call(city='北京', unit=\"c\")\n```".into()
            }
        );
    }

    #[test]
    fn chatglm3_bad_tool_call_falls_back_to_metadata() {
        let raw = "f\n```python\ntool_call(x=__import__('os').system('id'))\n```";
        let p = parse_reply(ReplyStyle::ChatGlm3, raw, true);
        assert_eq!(
            p.reply,
            Reply::Metadata {
                name: "f".into(),
                content: "```python\ntool_call(x=__import__('os').system('id'))\n```".into()
            }
        );
        let err = p.tool_call_error.unwrap();
        assert!(matches!(
            err,
            ToolCallError::Python(LiteralError::Unsupported { .. })
        ));
        assert!(err.to_string().contains("`__import__`"), "{err}");
        // No fence: the one line is dropped, leaving nothing to evaluate.
        let p = parse_reply(ReplyStyle::ChatGlm3, "f\ntool_call(a=1)", true);
        assert_eq!(
            p.tool_call_error,
            Some(ToolCallError::Python(LiteralError::Empty))
        );
    }

    #[test]
    fn glm4_tool_call() {
        let raw = "get_weather\n{\"city\": \"北京\", \"n\": [1, 2.5, null]}\n";
        let p = parse_reply(ReplyStyle::Glm4, raw, true);
        assert_eq!(
            p.reply.to_official_json(),
            json!({"name": "get_weather", "parameters": {"city": "北京", "n": [1, 2.5, null]}})
        );
        for (bad, kind) in [
            ("f\n[1, 2]", "array"),
            ("f\n\"s\"", "string"),
            ("f\n1", "number"),
        ] {
            let p = parse_reply(ReplyStyle::Glm4, bad, true);
            assert_eq!(
                p.tool_call_error,
                Some(ToolCallError::NotAnObject { found: kind })
            );
            assert_eq!(p.reply.kind(), ReplyKind::Metadata);
        }
        for bad in [
            "f\n{\"a\": NaN}",
            "f\n{'a': 1}",
            "f\n```json\n{}\n```",
            "f\n",
        ] {
            let p = parse_reply(ReplyStyle::Glm4, bad, true);
            assert!(
                matches!(p.tool_call_error, Some(ToolCallError::Json { .. })),
                "{bad:?}"
            );
        }
        let e = parse_reply(ReplyStyle::Glm4, "f\n{\"a\": NaN}", true).tool_call_error;
        assert_eq!(
            e.map(|e| e.to_string()).as_deref(),
            Some(
                "GLM-4 tool-call arguments are not valid JSON at line 1, column 7: expected value"
            )
        );
        let deep = format!("f\n{}", "[".repeat(100_000));
        assert!(parse_reply(ReplyStyle::Glm4, &deep, true)
            .tool_call_error
            .is_some());
    }

    #[test]
    fn fence_removal_matches_python_slicing() {
        assert_eq!(strip_code_fence(""), "");
        assert_eq!(strip_code_fence("a"), "");
        assert_eq!(strip_code_fence("a\nb"), "");
        assert_eq!(strip_code_fence("a\nb\nc"), "b");
        assert_eq!(strip_code_fence("a\nb\nc\n"), "b\nc");
        assert_eq!(strip_code_fence("```python\nx\ny\n```"), "x\ny");
    }

    #[test]
    fn reply_json_shapes() {
        assert_eq!(Reply::Text("hi".into()).to_official_json(), json!("hi"));
        let mut args = Map::new();
        args.insert("z".into(), json!(1));
        args.insert("a".into(), json!(2));
        let r = Reply::ToolCall {
            name: "f".into(),
            arguments: args,
        };
        assert_eq!(
            r.to_official_json().to_string(),
            r#"{"name":"f","parameters":{"z":1,"a":2}}"#
        );
    }
}

/// Checks against outputs of the official Python behaviour (`tests/fixtures/python/gen_oracle.py`).
#[cfg(test)]
mod oracle {

    use super::stream::ReplyStream;
    use super::{parse_reply, Reply, ReplyStyle};
    use crate::families::python::literal::{parse_tool_call, LiteralError};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    fn load(name: &str) -> Vec<Value> {
        let path = format!(
            "{}/tests/fixtures/python/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn style_of(case: &Value) -> ReplyStyle {
        match case["style"].as_str() {
            Some("chatglm2") => ReplyStyle::ChatGlm2,
            Some("chatglm3") => ReplyStyle::ChatGlm3,
            Some("glm4") => ReplyStyle::Glm4,
            other => panic!("unknown style {other:?}"),
        }
    }

    fn random_deltas<'a>(rng: &mut StdRng, raw: &'a str) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut start = 0;
        for (i, _) in raw.char_indices().skip(1) {
            if rng.random_bool(0.4) {
                out.push(&raw[start..i]);
                start = i;
            }
        }
        out.push(&raw[start..]);
        out
    }

    /// Streams `raw` in random pieces and checks the gate's promises against `parse_reply`.
    fn check_stream(rng: &mut StdRng, style: ReplyStyle, tools: bool, raw: &str) {
        for _ in 0..3 {
            let mut s = ReplyStream::new(style, tools);
            let mut shown = String::new();
            for d in random_deltas(rng, raw) {
                shown.push_str(&s.push(d));
            }
            let end = s.finish();
            shown.push_str(&end.delta);
            let expected = parse_reply(style, raw, tools);
            assert_eq!(end.reply, expected);
            let text = expected.reply.as_text().unwrap_or("");
            assert_eq!(end.display_text, text, "{raw:?}");
            if end.diverged {
                assert!(
                    raw.contains("<|assistant|>") && shown.ends_with(text),
                    "{raw:?}"
                );
            } else {
                assert_eq!(shown, text, "{style:?} {raw:?}");
            }
        }
    }

    #[test]
    fn fixtures_reproduce_chat_response() {
        let mut rng = StdRng::seed_from_u64(1);
        let cases = load("fixture_replies.json");
        assert_eq!(cases.len(), 20);
        for case in cases {
            let style = style_of(&case);
            let raw = case["raw"].as_str().unwrap_or_default();
            let tools = case["tools"].as_bool().unwrap_or(false);
            let parsed = parse_reply(style, raw, tools);
            assert_eq!(
                parsed.reply.to_official_json(),
                case["expected"],
                "{}",
                case["id"]
            );
            assert_eq!(parsed.reply.kind().as_str(), case["kind"], "{}", case["id"]);
            check_stream(&mut rng, style, tools, raw);
        }
    }

    #[test]
    fn random_replies_match_python() {
        let mut rng = StdRng::seed_from_u64(2);
        let cases = load("reply_oracle.json");
        assert!(cases.len() > 2000);
        for case in &cases {
            let style = style_of(case);
            let raw = case["raw"].as_str().unwrap_or_default();
            let tools = case["tools"].as_bool().unwrap_or(false);
            let parsed = parse_reply(style, raw, tools);
            match case["kind"].as_str() {
                Some("error") => {
                    // Python raised: we fall back to the metadata form and say why.
                    let e = &case["expected"];
                    assert_eq!(
                        parsed.reply,
                        Reply::Metadata {
                            name: e["name"].as_str().unwrap_or_default().to_owned(),
                            content: e["content"].as_str().unwrap_or_default().to_owned(),
                        },
                        "{raw:?}"
                    );
                    assert!(parsed.tool_call_error.is_some(), "{raw:?}");
                }
                Some(kind) => {
                    assert_eq!(
                        parsed.reply.kind().as_str(),
                        kind,
                        "{style:?} {raw:?}: {:?}",
                        parsed.tool_call_error
                    );
                    assert_eq!(
                        parsed.reply.to_official_json(),
                        case["expected"],
                        "{style:?} {raw:?}"
                    );
                    assert!(parsed.tool_call_error.is_none());
                }
                None => panic!("case without kind"),
            }
            check_stream(&mut rng, style, tools, raw);
        }
    }

    /// What the literal parser may reject although Python's `eval` accepts it (see pyliteral docs).
    fn documented_subset(e: &LiteralError) -> bool {
        match e {
            LiteralError::Unsupported { .. }
            | LiteralError::UnsupportedName { .. }
            | LiteralError::NumberOutOfRange { .. } => true,
            LiteralError::InvalidString { reason, .. } => reason.contains("\\N{"),
            // `1if x else y`, `0x1for`: Python tokenizes these (with a warning); they are expressions.
            LiteralError::InvalidNumber { reason, .. } => {
                reason.contains("invalid decimal literal")
            }
            _ => false,
        }
    }

    #[test]
    fn tool_call_literals_match_python_eval() {
        let cases = load("literal_oracle.json");
        let (mut same, mut subset, mut both_reject) = (0, 0, 0);
        for case in &cases {
            let code = case["code"].as_str().unwrap_or_default();
            let ours = parse_tool_call(code);
            match case["python"].as_str() {
                Some("ok") => {
                    let expected: Value =
                        serde_json::from_str(case["json"].as_str().unwrap_or_default()).unwrap();
                    match ours {
                        Ok(map) => {
                            assert_eq!(Value::Object(map), expected, "{code:?}");
                            same += 1;
                        }
                        Err(e) => {
                            assert!(documented_subset(&e), "{code:?}: rejected with {e}");
                            eprintln!("by design: {code:?}: {e}");
                            subset += 1;
                        }
                    }
                }
                Some(_) => {
                    assert!(
                        ours.is_err(),
                        "{code:?}: Python fails ({}) but we accept {:?}",
                        case,
                        ours
                    );
                    both_reject += 1;
                }
                None => panic!("case without python result"),
            }
        }
        eprintln!(
            "literal oracle: {same} equal, {subset} rejected by design, {both_reject} rejected by both"
        );
        assert!(same > 1200);
    }
}
