//! Converting to GGUF and loading it back gives the same model.

mod common;

use chathub::{Engine, ModelOptions, Quantization};

fn round_trip(quantization: Option<Quantization>) {
    let tmp = tempfile::tempdir().expect("tempdir");
    for case in common::all_cases() {
        let options = ModelOptions {
            quantization,
            ..ModelOptions::default()
        };
        let original = Engine::load_with(common::model_dir(&case.model), &options).expect("loads");
        let path = tmp
            .path()
            .join(format!("{}-{:?}.gguf", case.model, quantization));
        original.save_gguf(&path).expect("saves");
        let restored = Engine::load(&path).expect("loads the GGUF file");
        assert_eq!(restored.family(), original.family());
        assert_eq!(restored.quantization(), quantization);
        assert_eq!(restored.stop_ids(), original.stop_ids());
        let a = original.chat(&case.request()).expect("chat");
        let b = restored.chat(&case.request()).expect("chat");
        assert_eq!(a.prompt_token_ids, b.prompt_token_ids, "{}", case.id);
        assert_eq!(
            a.completion_token_ids, b.completion_token_ids,
            "{}",
            case.id
        );
        assert_eq!(a.text, b.text);
        if quantization.is_none() {
            assert_eq!(
                b.completion_token_ids, case.greedy_token_ids_until_stop,
                "{}",
                case.id
            );
        }
    }
}

#[test]
fn dense_models_round_trip_exactly() {
    round_trip(None);
}

#[test]
fn quantized_models_round_trip_without_requantizing() {
    round_trip(Some(Quantization::Q8_0));
    round_trip(Some(Quantization::Q4K));
}

#[test]
fn a_foreign_or_broken_gguf_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x03\x00\x00\x00garbage").expect("write");
    let err = Engine::load(&path).expect_err("broken");
    assert_eq!(err.path(), Some(path.as_path()), "{err}");
}

/// A converted file cut short (a copy interrupted, a full disk) fails to load with an error that
/// names it, wherever the cut falls: in a quantized matrix or in a dense table.
#[test]
fn a_truncated_quantized_gguf_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let options = ModelOptions {
        quantization: Some(Quantization::Q8_0),
        ..ModelOptions::default()
    };
    let engine = Engine::load_with(common::model_dir("chatglm3-tiny"), &options).expect("loads");
    let whole = tmp.path().join("whole.gguf");
    engine.save_gguf(&whole).expect("saves");
    let bytes = std::fs::read(&whole).expect("read");
    for keep in [bytes.len() - 1, bytes.len() * 3 / 4, bytes.len() / 2] {
        let cut = tmp.path().join(format!("cut-{keep}.gguf"));
        std::fs::write(&cut, &bytes[..keep]).expect("write");
        let err = Engine::load(&cut).expect_err("truncated");
        assert_eq!(err.path(), Some(cut.as_path()), "{err}");
    }
}

#[test]
fn the_convert_command_writes_a_loadable_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("demo-q8.gguf");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_chathub"))
        .args(["convert", "--quant", "q8_0", "--model"])
        .arg(common::model_dir("chatglm2-tiny"))
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("runs");
    assert!(status.success());
    let engine = Engine::load(&out).expect("loads");
    assert_eq!(engine.family(), chathub::ModelFamily::ChatGlm2);
    assert_eq!(engine.quantization(), Some(Quantization::Q8_0));
}
