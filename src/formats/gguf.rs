//! GGUF files: reading the header and metadata, and writing a file of named tensors.
//!
//! What the keys mean is not this module's business: chathub's own files and llama.cpp's are
//! interpreted by the layers above. Metadata lookups name the file and key in their errors.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;

use crate::error::{Error, Result};
use crate::formats::contain_panic;

/// Whether `path` names a GGUF file rather than a model directory.
pub(crate) fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An open GGUF file with its header read.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub file: File,
}

impl GgufFile {
    /// Opens `path` and reads its header (metadata and tensor directory).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = contain_panic(
            || Content::read(&mut file),
            || "malformed GGUF header: general.alignment is zero or the header is damaged".into(),
        )
        .map_err(|source| Error::Weights {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        check_layout(&content, len).map_err(|reason| Error::Weights {
            path: path.to_path_buf(),
            source: candle_core::Error::Msg(reason),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file,
        })
    }

    /// Metadata lookups that name this file in their errors.
    pub(crate) fn metadata(&self) -> Metadata<'_> {
        Metadata {
            path: &self.path,
            content: &self.content,
        }
    }
}

/// Checks the tensor directory against the file: every tensor a whole number of blocks, at an
/// aligned offset, inside the file, and no two sharing bytes. A tensor relabelled with another
/// type (a q8_0 tensor read as f32) then fails here rather than loading as noise.
fn check_layout(content: &Content, file_len: u64) -> std::result::Result<(), String> {
    // GGUF says u32, and llama.cpp refuses any other type; candle would quietly fall back to
    // 32 for some of them, placing every tensor somewhere its writer did not put it.
    let alignment = match content.metadata.get("general.alignment") {
        None => 32,
        Some(Value::U32(a)) => u64::from(*a),
        Some(other) => return Err(format!("general.alignment is {other:?}, not a u32")),
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(format!(
            "general.alignment {alignment} is not a power of two"
        ));
    }
    let mut extents = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let elements = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| format!("tensor {name}: shape {:?} is too large", info.shape))?;
        let block = dtype.block_size() as u64;
        if elements % block != 0 {
            return Err(format!(
                "tensor {name}: {elements} elements are not whole {dtype:?} blocks of {block}"
            ));
        }
        let bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| format!("tensor {name} is too large"))?;
        if info.offset % alignment != 0 {
            return Err(format!(
                "tensor {name}: offset {} is not a multiple of the alignment {alignment}",
                info.offset
            ));
        }
        let end = content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|start| start.checked_add(bytes))
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                format!(
                    "truncated: tensor {name} ({dtype:?}, {bytes} bytes at offset {}) runs past the end of the file ({file_len} bytes)",
                    info.offset
                )
            })?;
        extents.push((info.offset, end - content.tensor_data_offset, name.as_str()));
    }
    extents.sort_unstable();
    for pair in extents.windows(2) {
        let ((_, end, first), (start, _, second)) = (pair[0], pair[1]);
        if start < end {
            return Err(format!(
                "tensors {first} and {second} overlap (one ends at data offset {end}, the other starts at {start}): a tensor's type or shape does not match its bytes"
            ));
        }
    }
    Ok(())
}

/// Typed metadata lookups that name the file and key when something is missing or mistyped.
pub(crate) struct Metadata<'a> {
    pub path: &'a Path,
    pub content: &'a Content,
}

