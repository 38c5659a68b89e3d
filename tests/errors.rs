//! Bad models and bad requests give typed errors that name the culprit, never a panic.

mod common;

use std::path::{Path, PathBuf};

use chathub::{ChatRequest, Engine, Error, ErrorKind, Message};

/// A writable copy of a fixture model.
fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).expect("mkdir");
    for entry in std::fs::read_dir(common::model_dir(name)).expect("fixture") {
        let entry = entry.expect("entry");
        let target = dir.join(entry.file_name());
        std::fs::copy(entry.path(), &target).expect("copy");
        let mut perms = std::fs::metadata(&target).expect("meta").permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&target, perms).expect("chmod");
    }
    (tmp, dir)
}

fn load_err(dir: &Path) -> Error {
    Engine::load(dir).expect_err("loading must fail")
}

fn truncate(path: &Path, keep: u64) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    file.set_len(keep).expect("truncate");
}

#[test]
fn missing_directory() {
    let err = load_err(Path::new("/no/such/model/dir"));
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains("/no/such/model/dir"), "{err}");
}

#[test]
fn missing_config_and_tokenizer() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    std::fs::remove_file(dir.join("tokenizer.model")).expect("rm");
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::MissingFile {
                what: "tokenizer.model",
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::remove_file(dir.join("config.json")).expect("rm");
    let err = load_err(&dir);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn missing_shard_is_named() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_err(&dir);
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn no_weights_at_all() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ] {
        std::fs::remove_file(dir.join(f)).expect("rm");
    }
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::MissingFile {
                what: "weights",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("pytorch_model.bin"),
        "lists what it looked for: {err}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    let shard = dir.join("model-00001-of-00002.safetensors");
    let len = std::fs::metadata(&shard).expect("meta").len();
    truncate(&shard, len / 2);
    let err = load_err(&dir);
    assert!(matches!(err, Error::Weights { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidModel);
    assert_eq!(err.path(), Some(shard.as_path()));
}

#[test]
fn truncated_pytorch_shard_names_the_file() {
    let (_tmp, dir) = copy_fixture("chatglm2-tiny");
    let shard = dir.join("pytorch_model-00002-of-00002.bin");
    let len = std::fs::metadata(&shard).expect("meta").len();
    truncate(&shard, len / 3);
    let err = load_err(&dir);
    assert_eq!(err.kind(), ErrorKind::InvalidModel, "{err:?}");
    assert!(
        err.to_string().contains("pytorch_model-00002-of-00002.bin"),
        "{err}"
    );
}

#[test]
fn config_that_disagrees_with_the_weights() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        text.replace("\"ffn_hidden_size\": 128", "\"ffn_hidden_size\": 96"),
    )
    .expect("write");
    let err = load_err(&dir);
    match &err {
        Error::ShapeMismatch {
            name,
            expected,
            found,
            path,
        } => {
            assert!(name.contains("dense_h_to_4h"), "{name}");
            assert_eq!(expected, &vec![192, 64]);
            assert_eq!(found, &vec![256, 64]);
            assert!(path.to_string_lossy().ends_with(".safetensors"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn invalid_json_config_names_the_file() {
    let (_tmp, dir) = copy_fixture("chatglm2-tiny");
    let path = dir.join("config.json");
    std::fs::write(&path, "{\"num_layers\": 2,").expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, Error::Json { .. }), "{err:?}");
    assert_eq!(err.path(), Some(path.as_path()));
}

#[test]
fn nonsense_config_values() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).expect("read");
    std::fs::write(
        &path,
        text.replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 3"),
    )
    .expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    let path = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace(
        "\"transformer.output_layer.weight\": \"model-00002-of-00002.safetensors\",",
        "",
    );
    std::fs::write(&path, text).expect("write");
    let err = load_err(&dir);
    match &err {
        Error::MissingTensor { name, .. } => assert_eq!(name, "transformer.output_layer.weight"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn garbage_tokenizer() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    std::fs::write(dir.join("tokenizer.model"), b"\x0a\xff\xff\xff not a model").expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
}

#[test]
fn out_of_range_parameters_name_the_field() {
    let engine = common::load("chatglm3-tiny");
    let base = ChatRequest::new("hi").max_new_tokens(2);
    let cases: Vec<(&str, ChatRequest)> = vec![
        ("temperature", base.clone().temperature(f64::NAN)),
        ("temperature", base.clone().temperature(-0.5)),
        ("temperature", base.clone().temperature(f64::INFINITY)),
        ("top_p", base.clone().top_p(1.5)),
        ("top_p", base.clone().top_p(-0.1)),
        ("top_p", base.clone().top_p(f64::NAN)),
        (
            "top_k",
            ChatRequest {
                top_k: Some(0),
                ..base.clone()
            },
        ),
        (
            "repetition_penalty",
            ChatRequest {
                repetition_penalty: Some(-1.0),
                ..base.clone()
            },
        ),
        ("max_new_tokens", base.clone().max_new_tokens(0)),
        ("prompt", ChatRequest::new("")),
    ];
    for (field, request) in cases {
        let err = engine.chat(&request).expect_err(field);
        match &err {
            Error::InvalidArgument { field: f, .. } => assert_eq!(*f, field, "{err}"),
            other => panic!("{field}: unexpected {other:?}"),
        }
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains(field), "{err}");
    }
    // After all that, the model still works; zeros mean "model default", as in the proto.
    assert!(engine.chat(&base).is_ok());
    assert!(engine
        .chat(&base.clone().temperature(0.0).top_p(0.0).max_length(0))
        .is_ok());
}

#[test]
fn prompt_that_cannot_fit() {
    let engine = common::load("chatglm3-tiny");
    let err = engine
        .chat(&ChatRequest::new("a long enough prompt for sure").max_length(5))
        .expect_err("too long");
    assert!(
        matches!(err, Error::PromptTooLong { limit: 5, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::PromptTooLong);
}

#[test]
fn unknown_role_in_a_request_file_is_rejected() {
    let json = r#"{"prompt": "hi", "history": [{"role": "wizard", "content": "x"}]}"#;
    let err = serde_json::from_str::<ChatRequest>(json).expect_err("bad role");
    assert!(err.to_string().contains("wizard"), "{err}");
    assert!(Message::new("function", "x").is_err());
    // OpenAI's `tool` role is a tool's result: an observation.
    assert_eq!(
        Message::new("tool", "x").expect("known").role,
        chathub::Role::Observation
    );
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    edit(&mut value);
    std::fs::write(path, value.to_string()).expect("write");
}

#[test]
fn glm4_tokenizer_files_missing_or_corrupt_are_named() {
    let (_tmp, dir) = copy_fixture("glm4-hf-tiny");
    std::fs::remove_file(dir.join("tokenizer.json")).expect("rm");
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::MissingFile {
                what: "tokenizer",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::write(
        dir.join("tokenizer.json"),
        br#"{"model": {"type": "BPE", "vocab": 3}}"#,
    )
    .expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidModel);
    assert_eq!(
        err.path(),
        Some(dir.join("tokenizer.json").as_path()),
        "{err}"
    );

    // A tokenizer.model that is neither a tiktoken file nor a sentencepiece protobuf.
    let (_tmp, dir) = copy_fixture("glm4-chat-tiny");
    std::fs::write(
        dir.join("tokenizer.model"),
        b"\x00\x01 not a tokenizer \xff",
    )
    .expect("write");
    let err = load_err(&dir);
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    assert_eq!(
        err.path(),
        Some(dir.join("tokenizer.model").as_path()),
        "{err}"
    );
}

/// A sentencepiece model with an empty user-defined piece, which matched at every position
/// without advancing and grew the encoder's symbol list until memory ran out (found by
/// `fuzz/`, kept as `fuzz/corpus/sentencepiece/regression-empty-user-defined-piece`).
#[test]
fn a_sentencepiece_model_with_an_empty_user_defined_piece_is_refused() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/sentencepiece/regression-empty-user-defined-piece"),
        dir.join("tokenizer.model"),
    )
    .expect("copy");
    let err = load_err(&dir);
    assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidModel);
    assert!(err.to_string().contains("is empty"), "{err}");
}

#[test]
fn glm4_templates_that_fail_are_errors_not_panics() {
    let (_tmp, dir) = copy_fixture("glm4-0414-tiny");
    let config = dir.join("tokenizer_config.json");
    edit_json(&config, |c| {
        c["chat_template"] = "{% for m in messages %}".into()
    });
    let err = load_err(&dir);
    assert!(matches!(err, Error::Template { .. }), "{err:?}");
    assert_eq!(err.path(), Some(config.as_path()), "{err}");

    // A template that refuses a conversation refuses that request, not the model.
    edit_json(&config, |c| {
        c["chat_template"] =
            "{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}[gMASK]<sop><|user|>\n{{ messages[0].content }}<|assistant|>".into()
    });
    let engine = Engine::load(&dir).expect("loads");
    let ok = engine.chat(&ChatRequest::new("hi").max_new_tokens(1).greedy());
    assert!(ok.is_ok(), "{ok:?}");
    let err = engine
        .chat(
            &ChatRequest::new("hi")
                .history(vec![Message::user("a"), Message::assistant("b")])
                .max_new_tokens(1),
        )
        .expect_err("refused");
    assert!(matches!(err, Error::ConversationRejected { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("one message only"), "{err}");
}

#[test]
fn glm4_configs_that_contradict_themselves_or_the_weights() {
    let (_tmp, dir) = copy_fixture("glm4-hf-tiny");
    let config = dir.join("config.json");
    edit_json(&config, |c| c["num_key_value_heads"] = 3.into());
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "num_kv_heads",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.path(), Some(config.as_path()), "{err}");

    edit_json(&config, |c| {
        c["num_key_value_heads"] = 2.into();
        c["head_dim"] = 32.into();
    });
    let err = load_err(&dir);
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("q_proj"), "{err}");

    edit_json(&config, |c| {
        c["head_dim"] = 16.into();
        c["vocab_size"] = 1000.into();
    });
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "vocab_size",
                ..
            }
        ),
        "{err:?}"
    );

    edit_json(&config, |c| {
        c["vocab_size"] = 1216.into();
        c["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    });
    let err = load_err(&dir);
    assert!(
        matches!(
            err,
            Error::InvalidConfig {
                field: "rope_type",
                ..
            }
        ),
        "{err:?}"
    );
}

/// Rewrites a safetensors file's header (the data stays as it is).
fn edit_safetensors_header(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let bytes = std::fs::read(path).expect("read");
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).expect("header");
    edit(&mut header);
    let mut text = header.to_string().into_bytes();
    while text.len() < len {
        text.push(b' ');
    }
    assert_eq!(text.len(), len, "the edited header must keep its length");
    let mut out = bytes[..8].to_vec();
    out.extend(text);
    out.extend(&bytes[8 + len..]);
    std::fs::write(path, out).expect("write");
}

#[test]
fn overlapping_safetensors_tensors_are_refused() {
    let (_tmp, dir) = copy_fixture("chatglm3-tiny");
    let weights = dir.join("model-00001-of-00002.safetensors");
    edit_safetensors_header(&weights, |header| {
        // Two tensors of one size: the second now starts inside the first.
        let offsets = |v: &serde_json::Value| {
            (
                v["data_offsets"][0].as_u64().unwrap(),
                v["data_offsets"][1].as_u64().unwrap(),
            )
        };
        let names: Vec<String> = header
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        let (a, b) = names
            .iter()
            .flat_map(|a| names.iter().map(move |b| (a, b)))
            .find(|(a, b)| {
                let (sa, ea) = offsets(&header[a.as_str()]);
                let (sb, eb) = offsets(&header[b.as_str()]);
                a != b && ea - sa == eb - sb && ea - sa >= 4
            })
            .map(|(a, b)| (a.clone(), b.clone()))
            .expect("two tensors of one size");
        let (start, end) = offsets(&header[a.as_str()]);
        let shift = (end - start) / 2;
        header[b.as_str()]["data_offsets"] = serde_json::json!([start + shift, end + shift]);
    });
    let err = load_err(&dir);
    assert_eq!(err.kind(), ErrorKind::InvalidModel, "{err}");
    assert!(err.to_string().contains("overlap"), "{err}");
}

#[test]
fn a_shard_index_may_not_leave_the_model_directory() {
    for shard in [
        "../model.safetensors",
        "/etc/passwd",
        "sub/../../x.safetensors",
    ] {
        let (_tmp, dir) = copy_fixture("chatglm2-tiny");
        let index = serde_json::json!({"weight_map": {"transformer.embedding.word_embeddings.weight": shard}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("write");
        match load_err(&dir) {
            Error::InvalidConfig { field, value, .. } => {
                assert_eq!(field, "weight_map");
                assert_eq!(value, shard);
            }
            other => panic!("{shard}: {other:?}"),
        }
    }
}

#[test]
fn config_sizes_that_would_abort_the_allocator_are_refused() {
    for (key, value) in [
        ("padded_vocab_size", 1u64 << 40),
        ("seq_length", 1 << 40),
        ("hidden_size", 1 << 30),
        ("num_layers", 1 << 20),
        ("ffn_hidden_size", 1 << 40),
    ] {
        let (_tmp, dir) = copy_fixture("chatglm2-tiny");
        edit_json(&dir.join("config.json"), |config| {
            config[key] = value.into()
        });
        let err = load_err(&dir);
        assert_eq!(err.kind(), ErrorKind::InvalidModel, "{key}: {err}");
        assert!(matches!(err, Error::InvalidConfig { .. }), "{key}: {err:?}");
    }
}

/// A tensor directory entry: name, dims, ggml type, offset.
type GgufEntry<'a> = (&'a str, &'a [u64], u32, u64);

/// A GGUF file written by hand (version 3): `tensors`, then `data` after the header padded to
/// 32 bytes.
fn write_gguf(path: &Path, tensors: &[GgufEntry<'_>], data: &[u8]) {
    write_gguf_with_alignment(path, None, tensors, data)
}

/// As [`write_gguf`], with a `general.alignment` entry of GGUF value type `alignment.0` and
/// little-endian value `alignment.1`.
fn write_gguf_with_alignment(
    path: &Path,
    alignment: Option<(u32, &[u8])>,
    tensors: &[GgufEntry<'_>],
    data: &[u8],
) {
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((1 + u64::from(alignment.is_some())).to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    string(&mut out, "llama");
    if let Some((kind, value)) = alignment {
        string(&mut out, "general.alignment");
        out.extend(kind.to_le_bytes());
        out.extend(value);
    }
    for (name, dims, kind, offset) in tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(kind.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    std::fs::write(path, out).expect("write");
}

#[test]
fn gguf_tensor_directories_that_do_not_match_the_bytes_are_refused() {
    const F32: u32 = 0;
    const Q8_0: u32 = 8;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("model.gguf");
    let cases: [(&[GgufEntry<'_>], usize, &str); 4] = [
        // Not at a multiple of the alignment.
        (&[("a", &[8], F32, 4)], 64, "alignment"),
        // A q8_0 tensor (34 bytes per 32 values) relabelled f32 runs into the next one.
        (
            &[("a", &[32], F32, 0), ("b", &[32], Q8_0, 64)],
            128,
            "overlap",
        ),
        // Past the end of the file.
        (&[("a", &[1024], F32, 0)], 64, "truncated"),
        // Not whole blocks.
        (&[("a", &[33], Q8_0, 0)], 64, "blocks"),
    ];
    for (tensors, data, expected) in cases {
        write_gguf(&path, tensors, &vec![0u8; data]);
        let err = load_err(&path);
        assert_eq!(err.kind(), ErrorKind::InvalidModel, "{expected}: {err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
    }
}

/// `general.alignment` is a u32 power of two: zero made candle's reader divide by zero (found
/// by `fuzz/`), and a u64 would be read by candle as the default 32 while its writer meant
/// something else.
#[test]
fn gguf_alignments_that_are_not_a_u32_power_of_two_are_refused() {
    const U32: u32 = 4;
    const U64: u32 = 10;
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("model.gguf");
    let cases: [(u32, &[u8], &str); 3] = [
        (U32, &0u32.to_le_bytes(), "alignment"),
        (U32, &48u32.to_le_bytes(), "power of two"),
        (U64, &64u64.to_le_bytes(), "not a u32"),
    ];
    for (kind, value, expected) in cases {
        write_gguf_with_alignment(&path, Some((kind, value)), &[("a", &[8], 0, 0)], &[0; 64]);
        let err = load_err(&path);
        assert_eq!(err.kind(), ErrorKind::InvalidModel, "{expected}: {err}");
        assert!(err.to_string().contains(expected), "{expected}: {err}");
        assert!(err.to_string().contains("model.gguf"), "{err}");
    }
}

/// A damaged PyTorch checkpoint that makes candle's pickle reader panic (a tuple shorter than
/// it indexes; found by `fuzz/`, kept as `fuzz/corpus/pickle/regression-rebuild-args-panic`)
/// is an error naming the file, not a crash.
#[test]
fn a_pickle_that_panics_candles_reader_is_an_error() {
    let (_tmp, dir) = copy_fixture("chatglm2-tiny");
    let shard = dir.join("pytorch_model-00002-of-00002.bin");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/pickle/regression-rebuild-args-panic"),
        &shard,
    )
    .expect("copy");
    let err = load_err(&dir);
    assert_eq!(err.kind(), ErrorKind::InvalidModel, "{err}");
    assert!(err.to_string().contains("pytorch_model-00002"), "{err}");
}
