//! The transformer blocks every supported family is built from, and their per-request caches.

pub(crate) mod linear;
pub(crate) mod quantization;
pub(crate) mod transformer;