impl Metadata<'_> {
    /// An [`Error::InvalidConfig`] about `field` of this file.
    pub(crate) fn invalid(
        &self,
        field: &'static str,
        value: impl Into<String>,
        reason: &'static str,
    ) -> Error {
        Error::InvalidConfig {
            path: self.path.to_path_buf(),
            field,
            value: value.into(),
            reason,
        }
    }

    /// The value under `key`, if any.
    pub(crate) fn find(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(crate) fn get(&self, key: &'static str) -> Result<&Value> {
        self.find(key)
            .ok_or_else(|| self.invalid(key, "missing", "the file lacks this key"))
    }

    pub(crate) fn text(&self, key: &'static str) -> Result<&str> {
        match self.get(key)? {
            Value::String(s) => Ok(s),
            other => Err(self.invalid(key, format!("{other:?}"), "expected a string")),
        }
    }

    pub(crate) fn count(&self, key: &'static str) -> Result<usize> {
        let n = match self.get(key)? {
            Value::U8(n) => Some(*n as u64),
            Value::U16(n) => Some(*n as u64),
            Value::U32(n) => Some(*n as u64),
            Value::U64(n) => Some(*n),
            Value::I32(n) => u64::try_from(*n).ok(),
            Value::I64(n) => u64::try_from(*n).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.invalid(key, "not a count", "expected a non-negative integer"))
    }

    pub(crate) fn float(&self, key: &'static str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            other => Err(self.invalid(key, format!("{other:?}"), "expected a number")),
        }
    }

    pub(crate) fn array(&self, key: &'static str) -> Result<&[Value]> {
        match self.get(key)? {
            Value::Array(values) => Ok(values),
            _ => Err(self.invalid(key, "not an array", "expected an array")),
        }
    }

    pub(crate) fn strings(&self, key: &'static str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(self.invalid(key, "non-string item", "expected strings")),
            })
            .collect()
    }

    /// Bytes stored under `key` as a string or an array of `u8`; `None` when absent.
    pub(crate) fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        match self.find(key)? {
            Value::String(s) => Some(s.clone().into_bytes()),
            Value::Array(items) => items.iter().map(|v| v.to_u8().ok()).collect(),
            _ => None,
        }
    }
}

/// Stores `bytes` as a GGUF value: a string when it is UTF-8 text (readable in `gguf-dump`),
/// an array of `u8` otherwise.
pub(crate) fn bytes_value(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_string()),
        Err(_) => Value::Array(bytes.iter().map(|&b| Value::U8(b)).collect()),
    }
}

/// Writes a GGUF file of `metadata` and `tensors` to `path`, through a staging file beside it
/// renamed into place, so a reader never sees half a file. An existing `path` that is not a
/// regular file (a directory, device, FIFO or symbolic link) is refused, never replaced; on any
/// error the staging file is removed.
pub(crate) fn write(
    path: &Path,
    metadata: &[(&str, Value)],
    tensors: &[(String, std::sync::Arc<QTensor>)],
) -> Result<()> {
    refuse_special(path)?;
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_ref()))
        .collect();
    let failed = |reason: String| Error::Write {
        path: path.to_path_buf(),
        reason,
    };
    let (staging, mut file) = create_staging(path).map_err(|e| failed(e.to_string()))?;
    let written = gguf_file::write(&mut file, &metadata, &tensors)
        .map_err(|e| failed(e.to_string()))
        .and_then(|()| file.sync_all().map_err(|e| failed(e.to_string())))
        .and_then(|()| {
            drop(file);
            std::fs::rename(&staging, path).map_err(|e| failed(e.to_string()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

/// Errors when `path` exists and is not a regular file (looked at without following a link).
fn refuse_special(path: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let kind = meta.file_type();
    let reason = if kind.is_symlink() {
        "it is a symbolic link (give the path it points to)"
    } else if kind.is_dir() {
        "it is a directory"
    } else if kind.is_file() {
        return Ok(());
    } else {
        "it exists and is not a regular file (a device, FIFO or socket)"
    };
    Err(Error::OutputRefused {
        path: path.to_path_buf(),
        reason,
    })
}

/// A new file beside `path` that did not exist before (never a link someone planted).
fn create_staging(path: &Path) -> std::io::Result<(std::path::PathBuf, File)> {
    let name = path
        .file_name()
        .map_or_else(|| "model.gguf".into(), |n| n.to_string_lossy().into_owned());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    for attempt in 0..100u32 {
        let staging_name = format!(".{name}.{}.{attempt}.partial", std::process::id());
        let staging = dir.map_or_else(|| staging_name.clone().into(), |d| d.join(&staging_name));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(file) => return Ok((staging, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "no free staging file name beside the output",
    ))
}
