//! The block kernels on 256-bit `vpdpbusd`: for CPUs with AVX-VNNI and no AVX-512 (Intel's
//! laptops and desktops since Alder Lake), where the AVX2 kernels' `vpmaddubsw`, `vpaddw` and
//! `vpmaddwd` take three instructions for what one `vpdpbusd` does.
//!
//! A tile's 16 rows take two 8-lane registers, so each tile runs in two halves of 8 rows over
//! all of its blocks (the AVX2 kernels' order; 16 registers hold a half's accumulators). Each
//! output is the integer sum the other paths compute, then the same fused multiply-adds in the
//! same order: the same bits as every other path.
//!
//! The same source is compiled twice: for AVX-VNNI's VEX encoding, and for AVX-512 VNNI's EVEX
//! encoding of the same 256-bit instruction, which a CPU with AVX-512 runs when `CHATHUB_CPU`
//! caps it to `avxvnni` (how this path is tested on such a machine).

use std::arch::x86_64::*;

use super::x86::{
    add_minimums, add_q6k_block, add_scaled_block, broadcast_group, by_halves, fifth_run,
    nibble_groups, q6k_chain_starts, q6k_groups_256,
};
use super::{Activations, BlockFormat, BLOCK, GROUP, Q6K_TILE_QUANT_BYTES, TILE_ROWS};

/// Rows one 256-bit register holds, one 32-bit lane each.
const HALF: usize = TILE_ROWS / 2;

