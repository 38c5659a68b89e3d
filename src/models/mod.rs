//! Model architectures, one family per file.

mod attention;
pub(crate) mod block_matmul;
pub(crate) mod chatglm;
pub(crate) mod dense_matmul;
mod elementwise;
mod linear;
