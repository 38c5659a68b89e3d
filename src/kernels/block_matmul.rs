//! Products of f32 activations with q8_0 / q4_0 / q4_K weight matrices, by kernels made for
//! them.
//!
//! candle's CPU kernels for these formats reach about 0.6 (q8_0), 0.3 (q4_0) and 0.45 (q4_K) of
//! the memory bandwidth when decoding on a 2-core AVX-512 machine, and its q4_0 prefill runs at
//! about 30 tokens/s. The blocks here hold ggml's values (so a GGUF file round-trips byte for
//! byte), but quants and scales live in separate arrays: one 64-byte load then covers two 8-bit
//! or four 4-bit blocks of 32, which AVX-512 VNNI (`vpdpbusd`) multiplies by the activations in
//! one instruction. The activations are quantized to 8 bits once per product, as ggml does.
//! AVX2 machines get a `vpmaddubsw` path and other CPUs a portable one; the three compute the
//! same integer sums.
//!
//! The unsigned-by-signed VNNI instruction wants unsigned weights: q8_0 quants are flipped to
//! `w + 128` in a register, q4_0 nibbles are `w + 8` already, and the offset times the sum of
//! each activation block is taken off afterwards. q4_K is the same product with a minimum per
//! block of 32 in place of q4_0's fixed offset: its nibbles are reordered at load to q4_0's
//! order, and its 6-bit scales and minimums expanded to one f16 pair per block of 32 (5 bits per
//! weight read instead of 4.5, for one kernel and no unpacking while decoding). The super-block
//! headers are kept aside so the original bytes can be written back.

use std::sync::LazyLock;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use rayon::prelude::*;

use super::cpu;

/// Weights per block, in both formats.
const BLOCK: usize = 32;
/// Activation blocks are padded to a multiple of this, the scales one 512-bit register covers.
const SCALE_GROUP: usize = 16;
/// Bytes readable past the last row's quants: the wide kernels load whole registers.
const QUANT_PADDING: usize = 64;

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
}

impl BlockFormat {
    /// The format, when these kernels take it.
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4K => Some(BlockFormat::Q4K),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            BlockFormat::Q8_0 => GgmlDType::Q8_0,
            BlockFormat::Q4_0 => GgmlDType::Q4_0,
            BlockFormat::Q4K => GgmlDType::Q4K,
        }
    }

    fn quant_bytes_per_block(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK,
            BlockFormat::Q4_0 | BlockFormat::Q4K => BLOCK / 2,
        }
    }

    /// Whether the quants are nibbles in q4_0's order (low nibble element `i`, high `i + 16`).
    fn is_four_bit(self) -> bool {
        matches!(self, BlockFormat::Q4_0 | BlockFormat::Q4K)
    }
}

/// The instruction set a product runs on, chosen once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum KernelPath {
    /// AVX-512 with VNNI (`vpdpbusd`), F16C conversions.
    Vnni(cpu::Vnni),
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
        paths.extend(cpu::avx2().map(KernelPath::Avx2));
        paths.push(KernelPath::Portable);
        paths
    }
}

