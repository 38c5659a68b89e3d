//! Replies as the official `chat()` returns them, and tools in prompts, against the fixtures.

mod common;

use chathub::{ChatRequest, Engine, Message, Reply, Tool};
use serde_json::Value;

fn read(path: &str) -> Value {
    serde_json::from_slice(&std::fs::read(common::fixtures().join(path)).expect("read"))
        .expect("json")
}

fn ids(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).expect("ids")
}

/// A fixture's request with its OpenAI-shaped tools and history (assistant `tool_calls`, `tool`
/// results) parsed as a caller's JSON would be.
fn request_with_tools(case: &Value) -> ChatRequest {
    let history: Vec<Message> =
        serde_json::from_value(case["request"]["history"].clone()).expect("history");
    let tools: Vec<Tool> = serde_json::from_value(case["tools"].clone()).expect("tools");
    ChatRequest::new(case["request"]["prompt"].as_str().expect("prompt"))
        .history(history)
        .tools(tools)
        .max_new_tokens(1)
        .greedy()
}

#[test]
fn chatglm3_tool_prompts_match_the_official_demo() {
    let engine = common::load("chatglm3-tiny");
    for name in [
        "chatglm3_tools_default_system.json",
        "chatglm3_tools_own_system.json",
    ] {
        let case = read(&format!("expected_tools/{name}"));
        let outcome = engine.chat(&request_with_tools(&case)).expect("chat");
        assert_eq!(
            outcome.prompt_token_ids,
            ids(&case["prompt_token_ids"]),
            "{name}"
        );
    }
}

#[test]
fn glm4_tool_prompts_match_the_template() {
    for (name, model, key) in [
        // transformers >= 4.42's tojson (the chat layout's `prompt_token_ids` is 4.40's).
        (
            "glm4_chat_tools_weather.json",
            "glm4-chat-tiny",
            "prompt_token_ids_transformers_4_43",
        ),
        (
            "glm4_hf_tools_weather.json",
            "glm4-hf-tiny",
            "prompt_token_ids",
        ),
        (
            "glm4_0414_tools_weather.json",
            "glm4-0414-tiny",
            "prompt_token_ids",
        ),
    ] {
        let case = read(&format!("glm4/expected_tools/{name}"));
        let engine = Engine::load(common::model_dir(model)).expect("loads");
        let outcome = engine.chat(&request_with_tools(&case)).expect("chat");
        assert_eq!(outcome.prompt_token_ids, ids(&case[key]), "{name}");
    }
}

/// `response` as the official `chat()` returns it, through the Rust API, whole and streamed.
#[test]
fn replies_match_the_official_chat() {
    for case in common::cases() {
        let expected = read(&format!("expected/{}.json", case.id));
        let engine = common::load(&case.model);
        let mut streamed = String::new();
        let outcome = engine
            .chat_stream(&case.request(), |delta| {
                streamed.push_str(delta);
                std::ops::ControlFlow::Continue(())
            })
            .expect("chat");
        assert_eq!(
            outcome.reply.to_official_json(),
            expected["chat_response"],
            "{}",
            case.id
        );
        assert_eq!(
            outcome.reply.kind().as_str(),
            expected["chat_response_kind"],
            "{}",
            case.id
        );
        assert_eq!(outcome.raw_text, case.greedy_text_until_stop, "{}", case.id);
        match &outcome.reply {
            Reply::Text(text) => {
                assert_eq!(&outcome.text, text, "{}", case.id);
                assert_eq!(&streamed, text, "{}: deltas add up to the reply", case.id);
            }
            _ => assert!(streamed.is_empty(), "{}: nothing streamed", case.id),
        }
    }
}

fn weather() -> Tool {
    Tool::function(
        "get_weather",
        "Weather of a city",
        serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
    )
}

