//! CPU kernels: the products, attention and element-wise steps the transformer runs, each with
//! a portable twin for CPUs without the SIMD extensions they were written for.
//!
//! Nothing here knows about models, file formats or tokens: kernels take slices and shapes.

pub(crate) mod attention;
pub(crate) mod block_matmul;
pub(crate) mod cpu;
pub(crate) mod dense_matmul;
pub(crate) mod elementwise;
