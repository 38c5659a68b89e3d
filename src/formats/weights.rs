//! Finding and reading checkpoint tensors in a Hugging Face model directory.
//!
//! THUDM publishes weights as sharded safetensors with `model.safetensors.index.json`
//! (ChatGLM3), as sharded PyTorch pickles with `pytorch_model.bin.index.json` (ChatGLM2), or as
//! single files. Tensors are read one at a time and converted to the compute dtype right away, so
//! a checkpoint is never held twice.
//!
//! Safetensors are read with positioned reads rather than a memory map: candle's CPU tensors own
//! their memory, so a mapped file would only add its pages to the resident set next to the
//! converted copy (1.6x the model at peak). Read this way, the file's pages stay in the page cache,
//! which the kernel can drop, and f16/bf16 are widened to f32 on every core.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{pickle::PthTensors, DType, Device, Tensor};
use half::vec::HalfBitsVecExt;
use rayon::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::formats::contain_panic;
use crate::formats::json::read_json;

/// The weight files of one model directory, opened lazily tensor by tensor.
pub(crate) struct Weights {
    shards: Vec<Shard>,
    /// Which shard holds each tensor.
    routing: HashMap<String, usize>,
    /// Where a missing tensor was looked for (the index file, or the single weight file).
    catalogue: PathBuf,
    dtype: DType,
    /// What linear layers' weight matrices are stored in (may be narrower than `dtype`).
    matrix_dtype: DType,
    device: Device,
}

struct Shard {
    path: PathBuf,
    data: ShardData,
}

enum ShardData {
    Safetensors(SafetensorsFile),
    Pickle(PthTensors),
    Gguf {
        content: gguf_file::Content,
        file: Mutex<File>,
    },
}

/// A linear layer's weight matrix as stored: dense, or already quantized (GGUF files).
///
/// `B` is the caller's own layout for quantized blocks, filled by the reader it passes to
/// [`Weights::get_matrix`] straight from the file, so no intermediate copy is made.
pub(crate) enum Matrix<B> {
    Dense(Tensor),
    /// Dense, in host memory as a plain buffer that the CPU kernels may rearrange in place.
    Rows(HostRows),
    Quantized(QTensor),
    /// Quantized, read from a GGUF file straight into the caller's layout.
    Blocks(B),
}

/// A dense matrix's elements in host memory, row-major, in the dtype its products read.
///
/// Unlike a CPU tensor, the buffer is owned outright, so a layer can repack it for its kernel
/// without a second copy of the matrix.
#[derive(Debug)]
pub(crate) enum HostRows {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    BF16(Vec<half::bf16>),
}

