//! Model architectures, one family per file.

pub(crate) mod chatglm;
mod block_matmul;
mod linear;
