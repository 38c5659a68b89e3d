//! Products of f32 activations with q8_0 / q4_0 / q4_1 / q5_0 / q5_1 / q4_K / q5_K / q6_K
//! weight matrices, by kernels made for them.
//!
//! Weights are repacked at load into tiles of 16 rows, the layout llama.cpp's CPU "repack"
//! kernels use for the same reason: within a tile, block after block, the rows' quants are
//! interleaved four weights at a time, so one 64-byte load holds the same four columns of all
//! 16 rows. AVX-512 VNNI (`vpdpbusd`) multiplies it by four activation bytes broadcast to every
//! lane, and each lane accumulates one row's dot product. A broadcast activation thus serves 16
//! rows, one weight load serves every token of a pass, and a block's scales multiply 16 rows in
//! one instruction with no horizontal sums: the work per weight is a third of a row-by-row
//! kernel's, which is what prefill and batched decode are bound by. Decode reads each tile once
//! front to back, at the memory bandwidth.
//!
//! The activations are quantized to 8 bits in blocks of 32 once per product, as ggml does. The
//! unsigned-by-signed VNNI instruction wants unsigned weights: q8_0 quants are flipped to
//! `w + 128` in a register and q4_0 nibbles are `w + 8` already, and the offset times the sum of
//! the activation block's quants is taken off in integers. q4_K's weight is `scale * q -
//! minimum` for each block of 32, so its minimum times the activation block's sum is a second
//! multiply-add; its 6-bit scales and minimums are expanded at load to one f16 pair per block of
//! 32, and the super-block headers are kept aside so the original bytes can be written back.
//! q6_K's weight is `d * s * (q - 32)` with a signed 8-bit `s` for each 16 weights: each half
//! block gets its own integer chain, times its rows' `s` in integers, and the block's sum goes
//! on as the others' do, with `d` as its scale. Its quants stay six bits in memory (four in
//! nibble runs, two in bit-pair runs, widened in registers): 7 bits a weight with the scales,
//! against q8_0's 8.5 (llama.cpp's output layers, and the 4-bit choices' own).
//!
//! q4_1's weight is `scale * q + minimum` for each block of 32, q4_K's with the minimum
//! negated: it runs on q4_K's kernels. q5_0, q5_1 and q5_K are q4_0, q4_1 and q4_K with a
//! fifth bit: it is kept in one more run of 64 bytes, a bit of each of the eight groups in each
//! byte, and put in place in registers.
//!
//! ggml's q3_K and q2_K are requantized to q4_0 at load (see [`requantized_format`]).
//!
//! Every path (AVX-512 VNNI, 256-bit VNNI for AVX-VNNI CPUs, AVX2 `vpmaddubsw`, portable Rust)
//! computes each output as the same integer sums followed by the same chain of fused
//! multiply-adds, one per block in column order: they all give the same bits, and a token's
//! outputs do not depend on the other tokens of its pass (batch invariance).

use std::mem::MaybeUninit;
use std::sync::LazyLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use super::cpu;

/// The q6_K quants of four-column groups `j` and `j + 4` (`j < 4`) of a tile block as
/// unsigned bytes `0..64`, from run `j` of low nibbles (`packed`) and run `4 + j / 2` of high
/// bit pairs (`high`), with one register width's `and`, `or` and 16-bit shifts (a bit shifted
/// across a byte boundary is masked off). A macro, not a function, so that each kernel
/// expands it under its own target features.
#[cfg(target_arch = "x86_64")]
macro_rules! q6k_groups {
    ($j:expr, $packed:expr, $high:expr, ($and:ident, $or:ident), ($srli:ident, $slli:ident),
     ($low:expr, $top:expr)) => {{
        // Group `j`'s pair sits at bit 4 * (j % 2), group `j + 4`'s two bits above it; both
        // go to bits 4 and 5.
        let (first, second) = if $j % 2 == 0 {
            ($slli::<4>($high), $slli::<2>($high))
        } else {
            ($high, $srli::<2>($high))
        };
        (
            $or($and($packed, $low), $and(first, $top)),
            $or($and($srli::<4>($packed), $low), $and(second, $top)),
        )
    }};
}

/// The fifth bits of four-column groups `j` and `j + 4` (`j < 4`) of a 5-bit tile block, moved
/// from bits `j` and `j + 4` of the fifth run (`fifth`) to bit 4 (other bits left for the
/// caller to mask), with one register width's 16-bit shifts.
#[cfg(target_arch = "x86_64")]
macro_rules! fifth_bits {
    ($j:expr, $fifth:expr, ($srli:ident, $slli:ident)) => {{
        match $j {
            0 => ($slli::<4>($fifth), $fifth),
            1 => ($slli::<3>($fifth), $srli::<1>($fifth)),
            2 => ($slli::<2>($fifth), $srli::<2>($fifth)),
            _ => ($slli::<1>($fifth), $srli::<3>($fifth)),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod vnni256;

/// Weights per block, in every format.
const BLOCK: usize = 32;
/// Rows interleaved in a tile: one 512-bit register holds a four-weight group of each.
const TILE_ROWS: usize = 16;
/// Weights one `vpdpbusd` lane multiplies: one activation broadcast carries this many.
const GROUP: usize = 4;
/// Tokens one pass over a tile serves: each weight register is used this many times.
const TOKENS_PER_PASS: usize = 8;
/// Most tiles a prefill task sweeps for each pass of tokens, so their weights stay in the
/// core's L2 cache while the tokens go past.
const TILES_PER_SWEEP: usize = 16;
/// Most bytes of tiles one sweep holds: well inside a 1-2 MiB L2 with the pass's activations
/// beside them (16 tiles of 4096 q4_0 columns are 576 KiB; a tile of 13696 is 123 KiB).
const SWEEP_BYTES: usize = 640 << 10;

/// The ggml block formats these kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockFormat {
    /// 32 signed 8-bit quants per block.
    Q8_0,
    /// 32 4-bit quants per block, stored `w + 8`: element `i < 16` in the low nibble of byte
    /// `i`, element `i + 16` in its high nibble.
    Q4_0,
    /// ggml's q4_K super-blocks of 256: an f16 scale and minimum, 6-bit scales and minimums
    /// for each block of 32, and 4-bit quants `q` with weight `scale * q - minimum`.
    Q4K,
    /// 32 4-bit quants `q` per block, with weight `scale * q + minimum` (the minimum kept
    /// negated, as q4_K's).
    Q4_1,
    /// 32 5-bit quants per block, stored `w + 16`: q4_0's nibbles and a fifth bit for each.
    Q5_0,
    /// q4_1 with 5-bit quants.
    Q5_1,
    /// ggml's q5_K super-blocks of 256: q4_K with 5-bit quants.
    Q5K,
    /// ggml's q6_K super-blocks of 256: an f16 scale `d`, a signed 8-bit scale `s` for each
    /// sub-block of 16, and 6-bit quants `q` with weight `d * s * (q - 32)`.
    Q6K,
}

impl BlockFormat {
    /// The format, when these kernels take it.
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            GgmlDType::Q6K => Some(BlockFormat::Q6K),
            GgmlDType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlDType::Q5K => Some(BlockFormat::Q5K),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q5_1 => Some(BlockFormat::Q5_1),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            BlockFormat::Q8_0 => GgmlDType::Q8_0,
            BlockFormat::Q4_0 => GgmlDType::Q4_0,
            BlockFormat::Q4K => GgmlDType::Q4K,
            BlockFormat::Q6K => GgmlDType::Q6K,
            BlockFormat::Q5_0 => GgmlDType::Q5_0,
            BlockFormat::Q5K => GgmlDType::Q5K,
            BlockFormat::Q4_1 => GgmlDType::Q4_1,
            BlockFormat::Q5_1 => GgmlDType::Q5_1,
        }
    }

    /// Bytes and weights of one block as ggml stores it (k-quants: a super-block).
    fn ggml_block(self) -> (usize, usize) {
        match self {
            BlockFormat::Q8_0 => (34, BLOCK),
            BlockFormat::Q4_0 => (18, BLOCK),
            BlockFormat::Q4K => (Q4K_BYTES, SUPER_BLOCK),
            BlockFormat::Q6K => (Q6K_BYTES, SUPER_BLOCK),
            BlockFormat::Q5_0 => (22, BLOCK),
            BlockFormat::Q5K => (Q5K_BYTES, SUPER_BLOCK),
            BlockFormat::Q4_1 => (20, BLOCK),
            BlockFormat::Q5_1 => (24, BLOCK),
        }
    }

    /// Bytes of one row's quants for a block of 32 (5- and 6-bit formats: 16 of low nibbles,
    /// 4 or 8 of high bits).
    fn quant_bytes_per_block(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4K => BLOCK / 2,
            BlockFormat::Q5_0 | BlockFormat::Q5_1 | BlockFormat::Q5K => BLOCK / 2 + BLOCK / 8,
            BlockFormat::Q6K => BLOCK / 2 + BLOCK / 4,
        }
    }

    /// Whether each block of 32 carries a minimum (q4_1, q5_1, q4_K, q5_K).
    fn has_minimums(self) -> bool {
        matches!(
            self,
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K
        )
    }

    /// Whether the super-blocks' headers are kept aside to be written back (q4_K, q5_K).
    fn has_headers(self) -> bool {
        matches!(self, BlockFormat::Q4K | BlockFormat::Q5K)
    }

    /// The nibble format the 4- and 5-bit kernels run for their `MINIMUMS` and `FIFTH`
    /// parameters (q4_1 and q5_1 tiles are laid out as q4_K's and q5_K's, so they run on the
    /// same kernels).
    #[cfg(target_arch = "x86_64")]
    const fn nibbles(minimums: bool, fifth: bool) -> Self {
        match (minimums, fifth) {
            (false, false) => BlockFormat::Q4_0,
            (true, false) => BlockFormat::Q4K,
            (false, true) => BlockFormat::Q5_0,
            (true, true) => BlockFormat::Q5K,
        }
    }

    /// Where a nibble format's chain of integer sums starts for one block: what its quants'
    /// offset adds (q4_0's 8, q5_0's 16, times the activations' sum), so that it ends at the
    /// signed dot product; 0 for the formats with minimums, applied in floats.
    #[cfg(target_arch = "x86_64")]
    fn chain_start(self, act: &Activations, b: usize) -> i32 {
        match self {
            BlockFormat::Q4_0 => act.q4_offsets[b],
            BlockFormat::Q5_0 => 2 * act.q4_offsets[b],
            _ => 0,
        }
    }

    /// Bytes of one tile of rows of `cols` weights.
    fn tile_bytes(self, cols: usize) -> usize {
        cols / BLOCK * self.tile_block_bytes()
    }

    /// Bytes of one block of 32 columns of a tile: the 16 rows' quants, their f16 scales and
    /// (formats with minimums) their f16 minimums or (q6_K) their two sub-block scales.
    fn tile_block_bytes(self) -> usize {
        let extra = match self {
            BlockFormat::Q4_1 | BlockFormat::Q5_1 | BlockFormat::Q4K | BlockFormat::Q5K => 2,
            BlockFormat::Q6K => 2,
            BlockFormat::Q8_0 | BlockFormat::Q4_0 | BlockFormat::Q5_0 => 0,
        };
        TILE_ROWS * (self.quant_bytes_per_block() + 2 + extra)
    }
}

/// The instruction set a product runs on, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum KernelPath {
    /// AVX-512 with VNNI (`vpdpbusd`), F16C conversions.
    Vnni(cpu::Vnni),
    /// 256-bit `vpdpbusd` (AVX-VNNI, or AVX-512 VNNI capped to 256 bits), AVX2, FMA, F16C.
    Vnni256(cpu::Vnni256),
    /// AVX2, FMA and F16C (`vpmaddubsw`).
    Avx2(cpu::Avx2),
    /// Plain Rust, the twin of both.
    Portable,
}

impl KernelPath {
    /// The best path this process runs.
    pub(crate) fn detect() -> Self {
        *DETECTED
    }

    /// Paths this process can run, best first (tests compare them).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut paths = Vec::new();
        paths.extend(cpu::vnni().map(KernelPath::Vnni));
        paths.extend(cpu::vnni256().map(KernelPath::Vnni256));
        paths.extend(cpu::avx2().map(KernelPath::Avx2));
        paths.push(KernelPath::Portable);
        paths
    }
}

