//! Model families and their chat prompts, built at token level as the official code does.

pub(crate) mod config;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chat::message::{messages_to_tuple_history, Message, Role};
use crate::error::{Error, Result};
use crate::families::config::{GenerationDefaults, ModelConfig};
use crate::tokenizer::{SpecialToken, Tokenizer};

/// Which chat format and special tokens a checkpoint uses. The architectures are identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFamily {
    /// THUDM/chatglm2-6b: `[Round N]\n\n问：…\n\n答：` text prompts over (query, response) tuples.
    #[serde(rename = "chatglm2")]
    ChatGlm2,
    /// THUDM/chatglm3-6b: role tokens (`<|system|>`, `<|user|>`, ...) and a system prompt.
    #[serde(rename = "chatglm3")]
    ChatGlm3,
}

impl ModelFamily {
    /// The family's name as used on the command line and in JSON (`chatglm2`, `chatglm3`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFamily::ChatGlm2 => "chatglm2",
            ModelFamily::ChatGlm3 => "chatglm3",
        }
    }

    /// How many special tokens the tokenizer appends after sentencepiece's pieces.
    pub(crate) fn special_token_count(self) -> usize {
        match self {
            ModelFamily::ChatGlm2 => 5,
            ModelFamily::ChatGlm3 => 9,
        }
    }

    /// Tells the family from the files of a model directory, as a download ships them: the
    /// published name in `config.json` or `tokenizer_config.json`, the eos list in
    /// `generation_config.json`, then the directory's own name. Falls back to ChatGLM3.
    pub fn detect(dir: &Path, config: &ModelConfig, generation: &GenerationDefaults) -> Self {
        let from_name = |name: &str| {
            let name = name.to_ascii_lowercase();
            if name.contains("chatglm2") || name.contains("codegeex2") {
                Some(ModelFamily::ChatGlm2)
            } else if name.contains("chatglm3") {
                Some(ModelFamily::ChatGlm3)
            } else {
                None
            }
        };
        let tokenizer_name = std::fs::read(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("name_or_path")?.as_str().map(str::to_string));
        let eos_list = generation
            .eos_token_id
            .as_ref()
            .or(config.eos_token_id.as_ref())
            .map(|ids| ids.to_vec().len());
        let dir_name = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
        let detected = config
            .name_or_path
            .as_deref()
            .and_then(from_name)
            .or_else(|| tokenizer_name.as_deref().and_then(from_name))
            .or(match eos_list {
                Some(n) if n > 1 => Some(ModelFamily::ChatGlm3),
                _ => None,
            })
            .or_else(|| dir_name.as_deref().and_then(from_name));
        detected.unwrap_or_else(|| {
            tracing::warn!(
                dir = %dir.display(),
                "cannot tell ChatGLM2 from ChatGLM3 from the files; assuming chatglm3 (override the family to change)"
            );
            ModelFamily::ChatGlm3
        })
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
            _ => Err(Error::invalid("family", s, "expected chatglm2 or chatglm3")),
        }
    }
}

/// A prompt ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prompt {
    pub ids: Vec<u32>,
    /// History messages left out so the prompt fits.
    pub dropped_messages: usize,
}

/// Builds prompts for one family with one tokenizer.
pub(crate) struct PromptBuilder<'a> {
    pub family: ModelFamily,
    pub tokenizer: &'a Tokenizer,
}

