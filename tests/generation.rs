//! Generation behaviour: streaming, cancellation, limits, trimming, concurrency, sampling.

mod common;

use std::ops::ControlFlow;
use std::sync::Arc;

use chathub::{ChatRequest, FinishReason, Message};

fn conv1() -> common::Case {
    common::cases()
        .into_iter()
        .find(|c| c.id == "chatglm3_conv1_en")
        .expect("case exists")
}

/// Deltas arrive token by token and add up to the reply's text; the callback also runs (with
/// "") after tokens that show nothing, so a caller can always cancel.
#[test]
fn streamed_deltas_add_up_to_the_reply() {
    let case = common::cases()
        .into_iter()
        .find(|c| c.id == "chatglm2_conv4_zh")
        .expect("case exists");
    let engine = common::load(&case.model);
    let mut streamed = String::new();
    let (mut calls, mut pieces) = (0, 0);
    let outcome = engine
        .chat_stream(&case.request(), |delta| {
            streamed.push_str(delta);
            calls += 1;
            pieces += usize::from(!delta.is_empty());
            ControlFlow::Continue(())
        })
        .expect("chat");
    assert_eq!(streamed, outcome.text);
    assert!(pieces > 1, "{pieces} pieces");
    assert!(calls <= outcome.completion_token_ids.len() + 1);

    // ChatGLM3 writing a metadata line (a metadata reply) streams nothing, but still calls back.
    let engine = common::load("chatglm3-tiny");
    let mut streamed = String::new();
    let mut calls = 0;
    let outcome = engine
        .chat_stream(&conv1().request(), |delta| {
            streamed.push_str(delta);
            calls += 1;
            ControlFlow::Continue(())
        })
        .expect("chat");
    assert_eq!((streamed.as_str(), outcome.text.as_str()), ("", ""));
    assert!(matches!(outcome.reply, chathub::Reply::Metadata { .. }));
    assert_eq!(calls, outcome.completion_token_ids.len());
}

#[test]
fn callback_break_cancels_within_one_token() {
    let engine = common::load("chatglm3-tiny");
    let mut calls = 0;
    let outcome = engine
        .chat_stream(&conv1().request(), |_| {
            calls += 1;
            if calls == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .expect("chat");
    assert_eq!(outcome.finish_reason, FinishReason::Cancelled);
    assert_eq!(calls, 3, "no callback after Break");
    let n = outcome.completion_token_ids.len();
    assert!((3..20).contains(&n), "stopped early, got {n} tokens");
    // The tokens produced are the greedy prefix.
    assert_eq!(
        outcome.completion_token_ids[..],
        conv1().greedy_token_ids_until_stop[..n]
    );
}

#[test]
fn stop_tokens_end_the_reply_and_never_show() {
    let engine = common::load("chatglm3-tiny");
    let case = conv1();
    // The third greedy token (526) is made a stop token for this request.
    let request = ChatRequest {
        stop_token_ids: vec![526],
        ..case.request()
    };
    let outcome = engine.chat(&request).expect("chat");
    assert_eq!(outcome.finish_reason, FinishReason::Stop);
    assert_eq!(outcome.completion_token_ids, vec![324, 186]);
    assert_eq!(outcome.text, engine.tokenizer().decode(&[324, 186]));
    // ignore_stop runs through it.
    let through = engine
        .chat(&ChatRequest {
            ignore_stop: true,
            ..request
        })
        .expect("chat");
    assert_eq!(
        through.completion_token_ids,
        case.greedy_token_ids_until_stop
    );
}

#[test]
fn max_length_counts_prompt_and_reply() {
    let engine = common::load("chatglm3-tiny");
    let case = conv1();
    let prompt_len = case.prompt_token_ids.len();
    let request = ChatRequest {
        max_new_tokens: None,
        ..case.request().max_length(prompt_len + 5)
    };
    let outcome = engine.chat(&request).expect("chat");
    assert_eq!(outcome.finish_reason, FinishReason::Length);
    assert_eq!(outcome.completion_token_ids.len(), 5);
    assert_eq!(outcome.dropped_history_messages, 0);
    // 0 means the model default (8192), as proto3's unset field.
    let default = engine
        .chat(&ChatRequest {
            max_length: Some(0),
            ..case.request()
        })
        .expect("chat");
    assert_eq!(default.completion_token_ids.len(), 20);
}

fn long_history(turns: usize) -> Vec<Message> {
    let mut history = vec![Message::system("You are a helpful assistant.")];
    for i in 0..turns {
        history.push(Message::user(format!(
            "question number {i} about something long"
        )));
        history.push(Message::assistant(format!(
            "answer number {i}, equally long text"
        )));
    }
    history
}

#[test]
fn chatglm3_trims_oldest_turns_and_keeps_the_system_prompt() {
    let engine = common::load("chatglm3-tiny");
    let history = long_history(10);
    let full = engine.prompt_ids("last question", &history).expect("ids");
    let limit = full.len() / 2;
    let outcome = engine
        .chat(
            &ChatRequest::new("last question")
                .history(history.clone())
                .max_length(limit)
                .max_new_tokens(3)
                .greedy(),
        )
        .expect("trimmed, not rejected");
    assert!(outcome.dropped_history_messages > 0);
    assert_eq!(
        outcome.dropped_history_messages % 2,
        0,
        "whole turns are dropped"
    );
    assert!(outcome.usage.prompt_tokens < limit);
    let tok = engine.tokenizer();
    let system = tok.special_id("<|system|>").expect("chatglm3");
    assert_eq!(&outcome.prompt_token_ids[..3], &[1001, 1003, system]);
    // What is left is exactly the official prompt for the most recent turns.
    let kept = outcome.dropped_history_messages;
    let mut expected_history = vec![history[0].clone()];
    expected_history.extend_from_slice(&history[1 + kept..]);
    assert_eq!(
        outcome.prompt_token_ids,
        engine
            .prompt_ids("last question", &expected_history)
            .expect("ids")
    );
}

#[test]
fn chatglm2_trims_oldest_rounds() {
    let engine = common::load("chatglm2-tiny");
    let history = long_history(10);
    let full = engine.prompt_ids("last question", &history).expect("ids");
    let outcome = engine
        .chat(
            &ChatRequest::new("last question")
                .history(history.clone())
                .max_length(full.len() / 2)
                .max_new_tokens(2)
                .greedy(),
        )
        .expect("trimmed");
    let kept = outcome.dropped_history_messages;
    assert!(kept > 0);
    assert_eq!(
        outcome.prompt_token_ids,
        engine
            .prompt_ids("last question", &history[1 + kept..])
            .expect("ids")
    );
}

#[test]
fn concurrent_requests_on_one_model_match_sequential_ones() {
    let engine = Arc::new(common::load("chatglm3-tiny"));
    let cases: Vec<_> = common::cases()
        .into_iter()
        .filter(|c| c.model == "chatglm3-tiny")
        .collect();
    let sequential: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            engine
                .chat(&c.request())
                .expect("chat")
                .completion_token_ids
        })
        .collect();
    let requests: Vec<ChatRequest> = cases.iter().map(|c| c.request()).collect();
    let handles: Vec<_> = (0..6)
        .map(|i| {
            let engine = Arc::clone(&engine);
            let request = requests[i % requests.len()].clone();
            std::thread::spawn(move || {
                (i, engine.chat(&request).expect("chat").completion_token_ids)
            })
        })
        .collect();
    for handle in handles {
        let (i, ids) = handle.join().expect("thread");
        assert_eq!(ids, sequential[i % sequential.len()], "thread {i}");
    }
}