static DETECTED: LazyLock<KernelPath> = LazyLock::new(|| {
    if let Some(vnni) = cpu::vnni() {
        return KernelPath::Vnni(vnni);
    }
    if let Some(vnni256) = cpu::vnni256() {
        return KernelPath::Vnni256(vnni256);
    }
    match cpu::avx2() {
        Some(avx2) => KernelPath::Avx2(avx2),
        None => KernelPath::Portable,
    }
});

/// Bytes of a q4_K super-block: f16 scale, f16 minimum, 12 bytes of 6-bit scales and
/// minimums, 128 bytes of quants.
const Q4K_BYTES: usize = 144;
/// Bytes of a q4_K super-block before its quants.
const Q4K_HEADER: usize = 16;
/// Weights per k-quant super-block.
const SUPER_BLOCK: usize = 256;
/// Bytes of a q6_K super-block: 128 of low nibbles, 64 of high bit pairs, 16 signed scales
/// (one per 16 weights), an f16 scale.
const Q6K_BYTES: usize = 210;
/// Bytes of a q5_K super-block: q4_K's header, 32 bytes of fifth bits, 128 of nibbles.
const Q5K_BYTES: usize = 176;
/// Bytes of a q6_K tile block's quants (its scales follow).
#[cfg(target_arch = "x86_64")]
const Q6K_TILE_QUANT_BYTES: usize = TILE_ROWS * (BLOCK / 2 + BLOCK / 4);
/// Weights per q6_K sub-block (one signed 8-bit scale each).
const Q6K_SUB: usize = 16;

/// A `[rows, cols]` weight matrix in q8_0, q4_0 or q4_K blocks, repacked into tiles of 16 rows.
#[derive(Debug, Clone)]
pub(crate) struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Tile after tile (the last one padded with zero rows); within a tile, block of 32 columns
    /// after block: the quants of four-column group `g` for rows 0..16 (4 bytes a row) — q8_0
    /// groups 0..8 in 8 runs of 64 bytes; 4-bit formats groups `j` and `j + 4` in the low and
    /// high nibbles of run `j` of 4 (5-bit formats: their low four bits, and the fifth bit of
    /// group `g` at bit `g` of a fifth run; q6_K: their low four bits, and their top two bits
    /// at bits `4 * (j % 2)` and `4 * (j % 2) + 2` of two more runs' run `4 + j / 2`) — then
    /// the 16 rows' f16 scales, then (formats with minimums) their f16 minimums or (q6_K) their
    /// signed scales of columns 0..16, then those of columns 16..32.
    tiles: Vec<u8>,
    /// q4_K, q5_K: each super-block's first 16 bytes as stored, row after row, to write the
    /// original back.
    headers: Vec<[u8; Q4K_HEADER]>,
}

/// Turns ggml's row-major blocks, arriving in parts of any size, into tiles.
struct TileBuilder {
    matrix: BlockMatrix,
    /// Bytes of one row in ggml's layout.
    row_bytes: usize,
    /// Up to 16 rows in ggml's layout, waiting for their tile to fill.
    pending: Vec<u8>,
    scratch: TileScratch,
}

impl TileBuilder {
    /// A builder for `rows x cols` weights of `dtype`, and the bytes of the whole matrix in
    /// ggml's layout; `None` if these kernels do not run `dtype` on rows of `cols`.
    fn new(dtype: GgmlDType, rows: usize, cols: usize) -> Option<(Self, usize)> {
        let format = BlockFormat::from_ggml(dtype)?;
        let (block_bytes, block_weights) = format.ggml_block();
        if cols == 0 || !cols.is_multiple_of(block_weights) {
            return None;
        }
        let row_bytes = cols / block_weights * block_bytes;
        let matrix = BlockMatrix {
            format,
            rows,
            cols,
            tiles: crate::huge_pages::vec_prefaulted(
                rows.div_ceil(TILE_ROWS) * format.tile_bytes(cols),
            ),
            headers: Vec::new(),
        };
        let builder = TileBuilder {
            matrix,
            row_bytes,
            pending: Vec::with_capacity(TILE_ROWS * row_bytes),
            scratch: TileScratch::new(cols),
        };
        Some((builder, rows * row_bytes))
    }

    /// Takes the next bytes of the matrix in ggml's layout.
    fn push(&mut self, mut part: &[u8]) {
        while !part.is_empty() {
            let room = TILE_ROWS * self.row_bytes - self.pending.len();
            let (now, rest) = part.split_at(room.min(part.len()));
            self.pending.extend_from_slice(now);
            part = rest;
            if self.pending.len() == TILE_ROWS * self.row_bytes {
                self.flush_tile();
            }
        }
    }

    /// The matrix, its last tile padded with zero rows.
    fn finish(mut self) -> BlockMatrix {
        if !self.pending.is_empty() {
            self.flush_tile();
        }
        self.matrix
    }

    /// Repacks the pending rows (all whole) as one tile.
    fn flush_tile(&mut self) {
        let matrix = &mut self.matrix;
        let rows: Vec<&[u8]> = self.pending.chunks_exact(self.row_bytes).collect();
        let at = matrix.tiles.len();
        matrix
            .tiles
            .resize(at + matrix.format.tile_bytes(matrix.cols), 0);
        let out = &mut matrix.tiles[at..];
        repack_tile(matrix.format, matrix.cols, &rows, out, &mut self.scratch);
        push_q4k_headers(matrix, &rows);
        self.pending.clear();
    }
}

/// Keeps the q4_K or q5_K super-block headers of `rows` (ggml's layout) aside, to write them
/// back.
fn push_q4k_headers(matrix: &mut BlockMatrix, rows: &[&[u8]]) {
    if matrix.format.has_headers() {
        for row in rows {
            for block in row.chunks_exact(matrix.format.ggml_block().0) {
                matrix
                    .headers
                    .push(block[..Q4K_HEADER].try_into().expect("16 bytes"));
            }
        }
    }
}

/// One tile's weights unpacked: quants in column order, a byte per weight (q8_0 signed, 4-bit
/// unsigned), and scales and minimums, row after row. Kept from tile to tile: a fresh buffer
/// per tile costs a few page faults each, seconds over a 6B model.
struct TileScratch {
    quants: Vec<u8>,
    scales: Vec<f16>,
    minimums: Vec<f16>,
    /// q6_K's signed scale of each 16 weights.
    sub_scales: Vec<i8>,
}

impl TileScratch {
    fn new(cols: usize) -> Self {
        TileScratch {
            quants: vec![0; TILE_ROWS * cols],
            scales: vec![f16::ZERO; TILE_ROWS * cols / BLOCK],
            minimums: vec![f16::ZERO; TILE_ROWS * cols / BLOCK],
            sub_scales: vec![0; TILE_ROWS * cols / Q6K_SUB],
        }
    }
}

/// Writes one tile (`out`, [`BlockFormat::tile_bytes`] long) from up to 16 rows in ggml's
/// layout; missing rows are zero.
fn repack_tile(
    format: BlockFormat,
    cols: usize,
    rows: &[&[u8]],
    out: &mut [u8],
    scratch: &mut TileScratch,
) {
    let blocks = cols / BLOCK;
    let TileScratch {
        quants,
        scales,
        minimums,
        sub_scales,
    } = scratch;
    quants.fill(0);
    scales.fill(f16::ZERO);
    minimums.fill(f16::ZERO);
    sub_scales.fill(0);
    for (r, row) in rows.iter().enumerate() {
        let quants = &mut quants[r * cols..][..cols];
        let scales = &mut scales[r * blocks..][..blocks];
        let minimums = &mut minimums[r * blocks..][..blocks];
        let sub_scales = &mut sub_scales[r * cols / Q6K_SUB..][..cols / Q6K_SUB];
        match format {
            BlockFormat::Q4_1 | BlockFormat::Q5_0 | BlockFormat::Q5_1 => {
                // ggml's blocks: the f16 scale, (q4_1, q5_1) the f16 minimum, (q5_0, q5_1) 32
                // fifth bits in a little-endian word, 16 bytes of nibbles.
                let minimum = format.has_minimums();
                let fifth_at = if minimum { 4 } else { 2 };
                let nibbles_at = fifth_at + if format == BlockFormat::Q4_1 { 0 } else { 4 };
                for ((block, q), (s, m)) in row
                    .chunks_exact(format.ggml_block().0)
                    .zip(quants.chunks_exact_mut(BLOCK))
                    .zip(scales.iter_mut().zip(minimums.iter_mut()))
                {
                    *s = f16::from_le_bytes([block[0], block[1]]);
                    if minimum {
                        *m = -f16::from_le_bytes([block[2], block[3]]);
                    }
                    let fifth = match format {
                        BlockFormat::Q4_1 => 0,
                        _ => {
                            u32::from_le_bytes(block[fifth_at..][..4].try_into().expect("4 bytes"))
                        }
                    };
                    for (i, q) in q.iter_mut().enumerate() {
                        let nibble = (block[nibbles_at + i % 16] >> (4 * (i / 16))) & 0x0F;
                        *q = nibble | ((((fifth >> i) & 1) as u8) << 4);
                    }
                }
            }
            BlockFormat::Q5K => {
                let per_super = SUPER_BLOCK / BLOCK;
                for (s, block) in row.chunks_exact(Q5K_BYTES).enumerate() {
                    unpack_q5k(
                        block,
                        &mut quants[s * SUPER_BLOCK..][..SUPER_BLOCK],
                        &mut scales[s * per_super..][..per_super],
                        &mut minimums[s * per_super..][..per_super],
                    );
                }
            }
            BlockFormat::Q8_0 | BlockFormat::Q4_0 => {
                for ((block, q), s) in row
                    .chunks_exact(format.ggml_block().0)
                    .zip(quants.chunks_exact_mut(BLOCK))
                    .zip(scales.iter_mut())
                {
                    *s = f16::from_le_bytes([block[0], block[1]]);
                    if format == BlockFormat::Q8_0 {
                        q.copy_from_slice(&block[2..]);
                    } else {
                        let (low, high) = q.split_at_mut(16);
                        for ((byte, low), high) in block[2..].iter().zip(low).zip(high) {
                            *low = byte & 0x0F;
                            *high = byte >> 4;
                        }
                    }
                }
            }
            BlockFormat::Q4K => {
                let per_super = SUPER_BLOCK / BLOCK;
                for (s, block) in row.chunks_exact(Q4K_BYTES).enumerate() {
                    unpack_q4k(
                        block,
                        &mut quants[s * SUPER_BLOCK..][..SUPER_BLOCK],
                        &mut scales[s * per_super..][..per_super],
                        &mut minimums[s * per_super..][..per_super],
                    );
                }
            }
            BlockFormat::Q6K => {
                let per_super = SUPER_BLOCK / BLOCK;
                for (s, block) in row.chunks_exact(Q6K_BYTES).enumerate() {
                    let d = unpack_q6k(
                        block,
                        &mut quants[s * SUPER_BLOCK..][..SUPER_BLOCK],
                        &mut sub_scales[s * SUPER_BLOCK / Q6K_SUB..][..SUPER_BLOCK / Q6K_SUB],
                    );
                    scales[s * per_super..][..per_super].fill(d);
                }
            }
        }
    }
    let quant_bytes = TILE_ROWS * format.quant_bytes_per_block();
    for (b, out) in out.chunks_exact_mut(format.tile_block_bytes()).enumerate() {
        let (q, tail) = out.split_at_mut(quant_bytes);
        for r in 0..TILE_ROWS {
            let column = &quants[r * cols + b * BLOCK..][..BLOCK];
            match format {
                BlockFormat::Q8_0 => {
                    for g in 0..BLOCK / GROUP {
                        q[g * 64 + r * GROUP..][..GROUP]
                            .copy_from_slice(&column[g * GROUP..][..GROUP]);
                    }
                }
                BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4K => {
                    for j in 0..BLOCK / GROUP / 2 {
                        for i in 0..GROUP {
                            let k = j * GROUP + i;
                            q[j * 64 + r * GROUP + i] = column[k] | (column[16 + k] << 4);
                        }
                    }
                }
                BlockFormat::Q5_0 | BlockFormat::Q5_1 | BlockFormat::Q5K => {
                    for j in 0..BLOCK / GROUP / 2 {
                        for i in 0..GROUP {
                            let k = j * GROUP + i;
                            let (first, second) = (column[k], column[16 + k]);
                            q[j * 64 + r * GROUP + i] = (first & 0x0F) | (second << 4);
                            q[4 * 64 + r * GROUP + i] |=
                                ((first >> 4) << j) | ((second >> 4) << (j + 4));
                        }
                    }
                }
                BlockFormat::Q6K => {
                    for j in 0..BLOCK / GROUP / 2 {
                        let shift = 4 * (j % 2);
                        for i in 0..GROUP {
                            let k = j * GROUP + i;
                            let (first, second) = (column[k], column[16 + k]);
                            q[j * 64 + r * GROUP + i] = (first & 0x0F) | (second << 4);
                            q[(4 + j / 2) * 64 + r * GROUP + i] |=
                                ((first >> 4) << shift) | ((second >> 4) << (shift + 2));
                        }
                    }
                }
            }
            tail[2 * r..][..2].copy_from_slice(&scales[r * blocks + b].to_le_bytes());
            if format.has_minimums() {
                tail[2 * (TILE_ROWS + r)..][..2]
                    .copy_from_slice(&minimums[r * blocks + b].to_le_bytes());
            }
            if format == BlockFormat::Q6K {
                let subs = &sub_scales[r * cols / Q6K_SUB + 2 * b..][..2];
                tail[2 * TILE_ROWS + r] = subs[0] as u8;
                tail[3 * TILE_ROWS + r] = subs[1] as u8;
            }
        }
    }
}

