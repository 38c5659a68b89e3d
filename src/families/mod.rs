//! Model families: what tells them apart, how each reads its files, and its chat format.
//!
//! A family is a folder: [`chatglm`] (ChatGLM2 and ChatGLM3, which share a layout and
//! tokenizer) and [`glm4`] (its three published layouts). Each turns its `config.json` into an
//! [`ArchSpec`], names its tensors once per layout ([`TensorNames`]), loads its tokenizer and
//! builds prompts token for token as the official code does. Everything above this module
//! (the engine, the front-ends) sees only [`Opened`] and [`ChatFormat`].

pub(crate) mod chatglm;
pub(crate) mod glm4;
pub(crate) mod python;
pub(crate) mod reply;
pub(crate) mod source;
pub(crate) mod template;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chat::generation::GenerationDefaults;
use crate::chat::message::{Message, Role};
use crate::chat::request::SpecialText;
use crate::chat::tools::Tool;
use crate::error::{Error, Result};
use crate::formats::gguf::Metadata;
use crate::nn::names::TensorNames;
use crate::nn::spec::ArchSpec;
use crate::tokenizer::Tokenizer;
use reply::ReplyStyle;
use source::{Imported, ModelSource};

/// Which chat format, tokenizer and special tokens a checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ModelFamily {
    /// THUDM/chatglm2-6b: `[Round N]\n\n问：…\n\n答：` text prompts over (query, response) tuples.
    #[serde(rename = "chatglm2")]
    ChatGlm2,
    /// THUDM/chatglm3-6b: role tokens (`<|system|>`, `<|user|>`, ...) and a system prompt.
    #[serde(rename = "chatglm3")]
    ChatGlm3,
    /// THUDM/glm-4-9b-chat (and its -hf layout) and GLM-4-9B-0414: role tokens, a tiktoken-style
    /// byte-level BPE tokenizer and the directory's own chat template.
    #[serde(rename = "glm4")]
    Glm4,
}

impl ModelFamily {
    /// The family's name as used on the command line and in JSON (`chatglm2`, `chatglm3`,
    /// `glm4`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::ChatGlm2 => "chatglm2",
            ModelFamily::ChatGlm3 => "chatglm3",
            ModelFamily::Glm4 => "glm4",
        }
    }

    /// Tells the family from a model directory's files, as a download ships them (see
    /// [`Engine::load_with`](crate::Engine::load_with) to override it).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] or [`Error::Json`] when a file that decides it cannot be read.
    pub fn detect(dir: &Path) -> Result<Self> {
        let source = ModelSource::open(dir)?;
        detect(&source)
    }
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ModelFamily {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "chatglm2" => Ok(ModelFamily::ChatGlm2),
            "chatglm3" => Ok(ModelFamily::ChatGlm3),
            "glm4" | "glm-4" => Ok(ModelFamily::Glm4),
            _ => Err(Error::invalid(
                "family",
                s,
                "expected chatglm2, chatglm3 or glm4",
            )),
        }
    }
}

/// A conversation as a prompt builder takes it: the history and the new message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conversation<'a> {
    pub history: &'a [Message],
    pub prompt: &'a str,
    /// Who wrote `prompt`: the user, or a tool (an observation).
    pub prompt_role: Role,
    /// Functions offered to the model.
    pub tools: &'a [Tool],
    pub special_text: SpecialText,
}

/// A family's chat format: prompts at token level, and how replies come back.
pub(crate) trait ChatFormat: Send + Sync + fmt::Debug {
    /// The prompt exactly as the official builder makes it, whole history included.
    fn build(&self, tokenizer: &Tokenizer, conversation: &Conversation<'_>) -> Result<Vec<u32>>;

    /// Which official `process_response` turns this family's raw replies into [`Reply`]s.
    ///
    /// [`Reply`]: crate::Reply
    fn reply_style(&self) -> ReplyStyle;
}

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    /// History messages left out so the prompt fits.
    pub dropped_messages: usize,
}