static DETECTED: LazyLock<KernelPath> = LazyLock::new(|| {
    if let Some(vnni) = cpu::vnni() {
        return KernelPath::Vnni(vnni);
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
/// Weights per q4_K super-block.
const SUPER_BLOCK: usize = 256;

/// A `[rows, cols]` weight matrix in q8_0, q4_0 or q4_K blocks, quants and scales apart.
#[derive(Debug, Clone)]
pub(crate) struct BlockMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Row after row, `quant_bytes_per_block` per block, then [`QUANT_PADDING`] zero bytes.
    quants: Vec<u8>,
    /// One scale per block of 32, row after row.
    scales: Vec<f16>,
    /// q4_K: one minimum per block of 32 (weight = scale * q - minimum); empty otherwise.
    minimums: Vec<f16>,
    /// q4_K: each super-block's first 16 bytes as stored, to write the original back.
    headers: Vec<[u8; Q4K_HEADER]>,
}

impl BlockMatrix {
    /// Takes the blocks of a CPU `QTensor` in a format these kernels run; `None` for others.
    pub(crate) fn from_qtensor(qtensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let (rows, cols) = qtensor.shape().dims2()?;
        let data = qtensor.data()?;
        Self::from_ggml_bytes(qtensor.dtype(), rows, cols, [&data[..]])
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
        let Some((mut matrix, block_bytes, total)) = Self::empty(dtype, rows, cols) else {
            return Ok(None);
        };
        // 4 MiB or so of whole blocks per read.
        let band = ((4 << 20) / block_bytes).max(1) * block_bytes;
        let mut buffer = vec![0u8; band.min(total)];
        let mut left = total;
        while left > 0 {
            let n = band.min(left);
            read_exact(&mut buffer[..n])?;
            matrix.push_blocks(&buffer[..n], block_bytes);
            left -= n;
        }
        matrix.quants.resize(matrix.quants.len() + QUANT_PADDING, 0);
        Ok(Some(matrix))
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
        let Some((mut matrix, block_bytes, expected)) = Self::empty(dtype, rows, cols) else {
            return Ok(None);
        };
        let mut seen = 0;
        for part in parts {
            let part = part.as_ref();
            seen += part.len();
            if part.len() % block_bytes != 0 || seen > expected {
                break;
            }
            matrix.push_blocks(part, block_bytes);
        }
        if seen != expected {
            candle_core::bail!(
                "{dtype:?} tensor of {rows}x{cols} holds {seen} bytes of whole blocks, expected {expected}"
            );
        }
        matrix.quants.resize(matrix.quants.len() + QUANT_PADDING, 0);
        Ok(Some(matrix))
    }

    /// A matrix with room for `rows x cols` weights of `dtype` and no blocks yet, the bytes of
    /// one ggml block and of the whole matrix in ggml's layout; `None` if these kernels do not
    /// run `dtype` on rows of `cols`.
    fn empty(dtype: GgmlDType, rows: usize, cols: usize) -> Option<(Self, usize, usize)> {
        let format = BlockFormat::from_ggml(dtype)?;
        let (block_bytes, block_weights) = match format {
            BlockFormat::Q4K => (Q4K_BYTES, SUPER_BLOCK),
            _ => (2 + format.quant_bytes_per_block(), BLOCK),
        };
        if !cols.is_multiple_of(BLOCK) || !cols.is_multiple_of(block_weights) {
            return None;
        }
        let blocks = rows * cols / BLOCK;
        let matrix = BlockMatrix {
            format,
            rows,
            cols,
            quants: crate::huge_pages::vec_prefaulted(
                blocks * format.quant_bytes_per_block() + QUANT_PADDING,
            ),
            scales: crate::huge_pages::vec_prefaulted(blocks),
            minimums: if matches!(format, BlockFormat::Q4K) {
                crate::huge_pages::vec_prefaulted(blocks)
            } else {
                Vec::new()
            },
            headers: Vec::new(),
        };
        Some((
            matrix,
            block_bytes,
            rows * cols / block_weights * block_bytes,
        ))
    }

    /// Appends the whole ggml blocks in `part`.
    fn push_blocks(&mut self, part: &[u8], block_bytes: usize) {
        for block in part.chunks_exact(block_bytes) {
            match self.format {
                BlockFormat::Q4K => self.push_q4k(block),
                _ => {
                    self.scales.push(f16::from_le_bytes([block[0], block[1]]));
                    self.quants.extend_from_slice(&block[2..]);
                }
            }
        }
    }

    /// Unpacks one q4_K super-block: eight blocks of 32 with an f16 scale and minimum each,
    /// nibbles reordered so each block's 16 bytes read like a q4_0 block's.
    fn push_q4k(&mut self, block: &[u8]) {
        let header: [u8; Q4K_HEADER] = block[..Q4K_HEADER].try_into().expect("16 bytes");
        let scale = f16::from_le_bytes([header[0], header[1]]).to_f32();
        let minimum = f16::from_le_bytes([header[2], header[3]]).to_f32();
        let packed = &header[4..];
        for sub in 0..SUPER_BLOCK / BLOCK {
            // ggml's get_scale_min_k4: the first four pairs are plain 6-bit fields, the last
            // four keep their top two bits in the spare bits of the first eight bytes.
            let (sc, m) = if sub < 4 {
                (packed[sub] & 63, packed[sub + 4] & 63)
            } else {
                (
                    (packed[sub + 4] & 0x0F) | ((packed[sub - 4] >> 6) << 4),
                    (packed[sub + 4] >> 4) | ((packed[sub] >> 6) << 4),
                )
            };
            self.scales.push(f16::from_f32(scale * sc as f32));
            self.minimums.push(f16::from_f32(minimum * m as f32));
            // Quants come in 32-byte runs for a pair of blocks: the first block in the low
            // nibbles, the second in the high ones.
            let run = &block[Q4K_HEADER + (sub / 2) * 32..][..32];
            let nibble = |i: usize| {
                if sub % 2 == 0 {
                    run[i] & 0x0F
                } else {
                    run[i] >> 4
                }
            };
            for i in 0..16 {
                self.quants.push(nibble(i) | (nibble(i + 16) << 4));
            }
        }
        self.headers.push(header);
    }

    /// The same blocks as a candle `QTensor` (for GGUF files).
    pub(crate) fn to_qtensor(&self) -> candle_core::Result<QTensor> {
        let quant_bytes = self.format.quant_bytes_per_block();
        let mut bytes = Vec::with_capacity(self.storage_bytes());
        let quants = self.quants[..self.scales.len() * quant_bytes].chunks_exact(quant_bytes);
        if self.format == BlockFormat::Q4K {
            let per_super = SUPER_BLOCK / BLOCK;
            let blocks: Vec<&[u8]> = quants.collect();
            for (header, blocks) in self.headers.iter().zip(blocks.chunks_exact(per_super)) {
                bytes.extend_from_slice(header);
                for pair in blocks.chunks_exact(2) {
                    // Back to ggml's runs: element i of the pair's first block in the low
                    // nibble of byte i, of the second block in its high nibble.
                    let element = |b: &[u8], i: usize| {
                        if i < 16 {
                            b[i] & 0x0F
                        } else {
                            b[i - 16] >> 4
                        }
                    };
                    for i in 0..BLOCK {
                        bytes.push(element(pair[0], i) | (element(pair[1], i) << 4));
                    }
                }
            }
        } else {
            for (scale, quants) in self.scales.iter().zip(quants) {
                bytes.extend_from_slice(&scale.to_le_bytes());
                bytes.extend_from_slice(quants);
            }
        }
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.format.ggml(),
            &bytes,
            vec![self.rows, self.cols],
            &Device::Cpu,
        )
    }

    /// The ggml format of the blocks.
    pub(crate) fn ggml_dtype(&self) -> GgmlDType {
        self.format.ggml()
    }

    /// `(rows, cols)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes of the blocks as ggml stores them (what a token reads).
    pub(crate) fn storage_bytes(&self) -> usize {
        match self.format {
            BlockFormat::Q4K => self.headers.len() * Q4K_BYTES,
            _ => self.scales.len() * (2 + self.format.quant_bytes_per_block()),
        }
    }

    /// Bytes a token reads from this matrix in memory (q4_K's expanded scales included).
    pub(crate) fn bytes_read_per_token(&self) -> usize {
        self.scales.len() * (2 + self.format.quant_bytes_per_block()) + self.minimums.len() * 2
    }

    /// `out = x W^T` for `x: [tokens, cols]`, `out: [tokens, rows]`, row-major, on every core.
    pub(crate) fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_on(KernelPath::detect(), x, out)
    }

    fn matmul_on(&self, path: KernelPath, x: &[f32], out: &mut [f32]) {
        assert_eq!(x.len() % self.cols, 0, "activations are not whole rows");
        let tokens = x.len() / self.cols;
        assert_eq!(out.len(), tokens * self.rows, "output has the wrong size");
        let order = if matches!(path, KernelPath::Vnni(_)) && self.format.is_four_bit() {
            QuantOrder::NibbleHalves
        } else {
            QuantOrder::Natural
        };
        let acts: Vec<Activations> = if tokens > 1 {
            x.par_chunks(self.cols)
                .map(|row| Activations::quantize(row, order))
                .collect()
        } else {
            vec![Activations::quantize(x, order)]
        };
        let rows_per_task = (self.rows / (rayon::current_num_threads() * 8)).max(16);
        if tokens == 1 {
            out.par_chunks_mut(rows_per_task)
                .enumerate()
                .for_each(|(task, out)| {
                    let first = task * rows_per_task;
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = self.dot_rows::<1>(path, first + i, [&acts[0]])[0];
                    }
                });
            return;
        }
        // Row-major by weight row, so each task owns a contiguous slice; transposed at the end.
        let mut by_row = vec![0f32; self.rows * tokens];
        by_row
            .par_chunks_mut(rows_per_task * tokens)
            .enumerate()
            .for_each(|(task, chunk)| {
                let first = task * rows_per_task;
                for (i, row_out) in chunk.chunks_mut(tokens).enumerate() {
                    self.row_for_tokens(path, first + i, &acts, row_out);
                }
            });
        for (r, row) in by_row.chunks(tokens).enumerate() {
            for (t, v) in row.iter().enumerate() {
                out[t * self.rows + r] = *v;
            }
        }
    }

    /// One weight row against every token, four tokens per pass over the row.
    fn row_for_tokens(&self, path: KernelPath, row: usize, acts: &[Activations], out: &mut [f32]) {
        let mut t = 0;
        while t < acts.len() {
            match acts.len() - t {
                1 => out[t] = self.dot_rows::<1>(path, row, [&acts[t]])[0],
                2 => out[t..t + 2].copy_from_slice(&self.dot_rows::<2>(
                    path,
                    row,
                    [&acts[t], &acts[t + 1]],
                )),
                3 => out[t..t + 3].copy_from_slice(&self.dot_rows::<3>(
                    path,
                    row,
                    [&acts[t], &acts[t + 1], &acts[t + 2]],
                )),
                _ => out[t..t + 4].copy_from_slice(&self.dot_rows::<4>(
                    path,
                    row,
                    [&acts[t], &acts[t + 1], &acts[t + 2], &acts[t + 3]],
                )),
            }
            t += 4;
        }
    }

    /// `dot(W[row], x_t)` for `T` tokens.
    fn dot_rows<const T: usize>(
        &self,
        path: KernelPath,
        row: usize,
        acts: [&Activations; T],
    ) -> [f32; T] {
        let blocks = self.cols / BLOCK;
        let quant_bytes = self.format.quant_bytes_per_block();
        let quants = &self.quants[row * blocks * quant_bytes..];
        let scales = &self.scales[row * blocks..][..blocks];
        let minimums = match self.format {
            BlockFormat::Q4K => Some(&self.minimums[row * blocks..][..blocks]),
            _ => None,
        };
        // What both x86 paths rely on: `scales` (and `minimums`) are this row's `blocks` entries;
        // `quants` runs from this row's first block to the end of the buffer, so it holds the
        // row's `blocks * quant_bytes` bytes and then at least QUANT_PADDING (64) more (the
        // next rows' and the padding `from_ggml_bytes` / `read_ggml` append); every activation
        // row was quantized from `cols` values, so it holds `blocks` blocks padded to whole
        // scale groups (quants, scales and sums).
        #[cfg(target_arch = "x86_64")]
        match path {
            KernelPath::Vnni(_) => {
                // SAFETY: the Vnni token is made only once detection found AVX-512F/BW/VL,
                // VNNI and F16C; the slices are as said above, which is what the kernels'
                // contracts ask.
                return unsafe {
                    match self.format {
                        BlockFormat::Q8_0 => x86::q8_0_vnni(quants, scales, acts),
                        BlockFormat::Q4_0 | BlockFormat::Q4K => {
                            x86::q4_vnni(quants, scales, minimums, acts)
                        }
                    }
                };
            }
            KernelPath::Avx2(_) => {
                // SAFETY: the Avx2 token is made only once detection found AVX2, FMA and F16C;
                // the slices are as said above, which is what the kernels' contracts ask.
                return unsafe {
                    match self.format {
                        BlockFormat::Q8_0 => x86::q8_0_avx2(quants, scales, acts),
                        BlockFormat::Q4_0 | BlockFormat::Q4K => {
                            x86::q4_avx2(quants, scales, minimums, acts)
                        }
                    }
                };
            }
            KernelPath::Portable => {}
        }
        let _ = path;
        portable(self.format, quants, scales, minimums, acts)
    }
}