/// A model that answers with a call comes back as a tool call, ends at `<|observation|>` with
/// finish reason `tool_calls`, and streams nothing.
#[test]
fn a_tool_call_reply_is_parsed_and_not_streamed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // The tiny tokenizer writes every `"` as the same token, which a lookup-table model cannot
    // follow by two different tokens: the call takes no arguments.
    common::scripted_glm4(tmp.path(), "get_weather\n{}");
    let engine = Engine::load(tmp.path()).expect("loads");
    let request = ChatRequest::new("What is the weather in Paris?")
        .tools(vec![weather()])
        .greedy();
    let mut streamed = String::new();
    let outcome = engine
        .chat_stream(&request, |delta| {
            streamed.push_str(delta);
            std::ops::ControlFlow::Continue(())
        })
        .expect("chat");
    assert_eq!(outcome.raw_text, "get_weather\n{}");
    match &outcome.reply {
        Reply::ToolCall { name, arguments } => {
            assert_eq!(name, "get_weather");
            assert!(arguments.is_empty());
        }
        other => panic!("not a tool call: {other:?}"),
    }
    assert_eq!(outcome.finish_reason, chathub::FinishReason::ToolCalls);
    assert_eq!(outcome.text, "");
    assert_eq!(streamed, "", "a tool call streams nothing as text");
    assert!(outcome.tool_call_error.is_none());

    // The call and its result go back into the next prompt as GLM-4's own server writes them.
    let call = chathub::ToolCall::new("get_weather", serde_json::json!({"city": "Paris"}));
    let next = ChatRequest::new("Thanks!")
        .history(vec![
            Message::user("What is the weather in Paris?"),
            Message::assistant_tool_calls("", vec![call]),
            Message::tool_result("{\"temperature\": 21}", Some("call_1".into())),
        ])
        .tools(vec![weather()])
        .max_new_tokens(1);
    let ids = engine.chat(&next).expect("chat").prompt_token_ids;
    let text = engine.tokenizer().decode(&ids);
    assert!(
        text.contains("<|assistant|> get_weather\n{\"city\": \"Paris\"} <|observation|> \n{\"temperature\": 21}"),
        "{text}"
    );

    // Without tools, the same reply is the official metadata form.
    let plain = engine
        .chat(&ChatRequest::new("What is the weather in Paris?").greedy())
        .expect("chat");
    assert_eq!(
        plain.reply,
        Reply::Metadata {
            name: "get_weather".into(),
            content: "{}".into()
        }
    );
    assert_eq!(plain.finish_reason, chathub::FinishReason::Stop);
}

/// An ordinary answer loses the metadata line and its surrounding whitespace, streamed and whole.
#[test]
fn a_text_reply_streams_without_its_metadata_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    common::scripted_glm4(tmp.path(), "\n Hello there!  ");
    let engine = Engine::load(tmp.path()).expect("loads");
    let mut deltas = Vec::new();
    let outcome = engine
        .chat_stream(&ChatRequest::new("hi").greedy(), |delta| {
            if !delta.is_empty() {
                deltas.push(delta.to_string());
            }
            std::ops::ControlFlow::Continue(())
        })
        .expect("chat");
    assert_eq!(outcome.reply, Reply::Text("Hello there!".into()));
    assert_eq!(outcome.text, "Hello there!");
    assert_eq!(deltas.concat(), "Hello there!", "{deltas:?}");
    assert!(deltas.iter().all(|d| !d.starts_with('\n')), "{deltas:?}");
}

/// A tool's result as the new message (the official `chat(..., role="observation")`): the prompt
/// is the fixture's with that result as the last history message, up to where the next user
/// message would start, then `<|assistant|>`.
#[test]
fn a_tool_result_can_be_the_new_message() {
    let engine = common::load("chatglm3-tiny");
    let case = read("expected_tools/chatglm3_tools_own_system.json");
    let full = ids(&case["prompt_token_ids"]);
    let mut request = request_with_tools(&case);
    let result = request
        .history
        .pop()
        .expect("the fixture ends with a tool result");
    assert_eq!(result.role, chathub::Role::Observation);
    request.prompt = result.content;
    request.prompt_role = chathub::Role::Observation;
    let outcome = engine.chat(&request).expect("chat");
    let ids = outcome.prompt_token_ids;
    let user = engine.tokenizer().special_id("<|user|>").expect("user");
    let assistant = engine
        .tokenizer()
        .special_id("<|assistant|>")
        .expect("assistant");
    let user_at = full.iter().rposition(|&id| id == user).expect("user turn");
    assert_eq!(ids[..ids.len() - 1], full[..user_at]);
    assert_eq!(ids.last(), Some(&assistant));

    // Only the user's messages and tools' results may be the new message.
    request.prompt_role = chathub::Role::Assistant;
    let err = engine.validate(&request).expect_err("an assistant prompt");
    assert_eq!(err.kind(), chathub::ErrorKind::InvalidArgument, "{err}");
    // ChatGLM2 has no tool role.
    let chatglm2 = common::load("chatglm2-tiny");
    let err = chatglm2
        .validate(&ChatRequest::tool_result("{}"))
        .expect_err("ChatGLM2 observation");
    assert!(err.to_string().contains("ChatGLM2"), "{err}");
}