/// `rows x cols` weights of `dtype` in ggml's layout, as `target` bytes in bands of whole
/// rows (requantized on every core).
fn requantize(
    dtype: GgmlDType,
    target: GgmlDType,
    rows: usize,
    cols: usize,
    data: &[u8],
) -> candle_core::Result<Vec<Vec<u8>>> {
    let row_bytes = cols / dtype.block_size() * dtype.type_size();
    if data.len() != rows * row_bytes {
        candle_core::bail!(
            "{dtype:?} tensor of {rows}x{cols} holds {} bytes, expected {}",
            data.len(),
            rows * row_bytes
        );
    }
    let band_rows = (REQUANTIZE_BAND_WEIGHTS / cols).max(1);
    data.par_chunks(band_rows * row_bytes)
        .map(|band| {
            let dims = vec![band.len() / row_bytes, cols];
            let blocks = candle_core::quantized::ggml_file::qtensor_from_ggml(
                dtype,
                band,
                dims,
                &Device::Cpu,
            )?;
            let weights = blocks.dequantize(&Device::Cpu)?;
            QTensor::quantize(&weights, target)?
                .data()
                .map(|d| d.into_owned())
        })
        .collect()
}

/// Unpacks one q4_K super-block into eight blocks of 32: quants in column order, and each
/// block's scale and minimum as f16.
fn unpack_q4k(block: &[u8], quants: &mut [u8], scales: &mut [f16], minimums: &mut [f16]) {
    k_scales(&block[..Q4K_HEADER], scales, minimums);
    for sub in 0..SUPER_BLOCK / BLOCK {
        // Quants come in 32-byte runs for a pair of blocks: the first block in the low
        // nibbles, the second in the high ones.
        let run = &block[Q4K_HEADER + (sub / 2) * 32..][..32];
        for (i, byte) in run.iter().enumerate() {
            quants[sub * BLOCK + i] = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
        }
    }
}

/// Unpacks one q5_K super-block as [`unpack_q4k`] does a q4_K one: the nibbles as q4_K's, and
/// the fifth bit of weight `l` of the block pair `c` at bit `2 c` (first block) or `2 c + 1`
/// (second) of byte `l` of the 32 bytes after the header.
fn unpack_q5k(block: &[u8], quants: &mut [u8], scales: &mut [f16], minimums: &mut [f16]) {
    k_scales(&block[..Q4K_HEADER], scales, minimums);
    let fifth = &block[Q4K_HEADER..][..32];
    for sub in 0..SUPER_BLOCK / BLOCK {
        let run = &block[Q4K_HEADER + 32 + (sub / 2) * 32..][..32];
        for (i, byte) in run.iter().enumerate() {
            let nibble = if sub % 2 == 0 { byte & 0x0F } else { byte >> 4 };
            quants[sub * BLOCK + i] = nibble | (((fifth[i] >> sub) & 1) << 4);
        }
    }
}

/// The scale and minimum of each block of 32 of a q4_K or q5_K super-block, from its header.
fn k_scales(header: &[u8], scales: &mut [f16], minimums: &mut [f16]) {
    let scale = f16::from_le_bytes([header[0], header[1]]).to_f32();
    let minimum = f16::from_le_bytes([header[2], header[3]]).to_f32();
    let packed = &header[4..];
    for sub in 0..SUPER_BLOCK / BLOCK {
        // ggml's get_scale_min_k4: the first four pairs are plain 6-bit fields, the last four
        // keep their top two bits in the spare bits of the first eight bytes.
        let (sc, m) = if sub < 4 {
            (packed[sub] & 63, packed[sub + 4] & 63)
        } else {
            (
                (packed[sub + 4] & 0x0F) | ((packed[sub - 4] >> 6) << 4),
                (packed[sub + 4] >> 4) | ((packed[sub] >> 6) << 4),
            )
        };
        scales[sub] = f16::from_f32(scale * sc as f32);
        minimums[sub] = f16::from_f32(minimum * m as f32);
    }
}

/// Unpacks one q6_K super-block: its 256 quants in column order (0..64, weight `q - 32`
/// steps), the signed scale of each 16, and the super-block's scale.
fn unpack_q6k(block: &[u8], quants: &mut [u8], sub_scales: &mut [i8]) -> f16 {
    // ggml's layout: each half of 128 weights takes 64 bytes of low nibbles (weights `l` and
    // `l + 64` in byte `l`'s low and high nibble, `l < 64`) and 32 bytes of high bit pairs
    // (weights `l`, `l + 32`, `l + 64`, `l + 96` at bits 0, 2, 4, 6 of byte `l`, `l < 32`).
    for half in 0..2 {
        let low = &block[64 * half..][..64];
        let high = &block[128 + 32 * half..][..32];
        let quants = &mut quants[128 * half..][..128];
        for (l, q) in quants.iter_mut().enumerate() {
            let nibble = (low[l % 64] >> (4 * (l / 64))) & 0x0F;
            *q = nibble | (((high[l % 32] >> (2 * (l / 32))) & 3) << 4);
        }
    }
    for (s, byte) in sub_scales.iter_mut().zip(&block[192..208]) {
        *s = *byte as i8;
    }
    f16::from_le_bytes([block[208], block[209]])
}

/// The inverse of [`unpack_q6k`]: one super-block in ggml's layout.
fn pack_q6k(quants: &[u8], sub_scales: &[i8], d: f16) -> [u8; Q6K_BYTES] {
    let mut block = [0u8; Q6K_BYTES];
    for half in 0..2 {
        let quants = &quants[128 * half..][..128];
        for (l, q) in quants.iter().enumerate() {
            block[64 * half + l % 64] |= (q & 0x0F) << (4 * (l / 64));
            block[128 + 32 * half + l % 32] |= (q >> 4) << (2 * (l / 32));
        }
    }
    for (byte, s) in block[192..208].iter_mut().zip(sub_scales) {
        *byte = *s as u8;
    }
    block[208..].copy_from_slice(&d.to_le_bytes());
    block
}

/// The format these kernels run a ggml format they do not run as stored in, requantized at
/// load; `None` for the ones they run as stored (and the dense ones, which are not blocks).
///
/// llama.cpp's own files hold such formats: q3_K and q2_K (its q3_K_* and q2_K files).
/// candle's kernels, which ran them before, were slow (785M bench model: llama.cpp's q3_K_M
/// file's prompts at 92-97 tokens/s, against 380-399 since).
///
/// q3_K and q2_K (llama.cpp's smallest files) become q4_0, for 30% and 75% more bytes: 16
/// levels against their 8 and 4, and since a q3_K weight is at most 4 of its sub-block's steps,
/// q4_0's step is half the coarser one's or finer. (Not q8_0, which would triple them, nor
/// q4_K: candle's q4_K quantizer turns a block of 32 equal weights into zeros, and their few
/// levels make such blocks common.)
fn requantized_format(dtype: GgmlDType) -> Option<GgmlDType> {
    match dtype {
        GgmlDType::Q3K | GgmlDType::Q2K => Some(GgmlDType::Q4_0),
        _ => None,
    }
}

/// Rows requantized at a time: a band's f32 copy stays a few MiB.
const REQUANTIZE_BAND_WEIGHTS: usize = 1 << 20;

impl BlockMatrix {
    /// Takes the blocks of a CPU `QTensor` in a format these kernels run, requantizing the
    /// others that are blocks (see [`requantized_format`]); `None` for dense ones.
    pub(crate) fn from_qtensor(qtensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let (rows, cols) = qtensor.shape().dims2()?;
        let data = qtensor.data()?;
        let dtype = qtensor.dtype();
        if let Some(target) = requantized_format(dtype) {
            let parts = requantize(dtype, target, rows, cols, &data)?;
            return Self::from_ggml_bytes(target, rows, cols, parts);
        }
        Self::from_ggml_bytes(dtype, rows, cols, [&data[..]])
    }

