//! Multi-turn reuse of earlier requests' key/value caches: faster, and invisible in results.

mod common;

use chathub::{ChatRequest, Engine, Message, ModelOptions};

fn engines(model: &str) -> (Engine, Engine) {
    let dir = common::model_dir(model);
    let with_reuse = Engine::load(&dir).expect("loads");
    let without = Engine::load_with(
        &dir,
        &ModelOptions {
            prefix_cache_bytes: 0,
            ..ModelOptions::default()
        },
    )
    .expect("loads");
    (with_reuse, without)
}

/// Plays an AIHub-style conversation (the whole history sent every turn) on both engines.
/// With `read_replies`, each turn waits for the previous reply's pre-fill (a user reading it);
/// without, the next request races the pre-fill and must wait for it, not redo it.
fn conversation(model: &str, read_replies: bool) {
    let (with_reuse, without) = engines(model);
    let questions = [
        "Hello! How are you today?",
        "What is the capital of France?",
        "晚上睡不着应该怎么办？",
        "Tell me about numbers 12345 and emoji 👋",
        "And one more question, please.",
    ];
    let mut history = vec![Message::system("You are a helpful assistant.")];
    let mut computed = Vec::new();
    for (turn, question) in questions.iter().enumerate() {
        if read_replies {
            with_reuse.wait_for_background_work();
        }
        let request = ChatRequest::new(*question)
            .history(history.clone())
            .max_new_tokens(12)
            .greedy();
        let reused = with_reuse.chat(&request).expect("chat");
        let fresh = without.chat(&request).expect("chat");
        assert_eq!(
            reused.prompt_token_ids, fresh.prompt_token_ids,
            "{model} turn {turn}"
        );
        assert_eq!(
            reused.completion_token_ids, fresh.completion_token_ids,
            "{model} turn {turn}: reuse changed the reply"
        );
        assert_eq!(fresh.usage.cached_prompt_tokens, 0);
        if turn > 0 {
            assert!(
                reused.usage.cached_prompt_tokens > 0,
                "{model} turn {turn} reused nothing"
            );
        }
        let run = reused.usage.prompt_tokens - reused.usage.cached_prompt_tokens;
        computed.push(run);
        if turn > 0 && model != "chatglm2-tiny" {
            // Everything up to the new question was pre-filled: the question's own tokens
            // and the `<|assistant|>` after them are all that runs (ChatGLM2's text-level
            // prompt may re-split a few tokens around "问：").
            let question_tokens = with_reuse
                .tokenizer()
                .encode(question)
                .expect("encodes")
                .len();
            assert!(
                run <= question_tokens + 1,
                "{model} turn {turn}: ran {run} prompt tokens for a {question_tokens}-token question"
            );
        }
        history.push(Message::user(*question));
        history.push(Message::assistant(reused.text));
    }
    // Work per turn is about one exchange, not the whole history: turn 5 computes no more than
    // the biggest earlier turn, though its prompt is the longest.
    let first = computed[0];
    assert!(
        computed[1..].iter().all(|&c| c <= first + 40),
        "{model}: {computed:?}"
    );
}

#[test]
fn chatglm3_conversation_reuses_its_prefix_without_changing_replies() {
    conversation("chatglm3-tiny", true);
}

#[test]
fn glm4_conversations_reuse_their_prefix_without_changing_replies() {
    for model in ["glm4-chat-tiny", "glm4-hf-tiny", "glm4-0414-tiny"] {
        conversation(model, true);
    }
}

#[test]
fn chatglm2_conversation_reuses_its_prefix_without_changing_replies() {
    conversation("chatglm2-tiny", true);
}

#[test]
fn a_turn_that_races_the_previous_replys_prefill_waits_for_it() {
    conversation("chatglm3-tiny", false);
    conversation("chatglm2-tiny", false);
}

#[test]
fn concurrent_requests_sharing_a_prefix_agree() {
    let (with_reuse, without) = engines("chatglm3-tiny");
    let with_reuse = std::sync::Arc::new(with_reuse);
    let history = vec![
        Message::system("You are a helpful assistant."),
        Message::user("Hello! How are you today?"),
        Message::assistant("I am fine, thank you. What can I do for you?"),
    ];
    let prompts = [
        "What is the capital of France?",
        "And of Germany?",
        "And of Italy?",
    ];
    let expected: Vec<_> = prompts
        .iter()
        .map(|p| {
            let r = ChatRequest::new(*p)
                .history(history.clone())
                .max_new_tokens(10)
                .greedy();
            without.chat(&r).expect("chat").completion_token_ids
        })
        .collect();
    let handles: Vec<_> = (0..9)
        .map(|i| {
            let engine = with_reuse.clone();
            let request = ChatRequest::new(prompts[i % 3])
                .history(history.clone())
                .max_new_tokens(10)
                .greedy();
            std::thread::spawn(move || {
                (i, engine.chat(&request).expect("chat").completion_token_ids)
            })
        })
        .collect();
    for h in handles {
        let (i, ids) = h.join().expect("thread");
        assert_eq!(ids, expected[i % 3], "thread {i}");
    }
}

