//! The transformer blocks every supported family is built from, and their per-request caches.

pub(crate) mod linear;
pub(crate) mod names;
pub(crate) mod quantization;
pub(crate) mod spec;
pub(crate) mod transformer;
