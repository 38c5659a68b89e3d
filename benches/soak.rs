//! A soak: mixed gRPC and HTTP traffic over one server for a while, with clients that hang up
//! at random, checking that the process's memory stays flat and that no reply is lost or
//! changed.
//!
//! `cargo bench --features server --bench soak` (`CHATHUB_SOAK_SECONDS`, default 600;
//! `CHATHUB_SOAK_CLIENTS`, default 6). Every request is greedy, so each prompt has one right
//! answer, taken from the core before the soak starts: a completed reply must equal it, and a
//! reply cut short by its own client must be a prefix of it. Prints RSS over time and a summary
//! line; exits non-zero on a lost or wrong reply, or when RSS grows by more than 10% after the
//! first minute.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chathub::grpc::proto::chat_hub_client::ChatHubClient;
use chathub::grpc::proto::ChatRequest as ProtoRequest;
use chathub::http::HttpOptions;
use chathub::server::{Gate, ServeOptions};
use chathub::{ChatRequest, Engine};

const PROMPTS: [&str; 4] = [
    "Tell me a long story about the sea",
    "晚上睡不着应该怎么办？",
    "List the first twenty prime numbers",
    "emoji 👋 and numbers 12345",
];
const REPLY_TOKENS: usize = 48;

#[derive(Default)]
struct Tally {
    completed: AtomicU64,
    hung_up: AtomicU64,
    wrong: AtomicU64,
    refused: AtomicU64,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A cheap deterministic random stream per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One streamed HTTP completion; `hang_up_after` chunks, then the socket is dropped. Returns
/// the text seen and whether the stream ended properly (`[DONE]`).
fn http_stream(address: SocketAddr, prompt: &str, hang_up_after: Option<usize>) -> (String, bool) {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": REPLY_TOKENS,
        "temperature": 0,
        "stream": true,
    })
    .to_string();
    let Ok(mut stream) = TcpStream::connect(address) else {
        return (String::new(), false);
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(head.as_bytes()).is_err() {
        return (String::new(), false);
    }
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    let mut text = String::new();
    let mut events = 0;
    // Status line and headers.
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return (text, false);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut pending = String::new();
    loop {
        // Chunked framing: size line, data, CRLF.
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return (text, false);
        }
        let Ok(size) = usize::from_str_radix(line.trim(), 16) else {
            return (text, false);
        };
        if size == 0 {
            return (text, false);
        }
        let mut data = vec![0; size + 2];
        if reader.read_exact(&mut data).is_err() {
            return (text, false);
        }
        pending.push_str(&String::from_utf8_lossy(&data[..size]));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if payload == "[DONE]" {
                return (text, true);
            }
            let value: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
            if let Some(piece) = value["choices"][0]["delta"]["content"].as_str() {
                text.push_str(piece);
            }
            events += 1;
            if hang_up_after.is_some_and(|n| events >= n) {
                return (text, false);
            }
        }
    }
}