    /// Reads a `[rows, cols]` matrix's blocks in ggml's layout from `read_exact` (e.g. a file
    /// positioned at a GGUF tensor), a band at a time through one small buffer, so neither the
    /// ggml bytes nor a candle `QTensor` of them is ever held whole; `None` (nothing read) for
    /// formats these kernels do not run.
    pub(crate) fn read_ggml(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        read_exact: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> candle_core::Result<Option<Self>> {
        let Some((mut builder, total)) = TileBuilder::new(dtype, rows, cols) else {
            return Ok(None);
        };
        // 4 MiB or so of whole rows per read.
        let band = ((4 << 20) / builder.row_bytes).max(1) * builder.row_bytes;
        let mut buffer = vec![0u8; band.min(total)];
        let mut left = total;
        while left > 0 {
            let n = band.min(left);
            read_exact(&mut buffer[..n])?;
            builder.push(&buffer[..n]);
            left -= n;
        }
        Ok(Some(builder.finish()))
    }

    /// Takes a `[rows, cols]` matrix's blocks in ggml's layout, given in consecutive parts of
    /// whole blocks (bands of rows quantized apart), in a format these kernels run; `None` for
    /// others. Parts are read one after the other, so no whole copy of the ggml bytes is made.
    pub(crate) fn from_ggml_bytes<P: AsRef<[u8]>>(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        parts: impl IntoIterator<Item = P>,
    ) -> candle_core::Result<Option<Self>> {
        let Some((mut builder, expected)) = TileBuilder::new(dtype, rows, cols) else {
            return Ok(None);
        };
        let block_bytes = builder.matrix.format.ggml_block().0;
        let parts: Vec<P> = parts.into_iter().collect();
        let mut seen = 0;
        for part in &parts {
            let part = part.as_ref();
            seen += part.len();
            if part.len() % block_bytes != 0 || seen > expected {
                break;
            }
        }
        if seen != expected {
            candle_core::bail!(
                "{dtype:?} tensor of {rows}x{cols} holds {seen} bytes of whole blocks, expected {expected}"
            );
        }
        let row_bytes = builder.row_bytes;
        if parts
            .iter()
            .any(|part| part.as_ref().len() % row_bytes != 0)
        {
            for part in &parts {
                builder.push(part.as_ref());
            }
            return Ok(Some(builder.finish()));
        }
        // Whole rows in every part (bands quantized apart): tiles are repacked on every core.
        let rows: Vec<&[u8]> = parts
            .iter()
            .flat_map(|part| part.as_ref().chunks_exact(row_bytes))
            .collect();
        let mut matrix = builder.matrix;
        let (format, cols) = (matrix.format, matrix.cols);
        let tile_bytes = format.tile_bytes(cols);
        matrix
            .tiles
            .resize(rows.len().div_ceil(TILE_ROWS) * tile_bytes, 0);
        matrix
            .tiles
            .par_chunks_mut(tile_bytes)
            .zip(rows.par_chunks(TILE_ROWS))
            .for_each_init(
                || TileScratch::new(cols),
                |scratch, (out, rows)| repack_tile(format, cols, rows, out, scratch),
            );
        push_q4k_headers(&mut matrix, &rows);
        Ok(Some(matrix))
    }

    /// The same blocks as a candle `QTensor` (for GGUF files).
    pub(crate) fn to_qtensor(&self) -> candle_core::Result<QTensor> {
        let blocks = self.cols / BLOCK;
        let mut bytes = Vec::with_capacity(self.storage_bytes());
        let mut quants = [0u8; BLOCK];
        for row in 0..self.rows {
            if self.format.has_headers() {
                let supers = self.cols / SUPER_BLOCK;
                for (s, header) in self.headers[row * supers..][..supers].iter().enumerate() {
                    bytes.extend_from_slice(header);
                    if self.format == BlockFormat::Q5K {
                        let mut fifth = [0u8; 32];
                        for sub in 0..SUPER_BLOCK / BLOCK {
                            self.block_quants(row, s * SUPER_BLOCK / BLOCK + sub, &mut quants);
                            for (byte, q) in fifth.iter_mut().zip(&quants) {
                                *byte |= (q >> 4) << sub;
                            }
                        }
                        bytes.extend_from_slice(&fifth);
                    }
                    let mut pair = [[0u8; BLOCK]; 2];
                    for sub in 0..SUPER_BLOCK / BLOCK {
                        self.block_quants(row, s * SUPER_BLOCK / BLOCK + sub, &mut pair[sub % 2]);
                        if sub % 2 == 1 {
                            // Back to ggml's runs: the pair's first block in the low nibbles.
                            let (first, second) = (&pair[0], &pair[1]);
                            bytes.extend((0..BLOCK).map(|i| (first[i] & 0x0F) | (second[i] << 4)));
                        }
                    }
                }
                continue;
            }
            if self.format == BlockFormat::Q6K {
                let per_super = SUPER_BLOCK / BLOCK;
                let mut quants = [0u8; SUPER_BLOCK];
                let mut sub_scales = [0i8; SUPER_BLOCK / Q6K_SUB];
                for s in 0..self.cols / SUPER_BLOCK {
                    for sub in 0..per_super {
                        let b = s * per_super + sub;
                        let block = &mut quants[sub * BLOCK..][..BLOCK];
                        self.block_quants(row, b, block.try_into().expect("a block"));
                        sub_scales[2 * sub..][..2]
                            .copy_from_slice(&lane_sub_scales(self.tile_block(row, b), row % 16));
                    }
                    let d = self.block_scale(row, s * per_super);
                    bytes.extend_from_slice(&pack_q6k(&quants, &sub_scales, d));
                }
                continue;
            }
            for b in 0..blocks {
                bytes.extend_from_slice(&self.block_scale(row, b).to_le_bytes());
                if self.format.has_minimums() {
                    let minimum = lane_half(self.format, self.tile_block(row, b), row % 16, true);
                    bytes.extend_from_slice(&(-minimum).to_le_bytes());
                }
                self.block_quants(row, b, &mut quants);
                if matches!(self.format, BlockFormat::Q5_0 | BlockFormat::Q5_1) {
                    let fifth = (0..BLOCK).fold(0u32, |h, i| h | (u32::from(quants[i] >> 4) << i));
                    bytes.extend_from_slice(&fifth.to_le_bytes());
                }
                match self.format {
                    BlockFormat::Q8_0 => bytes.extend_from_slice(&quants),
                    _ => bytes.extend((0..16).map(|i| (quants[i] & 0x0F) | (quants[i + 16] << 4))),
                }
            }
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.format.ggml(),
            &bytes,
            vec![self.rows, self.cols],
            &Device::Cpu,
        )
    }

    /// The bytes of tile `tile`.
    fn tile(&self, tile: usize) -> &[u8] {
        let bytes = self.format.tile_bytes(self.cols);
        &self.tiles[tile * bytes..][..bytes]
    }

    /// Row `row`'s quants for block `b` in column order (q8_0 signed, 4-bit unsigned).
    fn block_quants(&self, row: usize, b: usize, out: &mut [u8; BLOCK]) {
        *out = lane_quants(self.format, self.tile_block(row, b), row % TILE_ROWS);
    }

    /// Row `row`'s scale for block `b`.
    fn block_scale(&self, row: usize, b: usize) -> f16 {
        lane_half(self.format, self.tile_block(row, b), row % TILE_ROWS, false)
    }

    /// The tile block holding row `row`'s block `b`.
    fn tile_block(&self, row: usize, b: usize) -> &[u8] {
        let bytes = self.format.tile_block_bytes();
        &self.tile(row / TILE_ROWS)[b * bytes..][..bytes]
    }

    /// The ggml format of the blocks.
    pub(crate) fn ggml_dtype(&self) -> GgmlDType {
        self.format.ggml()
    }

    /// `(rows, cols)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of the blocks as ggml stores them.
    pub(crate) fn storage_bytes(&self) -> usize {
        let (bytes, weights) = self.format.ggml_block();
        self.rows * self.cols / weights * bytes
    }

    /// Bytes a token reads from this matrix in memory (q4_K's expanded scales and the last
    /// tile's padding rows included).
    pub(crate) fn bytes_read_per_token(&self) -> usize {
        self.tiles.len()
    }

    /// `out = x W^T` for `x: [tokens, cols]`, `out: [tokens, rows]`, row-major, on every core,
    /// into memory not yet written: every output is written, so a caller hands over a fresh
    /// buffer without zeroing it first. A prefill chunk's outputs are tens of megabytes per
    /// product, and zeroing them (calloc's memset on reused memory) ran on one thread while
    /// the other cores waited.
    pub(crate) fn matmul_uninit(&self, x: &[f32], out: &mut [MaybeUninit<f32>]) {
        self.write_on(KernelPath::detect(), x, out)
    }

    /// The product on a chosen path into an initialised buffer (the tests compare paths).
    #[cfg(test)]
    fn matmul_on(&self, path: KernelPath, x: &[f32], out: &mut [f32]) {
        // SAFETY: same layout; `write_on` only ever writes initialised values into `out`, so
        // it stays initialised.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.write_on(path, x, out)
    }

    /// Writes every one of `out`'s `tokens * rows` values.
    fn write_on(&self, path: KernelPath, x: &[f32], out: &mut [MaybeUninit<f32>]) {
        assert_eq!(x.len() % self.cols, 0, "activations are not whole rows");
        let tokens = x.len() / self.cols;
        assert_eq!(out.len(), tokens * self.rows, "output has the wrong size");
        if tokens == 0 {
            return;
        }
        // A decode step's few rows take a microsecond or so each: less than handing them to
        // the other workers and joining them again, on each of a pass's products.
        let acts: Vec<Activations> = if tokens > TOKENS_PER_PASS {
            x.par_chunks(self.cols)
                .map(|row| Activations::quantize(path, row))
                .collect()
        } else {
            x.chunks(self.cols)
                .map(|row| Activations::quantize(path, row))
                .collect()
        };
        let tiles = self.rows.div_ceil(TILE_ROWS);
        let tile_bytes = self.format.tile_bytes(self.cols);
        let sweep = (SWEEP_BYTES / tile_bytes).clamp(1, TILES_PER_SWEEP);
        let tiles_per_task = (tiles / (rayon::current_num_threads() * 4)).clamp(1, sweep);
        // Each task owns a run of tiles, that is a run of every token's outputs: the output
        // rows are cut into those runs here, so the tasks write their results in place.
        // `runs[task * tokens + t]` is token `t`'s run for `task`: two allocations per product
        // whatever the number of tasks, as decode runs this for every matrix of every step.
        let task_rows = tiles_per_task * TILE_ROWS;
        let tasks = tiles.div_ceil(tiles_per_task);
        let mut by_token: Vec<_> = out
            .chunks_exact_mut(self.rows)
            .map(|row| row.chunks_mut(task_rows))
            .collect();
        let mut runs: Vec<&mut [MaybeUninit<f32>]> = Vec::with_capacity(tasks * tokens);
        for _ in 0..tasks {
            runs.extend(
                by_token
                    .iter_mut()
                    .map(|row| row.next().expect("a run per task")),
            );
        }
        runs.par_chunks_mut(tokens)
            .enumerate()
            .for_each(|(task, run)| {
                let first = task * tiles_per_task;
                let mut results = [[0f32; TILE_ROWS]; TOKENS_PER_PASS];
                let mut t = 0;
                while t < tokens {
                    let n = (tokens - t).min(TOKENS_PER_PASS);
                    for i in 0..run[0].len().div_ceil(TILE_ROWS) {
                        self.tile_tokens(path, first + i, &acts[t..t + n], &mut results[..n]);
                        for (outputs, lanes) in run[t..t + n].iter_mut().zip(&results) {
                            let outputs = &mut outputs[i * TILE_ROWS..];
                            for (output, lane) in outputs.iter_mut().zip(lanes) {
                                output.write(*lane);
                            }
                        }
                    }
                    t += n;
                }
            });
    }

    /// Tile `tile`'s 16 rows against up to [`TOKENS_PER_PASS`] tokens, into `out[token]`.
    fn tile_tokens(
        &self,
        path: KernelPath,
        tile: usize,
        acts: &[Activations],
        out: &mut [[f32; TILE_ROWS]],
    ) {
        fn refs<const T: usize>(acts: &[Activations]) -> [&Activations; T] {
            std::array::from_fn(|t| &acts[t])
        }
        fn put<const T: usize>(out: &mut [[f32; TILE_ROWS]], results: [[f32; TILE_ROWS]; T]) {
            out.copy_from_slice(&results);
        }
        match acts.len() {
            1 => put(out, self.tile_product::<1>(path, tile, refs(acts))),
            2 => put(out, self.tile_product::<2>(path, tile, refs(acts))),
            3 => put(out, self.tile_product::<3>(path, tile, refs(acts))),
            4 => put(out, self.tile_product::<4>(path, tile, refs(acts))),
            5 => put(out, self.tile_product::<5>(path, tile, refs(acts))),
            6 => put(out, self.tile_product::<6>(path, tile, refs(acts))),
            7 => put(out, self.tile_product::<7>(path, tile, refs(acts))),
            _ => put(out, self.tile_product::<8>(path, tile, refs(acts))),
        }
    }

    /// Tile `tile`'s 16 rows against `T` tokens.
    fn tile_product<const T: usize>(
        &self,
        path: KernelPath,
        tile: usize,
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let tile = self.tile(tile);
        let blocks = self.cols / BLOCK;
        // What every path relies on: `tile` is `blocks` whole tile blocks of this format, and
        // every activation row holds `blocks` blocks (quants, scales, sums).
        assert_eq!(tile.len(), blocks * self.format.tile_block_bytes());
        for act in acts {
            assert!(act.scales.len() == blocks && act.quants.len() == blocks * BLOCK);
            assert!(act.q6_offsets.len() == 2 * blocks);
        }
        #[cfg(target_arch = "x86_64")]
        match path {
            KernelPath::Vnni(_) => {
                // SAFETY: the Vnni token is made only once detection found AVX-512F/BW/VL,
                // VNNI and F16C; the slices are as asserted above, which is what the kernels'
                // contracts ask.
                return unsafe {
                    match self.format {
                        BlockFormat::Q8_0 => x86::q8_0_vnni(tile, acts),
                        BlockFormat::Q4_0 => x86::q4_vnni::<T, false, false>(tile, acts),
                        BlockFormat::Q4K => x86::q4_vnni::<T, true, false>(tile, acts),
                        BlockFormat::Q5_0 => x86::q4_vnni::<T, false, true>(tile, acts),
                        BlockFormat::Q5K => x86::q4_vnni::<T, true, true>(tile, acts),
                        BlockFormat::Q4_1 => x86::q4_vnni::<T, true, false>(tile, acts),
                        BlockFormat::Q5_1 => x86::q4_vnni::<T, true, true>(tile, acts),
                        BlockFormat::Q6K => x86::q6k_vnni(tile, acts),
                    }
                };
            }
            KernelPath::Vnni256(token) => {
                // SAFETY: the Vnni256 token is made only once detection found AVX2, FMA, F16C
                // and 256-bit VNNI, in the EVEX encoding (AVX-512F/VL VNNI) where it says so
                // and else in the VEX one (AVX-VNNI); the slices are as asserted above, which
                // is what the kernels' contracts ask.
                return unsafe {
                    match (self.format, token.evex()) {
                        (BlockFormat::Q8_0, true) => vnni256::q8_0_evex(tile, acts),
                        (BlockFormat::Q8_0, false) => vnni256::q8_0_vex(tile, acts),
                        (BlockFormat::Q4_0, true) => {
                            vnni256::q4_evex::<T, false, false>(tile, acts)
                        }
                        (BlockFormat::Q4_0, false) => {
                            vnni256::q4_vex::<T, false, false>(tile, acts)
                        }
                        (BlockFormat::Q4K, true) => vnni256::q4_evex::<T, true, false>(tile, acts),
                        (BlockFormat::Q4K, false) => vnni256::q4_vex::<T, true, false>(tile, acts),
                        (BlockFormat::Q5_0, true) => vnni256::q4_evex::<T, false, true>(tile, acts),
                        (BlockFormat::Q5_0, false) => vnni256::q4_vex::<T, false, true>(tile, acts),
                        (BlockFormat::Q5K, true) => vnni256::q4_evex::<T, true, true>(tile, acts),
                        (BlockFormat::Q5K, false) => vnni256::q4_vex::<T, true, true>(tile, acts),
                        (BlockFormat::Q4_1, true) => vnni256::q4_evex::<T, true, false>(tile, acts),
                        (BlockFormat::Q4_1, false) => vnni256::q4_vex::<T, true, false>(tile, acts),
                        (BlockFormat::Q5_1, true) => vnni256::q4_evex::<T, true, true>(tile, acts),
                        (BlockFormat::Q5_1, false) => vnni256::q4_vex::<T, true, true>(tile, acts),
                        (BlockFormat::Q6K, true) => vnni256::q6k_evex(tile, acts),
                        (BlockFormat::Q6K, false) => vnni256::q6k_vex(tile, acts),
                    }
                };
            }
            KernelPath::Avx2(_) => {
                // SAFETY: the Avx2 token is made only once detection found AVX2, FMA and F16C;
                // the slices are as asserted above, which is what the kernels' contracts ask.
                return unsafe {
                    match self.format {
                        BlockFormat::Q8_0 => x86::q8_0_avx2(tile, acts),
                        BlockFormat::Q4_0 => x86::q4_avx2::<T, false, false>(tile, acts),
                        BlockFormat::Q4K => x86::q4_avx2::<T, true, false>(tile, acts),
                        BlockFormat::Q5_0 => x86::q4_avx2::<T, false, true>(tile, acts),
                        BlockFormat::Q5K => x86::q4_avx2::<T, true, true>(tile, acts),
                        BlockFormat::Q4_1 => x86::q4_avx2::<T, true, false>(tile, acts),
                        BlockFormat::Q5_1 => x86::q4_avx2::<T, true, true>(tile, acts),
                        BlockFormat::Q6K => x86::q6k_avx2(tile, acts),
                    }
                };
            }
            KernelPath::Portable => {}
        }
        let _ = path;
        portable(self.format, tile, acts)
    }
}

/// One activation row quantized to 8 bits in blocks of 32, as ggml's q8_0.
#[derive(Debug)]
struct Activations {
    quants: Vec<i8>,
    /// `max|x| / 127` per block.
    scales: Vec<f32>,
    /// `-8 * sum` and `-128 * sum` per block (`sum`: the block's quants added up, what a
    /// constant offset on the weights adds), where the kernels start each block's integer chain
    /// (see `q4_vnni`, `q8_0_vnni`; q5_0's is twice q4_0's): kept in memory so that the kernels
    /// broadcast them with a load instead of a shuffle-port instruction per token and block.
    q4_offsets: Vec<i32>,
    q8_offsets: Vec<i32>,
    /// `-32 * sum` of each half block (16 quants), where q6_K's two chains per block start.
    q6_offsets: Vec<i32>,
    /// `-(scale * sum)` per block: what q4_K's minimum multiplies.
    negated_scaled_sums: Vec<f32>,
}

impl Activations {
    /// Quantizes one row with the widest vectors `path` allows. Every path runs the same
    /// scalar code ([`quantize_row`]), compiled for wider registers, so the bits are the same.
    fn quantize(path: KernelPath, x: &[f32]) -> Self {
        match path {
            // SAFETY: the Vnni token is made only once detection found AVX-512F/BW/VL.
            #[cfg(target_arch = "x86_64")]
            KernelPath::Vnni(_) => unsafe { x86::quantize_row_avx512(x) },
            // SAFETY: both tokens are made only once detection found AVX2.
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2(_) | KernelPath::Vnni256(_) => unsafe { x86::quantize_row_avx2(x) },
            _ => quantize_row(x),
        }
    }
}

/// Quantizes `x` in blocks of 32, written for the compiler to vectorise: prefill quantizes
/// every token's input to every product, and as scalar code that was a tenth of the time of
/// the products themselves.
#[inline(always)]
fn quantize_row(x: &[f32]) -> Activations {
    let blocks = x.len() / BLOCK;
    let mut quants = vec![0i8; blocks * BLOCK];
    let mut scales = vec![0f32; blocks];
    let mut half_sums = vec![0i32; 2 * blocks];
    for ((block, quants), (scale, halves)) in x
        .chunks_exact(BLOCK)
        .zip(quants.chunks_exact_mut(BLOCK))
        .zip(scales.iter_mut().zip(half_sums.chunks_exact_mut(2)))
    {
        *scale = abs_max(block) / 127.0;
        let inverse = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
        for (q, v) in quants.iter_mut().zip(block) {
            *q = round_to_i8(v * inverse);
        }
        for (sum, half) in halves.iter_mut().zip(quants.chunks_exact(Q6K_SUB)) {
            *sum = half.iter().map(|&q| i32::from(q)).sum();
        }
    }
    let sums: Vec<i32> = half_sums.chunks_exact(2).map(|h| h[0] + h[1]).collect();
    Activations {
        quants,
        q4_offsets: sums.iter().map(|s| -8 * s).collect(),
        q8_offsets: sums.iter().map(|s| -128 * s).collect(),
        q6_offsets: half_sums.iter().map(|s| -32 * s).collect(),
        negated_scaled_sums: scales
            .iter()
            .zip(&sums)
            .map(|(&scale, &sum)| -(scale * sum as f32))
            .collect(),
        scales,
    }
}

/// The largest `|v|` of a block (NaN ignored, 0 if there is none), as halves of halves with
/// plain comparisons so that the compiler keeps it in vectors: a fold from the first element
/// to the last is a chain of scalar maximums. The maximum is exact, so the order does not
/// change it.
#[inline(always)]
fn abs_max(block: &[f32]) -> f32 {
    // `a > b`, false for NaN, is what one vector instruction computes.
    fn larger(a: f32, b: f32) -> f32 {
        if a > b {
            a
        } else {
            b
        }
    }
    let block: &[f32; BLOCK] = block.try_into().expect("a whole block");
    let mut m = [0f32; 16];
    for (i, m) in m.iter_mut().enumerate() {
        *m = larger(
            larger(block[i].abs(), 0.0),
            larger(block[i + 16].abs(), 0.0),
        );
    }
    for half in [8, 4, 2, 1] {
        for i in 0..half {
            m[i] = larger(m[i], m[i + half]);
        }
    }
    m[0]
}

/// `y.round() as i8` (halves away from zero, as ggml quantizes), in plain arithmetic: `round`
/// is a call into libm and `as` a saturating conversion, and either keeps the loop around it
/// from being vectorised.
#[inline(always)]
fn round_to_i8(y: f32) -> i8 {
    // NaN (from a NaN or infinite activation) becomes 0, as `as i8` makes it.
    let y = y.clamp(-128.0, 127.0);
    let y = if y.is_nan() { 0.0 } else { y };
    // SAFETY: `y` is finite and within i32's range.
    let toward_zero: i32 = unsafe { y.to_int_unchecked() };
    // Exact: `y` and its truncation are within a factor of two of each other, or `y` < 1.
    let fraction = y - toward_zero as f32;
    (toward_zero + i32::from(fraction >= 0.5) - i32::from(fraction <= -0.5)) as i8
}

/// Row `lane`'s quants of one tile block, in column order (q8_0 signed, 4-bit unsigned).
fn lane_quants(format: BlockFormat, block: &[u8], lane: usize) -> [u8; BLOCK] {
    std::array::from_fn(|k| {
        let (group, i) = (k / GROUP, k % GROUP);
        let at = |run: usize| block[run * 64 + lane * GROUP + i];
        let nibble = |group: usize| {
            if group < 4 {
                at(group) & 0x0F
            } else {
                at(group - 4) >> 4
            }
        };
        match format {
            BlockFormat::Q8_0 => at(group),
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4K => nibble(group),
            BlockFormat::Q5_0 | BlockFormat::Q5_1 | BlockFormat::Q5K => {
                nibble(group) | (((at(4) >> group) & 1) << 4)
            }
            BlockFormat::Q6K => {
                let j = group % 4;
                let shift = 4 * (j % 2) + 2 * (group / 4);
                nibble(group) | (((at(4 + j / 2) >> shift) & 3) << 4)
            }
        }
    })
}

/// Row `lane`'s q6_K scales of columns 0..16 and 16..32 in one tile block.
fn lane_sub_scales(block: &[u8], lane: usize) -> [i8; 2] {
    let at = TILE_ROWS * (BlockFormat::Q6K.quant_bytes_per_block() + 2) + lane;
    [block[at] as i8, block[at + TILE_ROWS] as i8]
}

/// Row `lane`'s scale (or, with `minimum`, q4_K's minimum) in one tile block.
fn lane_half(format: BlockFormat, block: &[u8], lane: usize, minimum: bool) -> f16 {
    let at = TILE_ROWS * format.quant_bytes_per_block()
        + if minimum { 2 * TILE_ROWS } else { 0 }
        + 2 * lane;
    f16::from_le_bytes([block[at], block[at + 1]])
}

/// The reference computation, for CPUs without the x86 paths: the same integer sums and the
/// same chain of fused multiply-adds as they compute, so the same bits.
fn portable<const T: usize>(
    format: BlockFormat,
    tile: &[u8],
    acts: [&Activations; T],
) -> [[f32; TILE_ROWS]; T] {
    let mut out = [[0f32; TILE_ROWS]; T];
    let mut weights = [[0i32; BLOCK]; TILE_ROWS];
    let mut scales = [0f32; TILE_ROWS];
    let mut minimums = [0f32; TILE_ROWS];
    // The integer scale of each half block: q6_K's sub-block scales, 1 for the others.
    let mut halves = [[1i32; 2]; TILE_ROWS];
    for (b, block) in tile.chunks_exact(format.tile_block_bytes()).enumerate() {
        for (r, row) in weights.iter_mut().enumerate() {
            // The weights' integer values with their offsets taken off: q8_0's quants, q4_0's
            // nibbles less 8, q5_0's quants less 16, q4_K's and q5_K's quants (their minimums
            // are applied in floats), q6_K's quants less 32.
            let quants = lane_quants(format, block, r);
            for (w, q) in row.iter_mut().zip(quants) {
                *w = match format {
                    BlockFormat::Q8_0 => q as i8 as i32,
                    BlockFormat::Q4_0 => q as i32 - 8,
                    BlockFormat::Q4_1 | BlockFormat::Q5_1 => q as i32,
                    BlockFormat::Q4K | BlockFormat::Q5K => q as i32,
                    BlockFormat::Q5_0 => q as i32 - 16,
                    BlockFormat::Q6K => q as i32 - 32,
                };
            }
            scales[r] = lane_half(format, block, r, false).to_f32();
            if format.has_minimums() {
                minimums[r] = lane_half(format, block, r, true).to_f32();
            }
            if format == BlockFormat::Q6K {
                halves[r] = lane_sub_scales(block, r).map(i32::from);
            }
        }
        for (lanes, act) in out.iter_mut().zip(acts) {
            let x = &act.quants[b * BLOCK..][..BLOCK];
            for (r, lane) in lanes.iter_mut().enumerate() {
                // Exact in i32 and in f32's 24 bits: under 2 * 16 * 32 * 127 * 128 for q6_K.
                let dot: i32 = (0..2)
                    .map(|h| {
                        let (w, x) = (&weights[r][h * Q6K_SUB..], &x[h * Q6K_SUB..]);
                        let half: i32 = (0..Q6K_SUB).map(|k| w[k] * x[k] as i32).sum();
                        halves[r][h] * half
                    })
                    .sum();
                *lane = (dot as f32).mul_add(scales[r] * act.scales[b], *lane);
                if format.has_minimums() {
                    *lane = minimums[r].mul_add(act.negated_scaled_sums[b], *lane);
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{
        quantize_row, Activations, BlockFormat, BLOCK, GROUP, Q6K_TILE_QUANT_BYTES, TILE_ROWS,
    };
    use crate::kernels::prefetch_ahead as prefetch;

    /// `T` tokens' activation bytes for four-weight group `group` of block `b`, broadcast to
    /// every 32-bit lane.
    ///
    /// # Safety
    /// Every `acts[t]` holds block `b`'s 32 quants.
    #[inline(always)]
    pub(super) unsafe fn broadcast_group(act: &Activations, b: usize, group: usize) -> i32 {
        // SAFETY: the caller guarantees block `b`; `group < 8`, so the 4 bytes are inside it.
        unsafe {
            (act.quants.as_ptr().add(b * BLOCK + group * GROUP) as *const i32).read_unaligned()
        }
    }

    /// Adds block `b`'s integer dot products to eight rows of each token's sums: `acc[t] +=
    /// dots[t] · (scales · act_scale[t])`, one fused multiply-add per lane, the chain every
    /// path computes (the 256-bit kernels' shared step).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; every `acts[t]` holds block `b`'s scale.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn add_scaled_block<const T: usize>(
        acc: &mut [__m256; T],
        dots: [__m256i; T],
        scales: __m256,
        acts: [&Activations; T],
        b: usize,
    ) {
        for t in 0..T {
            // SAFETY: the caller guarantees block `b`.
            let act = unsafe { *acts[t].scales.get_unchecked(b) };
            let s = _mm256_mul_ps(scales, _mm256_set1_ps(act));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[t]), s, acc[t]);
        }
    }

    /// q4_K's second multiply-add per block: `acc[t] += minimums · -(act_scale[t] · sum[t])`,
    /// the eight rows' f16 minimums read at `tail + 32` (past the tile block's scales).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tail + 32` holds eight f16 minimums; every `acts[t]`
    /// holds block `b`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn add_minimums<const T: usize>(
        acc: &mut [__m256; T],
        tail: *const u8,
        acts: [&Activations; T],
        b: usize,
    ) {
        // SAFETY: the caller guarantees the eight minimums at `tail + 32`.
        let minimums = unsafe { _mm_loadu_si128(tail.add(2 * TILE_ROWS) as *const __m128i) };
        let minimums = _mm256_cvtph_ps(minimums);
        for t in 0..T {
            // SAFETY: the caller guarantees block `b`.
            let sums = unsafe { *acts[t].negated_scaled_sums.get_unchecked(b) };
            acc[t] = _mm256_fmadd_ps(minimums, _mm256_set1_ps(sums), acc[t]);
        }
    }

    /// [`quantize_row`] compiled for AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn quantize_row_avx512(x: &[f32]) -> Activations {
        quantize_row(x)
    }

