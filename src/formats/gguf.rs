//! Saving a loaded (typically quantized) model to one GGUF file, and loading it back.
//!
//! Quantizing a 6B model at every start costs time; `chathub convert` does it once and writes
//! the result as GGUF (the format llama.cpp and its tools read, so `gguf-dump` can inspect it).
//! Tensors keep their checkpoint names; the config, sampling defaults, family, weight format and
//! the sentencepiece model travel in `chathub.*` metadata, so the file alone is a whole model.
//! This is chathub's own layout, not llama.cpp's `chatglm` architecture.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};

use crate::error::{Error, Result};
use crate::families::config::{GenerationDefaults, ModelConfig};
use crate::families::ModelFamily;
use crate::nn::quantization::Quantization;
use crate::nn::transformer::ChatGlmModel;

const CONFIG: &str = "chathub.config";
const GENERATION: &str = "chathub.generation_config";
const FAMILY: &str = "chathub.family";
const QUANTIZATION: &str = "chathub.quantization";
const TOKENIZER: &str = "chathub.tokenizer_model";

/// Everything a GGUF file written by [`write()`] holds besides the tensors.
pub(crate) struct GgufModel {
    pub content: gguf_file::Content,
    pub file: File,
    pub config: ModelConfig,
    pub defaults: GenerationDefaults,
    pub family: ModelFamily,
    pub quantization: Option<Quantization>,
    pub tokenizer_model: Vec<u8>,
}

/// Whether `path` names a GGUF file rather than a model directory.
pub(crate) fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Reads the header and metadata of a file written by [`write()`].
pub(crate) fn read(path: &Path) -> Result<GgufModel> {
    let weights_error = |source| Error::Weights {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file).map_err(weights_error)?;
    if crate::formats::llama_cpp::is_llama_cpp(&content) {
        return crate::formats::llama_cpp::read(path, content, file);
    }
    let text = |key: &'static str| -> Result<String> {
        match content.metadata.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                field: key,
                value: "missing".into(),
                reason: "not a GGUF file written by chathub convert",
            }),
        }
    };
    let json = |key: &'static str| -> Result<serde_json::Value> {
        serde_json::from_str(&text(key)?).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })
    };
    let config: ModelConfig =
        serde_json::from_value(json(CONFIG)?).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    config.validate(path)?;
    let defaults: GenerationDefaults =
        serde_json::from_value(json(GENERATION)?).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let family = text(FAMILY)?.parse()?;
    let quantization = match text(QUANTIZATION)?.as_str() {
        "none" => None,
        q => Some(q.parse()?),
    };
    let tokenizer_model = match content.metadata.get(TOKENIZER) {
        Some(Value::Array(bytes)) => bytes
            .iter()
            .map(|b| b.to_u8())
            .collect::<candle_core::Result<Vec<u8>>>()
            .map_err(weights_error)?,
        _ => {
            return Err(Error::InvalidConfig {
                path: path.to_path_buf(),
                field: TOKENIZER,
                value: "missing".into(),
                reason: "not a GGUF file written by chathub convert",
            })
        }
    };
    Ok(GgufModel {
        content,
        file,
        config,
        defaults,
        family,
        quantization,
        tokenizer_model,
    })
}

/// Writes `model` and its metadata to `path`.
pub(crate) fn write(
    path: &Path,
    model: &ChatGlmModel,
    defaults: &GenerationDefaults,
    family: ModelFamily,
    quantization: Option<Quantization>,
    tokenizer_model: &[u8],
) -> Result<()> {
    let json_error = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let config = serde_json::to_string(model.config()).map_err(json_error)?;
    let generation = serde_json::to_string(defaults).map_err(json_error)?;
    let name = model
        .config()
        .name_or_path
        .clone()
        .unwrap_or_else(|| "chatglm".into());
    let metadata = [
        (
            "general.architecture",
            Value::String("chathub-chatglm".into()),
        ),
        ("general.name", Value::String(name)),
        (CONFIG, Value::String(config)),
        (GENERATION, Value::String(generation)),
        (FAMILY, Value::String(family.as_str().into())),
        (
            QUANTIZATION,
            Value::String(quantization.map_or("none", |q| q.as_str()).into()),
        ),
        (
            TOKENIZER,
            Value::Array(tokenizer_model.iter().map(|&b| Value::U8(b)).collect()),
        ),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors = model.export()?;
    let tensors: Vec<(&str, &candle_core::quantized::QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_ref()))
        .collect();
    let staging = path.with_extension("gguf.partial");
    let mut file = File::create(&staging).map_err(|e| Error::io(&staging, e))?;
    gguf_file::write(&mut file, &metadata, &tensors).map_err(|source| Error::Weights {
        path: staging.clone(),
        source,
    })?;
    file.sync_all().map_err(|e| Error::io(&staging, e))?;
    std::fs::rename(&staging, path).map_err(|e| Error::io(path, e))
}