/// The order of an activation row's quants within each group of four blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QuantOrder {
    /// Element order.
    Natural,
    /// Per four blocks: elements 0..16 of each block, then elements 16..32 of each, matching
    /// the low and high nibbles of a 64-byte load of q4_0 quants.
    NibbleHalves,
}

/// One activation row quantized to 8 bits in blocks of 32, padded to whole scale groups.
#[derive(Debug)]
struct Activations {
    quants: Vec<i8>,
    /// `max|x| / 127` per block.
    scales: Vec<f32>,
    /// `scale * sum(quants)` per block: what a constant offset on the weights adds.
    sums: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], order: QuantOrder) -> Self {
        let blocks = x.len() / BLOCK;
        let padded = blocks.div_ceil(SCALE_GROUP) * SCALE_GROUP;
        let mut quants = vec![0i8; padded * BLOCK];
        let mut scales = vec![0f32; padded];
        let mut sums = vec![0f32; padded];
        for (b, block) in x.chunks_exact(BLOCK).enumerate() {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (i, v) in block.iter().enumerate() {
                let q = (v * inverse).round() as i8;
                sum += q as i32;
                let at = match order {
                    QuantOrder::Natural => b * BLOCK + i,
                    QuantOrder::NibbleHalves => {
                        let (group, within) = (b / 4, b % 4);
                        group * 4 * BLOCK + (i / 16) * 64 + within * 16 + i % 16
                    }
                };
                quants[at] = q;
            }
            scales[b] = scale;
            sums[b] = scale * sum as f32;
        }
        Activations {
            quants,
            scales,
            sums,
        }
    }
}

