//! The OpenAI-compatible HTTP server over real loopback HTTP/1.1, with a small client written
//! here on std's TcpStream (so framing, SSE and disconnects are exactly what goes over the
//! wire).
#![cfg(feature = "http")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chathub::http::{HttpError, HttpOptions};
use chathub::server::{Gate, MetricsSnapshot, ServeOptions};
use serde_json::{json, Value};

/// A server on its own runtime, stopped when dropped.
struct Server {
    address: SocketAddr,
    gate: Gate,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), HttpError>>>,
    runtime: tokio::runtime::Runtime,
}

impl Server {
    /// Serves `model` (loading in the background; `None` never loads).
    fn start(model: Option<PathBuf>, options: ServeOptions, http: HttpOptions) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let address = listener.local_addr().expect("address");
        let gate = Gate::new(&options);
        gate.set_model_name("tiny");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = {
            let _entered = runtime.enter();
            if let Some(model) = model {
                gate.load_in_background(move || chathub::Engine::load(&model));
            }
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            runtime.spawn(chathub::http::serve(listener, gate.clone(), http, async {
                let _ = stopped.await;
            }))
        };
        Server {
            address,
            gate,
            stop: Some(stop),
            handle: Some(handle),
            runtime,
        }
    }

    /// Serves `model` and waits until it is loaded.
    fn ready(model: PathBuf, options: ServeOptions, http: HttpOptions) -> Server {
        let server = Server::start(Some(model), options, http);
        let start = Instant::now();
        while !server.gate.is_loaded() {
            assert!(start.elapsed() < Duration::from_secs(60), "never loaded");
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn tiny() -> Server {
        Server::ready(
            common::model_dir("chatglm3-tiny"),
            ServeOptions::default(),
            HttpOptions::default(),
        )
    }

    fn metrics(&self) -> MetricsSnapshot {
        self.gate.metrics()
    }

    /// Waits until `done` holds for the metrics.
    fn wait_for(&self, what: &str, done: impl Fn(&MetricsSnapshot) -> bool) -> MetricsSnapshot {
        let start = Instant::now();
        loop {
            let metrics = self.metrics();
            if done(&metrics) {
                return metrics;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "timed out waiting for {what}: {metrics:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Signals shutdown and waits for the server to return.
    fn stop(mut self) -> Result<(), HttpError> {
        let _ = self.stop.take().expect("running").send(());
        let handle = self.handle.take().expect("running");
        self.runtime.block_on(handle).expect("joins")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A whole HTTP response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("UTF-8 body")
    }

    /// Asserts an OpenAI-shaped error with `status` and returns its `error` object.
    fn error(&self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
        let error = self.json()["error"].clone();
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        assert!(error["type"].is_string(), "{error}");
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "{error}"
        );
        error
    }
}

/// Sends a request and reads the status line and headers.
fn send(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (BufReader<TcpStream>, u16, Vec<(String, String)>) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(body).expect("write body");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (name, value) = trimmed.split_once(':').expect("header line");
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    (reader, status, headers)
}

/// The next piece of a chunked body (`None` at its end).
fn read_chunk(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let size = usize::from_str_radix(line.trim(), 16).ok()?;
    let mut data = vec![0; size + 2];
    reader.read_exact(&mut data).ok()?;
    data.truncate(size);
    (size > 0).then_some(data)
}

fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let (mut reader, status, headers) = send(address, method, path, headers, body);
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            body.extend(chunk);
        }
    } else if method != "HEAD" {
        reader.read_to_end(&mut body).expect("body");
    }
    Response {
        status,
        headers,
        body,
    }
}

fn get(address: SocketAddr, path: &str) -> Response {
    request(address, "GET", path, &[], b"")
}

fn post(address: SocketAddr, body: &Value) -> Response {
    post_raw(address, &body.to_string(), &[])
}

fn post_raw(address: SocketAddr, body: &str, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(
        address,
        "POST",
        "/v1/chat/completions",
        &all,
        body.as_bytes(),
    )
}

/// A server-sent-event stream being read.
struct Events {
    reader: BufReader<TcpStream>,
    pending: String,
    status: u16,
    headers: Vec<(String, String)>,
}

