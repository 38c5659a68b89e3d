//! Model architectures, one family per file.

pub(crate) mod chatglm;
mod linear;
