//! Subcommands of the `chathub` binary, and the flags they share.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod generate;
#[cfg(any(feature = "grpc", feature = "http"))]
pub mod serve;

use std::path::PathBuf;

use chathub::candle_core::{DType, Device};
use chathub::{ChatRequest, Engine, ModelFamily, ModelOptions, Quantization};
use clap::Args;

/// Which model to load and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A model directory as downloaded from Hugging Face (THUDM/chatglm3-6b, glm-4-9b-chat,
    /// glm-4-9b-chat-hf, GLM-4-9B-0414...), or a .gguf file (`chathub convert`, llama.cpp).
    #[arg(long, env = "CHATHUB_MODEL", conflicts_with = "demo")]
    pub model: Option<PathBuf>,

    /// Use the built-in tiny demo model (random weights: its text is meaningless).
    #[arg(long, env = "CHATHUB_DEMO")]
    pub demo: bool,

    /// Chat format, when detection from the files guesses wrong: chatglm2, chatglm3 or glm4.
    #[arg(long, env = "CHATHUB_FAMILY")]
    pub family: Option<ModelFamily>,

    /// Compute dtype: f32 (default on CPU), f16 or bf16.
    #[arg(long, env = "CHATHUB_DTYPE", default_value = "f32", value_parser = parse_dtype)]
    pub dtype: DType,

    /// Quantize the weights at load: q8_0, q4_0 or q4k (smaller and faster on a CPU).
    #[arg(long, env = "CHATHUB_QUANT")]
    pub quant: Option<Quantization>,

    /// Run on the first CUDA GPU (needs a build with `--features cuda`).
    #[arg(long, env = "CHATHUB_CUDA")]
    pub cuda: bool,

    /// Store conversations' keys and values in f32 or f16 (half the memory per token, and
    /// faster decoding at long contexts on AVX-512 CPUs; rounded, so replies can differ
    /// slightly). Default: the compute dtype (f32 on the CPU).
    #[arg(long, env = "CHATHUB_KV_CACHE_DTYPE", value_parser = parse_cache_dtype)]
    pub kv_cache_dtype: Option<DType>,
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("unknown dtype {s:?}: expected f32, f16 or bf16")),
    }
}

fn parse_cache_dtype(s: &str) -> Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        _ => Err(format!("unknown cache dtype {s:?}: expected f32 or f16")),
    }
}

impl ModelArgs {
    /// The name servers report for the model: the directory's or file's name, or
    /// `chathub-demo`.
    #[cfg(any(feature = "grpc", feature = "http"))]
    pub fn name(&self) -> String {
        match &self.model {
            Some(path) => path
                .file_stem()
                .and_then(|n| n.to_str())
                .filter(|n| !n.is_empty())
                .unwrap_or("chathub")
                .to_string(),
            None => "chathub-demo".to_string(),
        }
    }

    /// Loads the model (the demo when no directory is given), saying so on stderr. Errors keep
    /// the core's kind (a missing file is still `NotFound` when `serve` reports it).
    pub fn load(&self) -> chathub::Result<Engine> {
        let dir = match &self.model {
            Some(dir) => dir.clone(),
            None => {
                eprintln!(
                    "chathub: no --model given: using the built-in demo model (random weights, \
                     its replies are meaningless; pass --model DIR for a real ChatGLM)"
                );
                chathub::demo_model_dir()?
            }
        };
        let device = if self.cuda {
            Device::new_cuda(0).map_err(chathub::Error::Compute)?
        } else {
            Device::Cpu
        };
        let mut options = ModelOptions::default().device(device).dtype(self.dtype);
        if let Some(family) = self.family {
            options = options.family(family);
        }
        if let Some(quantization) = self.quant {
            options = options.quantization(quantization);
        }
        if let Some(dtype) = self.kv_cache_dtype {
            options = options.kv_cache_dtype(dtype);
        }
        Engine::load_with(&dir, &options)
    }
}

/// Sampling flags; unset ones leave the model's defaults in place.
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Softmax temperature (> 0). Default: the model's (0.8 for ChatGLM).
    #[arg(long)]
    pub temperature: Option<f64>,

    /// Nucleus sampling threshold in (0, 1]. Default: the model's (0.8 for ChatGLM).
    #[arg(long)]
    pub top_p: Option<f64>,

    /// Sample only among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Repetition penalty (1.0 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,

    /// Prompt plus reply tokens. Default: the model's (8192 for ChatGLM).
    #[arg(long)]
    pub max_length: Option<usize>,

    /// At most this many reply tokens.
    #[arg(long)]
    pub max_new_tokens: Option<usize>,

    /// Seed for sampling, to reproduce a reply.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Always pick the most likely token (deterministic).
    #[arg(long)]
    pub greedy: bool,

    /// Text that ends the reply (not shown); repeat for several.
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Fills the request's unset fields from the flags.
    pub fn apply(&self, mut request: ChatRequest) -> ChatRequest {
        request.temperature = request.temperature.or(self.temperature);
        request.top_p = request.top_p.or(self.top_p);
        request.top_k = request.top_k.or(self.top_k);
        request.repetition_penalty = request.repetition_penalty.or(self.repetition_penalty);
        request.max_length = request.max_length.or(self.max_length);
        request.max_new_tokens = request.max_new_tokens.or(self.max_new_tokens);
        request.seed = request.seed.or(self.seed);
        request.greedy |= self.greedy;
        request.stop.extend(self.stop.iter().cloned());
        request
    }
}