impl Events {
    fn open(address: SocketAddr, body: &Value) -> Events {
        let body = body.to_string();
        let (reader, status, headers) = send(
            address,
            "POST",
            "/v1/chat/completions",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        Events {
            reader,
            pending: String::new(),
            status,
            headers,
        }
    }

    /// The next event's data (`None` when the stream ended).
    fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let event: String = self.pending.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Some(data.join("\n"));
            }
            let chunk = read_chunk(&mut self.reader)?;
            self.pending
                .push_str(std::str::from_utf8(&chunk).expect("events split on UTF-8"));
        }
    }

    /// Every remaining event: chunks as JSON, and whether `[DONE]` ended them.
    fn rest(mut self) -> (Vec<Value>, bool) {
        let mut chunks = Vec::new();
        while let Some(data) = self.next_data() {
            if data == "[DONE]" {
                assert!(self.next_data().is_none(), "events after [DONE]");
                return (chunks, true);
            }
            chunks.push(serde_json::from_str(&data).expect("chunk JSON"));
        }
        (chunks, false)
    }
}

/// The text, finish reason and usage a stream's chunks carry, checking their shape.
fn assemble(chunks: &[Value]) -> (String, Option<String>, Option<Value>) {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    assert_eq!(
        chunks[0]["choices"][0]["delta"]["role"], "assistant",
        "the first chunk carries the role"
    );
    let id = chunks[0]["id"].clone();
    for chunk in chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id, "one id per completion");
        let choices = chunk["choices"].as_array().expect("choices");
        if choices.is_empty() {
            usage = Some(chunk["usage"].clone());
            continue;
        }
        assert!(
            finish.is_none(),
            "nothing but usage after the finish reason"
        );
        if let Some(content) = choices[0]["delta"]["content"].as_str() {
            text.push_str(content);
        }
        if let Some(reason) = choices[0]["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (text, finish, usage)
}

/// The value of the unlabelled counter or gauge `name` in Prometheus text.
fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{text}"))
}

