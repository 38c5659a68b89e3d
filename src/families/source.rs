//! Where a model comes from: a directory as published, or one GGUF file.
//!
//! A family reads the same named files (`config.json`, `tokenizer.model`, ...) whichever it is:
//! from the directory, from the `chathub.file.*` metadata of a file `chathub convert` wrote, or
//! from what a family rebuilt out of a llama.cpp GGUF's keys. So detection, configs and
//! tokenizers have one code path, and a converted file loads exactly like its directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::{DType, Device};

use super::ModelFamily;
use crate::error::{Error, Result};
use crate::formats::gguf::{self, GgufFile};
use crate::formats::weights::Weights;
use crate::nn::quantization::Quantization;

/// The metadata key prefix under which chathub's GGUF files carry a directory's small files.
pub(crate) const FILE_KEY_PREFIX: &str = "chathub.file.";
/// The family a chathub GGUF file was written for.
pub(crate) const FAMILY_KEY: &str = "chathub.family";
/// The tensor-name layout of a chathub GGUF file.
pub(crate) const LAYOUT_KEY: &str = "chathub.layout";
/// The weight format a chathub GGUF file was quantized to (`none` when dense).
pub(crate) const QUANTIZATION_KEY: &str = "chathub.quantization";

/// A model's files, before the family reads them.
pub(crate) struct ModelSource {
    path: PathBuf,
    kind: Kind,
    /// The family the file says it holds, if it says.
    pub family: Option<ModelFamily>,
    /// The tensor-name layout the file says it uses, if it says.
    pub layout: Option<String>,
    /// The weight format a chathub GGUF file says it was quantized to.
    pub quantization: Option<Quantization>,
}

enum Kind {
    Dir,
    Gguf {
        gguf: GgufFile,
        files: HashMap<String, Vec<u8>>,
    },
}

impl ModelSource {
    /// Opens a model directory or a GGUF file (chathub's own or llama.cpp's).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when `path` does not exist or is neither, [`Error::Weights`] or
    /// [`Error::InvalidConfig`] for a GGUF file that cannot be read.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        if gguf::is_gguf(path) {
            return Self::open_gguf(path);
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            return Err(Error::io(
                path,
                std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "not a model directory (nor a .gguf file)",
                ),
            ));
        }
        Ok(ModelSource {
            path: path.to_path_buf(),
            kind: Kind::Dir,
            family: None,
            layout: None,
            quantization: None,
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let meta = gguf.metadata();
        let mut quantization = None;
        let (files, family, layout) = if meta.find(FAMILY_KEY).is_some() {
            quantization = match meta.text(QUANTIZATION_KEY).unwrap_or("none") {
                "none" => None,
                q => Some(q.parse()?),
            };
            let family: ModelFamily = meta.text(FAMILY_KEY)?.parse()?;
            let mut files = HashMap::new();
            for key in gguf.content.metadata.keys() {
                if let Some(name) = key.strip_prefix(FILE_KEY_PREFIX) {
                    if let Some(bytes) = meta.bytes(key) {
                        files.insert(name.to_string(), bytes);
                    }
                }
            }
            legacy_files(&meta, &mut files);
            let layout = meta
                .find(LAYOUT_KEY)
                .and_then(|v| v.to_string().ok().cloned());
            (files, Some(family), layout)
        } else {
            let imported = super::import_llama_cpp(&meta)?;
            (imported.files, Some(imported.family), Some(imported.layout))
        };
        Ok(ModelSource {
            path: path.to_path_buf(),
            kind: Kind::Gguf { gguf, files },
            family,
            layout,
            quantization,
        })
    }

    /// The directory or file the model was opened from.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where `name` is read from, for messages: the file in the directory, or the GGUF file.
    pub(crate) fn file_path(&self, name: &str) -> PathBuf {
        match &self.kind {
            Kind::Dir => self.path.join(name),
            Kind::Gguf { .. } => self.path.clone(),
        }
    }

    /// The bytes of `name`, or `None` when the model has no such file.
    pub(crate) fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match &self.kind {
            Kind::Dir => {
                let path = self.path.join(name);
                match std::fs::read(&path) {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Error::io(path, e)),
                }
            }
            Kind::Gguf { files, .. } => Ok(files.get(name).cloned()),
        }
    }

    /// The bytes of `name`; a [`Error::MissingFile`] saying it is `what` when absent.
    pub(crate) fn require(&self, name: &str, what: &'static str) -> Result<Vec<u8>> {
        self.read(name)?.ok_or_else(|| Error::MissingFile {
            dir: self.path.clone(),
            what,
            looked_for: name.to_string(),
        })
    }

    /// `name` parsed as JSON, or `None` when absent.
    pub(crate) fn json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        let Some(bytes) = self.read(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| Error::Json {
                path: self.file_path(name),
                source,
            })
    }

    /// The weights, to be read as `dtype` on `device` with weight matrices kept as
    /// `matrix_dtype`.
    pub(crate) fn into_weights(
        self,
        dtype: DType,
        matrix_dtype: DType,
        device: &Device,
    ) -> Result<Weights> {
        match self.kind {
            Kind::Dir => Weights::open(&self.path, dtype, matrix_dtype, device),
            Kind::Gguf { gguf, .. } => Ok(Weights::open_gguf(
                &gguf.path,
                gguf.content,
                gguf.file,
                dtype,
                matrix_dtype,
                device,
            )),
        }
    }
}

/// Files of the first chathub GGUF version, which stored them under fixed keys.
fn legacy_files(meta: &gguf::Metadata<'_>, files: &mut HashMap<String, Vec<u8>>) {
    for (key, name) in [
        ("chathub.config", "config.json"),
        ("chathub.generation_config", "generation_config.json"),
        ("chathub.tokenizer_model", "tokenizer.model"),
    ] {
        if !files.contains_key(name) {
            if let Some(bytes) = meta.bytes(key) {
                files.insert(name.to_string(), bytes);
            }
        }
    }
}

/// What a family rebuilt from a llama.cpp GGUF file's metadata.
pub(crate) struct Imported {
    pub family: ModelFamily,
    /// The tensor-name layout of the file (a llama.cpp layout).
    pub layout: String,
    /// The files the family reads, rebuilt (`config.json`, tokenizer files, ...).
    pub files: HashMap<String, Vec<u8>>,
}

/// Metadata entries holding `files` under [`FILE_KEY_PREFIX`], for writing a GGUF file.
pub(crate) fn file_entries(files: &[(String, Vec<u8>)]) -> Vec<(String, Value)> {
    files
        .iter()
        .map(|(name, bytes)| (format!("{FILE_KEY_PREFIX}{name}"), gguf::bytes_value(bytes)))
        .collect()
}