/// The reference computation, for CPUs without the x86 paths.
fn portable<const T: usize>(
    format: BlockFormat,
    quants: &[u8],
    scales: &[f16],
    minimums: Option<&[f16]>,
    acts: [&Activations; T],
) -> [f32; T] {
    let mut out = [0f32; T];
    let quant_bytes = format.quant_bytes_per_block();
    let mut weights = [0i32; BLOCK];
    for (b, scale) in scales.iter().enumerate() {
        let q = &quants[b * quant_bytes..][..quant_bytes];
        match format {
            BlockFormat::Q8_0 => {
                for (w, q) in weights.iter_mut().zip(q) {
                    *w = *q as i8 as i32;
                }
            }
            BlockFormat::Q4_0 | BlockFormat::Q4K => {
                for (i, byte) in q.iter().enumerate() {
                    weights[i] = (byte & 0x0F) as i32;
                    weights[i + 16] = (byte >> 4) as i32;
                }
            }
        }
        let scale = scale.to_f32();
        // What the nibbles' offset contributes per unit of `scale * sum(x)`: q4_0's fixed 8,
        // q4_K's own minimum.
        let offset = match (format, minimums) {
            (BlockFormat::Q4_0, _) => 8.0 * scale,
            (_, Some(minimums)) => minimums[b].to_f32(),
            _ => 0.0,
        };
        for (o, act) in out.iter_mut().zip(acts) {
            let x = &act.quants[b * BLOCK..][..BLOCK];
            let dot: i32 = weights.iter().zip(x).map(|(w, x)| w * *x as i32).sum();
            *o += scale * act.scales[b] * dot as f32 - offset * act.sums[b];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{Activations, BLOCK, SCALE_GROUP};

    /// Sum of eight lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sixteen block scales (fewer at a row's end, the rest zero) as f32.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL; `min(count, 16)` f16 values are readable at `scales`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_scales(scales: *const f16, count: usize) -> __m512 {
        let mask = if count >= SCALE_GROUP {
            0xFFFF
        } else {
            (1u16 << count) - 1
        };
        // SAFETY: `mask` keeps the first `min(count, 16)` lanes, which the caller guarantees
        // are readable; a masked load does not touch (or fault on) the others.
        _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(mask, scales as *const i16) })
    }

    /// Lane `i` of the result is lane `i / lanes_per_block + first` of `v`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn spread(v: __m512, index: __m512i) -> __m512 {
        _mm512_permutexvar_ps(index, v)
    }

    /// For the sixteen blocks from `group`: each token's weight scale × activation scale, and
    /// `offsets[t] += weight_offsets × the activation blocks' sums` (the unsigned offset's part).
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `acts[t]` holds at least `group + 16` scales and sums.
    #[target_feature(enable = "avx512f")]
    unsafe fn group_scales<const T: usize>(
        weight_scales: __m512,
        weight_offsets: __m512,
        acts: &[&Activations; T],
        group: usize,
        offsets: &mut [__m512; T],
    ) -> [__m512; T] {
        let mut combined = [_mm512_setzero_ps(); T];
        for t in 0..T {
            // SAFETY: the caller guarantees `group + 16` scales and sums in `acts[t]`: both
            // 16-lane loads stay inside them (`loadu` needs no alignment).
            let (x_scales, sums) = unsafe {
                (
                    _mm512_loadu_ps(acts[t].scales.as_ptr().add(group)),
                    _mm512_loadu_ps(acts[t].sums.as_ptr().add(group)),
                )
            };
            combined[t] = _mm512_mul_ps(weight_scales, x_scales);
            offsets[t] = _mm512_fmadd_ps(weight_offsets, sums, offsets[t]);
        }
        combined
    }

    /// `acc + dot × scales` with each lane's block scale picked out of `combined` by `index`.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_scaled(acc: __m512, dot: __m512i, combined: __m512, index: __m512i) -> __m512 {
        // SAFETY: `spread` needs only AVX-512F, which the caller guarantees.
        _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(dot),
            unsafe { spread(combined, index) },
            acc,
        )
    }

    /// Each token's dot product: its lanes summed, less `offset` times its offset sums.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn totals<const T: usize>(
        acc: [__m512; T],
        offsets: [__m512; T],
        offset: f32,
    ) -> [f32; T] {
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = _mm512_reduce_add_ps(acc[t]) - offset * _mm512_reduce_add_ps(offsets[t]);
        }
        out
    }

    /// q8_0 × q8 activations: a 64-byte load is two blocks, lanes 0..8 the first.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX-512 VNNI and F16C. `quants` holds the row's
    /// `32 * scales.len()` bytes of quants and then at least 32 more readable bytes (a 64-byte
    /// load covers two blocks, so a row with an odd number of blocks reads one block past its
    /// end). Each of `acts` holds at least `scales.len()` blocks rounded up to a multiple of
    /// [`SCALE_GROUP`]: 32 quants and one scale and one sum per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn q8_0_vnni<const T: usize>(
        quants: &[u8],
        scales: &[f16],
        acts: [&Activations; T],
    ) -> [f32; T] {
        let blocks = scales.len();
        let flip = _mm512_set1_epi8(-128);
        let halves = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); T];
        let mut offsets = [_mm512_setzero_ps(); T];
        let mut group = 0;
        while group < blocks {
            let count = (blocks - group).min(SCALE_GROUP);
            // SAFETY: `group < blocks`, and `count <= blocks - group` scales follow it in
            // `scales`; `group` is a multiple of 16 below `blocks`, so every activation row
            // (padded to whole groups of 16) holds `group + 16` scales and sums. AVX-512 as the
            // caller guarantees.
            let combined = unsafe {
                let weight_scales = load_scales(scales.as_ptr().add(group), count);
                group_scales(weight_scales, weight_scales, &acts, group, &mut offsets)
            };
            let mut pair = 0;
            while pair * 2 < count {
                let at = (group + pair * 2) * BLOCK;
                // SAFETY: blocks `group + 2 * pair` (below `blocks`) and the next, whose 32
                // bytes are either the row's or the at least 32 readable bytes the caller
                // guarantees after it; `loadu` needs no alignment.
                let w = unsafe { _mm512_loadu_si512(quants.as_ptr().add(at) as *const __m512i) };
                let w = _mm512_xor_si512(w, flip);
                let index = _mm512_add_epi32(halves, _mm512_set1_epi32(pair as i32 * 2));
                for t in 0..T {
                    // SAFETY: blocks `group + 2 * pair` and the next are below `group + 16`,
                    // inside the activation row's padded blocks of 32 quants.
                    let x = unsafe {
                        _mm512_loadu_si512(acts[t].quants.as_ptr().add(at) as *const __m512i)
                    };
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
                    // SAFETY: `add_scaled` needs AVX-512F, which the caller guarantees.
                    acc[t] = unsafe { add_scaled(acc[t], dot, combined[t], index) };
                }
                pair += 1;
            }
            group += SCALE_GROUP;
        }
        // SAFETY: `totals` needs AVX-512F, which the caller guarantees.
        unsafe { totals(acc, offsets, 128.0) }
    }

    /// 4-bit blocks × q8 activations in nibble-halves order: a 64-byte load is four blocks; its
    /// low nibbles meet the first 64 activation bytes of the group, its high nibbles the next
    /// 64. `minimums` are q4_K's; without them the nibbles are q4_0's `w + 8`.
    ///
    /// # Safety
    /// The CPU has AVX-512F/BW/VL, AVX-512 VNNI and F16C. `quants` holds the row's
    /// `16 * scales.len()` bytes of quants and then at least 48 more readable bytes (a 64-byte
    /// load covers four blocks, so a row whose block count is not a multiple of four reads up
    /// to three blocks past its end). `minimums`, when given, holds at least `scales.len()`
    /// values. Each of `acts` holds at least `scales.len()` blocks rounded up to a multiple of
    /// [`SCALE_GROUP`]: 32 quants and one scale and one sum per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c")]
    pub(super) unsafe fn q4_vnni<const T: usize>(
        quants: &[u8],
        scales: &[f16],
        minimums: Option<&[f16]>,
        acts: [&Activations; T],
    ) -> [f32; T] {
        let blocks = scales.len();
        let low = _mm512_set1_epi8(0x0F);
        let quarters = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let mut acc = [_mm512_setzero_ps(); T];
        let mut offsets = [_mm512_setzero_ps(); T];
        let mut group = 0;
        while group < blocks {
            let count = (blocks - group).min(SCALE_GROUP);
            // SAFETY: `group < blocks`, and `count <= blocks - group` values follow it in
            // `scales` and in `minimums` (which the caller guarantees holds `blocks`); AVX-512
            // as the caller guarantees.
            let (weight_scales, weight_offsets) = unsafe {
                let weight_scales = load_scales(scales.as_ptr().add(group), count);
                let weight_offsets = match minimums {
                    Some(m) => load_scales(m.as_ptr().add(group), count),
                    None => _mm512_mul_ps(weight_scales, _mm512_set1_ps(8.0)),
                };
                (weight_scales, weight_offsets)
            };
            // SAFETY: `group` is a multiple of 16 below `blocks`, so every activation row
            // (padded to whole groups of 16) holds `group + 16` scales and sums; AVX-512F as
            // the caller guarantees.
            let combined =
                unsafe { group_scales(weight_scales, weight_offsets, &acts, group, &mut offsets) };
            let mut quad = 0;
            while quad * 4 < count {
                let first_block = group + quad * 4;
                // SAFETY: blocks `first_block` (below `blocks`) to `first_block + 3`, 16 bytes
                // each: the row's, or within the 48 readable bytes the caller guarantees after
                // it; `loadu` needs no alignment.
                let v = unsafe {
                    _mm512_loadu_si512(quants.as_ptr().add(first_block * 16) as *const __m512i)
                };
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                let index = _mm512_add_epi32(quarters, _mm512_set1_epi32(quad as i32 * 4));
                for t in 0..T {
                    // SAFETY: the 128 bytes of blocks `first_block .. first_block + 4`, below
                    // `group + 16`, inside the activation row's padded blocks of 32 quants.
                    let (x_lo, x_hi) = unsafe {
                        let x = acts[t].quants.as_ptr().add(first_block * BLOCK);
                        (
                            _mm512_loadu_si512(x as *const __m512i),
                            _mm512_loadu_si512(x.add(64) as *const __m512i),
                        )
                    };
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x_lo);
                    let dot = _mm512_dpbusd_epi32(dot, hi, x_hi);
                    // SAFETY: `add_scaled` needs AVX-512F, which the caller guarantees.
                    acc[t] = unsafe { add_scaled(acc[t], dot, combined[t], index) };
                }
                quad += 1;
            }
            group += SCALE_GROUP;
        }
        // SAFETY: `totals` needs AVX-512F, which the caller guarantees.
        unsafe { totals(acc, offsets, 1.0) }
    }

    /// q8_0 × q8 activations, one block per 256-bit register: |w| times x with w's sign.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C. `quants` holds at least `32 * scales.len()` bytes, and
    /// each of `acts` at least `scales.len()` blocks of 32 quants (its scales are indexed with
    /// bounds checks).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0_avx2<const T: usize>(
        quants: &[u8],
        scales: &[f16],
        acts: [&Activations; T],
    ) -> [f32; T] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, scale) in scales.iter().enumerate() {
            // SAFETY: `b < scales.len()`, so block `b`'s 32 bytes are inside `quants`; `loadu`
            // needs no alignment.
            let w = unsafe { _mm256_loadu_si256(quants.as_ptr().add(b * BLOCK) as *const __m256i) };
            let magnitude = _mm256_sign_epi8(w, w);
            let scale = scale.to_f32();
            for t in 0..T {
                // SAFETY: block `b`'s 32 quants are inside the activation row, which holds at
                // least `scales.len()` blocks.
                let x = unsafe {
                    _mm256_loadu_si256(acts[t].quants.as_ptr().add(b * BLOCK) as *const __m256i)
                };
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, w));
                let dot = _mm256_madd_epi16(pairs, ones);
                let s = _mm256_set1_ps(scale * acts[t].scales[b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[t]);
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            // SAFETY: `sum8` needs AVX2 and FMA, which the caller guarantees.
            out[t] = unsafe { sum8(acc[t]) };
        }
        out
    }

    /// 4-bit blocks × q8 activations, one block per 256-bit register: nibbles times x, the
    /// offset (q4_0's 8, q4_K's minimum) taken off per block.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C. `quants` holds at least `16 * scales.len()` bytes, and
    /// each of `acts` at least `scales.len()` blocks of 32 quants (its scales and sums, and
    /// `minimums`, are indexed with bounds checks).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_avx2<const T: usize>(
        quants: &[u8],
        scales: &[f16],
        minimums: Option<&[f16]>,
        acts: [&Activations; T],
    ) -> [f32; T] {
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut offsets = [0f32; T];
        for (b, scale) in scales.iter().enumerate() {
            // SAFETY: `b < scales.len()`, so block `b`'s 16 bytes are inside `quants`; `loadu`
            // needs no alignment.
            let v = unsafe { _mm_loadu_si128(quants.as_ptr().add(b * 16) as *const __m128i) };
            let lo = _mm_and_si128(v, low);
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
            let w = _mm256_set_m128i(hi, lo);
            let scale = scale.to_f32();
            let offset = match minimums {
                Some(m) => m[b].to_f32(),
                None => 8.0 * scale,
            };
            for t in 0..T {
                // SAFETY: block `b`'s 32 quants are inside the activation row, which holds at
                // least `scales.len()` blocks.
                let x = unsafe {
                    _mm256_loadu_si256(acts[t].quants.as_ptr().add(b * BLOCK) as *const __m256i)
                };
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
                let s = _mm256_set1_ps(scale * acts[t].scales[b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[t]);
                offsets[t] += offset * acts[t].sums[b];
            }
        }
        let mut out = [0f32; T];
        for t in 0..T {
            // SAFETY: `sum8` needs AVX2 and FMA, which the caller guarantees.
            out[t] = unsafe { sum8(acc[t]) } - offsets[t];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Tensor;

    use super::*;

    const ALL: [BlockFormat; 3] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4K];

    fn matrix(rows: usize, cols: usize, seed: f64) -> candle_core::Result<Tensor> {
        Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?
            .reshape((rows, cols))?
            .affine(0.0007 * seed, seed)?
            .sin()
    }

    /// Every path against the dequantized matrix times the exact activations, for shapes with
    /// odd block counts, partial scale groups and token counts that are not multiples of four.
    #[test]
    fn kernels_match_the_dequantized_product() -> candle_core::Result<()> {
        let shapes = |format| match format {
            BlockFormat::Q4K => [(3, 256), (17, 768), (40, 1280), (9, 2304)],
            _ => [(3, 32), (17, 96), (40, 544), (9, 1056)],
        };
        for format in ALL {
            for (rows, cols) in shapes(format) {
                let w = matrix(rows, cols, 1.3)?;
                let q = QTensor::quantize(&w, format.ggml())?;
                let exact_w = q.dequantize(&Device::Cpu)?;
                let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
                for tokens in [1, 2, 5, 8] {
                    let x = matrix(tokens, cols, 0.7)?;
                    let expected = x.matmul(&exact_w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                    let x = x.flatten_all()?.to_vec1::<f32>()?;
                    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
                    for path in KernelPath::available() {
                        let mut out = vec![0f32; tokens * rows];
                        blocks.matmul_on(path, &x, &mut out);
                        for (got, want) in out.iter().zip(&expected) {
                            // The activations are quantized to 8 bits: ~1% of the largest output.
                            assert!(
                                (got - want).abs() <= 0.02 * scale,
                                "{format:?} {rows}x{cols}, {tokens} tokens, {path:?}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The fast paths compute the portable path's integer sums: they agree to f32 rounding.
    #[test]
    fn paths_agree_with_the_portable_one() -> candle_core::Result<()> {
        for format in ALL {
            let (rows, cols) = (
                33,
                if format == BlockFormat::Q4K {
                    1280
                } else {
                    1376
                },
            );
            let q = QTensor::quantize(&matrix(rows, cols, 2.1)?, format.ggml())?;
            let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
            let x = matrix(3, cols, 0.3)?.flatten_all()?.to_vec1::<f32>()?;
            let mut reference = vec![0f32; 3 * rows];
            blocks.matmul_on(KernelPath::Portable, &x, &mut reference);
            for path in KernelPath::available() {
                let mut out = vec![0f32; 3 * rows];
                blocks.matmul_on(path, &x, &mut out);
                for (got, want) in out.iter().zip(&reference) {
                    assert!(
                        (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                        "{format:?} {path:?}: {got} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn blocks_round_trip_to_the_same_ggml_bytes() -> candle_core::Result<()> {
        for format in ALL {
            let q = QTensor::quantize(&matrix(5, 512, 0.9)?, format.ggml())?;
            let blocks = BlockMatrix::from_qtensor(&q)?.expect("format is supported");
            assert_eq!(blocks.to_qtensor()?.data()?, q.data()?);
            assert_eq!(blocks.storage_bytes(), q.storage_size_in_bytes());
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