impl PromptBuilder<'_> {
    fn special(&self, token: SpecialToken) -> u32 {
        // The family's token count covers every token it asks for.
        self.tokenizer.special_id(token).unwrap_or(0)
    }

    /// The prompt exactly as the official builder makes it, whole history included.
    pub fn build(&self, prompt: &str, history: &[Message]) -> Vec<u32> {
        match self.family {
            ModelFamily::ChatGlm3 => {
                let mut ids = self.chatglm3_prefix();
                for message in history {
                    ids.extend(self.chatglm3_message(message.role, &message.content));
                }
                ids.extend(self.chatglm3_message(Role::User, prompt));
                ids.push(self.special(SpecialToken::Assistant));
                ids
            }
            ModelFamily::ChatGlm2 => {
                self.chatglm2_prompt(prompt, &messages_to_tuple_history(history))
            }
        }
    }

    /// Builds the prompt, dropping the oldest turns (never system messages) until it leaves at
    /// least one token of room below `limit`.
    pub fn build_within(&self, prompt: &str, history: &[Message], limit: usize) -> Result<Prompt> {
        match self.family {
            ModelFamily::ChatGlm3 => {
                let tail = {
                    let mut t = self.chatglm3_message(Role::User, prompt);
                    t.push(self.special(SpecialToken::Assistant));
                    t
                };
                let encoded: Vec<Vec<u32>> = history
                    .iter()
                    .map(|m| self.chatglm3_message(m.role, &m.content))
                    .collect();
                let mut keep = vec![true; history.len()];
                let total = |keep: &[bool]| {
                    2 + tail.len()
                        + encoded
                            .iter()
                            .zip(keep)
                            .filter(|(_, k)| **k)
                            .map(|(e, _)| e.len())
                            .sum::<usize>()
                };
                // Drop whole turns from the oldest: a turn runs from one non-system message up to
                // the next user message.
                let mut next = 0;
                while total(&keep) >= limit {
                    while next < history.len() && history[next].role == Role::System {
                        next += 1;
                    }
                    if next >= history.len() {
                        return Err(Error::PromptTooLong {
                            prompt_tokens: total(&keep),
                            limit,
                        });
                    }
                    keep[next] = false;
                    next += 1;
                    while next < history.len() && history[next].role != Role::User {
                        if history[next].role != Role::System {
                            keep[next] = false;
                        }
                        next += 1;
                    }
                }
                let mut ids = self.chatglm3_prefix();
                for (e, _) in encoded.iter().zip(&keep).filter(|(_, k)| **k) {
                    ids.extend_from_slice(e);
                }
                ids.extend(tail);
                Ok(Prompt {
                    ids,
                    dropped_messages: keep.iter().filter(|k| !**k).count(),
                })
            }
            ModelFamily::ChatGlm2 => {
                let tuples = messages_to_tuple_history(history);
                for first in 0..=tuples.len() {
                    let ids = self.chatglm2_prompt(prompt, &tuples[first..]);
                    if ids.len() < limit {
                        return Ok(Prompt {
                            ids,
                            dropped_messages: 2 * first,
                        });
                    }
                    if first == tuples.len() {
                        return Err(Error::PromptTooLong {
                            prompt_tokens: ids.len(),
                            limit,
                        });
                    }
                }
                unreachable!("the loop returns on its last iteration")
            }
        }
    }

    fn chatglm3_prefix(&self) -> Vec<u32> {
        vec![
            self.special(SpecialToken::GMask),
            self.special(SpecialToken::Sop),
        ]
    }

    /// `<|role|> sp(metadata + "\n") sp(content)`, metadata empty.
    fn chatglm3_message(&self, role: Role, content: &str) -> Vec<u32> {
        let role_token = match role {
            Role::System => SpecialToken::System,
            Role::User => SpecialToken::User,
            Role::Assistant => SpecialToken::Assistant,
            Role::Observation => SpecialToken::Observation,
        };
        let mut ids = vec![self.special(role_token)];
        ids.extend(self.tokenizer.encode("\n"));
        ids.extend(self.tokenizer.encode(content));
        ids
    }

    /// `[gMASK] sop sp("[Round 1]\n\n问：q1\n\n答：r1\n\n...[Round N]\n\n问：prompt\n\n答：")`.
    fn chatglm2_prompt(&self, prompt: &str, tuples: &[(String, String)]) -> Vec<u32> {
        let mut text = String::new();
        for (i, (query, response)) in tuples.iter().enumerate() {
            text.push_str(&format!(
                "[Round {}]\n\n问：{query}\n\n答：{response}\n\n",
                i + 1
            ));
        }
        text.push_str(&format!(
            "[Round {}]\n\n问：{prompt}\n\n答：",
            tuples.len() + 1
        ));
        let mut ids = vec![
            self.special(SpecialToken::GMask),
            self.special(SpecialToken::Sop),
        ];
        ids.extend(self.tokenizer.encode(&text));
        ids
    }

    /// Ids that end a reply: `</s>`, and for ChatGLM3 `<|user|>` and `<|observation|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.tokenizer.eos_id()];
        if self.family == ModelFamily::ChatGlm3 {
            ids.push(self.special(SpecialToken::User));
            ids.push(self.special(SpecialToken::Observation));
        }
        ids
    }
}
