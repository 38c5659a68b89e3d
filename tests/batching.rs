//! Continuous batching: generations running at once on one engine share forward passes, and
//! each gets exactly the reply it gets alone, whatever joins or leaves the batch meanwhile.

mod common;

use std::ops::ControlFlow;
use std::sync::Barrier;

use candle_core::DType;
use chathub::{ChatOutcome, ChatRequest, Engine, FinishReason, ModelOptions, Quantization};

/// Prompts of different lengths, so that prefills and decode steps overlap in every way.
const PROMPTS: [&str; 6] = [
    "Hello!",
    "What is the capital of France? Please answer in one word.",
    "晚上睡不着应该怎么办？",
    "Tell me about numbers 12345 and emoji 👋, then count to ten and back again slowly.",
    "hi",
    "A longer question, to make a prompt that needs more than a single chunk of prefill when it \
     arrives while other conversations are decoding: one, two, three, four, five, six, seven.",
];

fn requests() -> Vec<ChatRequest> {
    PROMPTS
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let request = ChatRequest::new(*prompt).max_new_tokens(20 + 3 * i);
            // One sampled request: its seeded draws must not depend on the batch either.
            if i == 2 {
                request.temperature(0.8).top_p(0.9).seed(7)
            } else {
                request.greedy()
            }
        })
        .collect()
}

fn load(name: &str, dtype: Option<DType>, quantization: Option<Quantization>) -> Engine {
    load_with(
        name,
        ModelOptions {
            dtype,
            quantization,
            ..ModelOptions::default()
        },
    )
}

fn load_with(name: &str, options: ModelOptions) -> Engine {
    Engine::load_with(
        common::model_dir(name),
        &ModelOptions {
            // Every request pays its whole prompt, so prefills meet decode steps.
            prefix_cache_bytes: 0,
            ..options
        },
    )
    .expect("loads")
}

/// Runs every request at once, one thread each, released together.
fn together(engine: &Engine, requests: &[ChatRequest]) -> Vec<ChatOutcome> {
    let start = Barrier::new(requests.len());
    std::thread::scope(|scope| {
        let threads: Vec<_> = requests
            .iter()
            .map(|request| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    engine.chat(request).expect("chat")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    })
}

fn batched_replies_equal_solo_ones(
    name: &str,
    dtype: Option<DType>,
    quantization: Option<Quantization>,
) {
    let engine = load(name, dtype, quantization);
    engine_replies_equal_solo_ones(&engine, &format!("{name} {dtype:?} {quantization:?}"));
}

fn engine_replies_equal_solo_ones(engine: &Engine, name: &str) {
    let requests = requests();
    let solo: Vec<ChatOutcome> = requests
        .iter()
        .map(|r| engine.chat(r).expect("chat"))
        .collect();
    let before = engine.batch_counts();
    let batched = together(engine, &requests);
    let after = engine.batch_counts();
    for (i, (alone, with_others)) in solo.iter().zip(&batched).enumerate() {
        assert_eq!(
            alone.completion_token_ids, with_others.completion_token_ids,
            "{name}: request {i} changed when batched"
        );
        assert_eq!(alone.finish_reason, with_others.finish_reason);
    }
    let (passes, sequences) = (
        after.passes - before.passes,
        after.sequences - before.sequences,
    );
    assert!(
        sequences > passes,
        "{name}: {sequences} sequences in {passes} passes: the requests never shared a pass"
    );
}

#[test]
fn chatglm3_replies_are_the_same_batched() {
    batched_replies_equal_solo_ones("chatglm3-tiny", None, None);
}

#[test]
fn chatglm2_replies_are_the_same_batched() {
    batched_replies_equal_solo_ones("chatglm2-tiny", None, None);
}

#[test]
fn glm4_replies_are_the_same_batched() {
    for name in ["glm4-chat-tiny", "glm4-hf-tiny", "glm4-0414-tiny"] {
        batched_replies_equal_solo_ones(&format!("glm4/{name}"), None, None);
    }
}

#[test]
fn sixteen_bit_replies_are_the_same_batched() {
    batched_replies_equal_solo_ones("chatglm3-tiny", Some(DType::F16), None);
    batched_replies_equal_solo_ones("glm4/glm4-chat-tiny", Some(DType::BF16), None);
}

#[test]
fn quantized_replies_are_the_same_batched() {
    for quantization in [Quantization::Q8_0, Quantization::Q4_0] {
        batched_replies_equal_solo_ones("chatglm3-tiny", None, Some(quantization));
    }
    batched_replies_equal_solo_ones("glm4/glm4-0414-tiny", None, Some(Quantization::Q4_0));
}

/// Over f16 caches (half the memory per token) each reply is still the same batched as alone,
/// and a request's reservation under `--kv-cache-bytes` is half the f32 cache's.
#[test]
fn replies_over_half_caches_are_the_same_batched() {
    for name in ["chatglm3-tiny", "glm4/glm4-chat-tiny"] {
        let half = load_with(name, ModelOptions::default().kv_cache_dtype(DType::F16));
        engine_replies_equal_solo_ones(&half, &format!("{name} with an f16 cache"));
        let full = load(name, None, None);
        let request = &requests()[1];
        assert_eq!(
            half.kv_cache_bytes_for(request).expect("valid") * 2,
            full.kv_cache_bytes_for(request).expect("valid"),
            "{name}"
        );
    }
}

/// A cache dtype the kernels cannot store is refused before any weight is read.
#[test]
fn a_bf16_cache_is_refused() {
    let err = Engine::load_with(
        common::model_dir("chatglm3-tiny"),
        &ModelOptions::default().kv_cache_dtype(DType::BF16),
    )
    .expect_err("bf16 caches are not supported");
    let message = err.to_string();
    assert!(
        message.contains("kv_cache_dtype") && message.contains("f32 or f16"),
        "{message}"
    );
}

/// A generation cancelled in the middle of a batch leaves it at once; the others go on and
/// still get their solo replies.
#[test]
fn a_cancelled_generation_leaves_the_batch_and_the_rest_are_unchanged() {
    let engine = load("chatglm3-tiny", None, None);
    let requests = requests();
    let solo: Vec<ChatOutcome> = requests
        .iter()
        .map(|r| engine.chat(r).expect("chat"))
        .collect();
    let start = Barrier::new(requests.len());
    let outcomes: Vec<ChatOutcome> = std::thread::scope(|scope| {
        let threads: Vec<_> = requests
            .iter()
            .enumerate()
            .map(|(i, request)| {
                let (start, engine) = (&start, &engine);
                scope.spawn(move || {
                    start.wait();
                    let mut steps = 0;
                    engine
                        .chat_stream(request, |_| {
                            steps += 1;
                            if i == 1 && steps == 3 {
                                ControlFlow::Break(())
                            } else {
                                ControlFlow::Continue(())
                            }
                        })
                        .expect("chat")
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect()
    });
    for (i, (alone, batched)) in solo.iter().zip(&outcomes).enumerate() {
        if i == 1 {
            assert_eq!(batched.finish_reason, FinishReason::Cancelled);
            assert_eq!(batched.completion_token_ids.len(), 3);
            assert_eq!(
                batched.completion_token_ids[..],
                alone.completion_token_ids[..3]
            );
        } else {
            assert_eq!(
                alone.completion_token_ids, batched.completion_token_ids,
                "request {i}"
            );
        }
    }
}
