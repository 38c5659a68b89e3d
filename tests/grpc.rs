//! The gRPC server through a real tonic client over loopback.
#![cfg(feature = "grpc")]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chathub::grpc::proto::chat_hub_client::ChatHubClient;
use chathub::grpc::proto::{ChatRequest, Message};
use chathub::grpc::{serve_service, ChatHubService, ServeOptions};
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

struct TestServer {
    address: String,
    service: ChatHubService,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), chathub::grpc::ServeError>>,
}

impl TestServer {
    async fn start(options: ServeOptions, load_delay: Duration) -> TestServer {
        Self::start_model(options, load_delay, common::model_dir("chatglm2-tiny")).await
    }

    async fn start_model(
        options: ServeOptions,
        load_delay: Duration,
        model: PathBuf,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = format!("http://{}", listener.local_addr().expect("addr"));
        let service = ChatHubService::new(options.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let load = move || {
            std::thread::sleep(load_delay);
            chathub::Engine::load(&model)
        };
        let handle = tokio::spawn(serve_service(
            listener,
            service.clone(),
            load,
            options.grace_period,
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            address,
            service,
            stop: Some(stop),
            handle,
        }
    }

    async fn ready(options: ServeOptions) -> TestServer {
        let server = Self::start(options, Duration::ZERO).await;
        server.wait_serving().await;
        server
    }

    /// A server over [`slow_model_dir`], for tests that stop a reply midway.
    async fn ready_slow(options: ServeOptions) -> TestServer {
        let server = Self::start_model(options, Duration::ZERO, common::slow_model_dir()).await;
        server.wait_serving().await;
        server
    }

    async fn channel(&self) -> Channel {
        for _ in 0..100 {
            if let Ok(channel) = Channel::from_shared(self.address.clone())
                .expect("uri")
                .connect()
                .await
            {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server did not come up");
    }

    async fn client(&self) -> ChatHubClient<Channel> {
        ChatHubClient::new(self.channel().await)
    }

    async fn health(&self) -> ServingStatus {
        let mut health = HealthClient::new(self.channel().await);
        let reply = health
            .check(HealthCheckRequest {
                service: "aihub.ChatHub".into(),
            })
            .await
            .expect("health answers");
        ServingStatus::try_from(reply.into_inner().status).expect("known status")
    }

    async fn wait_serving(&self) {
        for _ in 0..500 {
            if self.health().await == ServingStatus::Serving {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never SERVING");
    }

    /// Waits until no generation runs (cancelled ones finish their current token first).
    async fn wait_idle(&self) {
        let start = Instant::now();
        while self.service.metrics().active > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "generation never stopped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        self.handle.await.expect("joins").expect("clean shutdown");
    }
}

/// A reference case as AIHub sends it: ChatGLM2's `chatglm2_conv4_zh`, whose reply streams
/// token by token and is plain text.
fn conv1() -> (common::Case, ChatRequest) {
    case_request("chatglm2_conv4_zh")
}

fn case_request(id: &str) -> (common::Case, ChatRequest) {
    let case = common::all_cases()
        .into_iter()
        .find(|c| c.id == id)
        .expect("case");
    let request = ChatRequest {
        prompt: case.request.prompt.clone(),
        history: case
            .request
            .history
            .iter()
            .map(|m| Message {
                role: m.role.to_string(),
                content: m.content.clone(),
            })
            .collect(),
        // The prompt + 20 reply tokens; a top_p this small keeps only the best token.
        max_length: (case.prompt_token_ids.len() + 20) as i32,
        top_p: 1e-6,
        temperature: 0.0,
    };
    (case, request)
}

fn long(prompt: &str) -> ChatRequest {
    ChatRequest {
        prompt: prompt.into(),
        history: vec![],
        max_length: 2000,
        top_p: 1e-6,
        temperature: 0.0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_and_stream_match_the_reference() {
    let server = TestServer::ready(ServeOptions::default()).await;
    let mut client = server.client().await;
    let (case, request) = conv1();
    let reply = client
        .chat(request.clone())
        .await
        .expect("chat")
        .into_inner()
        .response;
    assert_eq!(reply, case.greedy_text_until_stop);

    let mut stream = client
        .streaming_chat(request)
        .await
        .expect("stream")
        .into_inner();
    let mut replies = Vec::new();
    while let Some(item) = stream.message().await.expect("item") {
        replies.push(item.response);
    }
    assert!(replies.len() > 1);
    for pair in replies.windows(2) {
        assert!(pair[1].starts_with(&pair[0]), "cumulative: {pair:?}");
    }
    assert_eq!(
        replies.last(),
        Some(&reply),
        "last streamed reply equals the unary reply"
    );

    // All fields at proto3's zero: the model's defaults (sampling), still a reply.
    let defaults = ChatRequest {
        prompt: "你好".into(),
        max_length: 0,
        top_p: 0.0,
        temperature: 0.0,
        history: vec![],
    };
    client.chat(defaults).await.expect("defaults work");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_arguments_name_the_field() {
    let server = TestServer::ready(ServeOptions::default()).await;
    let mut client = server.client().await;
    let (_, base) = conv1();
    let cases = [
        (
            "max_length",
            ChatRequest {
                max_length: -1,
                ..base.clone()
            },
        ),
        (
            "top_p",
            ChatRequest {
                top_p: 1.5,
                ..base.clone()
            },
        ),
        (
            "top_p",
            ChatRequest {
                top_p: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "temperature",
            ChatRequest {
                temperature: -0.5,
                ..base.clone()
            },
        ),
        (
            "temperature",
            ChatRequest {
                temperature: f32::NAN,
                ..base.clone()
            },
        ),
        (
            "prompt",
            ChatRequest {
                prompt: String::new(),
                ..base.clone()
            },
        ),
        (
            "wizard",
            ChatRequest {
                history: vec![Message {
                    role: "wizard".into(),
                    content: "x".into(),
                }],
                ..base.clone()
            },
        ),
        (
            "max_length 5",
            ChatRequest {
                max_length: 5,
                ..base.clone()
            },
        ),
    ];
    for (field, request) in cases {
        let status = client.chat(request.clone()).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
        let status = client.streaming_chat(request).await.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "stream {field}");
    }
    assert_eq!(server.service.metrics().active, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_leaves_stops_the_generation() {
    let server = TestServer::ready_slow(ServeOptions::default()).await;
    let mut client = server.client().await;
    let mut stream = client
        .streaming_chat(long("Tell me everything"))
        .await
        .expect("stream")
        .into_inner();
    for _ in 0..3 {
        stream.message().await.expect("item").expect("not finished");
    }
    drop(stream);
    server.wait_idle().await;
    let metrics = server.service.metrics();
    assert_eq!(metrics.cancelled, 1, "{metrics:?}");
    assert!(
        metrics.generated_tokens < 3 + 8 + 4,
        "stopped right away: {metrics:?}"
    );

    // Dropping a unary call's future stops its generation as well (aborted once it runs: the
    // slow model never finishes on its own).
    let call = tokio::spawn(async move { client.chat(long("Tell me more")).await });
    let start = Instant::now();
    while server.service.metrics().active == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    call.abort();
    server.wait_idle().await;
    assert_eq!(server.service.metrics().cancelled, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_stop_generation_with_deadline_exceeded() {
    let server = TestServer::ready_slow(ServeOptions::default()).await;
    let mut client = server.client().await;
    let mut request = tonic::Request::new(long("Tell me everything"));
    request.set_timeout(Duration::from_millis(300));
    let status = client.chat(request).await.expect_err("too slow");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    server.wait_idle().await;
    assert_eq!(server.service.metrics().cancelled, 1);

    let mut request = tonic::Request::new(long("Tell me everything"));
    request.set_timeout(Duration::from_millis(300));
    let mut stream = client
        .streaming_chat(request)
        .await
        .expect("stream")
        .into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("finished before the deadline"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    server.wait_idle().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_beyond_the_queue_are_turned_away() {
    let options = ServeOptions {
        max_concurrent: 1,
        max_queue: 1,
        ..ServeOptions::default()
    };
    let server = TestServer::ready(options).await;
    let mut first = server.client().await;
    let mut running = first
        .streaming_chat(long("first"))
        .await
        .expect("runs")
        .into_inner();
    running.message().await.expect("item");
    let mut second = server.client().await;
    let queued = tokio::spawn(async move { second.chat(conv1().1).await });
    // The running stream is not read, so it stays in its slot; wait until the second request
    // sits in the queue (the gate's own count, not a guess at timing).
    let start = Instant::now();
    while server.service.metrics().queued < 1 {
        assert!(start.elapsed() < Duration::from_secs(20), "never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut third = server.client().await;
    let status = third.chat(conv1().1).await.expect_err("queue full");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(server.service.metrics().rejected, 1);
    drop(running);
    let reply = queued
        .await
        .expect("joins")
        .expect("the queued request runs once the slot frees");
    assert_eq!(
        reply.into_inner().response,
        conv1().0.greedy_text_until_stop
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_never_mix() {
    let options = ServeOptions {
        max_concurrent: 4,
        ..ServeOptions::default()
    };
    let server = TestServer::ready(options).await;
    let prompts = [
        "What is the capital of France?",
        "晚上睡不着应该怎么办？",
        "Numbers 12345",
        "emoji 👋 ok 🙂",
    ];
    let mut expected = Vec::new();
    let mut client = server.client().await;
    for p in prompts {
        let request = ChatRequest {
            max_length: 40,
            ..long(p)
        };
        expected.push(
            client
                .chat(request)
                .await
                .expect("chat")
                .into_inner()
                .response,
        );
    }
    let tasks: Vec<_> = prompts
        .iter()
        .map(|p| {
            let request = ChatRequest {
                max_length: 40,
                ..long(p)
            };
            let address = server.address.clone();
            tokio::spawn(async move {
                let mut client = ChatHubClient::connect(address).await.expect("connect");
                let mut stream = client
                    .streaming_chat(request)
                    .await
                    .expect("stream")
                    .into_inner();
                let mut last = String::new();
                while let Some(item) = stream.message().await.expect("item") {
                    last = item.response;
                }
                last
            })
        })
        .collect();
    for (task, want) in tasks.into_iter().zip(expected) {
        assert_eq!(task.await.expect("joins"), want);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection() {
    let server = TestServer::start(ServeOptions::default(), Duration::from_millis(800)).await;
    assert_eq!(
        server.health().await,
        ServingStatus::NotServing,
        "while the model loads"
    );
    let status = server
        .client()
        .await
        .chat(conv1().1)
        .await
        .expect_err("loading");
    assert_eq!(status.code(), Code::Unavailable);
    server.wait_serving().await;

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection")
        .into_inner();
    let response = responses.message().await.expect("answer").expect("one");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"aihub.ChatHub"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_running_streams_finish() {
    let mut server = TestServer::ready(ServeOptions::default()).await;
    let mut client = server.client().await;
    let (case, request) = conv1();
    let mut stream = client
        .streaming_chat(request)
        .await
        .expect("stream")
        .into_inner();
    stream.message().await.expect("first item");
    let _ = server.stop.take().expect("running").send(());
    let mut last = String::new();
    while let Some(item) = stream.message().await.expect("stream keeps going") {
        last = item.response;
    }
    assert_eq!(last, case.greedy_text_until_stop);
    server.handle.await.expect("joins").expect("clean exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serve_command_exits_cleanly_on_sigterm() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chathub"))
        .args(["serve", "--demo", "--listen", &format!("127.0.0.1:{port}")])
        .env("CHATHUB_GRACE_PERIOD", "5")
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawns");
    let address = format!("http://127.0.0.1:{port}");
    let mut serving = false;
    for _ in 0..500 {
        if let Ok(channel) = Channel::from_shared(address.clone())
            .expect("uri")
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel);
            let reply = health
                .check(HealthCheckRequest {
                    service: "aihub.ChatHub".into(),
                })
                .await;
            if reply.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                serving = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(serving, "chathub serve --demo never became SERVING");
    let reply = ChatHubClient::connect(address)
        .await
        .expect("connect")
        .chat(conv1().1)
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("joins")
        .expect("waits");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
}

/// ChatGLM3 and GLM-4 over gRPC: the reply as the official code hands it over (no metadata
/// line), equal to the in-process engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chatglm3_and_glm4_replies_come_back_as_the_official_text() {
    for (model, id) in [
        ("chatglm3-tiny", "chatglm3_conv2_zh"),
        ("chatglm3-tiny", "chatglm3_conv1_en"),
        ("glm4-hf-tiny", "glm4_hf_system_user_zh"),
        ("glm4-chat-tiny", "glm4_chat_multi_turn"),
    ] {
        let dir = common::model_dir(model);
        let engine = chathub::Engine::load(&dir).expect("loads");
        let (case, request) = case_request(id);
        let local = engine.chat(&case.request()).expect("chat");
        let want = match &local.reply {
            chathub::Reply::Text(text) => text.clone(),
            chathub::Reply::Metadata { content, .. } => content.trim().to_string(),
            other => panic!("{id}: unexpected {other:?}"),
        };
        let server = TestServer::start_model(ServeOptions::default(), Duration::ZERO, dir).await;
        server.wait_serving().await;
        let mut client = server.client().await;
        let reply = client
            .chat(request.clone())
            .await
            .expect("chat")
            .into_inner()
            .response;
        assert_eq!(reply, want, "{id}");
        let mut stream = client
            .streaming_chat(request)
            .await
            .expect("stream")
            .into_inner();
        let mut last = String::new();
        while let Some(item) = stream.message().await.expect("item") {
            last = item.response;
        }
        assert_eq!(last, want, "{id}: the last cumulative message is the reply");
        server.stop().await;
    }
}

/// Request bytes that do not decode (truncated, or a string that is not UTF-8) are the client's
/// mistake: INVALID_ARGUMENT, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_protobuf_is_invalid_argument() {
    use prost::bytes::BufMut;
    use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};

    /// Sends its bytes as they are.
    struct Raw;
    struct RawEncoder;
    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = chathub::grpc::proto::ChatReply;
        type Encoder = RawEncoder;
        type Decoder = tonic_prost::ProstDecoder<chathub::grpc::proto::ChatReply>;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> Self::Decoder {
            tonic_prost::ProstDecoder::new(BufferSettings::default())
        }
    }

    let server = TestServer::ready(ServeOptions::default()).await;
    for bytes in [vec![0x0a, 0xff], vec![0x0a, 0x02, 0xff, 0xfe]] {
        let mut grpc = tonic::client::Grpc::new(server.channel().await);
        grpc.ready().await.expect("ready");
        let status = grpc
            .unary(
                tonic::Request::new(bytes.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static("/aihub.ChatHub/Chat"),
                Raw,
            )
            .await
            .expect_err("malformed");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bytes:?}: {status:?}"
        );
    }
    assert_eq!(server.service.metrics().active, 0);
    server.stop().await;
}

/// A connection that never sends HTTP/2's preface is closed after the handshake timeout, and
/// does not hold up a shutdown for the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_connections_are_closed_and_do_not_delay_shutdown() {
    use tokio::io::AsyncReadExt;
    let options = ServeOptions {
        handshake_timeout: Duration::from_millis(300),
        grace_period: Duration::from_secs(30),
        ..ServeOptions::default()
    };
    let server = TestServer::ready(options).await;
    let address = server.address.trim_start_matches("http://").to_string();
    let mut silent = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let start = Instant::now();
    let mut buffer = [0u8; 64];
    // The server's own preface may arrive first; then EOF (or a reset) once it gives up.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the silent connection was kept open"),
        }
    }
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );

    let _another = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let start = Instant::now();
    server.stop().await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "shutdown waited {:?} for a connection that never spoke",
        start.elapsed()
    );
}

/// Huge prompts are refused before any tokenizing: over the size limit at once, and with the
/// queue full at once; meanwhile health answers in milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_prompts_cannot_starve_the_server() {
    let options = ServeOptions {
        max_concurrent: 1,
        max_queue: 0,
        ..ServeOptions::default()
    };
    let server = TestServer::ready_slow(options).await;
    let huge = "你好".repeat(650_000); // 3.9 MB
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let calls: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let huge = huge.clone();
            async move {
                let start = Instant::now();
                let status = client.chat(long(&huge)).await.expect_err("too big");
                (status, start.elapsed())
            }
        })
        .collect();
    let calls = tokio::spawn(futures_join_all(calls));
    let health_start = Instant::now();
    assert_eq!(server.health().await, ServingStatus::Serving);
    assert!(
        health_start.elapsed() < Duration::from_secs(2),
        "health took {:?} while huge prompts arrived",
        health_start.elapsed()
    );
    for (status, took) in calls.await.expect("joins") {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("prompt"), "{status:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    // The only slot busy and no queue: a big prompt under the limit is turned away before it
    // is tokenized.
    let mut client = server.client().await;
    let mut running = client
        .streaming_chat(long("hold the slot"))
        .await
        .expect("runs")
        .into_inner();
    running.message().await.expect("item");
    let big = "你好".repeat(170_000); // 1 MB, under the limit
    let start = Instant::now();
    let status = server
        .client()
        .await
        .chat(long(&big))
        .await
        .expect_err("busy");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    drop(running);
    server.wait_idle().await;
    server.stop().await;
}

/// Awaits every future (the tests avoid a `futures` dependency for this one helper).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: Vec<F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for handle in handles {
        outputs.push(handle.await.expect("joins"));
    }
    outputs
}

/// A request whose key/value cache could never fit the server's budget is INVALID_ARGUMENT
/// naming `max_tokens`, on both methods; one that fits is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_beyond_the_kv_cache_budget_is_refused() {
    let server = TestServer::ready(ServeOptions::default().kv_cache_bytes(256 << 10)).await;
    let mut client = server.client().await;
    let (_, request) = conv1();
    let huge = ChatRequest {
        max_length: 8000,
        ..request.clone()
    };
    let status = client.chat(huge.clone()).await.expect_err("too big");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("max_tokens"), "{status:?}");
    let status = client.streaming_chat(huge).await.expect_err("too big");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let small = ChatRequest {
        max_length: 64,
        ..request
    };
    client.chat(small).await.expect("fits");
    server.stop().await;
}