impl HostRows {
    /// A CPU tensor of `shape` over the same buffer (no copy).
    pub(crate) fn into_tensor(self, shape: &[usize]) -> candle_core::Result<Tensor> {
        match self {
            HostRows::F32(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            HostRows::F16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
            HostRows::BF16(v) => Tensor::from_vec(v, shape, &Device::Cpu),
        }
    }

    /// The rows of `self`, then `b`'s, then `c`'s (a split query/key/value projection joined);
    /// all three must have the same element type.
    pub(crate) fn concat(self, b: HostRows, c: HostRows) -> candle_core::Result<Self> {
        fn join<T: Copy>(mut a: Vec<T>, b: Vec<T>, c: Vec<T>) -> Vec<T> {
            a.reserve_exact(b.len() + c.len());
            a.extend_from_slice(&b);
            a.extend_from_slice(&c);
            a
        }
        Ok(match (self, b, c) {
            (HostRows::F32(a), HostRows::F32(b), HostRows::F32(c)) => HostRows::F32(join(a, b, c)),
            (HostRows::F16(a), HostRows::F16(b), HostRows::F16(c)) => HostRows::F16(join(a, b, c)),
            (HostRows::BF16(a), HostRows::BF16(b), HostRows::BF16(c)) => {
                HostRows::BF16(join(a, b, c))
            }
            _ => candle_core::bail!("joined matrices must have one element type"),
        })
    }

    /// A copy of `t` converted to `dtype` (f32 for anything but f16 and bf16).
    pub(crate) fn from_tensor(t: &Tensor, dtype: DType) -> candle_core::Result<Self> {
        let flat = t.to_device(&Device::Cpu)?.flatten_all()?;
        Ok(match dtype {
            DType::F16 => HostRows::F16(flat.to_dtype(DType::F16)?.to_vec1()?),
            DType::BF16 => HostRows::BF16(flat.to_dtype(DType::BF16)?.to_vec1()?),
            _ => HostRows::F32(flat.to_dtype(DType::F32)?.to_vec1()?),
        })
    }
}

/// A safetensors file: its header parsed and checked against the file's length.
struct SafetensorsFile {
    file: File,
    data_start: u64,
    tensors: HashMap<String, StoredTensor>,
}

struct StoredTensor {
    dtype: StoredDType,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

#[derive(Clone, Copy)]
enum StoredDType {
    F16,
    BF16,
    F32,
}

impl StoredDType {
    fn size(self) -> usize {
        match self {
            StoredDType::F16 | StoredDType::BF16 => 2,
            StoredDType::F32 => 4,
        }
    }
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// Headers larger than this are not checkpoints (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100_000_000;

impl SafetensorsFile {
    fn open(path: &Path) -> candle_core::Result<Self> {
        let bad = |msg: String| candle_core::Error::Msg(msg);
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut size = [0u8; 8];
        file.read_exact(&mut size)
            .map_err(|_| bad(format!("truncated: {len} bytes, not even a header length")))?;
        let header_len = u64::from_le_bytes(size);
        if header_len > MAX_HEADER || 8 + header_len > len {
            return Err(bad(format!(
                "truncated or not safetensors: header of {header_len} bytes in a file of {len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)?;
        let entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
        let data_start = 8 + header_len;
        let mut tensors = HashMap::new();
        for (name, value) in entries {
            if name == "__metadata__" {
                continue;
            }
            let entry: HeaderEntry = serde_json::from_value(value)
                .map_err(|e| bad(format!("invalid header entry for {name}: {e}")))?;
            let dtype = match entry.dtype.as_str() {
                "F16" => StoredDType::F16,
                "BF16" => StoredDType::BF16,
                "F32" => StoredDType::F32,
                other => return Err(bad(format!("tensor {name} has unsupported dtype {other}"))),
            };
            let (start, end) = entry.data_offsets;
            let expected = entry
                .shape
                .iter()
                .try_fold(dtype.size() as u64, |bytes, &d| bytes.checked_mul(d as u64))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name}: shape {:?} is too large",
                        entry.shape
                    ))
                })?;
            if end < start || end - start != expected {
                return Err(bad(format!(
                    "tensor {name}: {} bytes stored for shape {:?}",
                    end.saturating_sub(start),
                    entry.shape
                )));
            }
            let needed = data_start.checked_add(end).filter(|&n| n <= len);
            if needed.is_none() {
                return Err(bad(format!(
                    "truncated: tensor {name} needs bytes up to {} but the file has {len}",
                    data_start.saturating_add(end)
                )));
            }
            tensors.insert(
                name,
                StoredTensor {
                    dtype,
                    shape: entry.shape,
                    start,
                    end,
                },
            );
        }
        // The format forbids tensors sharing bytes: overlapping ranges are a damaged (or
        // crafted) header, and would load one tensor's bytes as another's.
        let mut ranges: Vec<(u64, u64, &str)> = tensors
            .iter()
            .map(|(name, t)| (t.start, t.end, name.as_str()))
            .collect();
        ranges.sort_unstable();
        for pair in ranges.windows(2) {
            let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
            if start < end {
                return Err(bad(format!(
                    "tensors {first} and {second} overlap in the data (bytes {start}..{end})"
                )));
            }
        }
        Ok(SafetensorsFile {
            file,
            data_start,
            tensors,
        })
    }