fn main() {
    let seconds: u64 = std::env::var("CHATHUB_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let clients: usize = std::env::var("CHATHUB_SOAK_CLIENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    // ChatGLM2 streams every token; its tiny fixture keeps the CPU on the serving path.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chatglm2-tiny");
    let engine = Engine::load(&dir).expect("model");
    let expected: Vec<String> = PROMPTS
        .iter()
        .map(|p| {
            engine
                .chat(&ChatRequest::new(*p).max_new_tokens(REPLY_TOKENS).greedy())
                .expect("reference")
                .text
        })
        .collect();
    let max_lengths: Vec<i32> = PROMPTS
        .iter()
        .map(|p| (engine.prompt_ids(p, &[]).expect("prompt").len() + REPLY_TOKENS) as i32)
        .collect();
    let expected = Arc::new(expected);
    let max_lengths = Arc::new(max_lengths);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let options = ServeOptions::default().max_concurrent(2).max_queue(64);
    let gate = Gate::new(&options);
    gate.set_engine(engine);
    let (grpc_address, http_address) = runtime.block_on(async {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addresses = (grpc.local_addr().expect("a"), http.local_addr().expect("a"));
        tokio::spawn(chathub::grpc::serve_gate(
            grpc,
            gate.clone(),
            Duration::from_secs(5),
            std::future::pending(),
        ));
        tokio::spawn(chathub::http::serve(
            http,
            gate.clone(),
            HttpOptions::default(),
            std::future::pending(),
        ));
        addresses
    });

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for client in 0..clients {
        let (tally, stop, expected) = (tally.clone(), stop.clone(), expected.clone());
        let max_lengths = max_lengths.clone();
        let handle = runtime.handle().clone();
        workers.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1));
            let mut grpc = None;
            while !stop.load(Ordering::Relaxed) {
                let which = (rng.next() % PROMPTS.len() as u64) as usize;
                let prompt = PROMPTS[which];
                let want = &expected[which];
                // One request in four hangs up partway.
                let hang_up = rng
                    .next()
                    .is_multiple_of(4)
                    .then(|| 1 + (rng.next() % 6) as usize);
                let (text, finished) = if client % 2 == 0 {
                    http_stream(http_address, prompt, hang_up)
                } else {
                    let client = grpc.get_or_insert_with(|| {
                        handle
                            .block_on(ChatHubClient::connect(format!("http://{grpc_address}")))
                            .expect("gRPC connects")
                    });
                    let mut request = tonic::Request::new(ProtoRequest {
                        prompt: prompt.into(),
                        history: vec![],
                        max_length: max_lengths[which],
                        // A top_p this small keeps only the best token: greedy.
                        top_p: 1e-6,
                        temperature: 0.0,
                    });
                    request.set_timeout(Duration::from_secs(120));
                    handle.block_on(async {
                        let Ok(stream) = client.streaming_chat(request).await else {
                            return (String::new(), false);
                        };
                        let mut stream = stream.into_inner();
                        let mut text = String::new();
                        let mut seen = 0;
                        loop {
                            match stream.message().await {
                                Ok(Some(reply)) => {
                                    text = reply.response;
                                    seen += 1;
                                    if hang_up.is_some_and(|n| seen >= n) {
                                        return (text, false);
                                    }
                                }
                                Ok(None) => return (text, true),
                                Err(_) => return (text, false),
                            }
                        }
                    })
                };
                if finished && hang_up.is_none() {
                    if text == *want {
                        tally.completed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("wrong reply for {prompt:?}: {text:?}");
                    }
                } else if hang_up.is_some() {
                    if !want.starts_with(text.as_str()) {
                        tally.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("cut reply is not a prefix for {prompt:?}: {text:?}");
                    }
                    tally.hung_up.fetch_add(1, Ordering::Relaxed);
                    // A fresh gRPC connection after a hang-up, as a crashed client would make.
                    grpc = None;
                } else {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(10).min(Duration::from_secs(seconds)));
        let rss = rss_bytes();
        samples.push((start.elapsed().as_secs(), rss));
        println!(
            "t={:>4}s rss={:.1} MB completed={} hung_up={} wrong={} lost={} active={}",
            start.elapsed().as_secs(),
            rss as f64 / 1e6,
            tally.completed.load(Ordering::Relaxed),
            tally.hung_up.load(Ordering::Relaxed),
            tally.wrong.load(Ordering::Relaxed),
            tally.refused.load(Ordering::Relaxed),
            gate.metrics().active,
        );
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let after_warmup: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= 60.min(seconds / 2))
        .map(|(_, r)| *r)
        .collect();
    let (first, last, max) = (
        after_warmup.first().copied().unwrap_or(0),
        after_warmup.last().copied().unwrap_or(0),
        after_warmup.iter().copied().max().unwrap_or(0),
    );
    let metrics = gate.metrics();
    println!(
        "soak {seconds}s, {clients} clients: {} completed and equal to the reference, {} hung up \
         (server cancelled {}), {} wrong, {} lost; RSS after warm-up {:.1} -> {:.1} MB (max {:.1})",
        tally.completed.load(Ordering::Relaxed),
        tally.hung_up.load(Ordering::Relaxed),
        metrics.cancelled,
        tally.wrong.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        first as f64 / 1e6,
        last as f64 / 1e6,
        max as f64 / 1e6,
    );
    let grew = first > 0 && last as f64 > first as f64 * 1.10;
    if tally.wrong.load(Ordering::Relaxed) > 0 || tally.refused.load(Ordering::Relaxed) > 0 || grew
    {
        std::process::exit(1);
    }
}