/// Builds the prompt, dropping the oldest turns (never system messages) until it leaves at
/// least one token of room below `limit`. A turn runs from a non-system message up to the next
/// user message.
///
/// # Errors
///
/// [`Error::PromptTooLong`] when even the prompt without history does not fit.
pub(crate) fn build_within(
    format: &dyn ChatFormat,
    tokenizer: &Tokenizer,
    conversation: &Conversation<'_>,
    limit: usize,
) -> Result<Prompt> {
    let history = conversation.history;
    let full = format.build(tokenizer, conversation)?;
    if full.len() < limit {
        return Ok(Prompt {
            ids: full,
            dropped_messages: 0,
        });
    }
    // Where each turn starts among the non-system messages.
    let mut turn_starts = Vec::new();
    for (i, message) in history.iter().enumerate() {
        if message.role == Role::System {
            continue;
        }
        let starts_turn =
            message.role == Role::User || !history[..i].iter().any(|m| m.role != Role::System);
        if starts_turn {
            turn_starts.push(i);
        }
    }
    let without = |turns: usize| -> Result<(Vec<u32>, usize)> {
        let cut = turn_starts.get(turns).copied().unwrap_or(history.len());
        let kept: Vec<Message> = history
            .iter()
            .enumerate()
            .filter(|(i, m)| *i >= cut || m.role == Role::System)
            .map(|(_, m)| m.clone())
            .collect();
        let dropped = history.len() - kept.len();
        let ids = format.build(
            tokenizer,
            &Conversation {
                history: &kept,
                ..*conversation
            },
        )?;
        Ok((ids, dropped))
    };
    // Fewer tokens with every turn dropped: find the fewest turns to drop.
    let (all_dropped, dropped) = without(turn_starts.len())?;
    if all_dropped.len() >= limit {
        return Err(Error::PromptTooLong {
            prompt_tokens: all_dropped.len(),
            limit,
        });
    }
    let turns = turn_starts.len();
    let (mut low, mut high) = (1, turns);
    while low < high {
        let mid = low + (high - low) / 2;
        if without(mid)?.0.len() < limit {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    let (ids, dropped_messages) = if low >= turns {
        (all_dropped, dropped)
    } else {
        without(low)?
    };
    Ok(Prompt {
        ids,
        dropped_messages,
    })
}

/// Everything a family reads from a model, ready for the engine.
pub(crate) struct Opened {
    pub family: ModelFamily,
    pub spec: ArchSpec,
    pub names: &'static TensorNames,
    pub tokenizer: Tokenizer,
    pub format: Box<dyn ChatFormat>,
    pub defaults: GenerationDefaults,
    pub stop_ids: Vec<u32>,
    /// The small files the model was read from, as a GGUF export embeds them.
    pub files: Vec<(String, Vec<u8>)>,
    /// Where `config.json` was read from, for errors about it.
    pub config_path: std::path::PathBuf,
}

/// Tells the family of a model from its files: what the file says it is, then each family's
/// own signals.
pub(crate) fn detect(source: &ModelSource) -> Result<ModelFamily> {
    if let Some(family) = source.family {
        return Ok(family);
    }
    let config = source.json("config.json")?.unwrap_or_default();
    if let Some(family) = glm4::detect(source, &config)? {
        return Ok(family);
    }
    Ok(chatglm::detect(source, &config))
}

/// Reads a model's config, tokenizer and chat format as `family` (detected when `None`).
///
/// # Errors
///
/// [`Error::MissingFile`] for a file the family needs, [`Error::Json`] or
/// [`Error::InvalidConfig`] for a bad config, [`Error::Tokenizer`] for a bad tokenizer.
pub(crate) fn open(source: &ModelSource, family: Option<ModelFamily>) -> Result<Opened> {
    let family = match family {
        Some(family) => family,
        None => detect(source)?,
    };
    let opened = match family {
        ModelFamily::ChatGlm2 | ModelFamily::ChatGlm3 => chatglm::open(source, family)?,
        ModelFamily::Glm4 => glm4::open(source)?,
    };
    opened
        .spec
        .check()
        .map_err(|(field, value, reason)| Error::InvalidConfig {
            path: opened.config_path.clone(),
            field,
            value,
            reason,
        })?;
    if opened.tokenizer.vocab_size() > opened.spec.vocab_size {
        return Err(Error::InvalidConfig {
            path: opened.config_path.clone(),
            field: "vocab_size",
            value: opened.spec.vocab_size.to_string(),
            reason: "smaller than the tokenizer's vocabulary",
        });
    }
    Ok(opened)
}

/// Loads the tokenizer of a model directory or GGUF file as the engine would, without the
/// weights.
///
/// # Examples
///
/// ```
/// # fn main() -> chathub::Result<()> {
/// let tokenizer = chathub::load_tokenizer(chathub::demo_model_dir()?)?;
/// assert_eq!(tokenizer.decode(&tokenizer.encode("你好")?), "你好");
/// # Ok(())
/// # }
/// ```
///
/// # Errors
///
/// As [`Engine::load`](crate::Engine::load) for the files it reads.
pub fn load_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let source = ModelSource::open(path.as_ref())?;
    Ok(open(&source, None)?.tokenizer)
}

/// Rebuilds what a llama.cpp GGUF file's metadata describes, by the family that recognises its
/// architecture.
pub(crate) fn import_llama_cpp(meta: &Metadata<'_>) -> Result<Imported> {
    let architecture = meta.text("general.architecture")?;
    if let Some(imported) = glm4::import_llama_cpp(meta, architecture)? {
        return Ok(imported);
    }
    if let Some(imported) = chatglm::import_llama_cpp(meta, architecture)? {
        return Ok(imported);
    }
    Err(meta.invalid(
        "general.architecture",
        architecture,
        "not a model chathub runs (llama.cpp's chatglm or glm4, or a file from chathub convert)",
    ))
}

/// Adds `ids` to `stop` where missing, keeping the order.
pub(crate) fn add_stop_ids(stop: &mut Vec<u32>, ids: impl IntoIterator<Item = u32>) {
    for id in ids {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
}