    /// Reads a tensor as stored when that is `want` (no f32 copy of a 16-bit tensor that stays
    /// 16-bit), widened to f32 on every core otherwise.
    fn load(&self, name: &str, want: DType) -> candle_core::Result<Option<Tensor>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        self.load_rows(name, want)?
            .map(|rows| rows.into_tensor(&t.shape))
            .transpose()
    }

    /// [`Self::load`] into a host buffer of `want` (f32 for anything but f16 and bf16).
    fn load_rows(&self, name: &str, want: DType) -> candle_core::Result<Option<HostRows>> {
        let Some(t) = self.tensors.get(name) else {
            return Ok(None);
        };
        let mut file = &self.file;
        file.seek(SeekFrom::Start(self.data_start + t.start))?;
        let len = (t.end - t.start) as usize;
        let stored = match t.dtype {
            StoredDType::F16 => DType::F16,
            StoredDType::BF16 => DType::BF16,
            StoredDType::F32 => DType::F32,
        };
        if stored == want && stored != DType::F32 && cfg!(target_endian = "little") {
            // Read straight into the tensor's buffer: a 16-bit table is never held twice.
            let mut bits: Vec<u16> = crate::huge_pages::filled(len / 2);
            // SAFETY: `bits` holds `bits.len()` initialised u16s, so its buffer is `2 * bits.len()`
            // initialised bytes, which a u8 view may cover (alignment 1); any byte pattern is a
            // valid u16, so what `read_exact` writes keeps `bits` valid; and `bits` is not
            // touched while `view` (an exclusive borrow of it) is in use.
            let view = unsafe {
                std::slice::from_raw_parts_mut(bits.as_mut_ptr().cast::<u8>(), bits.len() * 2)
            };
            file.read_exact(view)?;
            return Ok(Some(match stored {
                DType::F16 => HostRows::F16(bits.reinterpret_into::<half::f16>()),
                _ => HostRows::BF16(bits.reinterpret_into::<half::bf16>()),
            }));
        }
        let mut bytes = vec![0u8; len];
        file.read_exact(&mut bytes)?;
        // Converted straight into the wanted type: another 16-bit type is not widened to f32
        // first, so the largest matrix is held at most as stored plus as wanted.
        Ok(Some(match want {
            DType::F16 => HostRows::F16(convert(&bytes, t.dtype, half::f16::from_f32)),
            DType::BF16 => HostRows::BF16(convert(&bytes, t.dtype, half::bf16::from_f32)),
            _ => HostRows::F32(convert(&bytes, t.dtype, |x| x)),
        }))
    }
}

/// The little-endian `stored` values in `bytes`, each widened to f32 and passed through
/// `narrow`, into a huge-page buffer, on every core.
fn convert<T: Copy + Default + Send + Sync>(
    bytes: &[u8],
    stored: StoredDType,
    narrow: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    let size = stored.size();
    let mut values: Vec<T> = crate::huge_pages::filled(bytes.len() / size);
    values
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(out, raw)| {
            let raw = raw.chunks_exact(size);
            match stored {
                StoredDType::F16 => out.iter_mut().zip(raw).for_each(|(o, b)| {
                    *o = narrow(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                }),
                StoredDType::BF16 => out.iter_mut().zip(raw).for_each(|(o, b)| {
                    *o = narrow(half::bf16::from_le_bytes([b[0], b[1]]).to_f32());
                }),
                StoredDType::F32 => out.iter_mut().zip(raw).for_each(|(o, b)| {
                    *o = narrow(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }),
            }
        });
    values
}

/// A GGUF tensor of `shape` handed to `read_blocks` positioned at its first byte; `None` when
/// it does not take the block type. The tensor's extent is checked against the file's length
/// first, so a truncated file is an error, not a short read.
fn read_gguf_blocks<B>(
    content: &gguf_file::Content,
    file: &mut File,
    name: &str,
    shape: &[usize],
    read_blocks: impl FnOnce(
        GgmlDType,
        usize,
        usize,
        &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
    ) -> candle_core::Result<Option<B>>,
) -> candle_core::Result<Option<B>> {
    let Some(info) = content.tensor_infos.get(name) else {
        return Ok(None);
    };
    let [rows, cols] = shape else {
        return Ok(None);
    };
    let dtype = info.ggml_dtype;
    let bytes = (rows * cols / dtype.block_size() * dtype.type_size()) as u64;
    let start = content.tensor_data_offset.saturating_add(info.offset);
    let file_len = file.metadata()?.len();
    if start.saturating_add(bytes) > file_len {
        candle_core::bail!(
            "truncated: tensor {name} needs bytes up to {} but the file has {file_len}",
            start.saturating_add(bytes)
        );
    }
    file.seek(SeekFrom::Start(start))?;
    read_blocks(dtype, *rows, *cols, &mut |buffer| file.read_exact(buffer))
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

/// The layouts we recognise, in the order they are tried.
const LAYOUTS: [(&str, bool); 4] = [
    ("model.safetensors.index.json", true),
    ("model.safetensors", false),
    ("pytorch_model.bin.index.json", true),
    ("pytorch_model.bin", false),
];

impl Weights {
    /// Opens the weights of `dir`, to be read as `dtype` on `device`, with weight matrices of
    /// linear layers kept as `matrix_dtype`.
    pub(crate) fn open(
        dir: &Path,
        dtype: DType,
        matrix_dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let Some((name, is_index)) = LAYOUTS
            .iter()
            .copied()
            .find(|(name, _)| dir.join(name).is_file())
        else {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                what: "weights",
                looked_for: LAYOUTS.map(|(n, _)| n).join(", "),
            });
        };
        let catalogue = dir.join(name);
        let mut shards = Vec::new();
        let mut routing = HashMap::new();
        if is_index {
            let index: ShardIndex = read_json(&catalogue)?;
            let mut by_file: HashMap<&str, usize> = HashMap::new();
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            for file in files {
                // Shards live in the model directory: an index naming `../x` or `/etc/x`
                // is damaged or hostile.
                let inside = !file.is_empty()
                    && Path::new(file)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(Error::InvalidConfig {
                        path: catalogue.clone(),
                        field: "weight_map",
                        value: file.clone(),
                        reason: "a shard must be a file inside the model directory",
                    });
                }
                let path = dir.join(file);
                if !path.is_file() {
                    return Err(Error::MissingFile {
                        dir: dir.to_path_buf(),
                        what: "weight shard named in the index",
                        looked_for: file.clone(),
                    });
                }
                by_file.insert(file, shards.len());
                shards.push(Shard::open(path)?);
            }
            for (tensor, file) in &index.weight_map {
                routing.insert(tensor.clone(), by_file[file.as_str()]);
            }
        } else {
            let shard = Shard::open(catalogue.clone())?;
            for name in shard.names() {
                routing.insert(name, 0);
            }
            shards.push(shard);
        }
        Ok(Weights {
            shards,
            routing,
            catalogue,
            dtype,
            matrix_dtype,
            device: device.clone(),
        })
    }