/// Defines `$q8` (q8_0), `$q4` (q4_0; q4_K with `MINIMUMS`, q5_0 with `FIFTH`, q5_K with
/// both) and `$q6k` (q6_K) for one
/// encoding of the 256-bit `vpdpbusd`, `$dpbusd`, under the target features `$features`.
macro_rules! kernels {
    ($q8:ident, $q4:ident, $q6k:ident, $features:literal, $dpbusd:ident, $isa:literal) => {
        /// q8_0 tile × `T` tokens, eight rows per register, on
        #[doc = $isa]
        ///
        /// # Safety
        /// The CPU runs the target features this is compiled for; `tile` is whole q8_0 tile
        /// blocks, and every `acts[t]` holds at least as many blocks (quants, scales, sums).
        #[target_feature(enable = $features)]
        pub(in crate::kernels::block_matmul) unsafe fn $q8<const T: usize>(
            tile: &[u8],
            acts: [&Activations; T],
        ) -> [[f32; TILE_ROWS]; T] {
            let flip = _mm256_set1_epi8(-128);
            let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
                // SAFETY: `base` is tile block `b`: eight 64-byte runs of quants (this
                // half's rows in bytes `32 * half..` of each), then 16 f16 scales; the
                // activations hold block `b` (the caller's contract).
                unsafe {
                    // Each chain starts at what the flip to `w + 128` adds (-128 times the
                    // activations' sum), so it ends at the signed dot product.
                    let mut dots: [__m256i; T] = std::array::from_fn(|t| {
                        _mm256_set1_epi32(*acts[t].q8_offsets.get_unchecked(b))
                    });
                    for g in 0..BLOCK / GROUP {
                        let w = base.add(g * 64 + half * 32) as *const __m256i;
                        let w = _mm256_xor_si256(_mm256_loadu_si256(w), flip);
                        for t in 0..T {
                            let x = _mm256_set1_epi32(broadcast_group(acts[t], b, g));
                            dots[t] = $dpbusd(dots[t], w, x);
                        }
                    }
                    let scales = base.add(16 * BLOCK + half * 2 * HALF) as *const __m128i;
                    let scales = _mm256_cvtph_ps(_mm_loadu_si128(scales));
                    add_scaled_block(acc, dots, scales, acts, b);
                }
            };
            // SAFETY: `tile` is whole q8_0 tile blocks (the caller's contract).
            unsafe { by_halves(tile, BlockFormat::Q8_0.tile_block_bytes(), step) }
        }

        /// q4_0, q4_K (`MINIMUMS`), q5_0 (`FIFTH`) or q5_K (both) tile × `T` tokens, eight
        /// rows per register, on
        #[doc = $isa]
        ///
        /// # Safety
        /// The CPU runs the target features this is compiled for; `tile` is whole tile blocks
        /// of the format, and every `acts[t]` holds at least as many blocks (quants, scales,
        /// sums).
        #[target_feature(enable = $features)]
        pub(in crate::kernels::block_matmul) unsafe fn $q4<
            const T: usize,
            const MINIMUMS: bool,
            const FIFTH: bool,
        >(
            tile: &[u8],
            acts: [&Activations; T],
        ) -> [[f32; TILE_ROWS]; T] {
            let format = BlockFormat::nibbles(MINIMUMS, FIFTH);
            let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
                // SAFETY: `base` is tile block `b`: four 64-byte runs of nibbles (this
                // half's rows in bytes `32 * half..` of each), for 5-bit formats a run of
                // fifth bits, 16 f16 scales, and with minimums 16 f16 minimums; the
                // activations hold block `b` (the caller's contract).
                unsafe {
                    let mut dots: [__m256i; T] =
                        std::array::from_fn(|t| _mm256_set1_epi32(format.chain_start(acts[t], b)));
                    let fifth = fifth_run::<FIFTH>(base, half);
                    for j in 0..4 {
                        let (lo, hi) = nibble_groups::<FIFTH>(base, half, j, fifth);
                        for t in 0..T {
                            let x_lo = _mm256_set1_epi32(broadcast_group(acts[t], b, j));
                            let x_hi = _mm256_set1_epi32(broadcast_group(acts[t], b, j + 4));
                            dots[t] = $dpbusd(dots[t], lo, x_lo);
                            dots[t] = $dpbusd(dots[t], hi, x_hi);
                        }
                    }
                    let tail = TILE_ROWS * format.quant_bytes_per_block() + half * 2 * HALF;
                    let tail = base.add(tail);
                    let scales = _mm256_cvtph_ps(_mm_loadu_si128(tail as *const __m128i));
                    add_scaled_block(acc, dots, scales, acts, b);
                    if MINIMUMS {
                        add_minimums(acc, tail, acts, b);
                    }
                }
            };
            // SAFETY: `tile` is whole tile blocks of the format (the caller's contract).
            unsafe { by_halves(tile, format.tile_block_bytes(), step) }
        }

        /// q6_K tile × `T` tokens, eight rows per register, two chains per sub-block pair, on
        #[doc = $isa]
        ///
        /// # Safety
        /// The CPU runs the target features this is compiled for; `tile` is whole q6_K tile
        /// blocks, and every `acts[t]` holds at least as many blocks (quants, scales,
        /// offsets).
        #[target_feature(enable = $features)]
        pub(in crate::kernels::block_matmul) unsafe fn $q6k<const T: usize>(
            tile: &[u8],
            acts: [&Activations; T],
        ) -> [[f32; TILE_ROWS]; T] {
            let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
                // SAFETY: `base` is tile block `b`: four 64-byte runs of nibbles and two
                // of high bit pairs (this half's rows in bytes `32 * half..` of each), 16
                // f16 scales and 32 signed sub-block scales; the activations hold block
                // `b` (the caller's contract).
                unsafe {
                    // Each chain starts at what the quants' offset adds (-32 times the half
                    // block's activation sum), so it ends at the signed dot product.
                    let mut dots = q6k_chain_starts(acts, b);
                    for j in 0..4 {
                        let (lo, hi) = q6k_groups_256(base, half, j);
                        for t in 0..T {
                            let x_lo = _mm256_set1_epi32(broadcast_group(acts[t], b, j));
                            let x_hi = _mm256_set1_epi32(broadcast_group(acts[t], b, j + 4));
                            dots[t][0] = $dpbusd(dots[t][0], lo, x_lo);
                            dots[t][1] = $dpbusd(dots[t][1], hi, x_hi);
                        }
                    }
                    let tail = base.add(Q6K_TILE_QUANT_BYTES);
                    add_q6k_block(acc, dots, tail, half, acts, b);
                }
            };
            // SAFETY: `tile` is whole q6_K tile blocks (the caller's contract).
            unsafe { by_halves(tile, BlockFormat::Q6K.tile_block_bytes(), step) }
        }
    };
}

kernels!(
    q8_0_vex,
    q4_vex,
    q6k_vex,
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32,
    "AVX-VNNI (VEX encoding)."
);
kernels!(
    q8_0_evex,
    q4_evex,
    q6k_evex,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32,
    "AVX-512 VNNI's 256-bit form (EVEX encoding)."
);