fn chat(prompt: &str, max_tokens: usize) -> Value {
    json!({
        "model": "anything",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[test]
fn models_health_metrics_and_routes() {
    let server = Server::tiny();
    let address = server.address;

    let health = get(address, "/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "ok");

    let models = get(address, "/v1/models");
    assert_eq!(models.status, 200);
    let list = models.json();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], "tiny");
    assert_eq!(list["data"][0]["object"], "model");
    let model = get(address, "/v1/models/tiny");
    assert_eq!(model.json()["id"], "tiny");
    let error = get(address, "/v1/models/gpt-4").error(404);
    assert_eq!(error["code"], "model_not_found");

    let error = get(address, "/v1/nothing").error(404);
    assert_eq!(error["code"], "not_found");
    let error = request(address, "DELETE", "/v1/models", &[], b"").error(405);
    assert_eq!(error["code"], "method_not_allowed");
    request(address, "GET", "/v1/chat/completions", &[], b"").error(405);

    let page = get(address, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().contains("<html"), "the chat page");
    assert!(page.header("content-security-policy").is_some());

    post(address, &chat("你好", 4));
    let metrics = get(address, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = metrics.text();
    for line in [
        "chathub_model_loaded 1",
        "chathub_requests_running 0",
        "chathub_requests_queued 0",
        "chathub_requests_total 1",
        "chathub_requests_completed_total 1",
        "chathub_generated_tokens_total 4",
        "chathub_time_to_first_token_seconds_count 1",
        "chathub_request_duration_seconds_count 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} in\n{text}");
    }
    let value = |name: &str| metric(&text, name);
    // A prompt pass and a pass per token after the first (next-turn warm-ups may add some).
    let passes = value("chathub_forward_passes_total");
    assert!(passes >= 4, "{passes} passes");
    assert!(value("chathub_forward_pass_sequences_total") >= passes);
}

/// The JSON reply is the core's own reply for the same request, and streaming it gives the
/// same text.
#[test]
fn replies_match_the_core_whole_and_streamed() {
    let server = Server::tiny();
    let engine = common::load("chatglm3-tiny");
    for (prompt, max_tokens) in [("你好", 12), ("What is 2 + 2?", 20), ("写一首诗", 30)] {
        let core = engine
            .chat(
                &chathub::ChatRequest::new(prompt)
                    .history(vec![chathub::Message::system(
                        "You are a helpful assistant.",
                    )])
                    .max_new_tokens(max_tokens)
                    .greedy(),
            )
            .expect("core");
        let whole = post(server.address, &chat(prompt, max_tokens));
        assert_eq!(whole.status, 200, "{}", whole.text());
        assert_eq!(whole.header("content-type"), Some("application/json"));
        let whole = whole.json();
        assert_eq!(whole["object"], "chat.completion");
        assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(whole["model"], "anything", "the asked-for name is echoed");
        assert!(whole["created"].as_u64().is_some());
        let choice = &whole["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], core.text.as_str(), "{prompt}");
        let finish = if core.finish_reason == chathub::FinishReason::Length {
            "length"
        } else {
            "stop"
        };
        assert_eq!(choice["finish_reason"], finish);
        let usage = &whole["usage"];
        assert_eq!(usage["prompt_tokens"], core.usage.prompt_tokens);
        assert_eq!(usage["completion_tokens"], core.usage.completion_tokens);
        assert_eq!(
            usage["total_tokens"],
            core.usage.prompt_tokens + core.usage.completion_tokens
        );
        assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());

        let body = with(
            chat(prompt, max_tokens),
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let events = Events::open(server.address, &body);
        assert_eq!(events.status, 200);
        let content_type = events
            .headers
            .iter()
            .find(|(n, _)| n == "content-type")
            .map(|(_, v)| v.clone());
        assert!(content_type.unwrap().starts_with("text/event-stream"));
        let (chunks, done) = events.rest();
        assert!(done, "the stream ends with data: [DONE]");
        let (text, finish_reason, usage) = assemble(&chunks);
        assert_eq!(text, core.text, "streamed = whole for {prompt}");
        assert_eq!(finish_reason.as_deref(), Some(finish));
        let usage = usage.expect("a usage chunk with include_usage");
        assert_eq!(usage["completion_tokens"], core.usage.completion_tokens);

        // Without include_usage, no usage chunk.
        let (chunks, done) = Events::open(
            server.address,
            &with(chat(prompt, max_tokens), json!({"stream": true})),
        )
        .rest();
        assert!(done);
        assert!(chunks
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty()));
    }
}

/// Stop strings end the reply before them, and a stream never shows any of them.
#[test]
fn stop_strings_are_never_shown() {
    let server = Server::tiny();
    let whole = post(server.address, &chat("写一首诗", 40)).json();
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 8, "a reply long enough to cut: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let before = &text[..text.find(&stop).expect("stop in text")];
    let body = with(
        chat("写一首诗", 40),
        json!({"stop": [stop.clone(), "never-appears"]}),
    );
    let cut = post(server.address, &body).json();
    assert_eq!(cut["choices"][0]["message"]["content"], before);
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    let (chunks, _) = Events::open(server.address, &with(body, json!({"stream": true}))).rest();
    let (streamed, finish, _) = assemble(&chunks);
    assert_eq!(streamed, before, "stop {stop:?} shown while streaming");
    assert_eq!(finish.as_deref(), Some("stop"));
}

#[test]
fn client_mistakes_get_openai_errors_never_5xx() {
    let server = Server::tiny();
    let address = server.address;
    let cases: Vec<(Value, &str)> = vec![
        (json!({"messages": []}), "messages"),
        (json!({"model": "x"}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
            "messages[0].content[0]",
        ),
        (with(chat("hi", 4), json!({"n": 2})), "n"),
        (
            with(chat("hi", 4), json!({"temperature": 3})),
            "temperature",
        ),
        (
            with(chat("hi", 4), json!({"temperature": "hot"})),
            "temperature",
        ),
        (with(chat("hi", 4), json!({"top_p": 1.5})), "top_p"),
        (with(chat("hi", 4), json!({"max_tokens": -1})), "max_tokens"),
        (with(chat("hi", 4), json!({"max_tokens": 0})), "max_tokens"),
        (with(chat("hi", 4), json!({"stop": [""]})), "stop"),
        (
            with(chat("hi", 4), json!({"presence_penalty": 1})),
            "presence_penalty",
        ),
        (
            with(chat("hi", 4), json!({"logit_bias": {"1": 5}})),
            "logit_bias",
        ),
        (
            with(chat("hi", 4), json!({"tools": [{"type": "function"}]})),
            "tools[0]",
        ),
        (
            with(chat("hi", 4), json!({"stream_options": 3})),
            "stream_options",
        ),
        (with(chat("hi", 4), json!({"stream": "yes"})), "stream"),
    ];
    for (body, param) in cases {
        let error = post(address, &body).error(400);
        assert_eq!(error["param"], param, "{body}: {error}");
        assert_eq!(error["type"], "invalid_request_error");
        // The same mistake with stream: true is a JSON 400 too, not an event stream.
        if param != "stream" {
            let error = post(address, &with(body.clone(), json!({"stream": true}))).error(400);
            assert_eq!(error["param"], param, "{body}: {error}");
        }
    }
    let error = post_raw(address, "{not json", &[]).error(400);
    assert_eq!(error["code"], "invalid_json");
    let error = post_raw(address, "[1, 2]", &[]).error(400);
    assert_eq!(error["param"], "body");

    // A prompt beyond the model's context (2048 tokens).
    let long = "你好 ".repeat(3000);
    let error = post(address, &chat(&long, 4)).error(400);
    assert_eq!(error["code"], "context_length_exceeded");
    let error = post(address, &with(chat(&long, 4), json!({"stream": true}))).error(400);
    assert_eq!(error["code"], "context_length_exceeded");
    let metrics = server.metrics();
    assert_eq!(metrics.active, 0);
    assert_eq!(metrics.completed, 0, "nothing was generated");
}

#[test]
fn body_and_prompt_limits() {
    let server = Server::ready(
        common::model_dir("chatglm3-tiny"),
        ServeOptions::default().max_prompt_bytes(1000),
        HttpOptions::default().max_body_bytes(4096),
    );
    let big = chat(&"x".repeat(5000), 4);
    let error = post(server.address, &big).error(413);
    assert_eq!(error["code"], "request_too_large");
    let error = post(server.address, &chat(&"x".repeat(2000), 4)).error(400);
    assert_eq!(error["param"], "prompt");
    assert_eq!(post(server.address, &chat("hi", 2)).status, 200);
}

#[test]
fn api_key_and_cors() {
    let server = Server::ready(
        common::model_dir("chatglm3-tiny"),
        ServeOptions::default(),
        HttpOptions::default()
            .api_key("sk-test-key")
            .cors_origin("https://app.example"),
    );
    let address = server.address;
    let error = post(address, &chat("hi", 2)).error(401);
    assert_eq!(error["code"], "invalid_api_key");
    let body = chat("hi", 2).to_string();
    post_raw(address, &body, &[("Authorization", "Bearer sk-test-kez")]).error(401);
    post_raw(
        address,
        &body,
        &[("Authorization", "Bearer sk-test-key-longer")],
    )
    .error(401);
    post_raw(address, &body, &[("Authorization", "sk-test-key")]).error(401);
    let ok = post_raw(address, &body, &[("Authorization", "Bearer sk-test-key")]);
    assert_eq!(ok.status, 200, "{}", ok.text());
    get(address, "/v1/models").error(401);
    get(address, "/metrics").error(401);
    assert_eq!(get(address, "/health").status, 200, "health needs no key");
    assert_eq!(
        get(address, "/").status,
        200,
        "the page asks for the key itself"
    );

    let preflight = request(
        address,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("Origin", "https://app.example"),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "authorization, content-type",
            ),
        ],
        b"",
    );
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(preflight
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    let allowed = post_raw(
        address,
        &body,
        &[
            ("Authorization", "Bearer sk-test-key"),
            ("Origin", "https://app.example"),
        ],
    );
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let other = post_raw(
        address,
        &body,
        &[
            ("Authorization", "Bearer sk-test-key"),
            ("Origin", "https://evil.example"),
        ],
    );
    assert_eq!(other.header("access-control-allow-origin"), None);
}

#[test]
fn loading_is_503_and_health_says_so() {
    let server = Server::start(None, ServeOptions::default(), HttpOptions::default());
    let health = get(server.address, "/health");
    assert_eq!(health.status, 503);
    assert_eq!(health.json()["status"], "loading");
    let refused = post(server.address, &chat("hi", 2));
    // The openai SDKs wait this long before each of their retries.
    assert_eq!(refused.header("retry-after"), Some("5"));
    let error = refused.error(503);
    assert_eq!(error["code"], "model_loading");
    let error = post(
        server.address,
        &with(chat("hi", 2), json!({"stream": true})),
    )
    .error(503);
    assert_eq!(error["code"], "model_loading");
}

#[test]
fn a_full_queue_is_429_with_retry_after() {
    let server = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default().max_concurrent(1).max_queue(0),
        HttpOptions::default(),
    );
    let mut running = Events::open(
        server.address,
        &with(chat("hi", 2000), json!({"stream": true})),
    );
    running.next_data().expect("first chunk");
    server.wait_for("the generation", |m| m.active == 1);
    let busy = post(server.address, &chat("hi", 2));
    let error = busy.error(429);
    assert_eq!(busy.header("retry-after"), Some("1"));
    assert_eq!(error["code"], "server_busy");
    drop(running);
    server.wait_for("the cancellation", |m| m.active == 0 && m.cancelled == 1);
    assert_eq!(server.metrics().rejected, 1);
}

/// A client that hangs up mid-stream stops its generation within a token.
#[test]
fn a_disconnect_mid_stream_stops_generation() {
    let server = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default(),
        HttpOptions::default(),
    );
    let mut events = Events::open(
        server.address,
        &with(chat("hi", 2000), json!({"stream": true})),
    );
    for _ in 0..4 {
        events.next_data().expect("chunks");
    }
    drop(events);
    let metrics = server.wait_for("the cancellation", |m| m.active == 0);
    assert_eq!(metrics.cancelled, 1);
    assert_eq!(metrics.completed, 0);
    // The slot is free again.
    assert_eq!(post(server.address, &chat("hi", 2)).status, 200);
}