    /// Whether a tensor of that name is stored (to tell apart layouts that name it differently).
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// The ggml block type `name` is stored in, when it is a quantized GGUF tensor.
    pub(crate) fn block_type(&self, name: &str) -> Option<GgmlDType> {
        let shard = &self.shards[*self.routing.get(name)?];
        match &shard.data {
            ShardData::Gguf { content, .. } => {
                let dtype = content.tensor_infos.get(name)?.ggml_dtype;
                (!matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
                    .then_some(dtype)
            }
            _ => None,
        }
    }

    /// Total bytes of the weight files, for progress reports.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Opens a GGUF file written by [`crate::Engine::save_gguf`], whose header was read into
    /// `content`.
    pub(crate) fn open_gguf(
        path: &Path,
        content: gguf_file::Content,
        file: File,
        dtype: DType,
        matrix_dtype: DType,
        device: &Device,
    ) -> Self {
        let routing = content
            .tensor_infos
            .keys()
            .map(|name| (name.clone(), 0))
            .collect();
        Weights {
            shards: vec![Shard {
                path: path.to_path_buf(),
                data: ShardData::Gguf {
                    content,
                    file: Mutex::new(file),
                },
            }],
            routing,
            catalogue: path.to_path_buf(),
            dtype,
            matrix_dtype,
            device: device.clone(),
        }
    }

    /// Reads a linear layer's weight matrix: quantized blocks stay quantized, dense matrices
    /// come in the matrix dtype, as a host buffer ([`Matrix::Rows`]) when `host_rows` is set
    /// and the weights are for the CPU, as a tensor otherwise.
    ///
    /// `read_blocks(dtype, rows, cols, read_exact)` lays out a quantized GGUF tensor's ggml
    /// blocks as it reads them (band by band through `read_exact`), or returns `None` for block
    /// types it does not take, which then come as a candle [`QTensor`].
    pub(crate) fn get_matrix<B>(
        &self,
        name: &str,
        shape: &[usize],
        host_rows: bool,
        read_blocks: impl FnOnce(
            GgmlDType,
            usize,
            usize,
            &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
        ) -> candle_core::Result<Option<B>>,
    ) -> Result<Matrix<B>> {
        if let Some(&index) = self.routing.get(name) {
            let shard = &self.shards[index];
            if let ShardData::Gguf { content, file } = &shard.data {
                let quantized = content.tensor_infos.get(name).is_some_and(|info| {
                    !matches!(
                        info.ggml_dtype,
                        GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
                    )
                });
                if quantized {
                    self.check_shape(shard, name, shape)?;
                    let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                    if self.device.is_cpu() {
                        if let Some(blocks) =
                            read_gguf_blocks(content, &mut file, name, shape, read_blocks).map_err(
                                |source| Error::Weights {
                                    path: shard.path.clone(),
                                    source,
                                },
                            )?
                        {
                            return Ok(Matrix::Blocks(blocks));
                        }
                    }
                    let qtensor =
                        content
                            .tensor(&mut *file, name, &self.device)
                            .map_err(|source| Error::Weights {
                                path: shard.path.clone(),
                                source,
                            })?;
                    return Ok(Matrix::Quantized(qtensor));
                }
            }
        }
        if host_rows && self.device.is_cpu() {
            return self
                .get_rows(name, shape, self.matrix_dtype)
                .map(Matrix::Rows);
        }
        self.get_as(name, shape, self.matrix_dtype)
            .map(Matrix::Dense)
    }

    /// Reads one dense tensor into a host buffer of `dtype`: straight from a safetensors file,
    /// through a converted copy of the tensor from other formats.
    fn get_rows(&self, name: &str, shape: &[usize], dtype: DType) -> Result<HostRows> {
        if let Some(&index) = self.routing.get(name) {
            let shard = &self.shards[index];
            if let ShardData::Safetensors(st) = &shard.data {
                self.check_shape(shard, name, shape)?;
                // Converted while read: already in `dtype` (f32 for anything but f16/bf16).
                return st
                    .load_rows(name, dtype)
                    .map_err(|source| Error::Weights {
                        path: shard.path.clone(),
                        source,
                    })?
                    .ok_or_else(|| Error::MissingTensor {
                        name: name.to_string(),
                        path: shard.path.clone(),
                    });
            }
        }
        let tensor = self.get_as(name, shape, dtype)?;
        HostRows::from_tensor(&tensor, dtype).map_err(|source| Error::Weights {
            path: self.catalogue.clone(),
            source,
        })
    }

    fn check_shape(&self, shard: &Shard, name: &str, shape: &[usize]) -> Result<()> {
        let found = shard.shape(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            path: shard.path.clone(),
        })?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(())
    }

