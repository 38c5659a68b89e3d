//! JSON files (configs, indexes) read with their path in every error.

use std::path::Path;

use crate::error::{Error, Result};

/// Reads a JSON file into `T`, naming the file in every error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
