//! The serving path's cost: gRPC streaming versus the in-process core on the same model, and
//! `Chat` requests per second at 1, 4 and 16 concurrent clients.
//!
//! `cargo bench --features grpc --bench serving` (set `CHATHUB_BENCH_MODEL=DIR` for another
//! model than the tiny reference fixture). Everything runs on loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chathub::grpc::proto::chat_hub_client::ChatHubClient;
use chathub::grpc::proto::ChatRequest as ProtoRequest;
use chathub::grpc::{serve_service, ChatHubService, ServeOptions};
use chathub::{ChatRequest, Engine, ModelOptions};

const REPLY_TOKENS: usize = 64;
const RUNS: usize = 5;

fn model_dir() -> std::path::PathBuf {
    std::env::var_os("CHATHUB_BENCH_MODEL")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chatglm3-tiny")
        })
}

/// A request that generates exactly `REPLY_TOKENS` tokens unless a stop token comes first:
/// top_p this small keeps only the most likely token (greedy through the proto).
fn proto_request(engine: &Engine, prompt: &str) -> ProtoRequest {
    let prompt_len = engine.prompt_ids(prompt, &[]).expect("prompt").len();
    ProtoRequest {
        prompt: prompt.into(),
        history: vec![],
        max_length: (prompt_len + REPLY_TOKENS) as i32,
        top_p: 1e-6,
        temperature: 0.0,
    }
}

fn core_request(p: &ProtoRequest) -> ChatRequest {
    ChatRequest::new(p.prompt.clone())
        .max_length(p.max_length as usize)
        .top_p(p.top_p as f64)
}

/// Prefix reuse off: every request pays its whole prompt, as a first turn does.
fn load(dir: &std::path::Path) -> Engine {
    let options = ModelOptions {
        prefix_cache_bytes: 0,
        ..ModelOptions::default()
    };
    Engine::load_with(dir, &options).expect("model loads")
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let dir = model_dir();
    let engine = load(&dir);
    let request = proto_request(&engine, "Tell me a long story about the sea");

    // In-process: the core's own timings.
    let mut best_inproc = (f64::MAX, 0f64);
    for _ in 0..RUNS {
        let outcome = engine.chat(&core_request(&request)).expect("chat");
        best_inproc.0 = best_inproc.0.min(outcome.timings.ttft_ms);
        best_inproc.1 = best_inproc.1.max(outcome.timings.decode_tokens_per_s);
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("addr"));
    let options = ServeOptions {
        max_concurrent: 2,
        max_queue: 64,
        ..ServeOptions::default()
    };
    let service = ChatHubService::new(options.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let load_dir = dir.clone();
    let server = tokio::spawn(serve_service(
        listener,
        service.clone(),
        move || Ok(load(&load_dir)),
        options.grace_period,
        async move {
            let _ = stopped.await;
        },
    ));
    let mut client = loop {
        if let Ok(c) = ChatHubClient::connect(address.clone()).await {
            if c.clone().chat(request.clone()).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Through gRPC streaming: first reply message, then replies per second.
    let mut best_grpc = (f64::MAX, 0f64);
    for _ in 0..RUNS {
        let start = Instant::now();
        let mut stream = client
            .streaming_chat(request.clone())
            .await
            .expect("stream")
            .into_inner();
        let mut first = None;
        let mut replies = 0usize;
        while let Some(_reply) = stream.message().await.expect("reply") {
            first.get_or_insert_with(Instant::now);
            replies += 1;
        }
        let first = first.expect("at least one reply");
        let ttft = first.duration_since(start).as_secs_f64() * 1e3;
        let rate = (replies.saturating_sub(1)) as f64 / first.elapsed().as_secs_f64();
        best_grpc.0 = best_grpc.0.min(ttft);
        best_grpc.1 = best_grpc.1.max(rate);
    }

    println!(
        "model: {} ({} reply tokens, best of {RUNS})",
        dir.display(),
        REPLY_TOKENS
    );
    println!("| path | time to first token (ms) | decode tokens/s |");
    println!("|---|---|---|");
    println!(
        "| in-process core | {:.2} | {:.1} |",
        best_inproc.0, best_inproc.1
    );
    println!(
        "| gRPC StreamingChat (loopback) | {:.2} | {:.1} |",
        best_grpc.0, best_grpc.1
    );

    // Chat requests per second at several client counts, short replies.
    let short = ProtoRequest {
        max_length: request.max_length - (REPLY_TOKENS as i32) + 8,
        ..request.clone()
    };
    println!();
    println!("| concurrent clients | Chat requests/s | errors |");
    println!("|---|---|---|");
    for clients in [1usize, 4, 16] {
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let until = Instant::now() + Duration::from_secs(3);
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|_| {
                let (mut client, request) = (client.clone(), short.clone());
                let (done, errors) = (done.clone(), errors.clone());
                tokio::spawn(async move {
                    while Instant::now() < until {
                        match client.chat(request.clone()).await {
                            Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("client task");
        }
        let rps = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
        println!(
            "| {clients} | {rps:.1} | {} |",
            errors.load(Ordering::Relaxed)
        );
    }
    let _ = stop.send(());
    let _ = server.await;
}
