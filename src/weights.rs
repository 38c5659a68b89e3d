//! Finding and reading checkpoint tensors in a Hugging Face model directory.
//!
//! THUDM publishes weights as sharded safetensors with `model.safetensors.index.json`
//! (ChatGLM3), as sharded PyTorch pickles with `pytorch_model.bin.index.json` (ChatGLM2), or as
//! single files. Tensors are read one at a time and converted to the compute dtype right away, so
//! a checkpoint is never held twice. Safetensors shards are memory-mapped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{pickle::PthTensors, DType, Device, Tensor};
use serde::Deserialize;

use crate::config::read_json;
use crate::error::{Error, Result};

/// The weight files of one model directory, opened lazily tensor by tensor.
pub(crate) struct Weights {
    shards: Vec<Shard>,
    /// Which shard holds each tensor.
    routing: HashMap<String, usize>,
    /// Where a missing tensor was looked for (the index file, or the single weight file).
    catalogue: PathBuf,
    dtype: DType,
    device: Device,
}

struct Shard {
    path: PathBuf,
    data: ShardData,
}

enum ShardData {
    Safetensors(MmapedSafetensors),
    Pickle(PthTensors),
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
    /// Opens the weights of `dir`, to be read as `dtype` on `device`.
    pub(crate) fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
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
            device: device.clone(),
        })
    }

    /// Total bytes of the weight files, for progress reports.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.shards
            .iter()
            .filter_map(|s| std::fs::metadata(&s.path).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Reads one tensor, checks its shape against `shape` and converts it to the compute dtype.
    pub(crate) fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
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
        let found = shard.shape(name).ok_or_else(missing)?;
        if found != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                path: shard.path.clone(),
                expected: shape.to_vec(),
                found,
            });
        }
        let tensor = match &shard.data {
            ShardData::Safetensors(st) => st.load(name, &Device::Cpu).map_err(weights_error)?,
            ShardData::Pickle(pth) => pth.get(name).map_err(weights_error)?.ok_or_else(missing)?,
        };
        tensor
            .to_dtype(self.dtype)
            .and_then(|t| t.to_device(&self.device))
            .map_err(weights_error)
    }
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let data = if is_safetensors {
            // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file
            // not being truncated while the model loads.
            unsafe { MmapedSafetensors::new(&path) }.map(ShardData::Safetensors)
        } else {
            PthTensors::new(&path, None).map(ShardData::Pickle)
        };
        let data = data.map_err(|source| Error::Weights {
            path: path.clone(),
            source,
        })?;
        Ok(Shard { path, data })
    }

    fn names(&self) -> Vec<String> {
        match &self.data {
            ShardData::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            ShardData::Pickle(pth) => pth.tensor_infos().keys().cloned().collect(),
        }
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.data {
            ShardData::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            ShardData::Pickle(pth) => pth
                .tensor_infos()
                .get(name)
                .map(|info| info.layout.shape().dims().to_vec()),
        }
    }
}