#[test]
fn seeded_sampling_is_reproducible() {
    let engine = common::load("chatglm3-tiny");
    let request = |seed| {
        ChatRequest::new("Tell me a story")
            .max_new_tokens(12)
            .temperature(1.0)
            .top_p(0.95)
            .seed(seed)
    };
    let a = engine.chat(&request(1)).expect("chat").completion_token_ids;
    assert_eq!(
        a,
        engine.chat(&request(1)).expect("chat").completion_token_ids
    );
    let distinct: std::collections::HashSet<Vec<u32>> = (2..7)
        .map(|s| engine.chat(&request(s)).expect("chat").completion_token_ids)
        .collect();
    assert!(distinct.len() > 1, "different seeds give different replies");
}

#[test]
fn engine_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<chathub::Engine>();
}

#[test]
fn demo_model_runs_the_whole_pipeline() {
    let engine = chathub::Engine::load(chathub::demo_model_dir().expect("demo")).expect("loads");
    assert_eq!(engine.family(), chathub::ModelFamily::ChatGlm3);
    let a = engine
        .chat(&ChatRequest::new("你好").max_new_tokens(6).greedy())
        .expect("chat");
    let b = engine
        .chat(&ChatRequest::new("你好").max_new_tokens(6).greedy())
        .expect("chat");
    assert_eq!(
        a.completion_token_ids, b.completion_token_ids,
        "deterministic"
    );
}

#[test]
fn stop_strings_cut_the_reply_even_across_tokens() {
    let engine = common::load("chatglm3-tiny");
    let case = conv1();
    let full = &case.greedy_text_until_stop;
    let stop = "apit十";
    let at = full.find(stop).expect("the reference text contains it");
    let request = ChatRequest {
        stop: vec![stop.to_string(), "never appears".to_string()],
        ..case.request()
    };
    let mut streamed = String::new();
    let outcome = engine
        .chat_stream(&request, |delta| {
            streamed.push_str(delta);
            ControlFlow::Continue(())
        })
        .expect("chat");
    assert_eq!(outcome.finish_reason, FinishReason::Stop);
    assert_eq!(outcome.raw_text, full[..at]);
    assert_eq!(
        streamed, outcome.text,
        "nothing of the stop string was streamed"
    );
    assert!(outcome.completion_token_ids.len() < 20);
    // A stop string that never comes changes nothing.
    let untouched = engine
        .chat(&ChatRequest {
            stop: vec!["never appears".to_string()],
            ..case.request()
        })
        .expect("chat");
    assert_eq!(untouched.raw_text, *full);
    assert_eq!(untouched.finish_reason, FinishReason::Length);
    let err = engine
        .chat(&ChatRequest {
            stop: vec![String::new()],
            ..case.request()
        })
        .expect_err("empty stop string");
    assert!(err.is_invalid_argument());
}