    /// [`quantize_row`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_row_avx2(x: &[f32]) -> Activations {
        quantize_row(x)
    }

    /// q8_0 tile × `T` tokens.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX-512 VNNI and F16C; `tile` is whole q8_0 tile blocks,
    /// and every `acts[t]` holds at least as many blocks (quants, scales and sums).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn q8_0_vnni<const T: usize>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let bytes = BlockFormat::Q8_0.tile_block_bytes();
        let ahead = crate::kernels::block_prefetch_ahead(T);
        let flip = _mm512_set1_epi8(-128);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..tile.len() / bytes {
            // SAFETY: tile block `b` is `bytes` long: eight 64-byte runs of quants, then 16 f16
            // scales; the activations hold block `b` (the caller's contract).
            unsafe {
                let base = tile.as_ptr().add(b * bytes);
                prefetch(base, ahead, bytes);
                // Each token's chain starts at what the flip adds (128 times the activations'
                // sum), so it ends at the signed dot product.
                let mut dots: [__m512i; T] = std::array::from_fn(|t| {
                    _mm512_set1_epi32(*acts[t].q8_offsets.get_unchecked(b))
                });
                for g in 0..BLOCK / GROUP {
                    let w = _mm512_loadu_si512(base.add(g * 64) as *const __m512i);
                    let w = _mm512_xor_si512(w, flip);
                    for t in 0..T {
                        let x = _mm512_set1_epi32(broadcast_group(acts[t], b, g));
                        dots[t] = _mm512_dpbusd_epi32(dots[t], w, x);
                    }
                }
                let scales =
                    _mm512_cvtph_ps(_mm256_loadu_si256(base.add(16 * BLOCK) as *const __m256i));
                add_scaled_block_512(&mut acc, dots, scales, acts, b);
            }
        }
        store_512(acc)
    }

    /// q4_0, q4_K (`MINIMUMS`), q5_0 (`FIFTH`) or q5_K (both) tile × `T` tokens.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX-512 VNNI and F16C; `tile` is whole tile blocks of the
    /// format, and every `acts[t]` holds at least as many blocks (quants, scales and sums).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn q4_vnni<const T: usize, const MINIMUMS: bool, const FIFTH: bool>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let format = BlockFormat::nibbles(MINIMUMS, FIFTH);
        let bytes = format.tile_block_bytes();
        let ahead = crate::kernels::block_prefetch_ahead(T);
        let (low, bit4) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x10));
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..tile.len() / bytes {
            // SAFETY: tile block `b` is `bytes` long: four 64-byte runs of nibbles, for 5-bit
            // formats a run of fifth bits, 16 f16 scales, and with minimums 16 f16 minimums;
            // the activations hold block `b` (the caller's contract).
            unsafe {
                let base = tile.as_ptr().add(b * bytes);
                prefetch(base, ahead, bytes);
                let mut dots: [__m512i; T] =
                    std::array::from_fn(|t| _mm512_set1_epi32(format.chain_start(acts[t], b)));
                let fifth = if FIFTH {
                    _mm512_loadu_si512(base.add(4 * 64) as *const __m512i)
                } else {
                    _mm512_setzero_si512()
                };
                for j in 0..4 {
                    let packed = _mm512_loadu_si512(base.add(j * 64) as *const __m512i);
                    let mut lo = _mm512_and_si512(packed, low);
                    let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                    if FIFTH {
                        let (first, second) =
                            fifth_bits!(j, fifth, (_mm512_srli_epi16, _mm512_slli_epi16));
                        lo = _mm512_or_si512(lo, _mm512_and_si512(first, bit4));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(second, bit4));
                    }
                    for t in 0..T {
                        let x_lo = _mm512_set1_epi32(broadcast_group(acts[t], b, j));
                        let x_hi = _mm512_set1_epi32(broadcast_group(acts[t], b, j + 4));
                        dots[t] = _mm512_dpbusd_epi32(dots[t], lo, x_lo);
                        dots[t] = _mm512_dpbusd_epi32(dots[t], hi, x_hi);
                    }
                }
                let tail = base.add(TILE_ROWS * format.quant_bytes_per_block());
                let scales = _mm512_cvtph_ps(_mm256_loadu_si256(tail as *const __m256i));
                add_scaled_block_512(&mut acc, dots, scales, acts, b);
                if MINIMUMS {
                    let minimums =
                        _mm512_cvtph_ps(_mm256_loadu_si256(tail.add(32) as *const __m256i));
                    for t in 0..T {
                        let sums = _mm512_set1_ps(*acts[t].negated_scaled_sums.get_unchecked(b));
                        acc[t] = _mm512_fmadd_ps(minimums, sums, acc[t]);
                    }
                }
            }
        }
        store_512(acc)
    }

    /// q6_K tile × `T` tokens: two chains per token and block, one per sub-block of 16, each
    /// times its rows' signed scales in integers, then the one multiply-add every path does.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX-512 VNNI and F16C; `tile` is whole q6_K tile blocks,
    /// and every `acts[t]` holds at least as many blocks (quants, scales and offsets).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn q6k_vnni<const T: usize>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let bytes = BlockFormat::Q6K.tile_block_bytes();
        let ahead = crate::kernels::block_prefetch_ahead(T);
        let (low, top) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..tile.len() / bytes {
            // SAFETY: tile block `b` is `bytes` long: four 64-byte runs of nibbles, two of high
            // bit pairs, 16 f16 scales and 32 signed sub-block scales; the activations hold
            // block `b` (the caller's contract).
            unsafe {
                let base = tile.as_ptr().add(b * bytes);
                prefetch(base, ahead, bytes);
                // Each chain starts at what the quants' offset adds (32 times the half block's
                // activation sum), so it ends at the signed dot product.
                let mut dots: [[__m512i; 2]; T] = std::array::from_fn(|t| {
                    let offsets = &acts[t].q6_offsets;
                    [
                        _mm512_set1_epi32(*offsets.get_unchecked(2 * b)),
                        _mm512_set1_epi32(*offsets.get_unchecked(2 * b + 1)),
                    ]
                });
                for j in 0..4 {
                    let packed = _mm512_loadu_si512(base.add(j * 64) as *const __m512i);
                    let high = _mm512_loadu_si512(base.add((4 + j / 2) * 64) as *const __m512i);
                    let (lo, hi) = q6k_groups!(
                        j,
                        packed,
                        high,
                        (_mm512_and_si512, _mm512_or_si512),
                        (_mm512_srli_epi16, _mm512_slli_epi16),
                        (low, top)
                    );
                    for t in 0..T {
                        let x_lo = _mm512_set1_epi32(broadcast_group(acts[t], b, j));
                        let x_hi = _mm512_set1_epi32(broadcast_group(acts[t], b, j + 4));
                        dots[t][0] = _mm512_dpbusd_epi32(dots[t][0], lo, x_lo);
                        dots[t][1] = _mm512_dpbusd_epi32(dots[t][1], hi, x_hi);
                    }
                }
                let tail = base.add(Q6K_TILE_QUANT_BYTES);
                let scales = _mm512_cvtph_ps(_mm256_loadu_si256(tail as *const __m256i));
                let first = _mm512_cvtepi8_epi32(_mm_loadu_si128(tail.add(32) as *const __m128i));
                let second = _mm512_cvtepi8_epi32(_mm_loadu_si128(tail.add(48) as *const __m128i));
                let sums = std::array::from_fn(|t| {
                    _mm512_add_epi32(
                        _mm512_mullo_epi32(dots[t][0], first),
                        _mm512_mullo_epi32(dots[t][1], second),
                    )
                });
                add_scaled_block_512(&mut acc, sums, scales, acts, b);
            }
        }
        store_512(acc)
    }

    /// Adds one q6_K tile block's sums to eight rows (`half` of the tile) of each token's:
    /// `dots[t][h]` (sub-block `h`'s chain, offset included) times the rows' signed scales, added
    /// in integers, then [`add_scaled_block`] with the rows' f16 scales (the 256-bit kernels'
    /// shared step).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tail` is a q6_K tile block's scales (16 f16, then 16
    /// and 16 signed scales); every `acts[t]` holds block `b`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub(super) unsafe fn add_q6k_block<const T: usize>(
        acc: &mut [__m256; T],
        dots: [[__m256i; 2]; T],
        tail: *const u8,
        half: usize,
        acts: [&Activations; T],
        b: usize,
    ) {
        // SAFETY: the caller guarantees the scales and block `b`.
        unsafe {
            let scales = _mm256_cvtph_ps(_mm_loadu_si128(tail.add(half * 16) as *const __m128i));
            let sub_scales = tail.add(2 * TILE_ROWS + half * 8);
            let first = _mm256_cvtepi8_epi32(_mm_loadl_epi64(sub_scales as *const __m128i));
            let second =
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(sub_scales.add(16) as *const __m128i));
            let sums = std::array::from_fn(|t| {
                _mm256_add_epi32(
                    _mm256_mullo_epi32(dots[t][0], first),
                    _mm256_mullo_epi32(dots[t][1], second),
                )
            });
            add_scaled_block(acc, sums, scales, acts, b);
        }
    }

    /// The loop every 256-bit kernel runs: a tile's 16 rows take two 8-lane registers, so for
    /// each half of them `step(acc, base, half, b)` adds tile block `b` (starting at `base`,
    /// `bytes` long) to the half's sums `acc`, block after block; the first half also asks for
    /// the weights ahead. Returns each token's 16 sums.
    ///
    /// # Safety
    /// `tile` is whole blocks of `bytes`; `step` reads only the block it is given.
    #[inline(always)]
    pub(super) unsafe fn by_halves<const T: usize>(
        tile: &[u8],
        bytes: usize,
        mut step: impl FnMut(&mut [__m256; T], *const u8, usize, usize),
    ) -> [[f32; TILE_ROWS]; T] {
        let ahead = crate::kernels::block_prefetch_ahead(T);
        let mut out = [[0f32; TILE_ROWS]; T];
        for half in 0..2 {
            // SAFETY: every caller is compiled for AVX2 (this is inlined into it).
            let mut acc = [unsafe { _mm256_setzero_ps() }; T];
            for b in 0..tile.len() / bytes {
                // SAFETY: block `b` lies inside `tile`, whole blocks of `bytes`.
                let base = unsafe { tile.as_ptr().add(b * bytes) };
                if half == 0 {
                    prefetch(base, ahead, bytes);
                }
                step(&mut acc, base, half, b);
            }
            // SAFETY: as `_mm256_setzero_ps` above.
            unsafe { store_half(&mut out, half, acc) };
        }
        out
    }

    /// Four-column groups `j` and `j + 4` (`j < 4`) of a nibble tile block's `half`, widened to
    /// bytes, with their fifth bits from `fifth` (the block's fifth run, this half's 32 bytes)
    /// for 5-bit formats: what the 256-bit q4 kernels multiply.
    ///
    /// # Safety
    /// The CPU has AVX2; `base` is a nibble tile block.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn nibble_groups<const FIFTH: bool>(
        base: *const u8,
        half: usize,
        j: usize,
        fifth: __m256i,
    ) -> (__m256i, __m256i) {
        let (low, bit4) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
        // SAFETY: run `j` of the block holds this half's 32 bytes at `32 * half`.
        let packed = unsafe { _mm256_loadu_si256(base.add(j * 64 + half * 32) as *const __m256i) };
        let mut lo = _mm256_and_si256(packed, low);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(packed), low);
        if FIFTH {
            let (first, second) = fifth_bits!(j, fifth, (_mm256_srli_epi16, _mm256_slli_epi16));
            lo = _mm256_or_si256(lo, _mm256_and_si256(first, bit4));
            hi = _mm256_or_si256(hi, _mm256_and_si256(second, bit4));
        }
        (lo, hi)
    }

    /// A 5-bit nibble tile block's fifth run for `half` (zero for 4-bit formats).
    ///
    /// # Safety
    /// The CPU has AVX2; `base` is a tile block of the format `FIFTH` says.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn fifth_run<const FIFTH: bool>(base: *const u8, half: usize) -> __m256i {
        if FIFTH {
            // SAFETY: the fifth run follows the four nibble runs.
            unsafe { _mm256_loadu_si256(base.add(4 * 64 + half * 32) as *const __m256i) }
        } else {
            _mm256_setzero_si256()
        }
    }

    /// Where each token's two q6_K chains of block `b` start (see `q6k_vnni`).
    ///
    /// # Safety
    /// The CPU has AVX2; every `acts[t]` holds block `b`.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn q6k_chain_starts<const T: usize>(
        acts: [&Activations; T],
        b: usize,
    ) -> [[__m256i; 2]; T] {
        std::array::from_fn(|t| {
            let offsets = &acts[t].q6_offsets;
            // SAFETY: the caller guarantees block `b`'s two offsets.
            unsafe {
                [
                    _mm256_set1_epi32(*offsets.get_unchecked(2 * b)),
                    _mm256_set1_epi32(*offsets.get_unchecked(2 * b + 1)),
                ]
            }
        })
    }

    /// Four-column groups `j` and `j + 4` of a q6_K tile block's `half`, widened to bytes.
    ///
    /// # Safety
    /// The CPU has AVX2; `base` is a q6_K tile block.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub(super) unsafe fn q6k_groups_256(
        base: *const u8,
        half: usize,
        j: usize,
    ) -> (__m256i, __m256i) {
        let (low, top) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        // SAFETY: nibble run `j` and bit-pair run `4 + j / 2` hold this half's 32 bytes each.
        let (packed, high) = unsafe {
            (
                _mm256_loadu_si256(base.add(j * 64 + half * 32) as *const __m256i),
                _mm256_loadu_si256(base.add((4 + j / 2) * 64 + half * 32) as *const __m256i),
            )
        };
        q6k_groups!(
            j,
            packed,
            high,
            (_mm256_and_si256, _mm256_or_si256),
            (_mm256_srli_epi16, _mm256_slli_epi16),
            (low, top)
        )
    }

    /// Stores eight rows (`half` of the tile) of each token's sums into `out[t]`.
    #[target_feature(enable = "avx")]
    #[inline]
    pub(super) fn store_half<const T: usize>(
        out: &mut [[f32; TILE_ROWS]; T],
        half: usize,
        acc: [__m256; T],
    ) {
        for (out, acc) in out.iter_mut().zip(acc) {
            // SAFETY: `out` holds 16 floats, 8 from `8 * half` (`half` is 0 or 1).
            unsafe { _mm256_storeu_ps(out[half * 8..][..8].as_mut_ptr(), acc) };
        }
    }

    /// Adds block `b`'s integer dot products to each token's 16 sums: `acc[t] += dots[t] ·
    /// (scales · act_scale[t])`, one fused multiply-add per lane, the chain every path
    /// computes (the 512-bit kernels' shared step).
    ///
    /// # Safety
    /// Every `acts[t]` holds block `b`'s scale.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_scaled_block_512<const T: usize>(
        acc: &mut [__m512; T],
        dots: [__m512i; T],
        scales: __m512,
        acts: [&Activations; T],
        b: usize,
    ) {
        for t in 0..T {
            // SAFETY: the caller guarantees block `b`.
            let act = unsafe { *acts[t].scales.get_unchecked(b) };
            let s = _mm512_mul_ps(scales, _mm512_set1_ps(act));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[t]), s, acc[t]);
        }
    }

    /// Each token's 16 sums, as the 512-bit kernels return them.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store_512<const T: usize>(acc: [__m512; T]) -> [[f32; TILE_ROWS]; T] {
        let mut out = [[0f32; TILE_ROWS]; T];
        for (out, acc) in out.iter_mut().zip(acc) {
            // SAFETY: `out` holds 16 floats.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
        }
        out
    }

    /// q8_0 tile × `T` tokens, eight rows per 256-bit register: |w| times x with w's sign.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tile` is whole q8_0 tile blocks, and every `acts[t]`
    /// holds at least as many blocks (quants, scales and sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_avx2<const T: usize>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let bytes = BlockFormat::Q8_0.tile_block_bytes();
        let ones = _mm256_set1_epi16(1);
        let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
            // SAFETY: `base` is tile block `b`: eight 64-byte runs of quants (this half's
            // rows in bytes `32 * half..` of each), then 16 f16 scales; the activations
            // hold block `b` (the caller's contract).
            unsafe {
                let mut dots = [_mm256_setzero_si256(); T];
                for g in 0..BLOCK / GROUP {
                    let w = _mm256_loadu_si256(base.add(g * 64 + half * 32) as *const __m256i);
                    let magnitude = _mm256_sign_epi8(w, w);
                    for t in 0..T {
                        let x = _mm256_set1_epi32(broadcast_group(acts[t], b, g));
                        let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
                        dots[t] = _mm256_add_epi32(dots[t], _mm256_madd_epi16(pairs, ones));
                    }
                }
                let scales = base.add(16 * BLOCK + half * 16) as *const __m128i;
                let scales = _mm256_cvtph_ps(_mm_loadu_si128(scales));
                add_scaled_block(acc, dots, scales, acts, b);
            }
        };
        // SAFETY: `tile` is whole q8_0 tile blocks (the caller's contract).
        unsafe { by_halves(tile, bytes, step) }
    }

    /// q4_0, q4_K (`MINIMUMS`), q5_0 (`FIFTH`) or q5_K (both) tile × `T` tokens, eight rows
    /// per 256-bit register.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tile` is whole tile blocks of the format, and every
    /// `acts[t]` holds at least as many blocks (quants, scales and sums).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_avx2<const T: usize, const MINIMUMS: bool, const FIFTH: bool>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let format = BlockFormat::nibbles(MINIMUMS, FIFTH);
        let ones = _mm256_set1_epi16(1);
        let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
            // SAFETY: `base` is tile block `b`: four 64-byte runs of nibbles (this half's
            // rows in bytes `32 * half..` of each), for 5-bit formats a run of fifth bits,
            // 16 f16 scales, and with minimums 16 f16 minimums; the activations hold block
            // `b` (the caller's contract).
            unsafe {
                // Eight products of at most 15 * 127 * 2 fit 16 bits, four of 31 * 127 * 2:
                // one widening per block, two for 5-bit quants.
                let mut pairs = [_mm256_setzero_si256(); T];
                let mut dots: [__m256i; T] =
                    std::array::from_fn(|t| _mm256_set1_epi32(format.chain_start(acts[t], b)));
                let fifth = fifth_run::<FIFTH>(base, half);
                for j in 0..4 {
                    let (lo, hi) = nibble_groups::<FIFTH>(base, half, j, fifth);
                    for t in 0..T {
                        let x_lo = _mm256_set1_epi32(broadcast_group(acts[t], b, j));
                        let x_hi = _mm256_set1_epi32(broadcast_group(acts[t], b, j + 4));
                        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(lo, x_lo));
                        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(hi, x_hi));
                        if j == 3 || (FIFTH && j == 1) {
                            let wide = _mm256_madd_epi16(pairs[t], ones);
                            dots[t] = _mm256_add_epi32(dots[t], wide);
                            pairs[t] = _mm256_setzero_si256();
                        }
                    }
                }
                let tail = base.add(TILE_ROWS * format.quant_bytes_per_block() + half * 16);
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

    /// q6_K tile × `T` tokens, eight rows per 256-bit register: `vpmaddubsw` pairs of two
    /// groups summed in 16 bits, then the sub-block chains as on the VNNI paths.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `tile` is whole q6_K tile blocks, and every `acts[t]`
    /// holds at least as many blocks (quants, scales and offsets).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_avx2<const T: usize>(
        tile: &[u8],
        acts: [&Activations; T],
    ) -> [[f32; TILE_ROWS]; T] {
        let ones = _mm256_set1_epi16(1);
        let step = |acc: &mut [__m256; T], base: *const u8, half: usize, b: usize| {
            // SAFETY: `base` is tile block `b`: four 64-byte runs of nibbles and two of
            // high bit pairs (this half's rows in bytes `32 * half..` of each), 16 f16
            // scales and 32 signed sub-block scales; the activations hold block `b` (the
            // caller's contract).
            unsafe {
                let mut dots = q6k_chain_starts(acts, b);
                // Two groups' products of at most 63 * 127 * 2 each fit 16 bits.
                let mut pairs = [[_mm256_setzero_si256(); 2]; T];
                for j in 0..4 {
                    let (lo, hi) = q6k_groups_256(base, half, j);
                    for t in 0..T {
                        let x_lo = _mm256_set1_epi32(broadcast_group(acts[t], b, j));
                        let x_hi = _mm256_set1_epi32(broadcast_group(acts[t], b, j + 4));
                        let p = &mut pairs[t];
                        p[0] = _mm256_add_epi16(p[0], _mm256_maddubs_epi16(lo, x_lo));
                        p[1] = _mm256_add_epi16(p[1], _mm256_maddubs_epi16(hi, x_hi));
                        if j % 2 == 1 {
                            for h in 0..2 {
                                let wide = _mm256_madd_epi16(p[h], ones);
                                dots[t][h] = _mm256_add_epi32(dots[t][h], wide);
                                p[h] = _mm256_setzero_si256();
                            }
                        }
                    }
                }
                let tail = base.add(Q6K_TILE_QUANT_BYTES);
                add_q6k_block(acc, dots, tail, half, acts, b);
            }
        };
        // SAFETY: `tile` is whole q6_K tile blocks (the caller's contract).
        unsafe { by_halves(tile, BlockFormat::Q6K.tile_block_bytes(), step) }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    const ALL: [BlockFormat; 8] = [
        BlockFormat::Q8_0,
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q5_0,
        BlockFormat::Q5_1,
        BlockFormat::Q4K,
        BlockFormat::Q5K,
        BlockFormat::Q6K,
    ];

    fn matrix(rows: usize, cols: usize, seed: f64) -> candle_core::Result<Tensor> {
        Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .affine(0.0007 * seed, seed)?
            .sin()
    }

    #[test]
    fn activations_quantize_to_the_same_bits_on_every_path() {
        // Ordinary values, halves after scaling, and blocks holding NaN, infinities, zeros.
        let mut x: Vec<f32> = (0..32 * 40)
            .map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0)
            .collect();
        x[3] = f32::NAN;
        x[40] = f32::INFINITY;
        x[70] = f32::NEG_INFINITY;
        x[96..128].fill(0.0);
        x[128..160].fill(f32::NAN);
        for (i, v) in x[160..192].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 127.0 / 16.0 + 0.5;
        }
        let portable = quantize_row(&x);
        for path in KernelPath::available() {
            let got = Activations::quantize(path, &x);
            assert_eq!(got.quants, portable.quants, "{path:?}");
            assert_eq!(got.q4_offsets, portable.q4_offsets, "{path:?}");
            assert_eq!(got.q6_offsets, portable.q6_offsets, "{path:?}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.scales), bits(&portable.scales), "{path:?}");
        }
        // What the old fold-and-round gave: NaN ignored by the maximum, NaN quantized to 0.
        for (block, quants) in x
            .chunks_exact(BLOCK)
            .zip(portable.quants.chunks_exact(BLOCK))
        {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            for (q, v) in quants.iter().zip(block) {
                assert_eq!(*q, (v * inverse).round() as i8, "{v}");
            }
        }
    }

    /// The arithmetic rounding is `round` exactly: at and beside every half up to the i8 range
    /// and beyond it, for NaN and the infinities, and over a sweep of bit patterns.
    #[test]
    fn activation_rounding_is_rounds_own() {
        let mut values = vec![
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e9,
            -1e9,
        ];
        for half in -300..=300 {
            let y = half as f32 / 2.0;
            values.extend([y, y.next_up(), y.next_down()]);
        }
        values.extend((0..u32::MAX).step_by(9973).map(f32::from_bits));
        for y in values {
            assert_eq!(round_to_i8(y), y.round() as i8, "{y:e}");
        }
    }

    /// `blocks` times `x` on `path` is within `tolerance` of the largest output of `x` times
    /// the dense `w` (`rows x cols`), output by output.
    fn assert_near_product(
        blocks: &BlockMatrix,
        path: KernelPath,
        x: &Tensor,
        w: &Tensor,
        tolerance: f32,
        what: &str,
    ) -> candle_core::Result<()> {
        let expected = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut out = vec![0f32; expected.len()];
        blocks.matmul_on(path, &x.flatten_all()?.to_vec1::<f32>()?, &mut out);
        for (got, want) in out.iter().zip(&expected) {
            assert!(
                (got - want).abs() <= tolerance * scale,
                "{what}: {got} vs {want}"
            );
        }
        Ok(())
    }

    /// Every path against the dequantized matrix times the exact activations, for row counts
    /// that leave the last tile part empty and token counts that are not whole passes.
    #[test]
    fn kernels_match_the_dequantized_product() -> candle_core::Result<()> {
        let shapes = |format| match format {
            BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K => {
                [(3, 256), (17, 768), (40, 1280), (9, 2304), (300, 256)]
            }
            // 300 rows: tasks of several tiles, the last one short, the last tile partial.
            _ => [(3, 32), (17, 96), (40, 544), (9, 1056), (300, 64)],
        };
        for format in ALL {
            for (rows, cols) in shapes(format) {
                let w = matrix(rows, cols, 1.3)?;
                let q = QTensor::quantize(&w, format.ggml())?;
                let exact_w = q.dequantize(&Device::Cpu)?;
                let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
                for tokens in [1, 2, 5, 8] {
                    let x = matrix(tokens, cols, 0.7)?;
                    for path in KernelPath::available() {
                        // The activations are quantized to 8 bits: ~1% of the largest output.
                        let what = format!("{format:?} {rows}x{cols}, {tokens} tokens, {path:?}");
                        assert_near_product(&blocks, path, &x, &exact_w, 0.02, &what)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The block formats these kernels do not run as stored are taken in the one
    /// `requantized_format` names, and the product stays within the activations' rounding of
    /// the one with the weights as stored.
    #[test]
    fn other_block_formats_are_requantized() -> candle_core::Result<()> {
        let formats = [
            (GgmlDType::Q3K, GgmlDType::Q4_0),
            (GgmlDType::Q2K, GgmlDType::Q4_0),
        ];
        for (source, target) in formats {
            let (rows, cols) = (40, 512);
            let q = QTensor::quantize(&matrix(rows, cols, 1.1)?, source)?;
            let stored = q.dequantize(&Device::Cpu)?;
            let blocks = BlockMatrix::from_qtensor(&q)?.expect("taken after requantizing");
            assert_eq!(blocks.ggml_dtype(), target, "{source:?}");
            let x = matrix(3, cols, 0.7)?;
            let what = format!("{source:?}");
            assert_near_product(&blocks, KernelPath::detect(), &x, &stored, 0.03, &what)?;
        }
        Ok(())
    }

    /// llama.cpp's q6_K layers run as stored: every weight the kernels see is the one ggml
    /// dequantizes, with the extremes of the format (quants 0 and 63, scales -128 and 127).
    #[test]
    fn q6k_runs_as_stored() -> candle_core::Result<()> {
        let (rows, cols) = (20, 512);
        let q6 = QTensor::quantize(&matrix(rows, cols, 0.9)?, GgmlDType::Q6K)?;
        let mut bytes = q6.data()?.into_owned();
        for (i, block) in bytes.chunks_exact_mut(Q6K_BYTES).enumerate() {
            // Low nibbles and high bit pairs all set or clear: quants 63 or 0.
            block[i % 128] = if i % 2 == 0 { 0xFF } else { 0 };
            block[128 + i % 64] = if i % 2 == 0 { 0xFF } else { 0 };
            block[192 + i % 16] = if i % 3 == 0 { 0x80 } else { 0x7F };
        }
        let q6 = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q6K,
            &bytes,
            vec![rows, cols],
            &Device::Cpu,
        )?;
        let blocks = BlockMatrix::from_qtensor(&q6)?.expect("q6_K is taken");
        assert_eq!(blocks.ggml_dtype(), GgmlDType::Q6K);
        assert_eq!(
            blocks.bytes_read_per_token(),
            rows.div_ceil(16) * 16 * cols * 7 / 8
        );
        let want = q6.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
        for (r, want) in want.iter().enumerate() {
            for (b, want) in want.chunks_exact(BLOCK).enumerate() {
                let mut quants = [0u8; BLOCK];
                blocks.block_quants(r, b, &mut quants);
                let subs = lane_sub_scales(blocks.tile_block(r, b), r % TILE_ROWS);
                let d = blocks.block_scale(r, b).to_f32();
                for (k, (q, want)) in quants.iter().zip(want).enumerate() {
                    let got = d * f32::from(subs[k / Q6K_SUB]) * (*q as f32 - 32.0);
                    assert_eq!(got, *want, "row {r} block {b} column {k}");
                }
            }
        }
        assert_eq!(blocks.to_qtensor()?.data()?, &bytes[..]);
        Ok(())
    }

    /// The fast paths compute the portable path's integer sums and then the same fused
    /// multiply-adds in the same order: the same bits.
    #[test]
    fn paths_give_the_portable_bits() -> candle_core::Result<()> {
        for format in ALL {
            let (rows, cols) = (
                33,
                if matches!(
                    format,
                    BlockFormat::Q4K | BlockFormat::Q5K | BlockFormat::Q6K
                ) {
                    1280
                } else {
                    1376
                },
            );
            let q = QTensor::quantize(&matrix(rows, cols, 2.1)?, format.ggml())?;
            let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
            let x = matrix(7, cols, 0.3)?.flatten_all()?.to_vec1::<f32>()?;
            let mut reference = vec![0f32; 7 * rows];
            blocks.matmul_on(KernelPath::Portable, &x, &mut reference);
            for path in KernelPath::available() {
                let mut out = vec![0f32; 7 * rows];
                blocks.matmul_on(path, &x, &mut out);
                assert_eq!(out, reference, "{format:?} {path:?}");
            }
        }
        Ok(())
    }

    /// A token's outputs are the same bits alone and in a pass with others, wherever it sits:
    /// batched decode gives what one sequence gets.
    #[test]
    fn a_token_gets_the_same_bits_in_any_batch() -> candle_core::Result<()> {
        for format in ALL {
            let (rows, cols) = (48, 512);
            let q = QTensor::quantize(&matrix(rows, cols, 0.8)?, format.ggml())?;
            let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
            let tokens = 11;
            let x = matrix(tokens, cols, 1.7)?.flatten_all()?.to_vec1::<f32>()?;
            for path in KernelPath::available() {
                let mut batched = vec![0f32; tokens * rows];
                blocks.matmul_on(path, &x, &mut batched);
                for (t, token) in x.chunks_exact(cols).enumerate() {
                    let mut alone = vec![0f32; rows];
                    blocks.matmul_on(path, token, &mut alone);
                    assert_eq!(
                        alone,
                        batched[t * rows..][..rows],
                        "{format:?} {path:?} token {t}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn blocks_round_trip_to_the_same_ggml_bytes() -> candle_core::Result<()> {
        for format in ALL {
            for rows in [5, 16, 37] {
                let q = QTensor::quantize(&matrix(rows, 512, 0.9)?, format.ggml())?;
                let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
                assert_eq!(blocks.to_qtensor()?.data()?, q.data()?, "{format:?} {rows}");
                assert_eq!(blocks.storage_bytes(), q.storage_size_in_bytes());
                // Parts that split rows (whole blocks only) take the streaming path: same tiles.
                let data = q.data()?;
                let block = format.ggml_block().0;
                let cut = (data.len() / block / 3) * block;
                let parts = [&data[..cut], &data[cut..]];
                let split = BlockMatrix::from_ggml_bytes(format.ggml(), rows, 512, parts)?
                    .expect("format is supported");
                assert_eq!(split.tiles, blocks.tiles, "{format:?} {rows}");
                assert_eq!(split.headers, blocks.headers, "{format:?} {rows}");
            }
        }
        Ok(())
    }

    /// Reading a GGUF tensor band by band gives the same matrix as taking its bytes whole, and a
    /// reader that runs dry is an error, not a short matrix.
    #[test]
    fn reading_in_bands_matches_and_a_short_read_is_an_error() -> candle_core::Result<()> {
        for format in ALL {
            // 4500 rows of q8_0 are 4.9 MB: two bands.
            let q = QTensor::quantize(&matrix(4500, 1024, 0.4)?, format.ggml())?;
            let bytes = q.data()?;
            let mut reader = &bytes[..];
            let read = BlockMatrix::read_ggml(format.ggml(), 4500, 1024, &mut |buf| {
                std::io::Read::read_exact(&mut reader, buf)
            })?
            .expect("format is supported");
            assert_eq!(read.to_qtensor()?.data()?, bytes);
            let mut short = &bytes[..bytes.len() - 1];
            let cut = BlockMatrix::read_ggml(format.ggml(), 4500, 1024, &mut |buf| {
                std::io::Read::read_exact(&mut short, buf)
            });
            assert!(cut.is_err(), "{format:?}");
        }
        Ok(())
    }
}
