//! `generation_config.json`: the sampling defaults and stop ids a checkpoint ships.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::formats::json::read_json;

/// A JSON field that holds either one token id or a list of them (`eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Sampling defaults from `generation_config.json` (ChatGLM's `model.chat` defaults when absent).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct GenerationDefaults {
    /// Prompt plus generated tokens.
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    /// Nucleus sampling threshold.
    #[serde(default = "default_sampling")]
    pub top_p: f64,
    /// Softmax temperature.
    #[serde(default = "default_sampling")]
    pub temperature: f64,
    /// End-of-sequence ids, when the file lists them.
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_length() -> usize {
    8192
}
fn default_sampling() -> f64 {
    0.8
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        GenerationDefaults {
            max_length: default_max_length(),
            top_p: default_sampling(),
            temperature: default_sampling(),
            eos_token_id: None,
        }
    }
}

impl GenerationDefaults {
    /// Reads `generation_config.json` if the directory has one; ChatGLM's defaults otherwise.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.exists() {
            return Ok(Self::default());
        }
        Self::checked(read_json(&path)?, &path)
    }

    /// Checks values read from `path`.
    pub(crate) fn checked(defaults: GenerationDefaults, path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        if defaults.max_length == 0
            || !(defaults.top_p > 0.0 && defaults.top_p <= 1.0)
            || !(defaults.temperature > 0.0 && defaults.temperature.is_finite())
        {
            return Err(Error::InvalidConfig {
                path,
                field: "max_length/top_p/temperature",
                value: format!(
                    "{}/{}/{}",
                    defaults.max_length, defaults.top_p, defaults.temperature
                ),
                reason: "must be positive, with top_p at most 1",
            });
        }
        Ok(defaults)
    }
}