    /// Reads one tensor, checks its shape against `shape` and converts it to the compute dtype.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// What linear layers' weight matrices are stored in.
    pub(crate) fn matrix_dtype(&self) -> DType {
        self.matrix_dtype
    }

    /// Reads one tensor, checks its shape against `shape` and converts it to `dtype`.
    pub(crate) fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
                path: self.catalogue.clone(),
            });
        };
        let shard = &self.shards[index];
        let weights_error = |source| Error::Weights {
            path: shard.path.clone(),
            source,
        };
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            path: shard.path.clone(),
        };
        self.check_shape(shard, name, shape)?;
        let tensor = match &shard.data {
            ShardData::Safetensors(st) => st.load(name, dtype).map_err(weights_error)?,
            ShardData::Pickle(pth) => {
                contain_panic(|| pth.get(name), pickle_failure("reading a tensor of"))
                    .map_err(weights_error)?
            }
            ShardData::Gguf { content, file } => {
                let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
                Some(
                    content
                        .tensor(&mut *file, name, &Device::Cpu)
                        .and_then(|q| q.dequantize(&Device::Cpu))
                        .map_err(weights_error)?,
                )
            }
        }
        .ok_or_else(missing)?;
        tensor
            .to_dtype(dtype)
            .and_then(|t| t.to_device(&self.device))
            .map_err(weights_error)
    }
}