/// A non-streaming request whose client hangs up stops too, and so does one still queued.
#[test]
fn a_disconnect_while_generating_or_queued_stops_it() {
    let server = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default().max_concurrent(1),
        HttpOptions::default(),
    );
    let open = |body: &Value| {
        let mut stream = TcpStream::connect(server.address).expect("connect");
        let body = body.to_string();
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        stream
    };
    let generating = open(&chat("hi", 2000));
    server.wait_for("the generation", |m| m.active == 1);
    let queued = open(&chat("hi", 2000));
    server.wait_for("the queued request", |m| m.queued == 1);
    drop(queued);
    server.wait_for("the queue to empty", |m| m.queued == 0);
    assert_eq!(server.metrics().active, 1, "the first one still runs");
    drop(generating);
    let metrics = server.wait_for("the cancellation", |m| m.active == 0);
    assert_eq!(metrics.cancelled, 1);
    assert_eq!(metrics.completed, 0, "the queued one never ran");
}

/// Eight clients at once get exactly what each gets alone.
#[test]
fn concurrent_requests_equal_their_solo_runs() {
    let server = Server::ready(
        common::model_dir("chatglm3-tiny"),
        ServeOptions::default().max_concurrent(2),
        HttpOptions::default(),
    );
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("第{i}个问题：1 + {i} = ?"))
        .collect();
    let body = |i: usize| {
        let mut body = chat(&prompts[i], 16);
        if i % 2 == 1 {
            body["stream"] = json!(true);
        }
        body
    };
    let text = |address: SocketAddr, body: &Value| -> String {
        if body["stream"] == json!(true) {
            assemble(&Events::open(address, body).rest().0).0
        } else {
            post(address, body).json()["choices"][0]["message"]["content"]
                .as_str()
                .expect("content")
                .to_string()
        }
    };
    let solo: Vec<String> = (0..8).map(|i| text(server.address, &body(i))).collect();
    let address = server.address;
    let together: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let body = body(i);
                scope.spawn(move || text(address, &body))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joins"))
            .collect()
    });
    assert_eq!(together, solo);
}

