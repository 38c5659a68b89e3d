//! Reading weight files: safetensors, PyTorch pickles and GGUF.

pub(crate) mod gguf;
pub(crate) mod llama_cpp;
pub(crate) mod weights;