/// What a contained panic of candle's pickle reader becomes (see [`super::contain_panic`]).
fn pickle_failure(what: &'static str) -> impl FnOnce() -> String {
    move || format!("malformed PyTorch checkpoint: the pickle reader failed {what} it")
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let data = if is_safetensors {
            SafetensorsFile::open(&path).map(ShardData::Safetensors)
        } else {
            contain_panic(
                || PthTensors::new(&path, None),
                pickle_failure("reading the tensor index of"),
            )
            .map(ShardData::Pickle)
        };
        let data = data.map_err(|source| Error::Weights {
            path: path.clone(),
            source,
        })?;
        Ok(Shard { path, data })
    }

    fn names(&self) -> Vec<String> {
        match &self.data {
            ShardData::Safetensors(st) => st.tensors.keys().cloned().collect(),
            ShardData::Pickle(pth) => pth.tensor_infos().keys().cloned().collect(),
            ShardData::Gguf { content, .. } => content.tensor_infos.keys().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.data {
            ShardData::Safetensors(st) => st.tensors.get(name).map(|t| t.shape.clone()),
            ShardData::Pickle(pth) => pth
                .tensor_infos()
                .get(name)
                .map(|info| info.layout.shape().dims().to_vec()),
            ShardData::Gguf { content, .. } => content
                .tensor_infos
                .get(name)
                .map(|info| info.shape.dims().to_vec()),
        }
    }
}

/// For `cargo fuzz`: a safetensors file's checks, then each tensor read back as f32.
#[cfg(fuzzing)]
pub(crate) fn fuzz_safetensors(path: &Path) {
    if let Ok(file) = SafetensorsFile::open(path) {
        let names: Vec<String> = file.tensors.keys().cloned().collect();
        for name in names {
            let _ = file.load_rows(&name, DType::F32);
        }
    }
}

/// For `cargo fuzz`: a pickle checkpoint's tensor directory.
#[cfg(fuzzing)]
pub(crate) fn fuzz_pickle(path: &Path) {
    if let Ok(shard) = Shard::open(path.to_path_buf()) {
        for name in shard.names() {
            if let ShardData::Pickle(pth) = &shard.data {
                let _ = contain_panic(|| pth.get(&name), pickle_failure("reading a tensor of"));
            }
        }
    }
}