/// Shutdown lets a running stream finish, then the server returns.
#[test]
fn shutdown_drains_running_streams() {
    let server = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default(),
        HttpOptions::default(),
    );
    let mut events = Events::open(
        server.address,
        &with(chat("hi", 40), json!({"stream": true})),
    );
    events.next_data().expect("first chunk");
    let address = server.address;
    let stopping = std::thread::spawn(move || server.stop());
    let (chunks, done) = events.rest();
    assert!(done, "the running stream finished");
    let (_, finish, _) = assemble(&{
        let mut all = vec![
            json!({"id": chunks[0]["id"], "object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant"}}]}),
        ];
        all.extend(chunks);
        all
    });
    assert_eq!(finish.as_deref(), Some("length"));
    stopping.join().expect("joins").expect("clean stop");
    assert!(TcpStream::connect(address).is_err(), "no longer accepting");
}

/// A model that answers with a call: `tool_calls` and `finish_reason: "tool_calls"`, whole and
/// streamed; the tool's result goes back as a `tool` message.
#[test]
fn tool_calls_come_back_in_openai_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    // (A scripted reply may not repeat a token, hence no arguments.)
    common::scripted_glm4(dir.path(), "get_weather\n{}");
    let server = Server::ready(
        dir.path().to_path_buf(),
        ServeOptions::default(),
        HttpOptions::default(),
    );
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }]);
    let body = json!({
        "model": "glm-4",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": tools,
        "temperature": 0,
        "max_tokens": 30,
    });
    let whole = post(server.address, &body);
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["function"]["name"], "get_weather");
    let arguments: Value = serde_json::from_str(
        call["function"]["arguments"]
            .as_str()
            .expect("a JSON string"),
    )
    .expect("arguments JSON");
    assert_eq!(arguments, json!({}));

    let (chunks, done) =
        Events::open(server.address, &with(body.clone(), json!({"stream": true}))).rest();
    assert!(done);
    let (text, finish, _) = assemble(&chunks);
    assert_eq!(text, "", "a call shows no text");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let streamed_call = chunks
        .iter()
        .find_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0).cloned())
        .expect("a tool_calls delta");
    assert_eq!(streamed_call["index"], 0);
    assert_eq!(streamed_call["function"]["name"], "get_weather");

    // The call and its result as history: accepted, and the tool's result is the new message.
    let follow_up = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperature\": 21}"},
        ],
        "tools": tools,
        "temperature": 0,
        "max_tokens": 4,
    });
    let answered = post(server.address, &follow_up);
    assert_eq!(answered.status, 200, "{}", answered.text());
    // tool_choice "none" hides the tools; naming a missing function is a 400.
    let none = with(body.clone(), json!({"tool_choice": "none"}));
    assert_eq!(post(server.address, &none).status, 200);
    let missing = with(
        body,
        json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    );
    assert_eq!(
        post(server.address, &missing).error(400)["param"],
        "tool_choice"
    );
}

