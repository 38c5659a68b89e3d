//! Reading weight files (safetensors, PyTorch pickles, GGUF) and JSON configs: tensors and
//! values out, with the file named in every error. Nothing here knows what the tensors mean.

pub(crate) mod gguf;
pub(crate) mod json;
pub(crate) mod weights;