/// Asking the same turn again ("regenerate") right away finds its prompt cached, although the
/// first reply's pre-fill for the next turn has taken that cache out meanwhile.
#[test]
fn asking_the_same_turn_again_reuses_its_prompt() {
    let (with_reuse, without) = engines("chatglm3-tiny");
    let history = vec![Message::system("You are a helpful assistant.")];
    let request = ChatRequest::new("What is the capital of France?")
        .history(history)
        .max_new_tokens(12)
        .greedy();
    let expected = without.chat(&request).expect("chat").completion_token_ids;
    for round in 0..20 {
        let outcome = with_reuse.chat(&request).expect("chat");
        assert_eq!(outcome.completion_token_ids, expected, "round {round}");
        if round > 0 {
            assert_eq!(
                outcome.usage.cached_prompt_tokens,
                outcome.usage.prompt_tokens - 1,
                "round {round}: the repeated prompt was not reused"
            );
        }
    }
}

/// Users of one server share a system prompt: a new conversation reuses the opening another
/// one left cached, and leaves that conversation's cache whole for its next turn.
#[test]
fn conversations_sharing_an_opening_each_keep_their_cache() {
    let (with_reuse, without) = engines("chatglm3-tiny");
    let system = Message::system("You are a helpful assistant. Answer briefly and politely.");
    let ask = |history: &[Message], question: &str| {
        ChatRequest::new(question)
            .history(history.to_vec())
            .max_new_tokens(8)
            .greedy()
    };
    let first = ask(
        std::slice::from_ref(&system),
        "What is the capital of France?",
    );
    let first_reply = with_reuse.chat(&first).expect("chat");
    with_reuse.wait_for_background_work();

    // Another user, same system prompt: the system prompt is reused, the reply unchanged.
    let other = ask(
        std::slice::from_ref(&system),
        "How many legs does a spider have?",
    );
    let other_reply = with_reuse.chat(&other).expect("chat");
    assert!(
        other_reply.usage.cached_prompt_tokens > 0,
        "shared opening not reused"
    );
    assert_eq!(
        other_reply.completion_token_ids,
        without.chat(&other).expect("chat").completion_token_ids
    );
    with_reuse.wait_for_background_work();

    // The first user's next turn still finds its whole history cached.
    let history = [
        system,
        Message::user("What is the capital of France?"),
        Message::assistant(first_reply.text),
    ];
    let next = ask(&history, "And of Germany?");
    let next_reply = with_reuse.chat(&next).expect("chat");
    let question_tokens = with_reuse
        .tokenizer()
        .encode("And of Germany?")
        .expect("encodes")
        .len();
    let ran = next_reply.usage.prompt_tokens - next_reply.usage.cached_prompt_tokens;
    assert!(
        ran <= question_tokens + 1,
        "the other conversation cut this one's cache: ran {ran} prompt tokens"
    );
    assert_eq!(
        next_reply.completion_token_ids,
        without.chat(&next).expect("chat").completion_token_ids
    );
}

/// The same question asked by several users at once: each one reuses the cached prompt (a
/// copy of it), not only the first to arrive.
#[test]
fn concurrent_requests_for_a_cached_prompt_all_reuse_it() {
    let (with_reuse, without) = engines("chatglm3-tiny");
    let request = ChatRequest::new("Tell me a long story about the sea.")
        .history(vec![Message::system("You are a helpful assistant.")])
        .max_new_tokens(8)
        .greedy();
    let expected = without.chat(&request).expect("chat").completion_token_ids;
    with_reuse.chat(&request).expect("chat");
    with_reuse.wait_for_background_work();
    let with_reuse = std::sync::Arc::new(with_reuse);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (engine, request) = (with_reuse.clone(), request.clone());
            std::thread::spawn(move || engine.chat(&request).expect("chat"))
        })
        .collect();
    for (i, handle) in handles.into_iter().enumerate() {
        let outcome = handle.join().expect("thread");
        assert_eq!(outcome.completion_token_ids, expected, "request {i}");
        assert_eq!(
            outcome.usage.cached_prompt_tokens,
            outcome.usage.prompt_tokens - 1,
            "request {i} ran its prompt again"
        );
    }
}
