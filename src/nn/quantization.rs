//! Quantized weight formats selectable at load time.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

use crate::error::Error;

/// A block format for the weights of every linear layer, chosen when a model is loaded.
///
/// These are ggml's formats (the ones llama.cpp and chatglm.cpp use): weights are stored in
/// blocks with a scale each, and multiplied without widening them back to f32 first. The
/// embedding table stays dense, and the output layer, whose errors land directly on the
/// logits, keeps more bits than 4: q8_0 with [`Quantization::Q8_0`], q6_K (6.56 bits, as in
/// llama.cpp's 4-bit files) with the 4-bit choices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Quantization {
    /// 8-bit, blocks of 32 (8.5 bits per weight): nearly lossless.
    Q8_0,
    /// 4-bit, blocks of 32 (4.5 bits per weight).
    Q4_0,
    /// 4-bit k-quant, super-blocks of 256 (4.5 bits per weight), more accurate than q4_0. Rows
    /// whose width is not a multiple of 256 (ChatGLM's MLP down-projection) fall back to q8_0,
    /// which keeps the layer whose inputs vary most nearly lossless; so does a matrix holding a
    /// block of 32 equal nonzero weights, which candle's q4_K quantizer would zero.
    Q4K,
}

impl Quantization {
    /// The name used on the command line (`q8_0`, `q4_0`, `q4k`).
    pub fn as_str(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4_0 => "q4_0",
            Quantization::Q4K => "q4k",
        }
    }

    /// The choice a stored block type stands for (`None` for dense and other types).
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(Quantization::Q8_0),
            GgmlDType::Q4_0 => Some(Quantization::Q4_0),
            GgmlDType::Q4K => Some(Quantization::Q4K),
            _ => None,
        }
    }

    /// Formats to try, best first: later ones take narrower rows (blocks of 32).
    pub(crate) fn candidates(self) -> &'static [GgmlDType] {
        match self {
            Quantization::Q8_0 => &[GgmlDType::Q8_0],
            Quantization::Q4_0 => &[GgmlDType::Q4_0],
            Quantization::Q4K => &[GgmlDType::Q4K, GgmlDType::Q8_0],
        }
    }

    /// Formats to try for the output layer, best first. Its errors land on the logits
    /// directly, so it never takes 4 bits: q8_0 keeps 8, and the 4-bit choices give it q6_K
    /// (6.56 bits, a signed scale per 16 weights), as llama.cpp's 4-bit files do. It is the
    /// largest matrix a decode step reads (with 4-bit layers, a third of the 785M bench model's
    /// bytes per token, an eighth of GLM-4-9B's), and q6_K reads a fifth less of it than q8_0.
    /// q8_0 where rows are not a multiple of 256.
    pub(crate) fn output_candidates(self) -> &'static [GgmlDType] {
        match self {
            Quantization::Q8_0 => &[GgmlDType::Q8_0],
            Quantization::Q4_0 | Quantization::Q4K => &[GgmlDType::Q6K, GgmlDType::Q8_0],
        }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Quantization {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "q8_0" | "q8" => Ok(Quantization::Q8_0),
            "q4_0" => Ok(Quantization::Q4_0),
            "q4k" | "q4_k" | "q4_k_m" => Ok(Quantization::Q4K),
            _ => Err(Error::invalid(
                "quantization",
                s,
                "expected q8_0, q4_0 or q4k",
            )),
        }
    }
}