/// The official `openai` Python package as the client (CI installs it in a venv and points
/// CHATHUB_TEST_PYTHON at that interpreter).
#[test]
fn the_official_openai_python_client() {
    let Some(python) = std::env::var_os("CHATHUB_TEST_PYTHON") else {
        assert!(
            std::env::var_os("CHATHUB_REQUIRE_CLIENTS").is_none(),
            "CHATHUB_REQUIRE_CLIENTS is set but CHATHUB_TEST_PYTHON is not"
        );
        eprintln!("skipped: set CHATHUB_TEST_PYTHON to a Python with the openai package");
        return;
    };
    let server = Server::tiny();
    let slow = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default(),
        HttpOptions::default(),
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_sdk.py");
    let output = std::process::Command::new(python)
        .arg(&script)
        .arg(format!("http://{}/v1", server.address))
        .arg(format!("http://{}/v1", slow.address))
        .output()
        .expect("runs python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    slow.wait_for("the cancelled stream", |m| {
        m.active == 0 && m.cancelled >= 1
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `chathub serve --http` (with `--listen` too: one model, both protocols): a stream running
/// at SIGTERM finishes, then the process exits 0.
#[test]
fn the_serve_command_drains_on_sigterm() {
    let (http_port, grpc_port) = (free_port(), free_port());
    let mut args = vec![
        "serve".to_string(),
        "--model".into(),
        common::slow_model_dir().display().to_string(),
        "--http".into(),
        format!("127.0.0.1:{http_port}"),
    ];
    if cfg!(feature = "grpc") {
        args.extend(["--listen".into(), format!("127.0.0.1:{grpc_port}")]);
    }
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chathub"))
        .args(&args)
        .env("CHATHUB_GRACE_PERIOD", "20")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let address: SocketAddr = format!("127.0.0.1:{http_port}").parse().expect("address");
    let start = Instant::now();
    loop {
        if TcpStream::connect(address).is_ok() && get(address, "/health").status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "never healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        get(address, "/v1/models").json()["data"][0]["id"],
        "chathub-grpc-slow-v3"
    );
    if cfg!(feature = "grpc") {
        assert!(
            TcpStream::connect(("127.0.0.1", grpc_port)).is_ok(),
            "gRPC listens beside HTTP"
        );
    }
    let mut events = Events::open(address, &with(chat("hi", 40), json!({"stream": true})));
    events.next_data().expect("first chunk");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let (chunks, done) = events.rest();
    assert!(
        done,
        "the running stream finished after SIGTERM ({} chunks)",
        chunks.len()
    );
    let status = child.wait().expect("waits");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

/// A model that cannot load: `serve` says why and exits non-zero.
#[test]
fn the_serve_command_reports_a_bad_model() {
    let port = free_port();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chathub"))
        .args([
            "serve",
            "--model",
            "/no/such/model",
            "--http",
            &format!("127.0.0.1:{port}"),
        ])
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/no/such/model"), "{stderr}");
}

/// The chat page in headless Chromium (tests/web/test_page.py, Selenium): a streamed reply,
/// Stop cancelling a long one, HTML shown as text. Needs CHATHUB_TEST_PYTHON (with selenium)
/// and Debian's chromium and chromium-driver, which CI installs; CHATHUB_SCREENSHOT=FILE.png
/// saves the README's screenshot.
#[test]
fn the_chat_page_in_a_real_browser() {
    let driver = std::env::var_os("CHROMEDRIVER").unwrap_or_else(|| "/usr/bin/chromedriver".into());
    let (Some(python), true) = (
        std::env::var_os("CHATHUB_TEST_PYTHON"),
        std::path::Path::new(&driver).exists(),
    ) else {
        assert!(
            std::env::var_os("CHATHUB_REQUIRE_CLIENTS").is_none(),
            "CHATHUB_REQUIRE_CLIENTS is set but the browser test cannot run \
             (CHATHUB_TEST_PYTHON with selenium, and chromium-driver, are needed)"
        );
        eprintln!("skipped: needs CHATHUB_TEST_PYTHON (with selenium) and chromium-driver");
        return;
    };
    // Streams token by token (ChatGLM2) and never stops on its own: Stop always finds a reply
    // still streaming.
    let server = Server::ready(
        common::slow_model_dir(),
        ServeOptions::default(),
        HttpOptions::default(),
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/web/test_page.py");
    let mut command = std::process::Command::new(python);
    command
        .arg(&script)
        .arg(format!("http://{}", server.address));
    if let Some(screenshot) = std::env::var_os("CHATHUB_SCREENSHOT") {
        command.arg(screenshot);
    }
    let output = command.output().expect("runs python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    let metrics = server.wait_for("no generation running", |m| m.active == 0);
    assert!(
        metrics.cancelled >= 1,
        "Stop cancelled a generation: {metrics:?}"
    );
}

/// A client that sends half a request head, or leaves a kept-alive connection idle, is cut off
/// after the header timeout; one that sends its body too slowly gets 408.
#[test]
fn slow_and_idle_clients_are_cut_off() {
    let server = Server::ready(
        common::model_dir("chatglm3-tiny"),
        ServeOptions::default(),
        HttpOptions::default().header_timeout(Duration::from_millis(500)),
    );
    let closed_within = |mut stream: TcpStream, limit: Duration| {
        stream.set_read_timeout(Some(limit)).expect("timeout");
        let start = Instant::now();
        let mut rest = Vec::new();
        // EOF (or a reset) once the server gives up; a read timeout means it never did.
        let ended = match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => {
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut
            }
        };
        assert!(ended, "the server kept the connection open");
        (start.elapsed(), rest)
    };

    let mut half = TcpStream::connect(server.address).expect("connect");
    half.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    let (elapsed, _) = closed_within(half, Duration::from_secs(10));
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");

    let mut idle = TcpStream::connect(server.address).expect("connect");
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut reader = BufReader::new(idle.try_clone().expect("clone"));
    let mut status = String::new();
    reader.read_line(&mut status).expect("a response");
    assert!(status.contains("200"), "{status}");
    closed_within(idle, Duration::from_secs(10));

    let mut slow = TcpStream::connect(server.address).expect("connect");
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\":",
    )
    .expect("write");
    let mut reader = BufReader::new(slow);
    let mut status = String::new();
    reader.read_line(&mut status).expect("a response");
    assert!(status.contains("408"), "{status}");
}

/// CPU time (user + system) of a process so far, in clock ticks (Linux).
#[cfg(target_os = "linux")]
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Out of file descriptors, the server backs off instead of spinning on accept, and serves
/// again once connections close.
#[cfg(target_os = "linux")]
#[test]
fn running_out_of_file_descriptors_does_not_spin() {
    let port = free_port();
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 64 && exec \"$0\" serve --demo --http 127.0.0.1:{port} --max-connections 1000 --header-timeout 3"
        ))
        .arg(env!("CARGO_BIN_EXE_chathub"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let start = Instant::now();
    while !(TcpStream::connect(address).is_ok() && get(address, "/health").status == 200) {
        assert!(start.elapsed() < Duration::from_secs(60), "never healthy");
        std::thread::sleep(Duration::from_millis(20));
    }
    let flood: Vec<TcpStream> = (0..120)
        .filter_map(|_| TcpStream::connect(address).ok())
        .collect();
    assert!(flood.len() > 64, "the backlog takes the flood");
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(child.id());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_ticks(child.id()) - before;
    // A spinning accept loop burns the whole 2 s (200 ticks at 100 Hz).
    assert!(
        spent < 40,
        "{spent} ticks of CPU in 2 s while out of descriptors"
    );
    drop(flood);
    let start = Instant::now();
    loop {
        let healthy = TcpStream::connect(address).is_ok() && get(address, "/health").status == 200;
        if healthy {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// With a key/value budget that holds one request's cache, two requests sent at once never
/// share a forward pass (the second waits for the first's cache to be freed) and both
/// complete; a request that could never fit is a 400 naming `max_tokens`.
#[test]
fn the_kv_cache_budget_admits_what_fits() {
    let engine = common::load("chatglm3-tiny");
    let body = chat("你好", 24);
    let core = chathub::ChatRequest::new("你好")
        .history(vec![chathub::Message::system(
            "You are a helpful assistant.",
        )])
        .max_new_tokens(24);
    let need = engine.kv_cache_bytes_for(&core).expect("valid") as u64;
    let server = Server::ready(
        common::model_dir("chatglm3-tiny"),
        ServeOptions::default()
            .max_concurrent(2)
            .kv_cache_bytes(need + need / 2),
        HttpOptions::default(),
    );
    let address = server.address;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| post(address, &body).status))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joins"))
            .collect()
    });
    assert_eq!(statuses, [200, 200]);
    let metrics = get(address, "/metrics").text();
    let value = |name: &str| metric(&metrics, name);
    assert_eq!(
        value("chathub_forward_pass_sequences_total"),
        value("chathub_forward_passes_total"),
        "the two requests' caches never fit together, so they never shared a pass"
    );
    let error = post(address, &chat("你好", 4000)).error(400);
    assert_eq!(error["param"], "max_tokens", "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("--kv-cache-bytes"),
        "{error}"
    );
}
