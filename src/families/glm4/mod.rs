//! GLM-4: THUDM/glm-4-9b-chat, its -hf layout and GLM-4-9B-0414.
//!
//! Three layouts of one model family (facts in `tests/fixtures/glm4/README.md`):
//!
//! - `chat` (glm-4-9b-chat): ChatGLM's config keys and tensor names, a tiktoken-style
//!   `tokenizer.model`;
//! - `hf` (glm-4-9b-chat-hf, transformers' `GlmForCausalLM`): transformers' config keys, split
//!   (or fused) q/k/v, `tokenizer.json`;
//! - `0414` (GLM-4-9B-0414, `Glm4ForCausalLM`): as `hf` plus "sandwich" norms on each
//!   sub-layer's output.
//!
//! Prompts are the directory's own `chat_template` rendered as transformers >= 4.42 does
//! ([`super::template`]) and tokenized as the official path does: special-token text in the
//! rendered prompt becomes special ids, including text a user typed (`<|user|>` in a message
//! injects a real role token, as with the official code). [`SpecialText::Text`] keeps message
//! text as text for callers that pass untrusted input.

mod config;
mod llama_cpp;

use serde_json::{json, Map, Value};

use super::source::{Imported, ModelSource};
use super::template::{ChatTemplate, TemplateError};
use super::{add_stop_ids, ChatFormat, Conversation, ModelFamily, Opened};
use crate::chat::generation::GenerationDefaults;
use crate::chat::message::Role;
use crate::chat::request::SpecialText;
use crate::chat::tools::Tool;
use crate::error::{Error, Result};
use crate::families::python::format::{json_dumps, JsonDumpsOptions};
use crate::families::reply::ReplyStyle;
use crate::formats::gguf::Metadata;
use crate::nn::names::{QkvNames, TensorNames};
use crate::tokenizer::{sniff, ModelFileKind, Tokenizer, GLM4_SPECIAL_TOKENS};
use config::HfGlmConfig;

/// transformers' names (`GlmForCausalLM`): split q/k/v (or the fused `qkv_proj` transformers'
/// own converter writes).
pub(crate) const HF_NAMES: TensorNames = TensorNames {
    id: "glm-hf",
    embedding: "model.embed_tokens",
    layer: "model.layers.{i}",
    input_norm: "input_layernorm",
    qkv: QkvNames::Split {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        fused: "self_attn.qkv_proj",
    },
    attention_output: "self_attn.o_proj",
    post_attention_norm: "post_attention_layernorm",
    mlp_gate_up: "mlp.gate_up_proj",
    mlp_down: "mlp.down_proj",
    post_self_attention_norm: None,
    post_mlp_norm: None,
    final_norm: "model.norm",
    output: "lm_head",
};

/// `Glm4ForCausalLM`'s names: [`HF_NAMES`] plus the sandwich norms.
pub(crate) const V0414_NAMES: TensorNames = TensorNames {
    id: "glm4-0414",
    post_self_attention_norm: Some("post_self_attn_layernorm"),
    post_mlp_norm: Some("post_mlp_layernorm"),
    ..HF_NAMES
};

/// llama.cpp's names for GLM-4-0414 (architecture `glm4`).
pub(crate) const LLAMA_CPP_0414_NAMES: TensorNames = TensorNames {
    id: "llama.cpp-glm4",
    embedding: "token_embd",
    layer: "blk.{i}",
    input_norm: "attn_norm",
    qkv: QkvNames::Split {
        q: "attn_q",
        k: "attn_k",
        v: "attn_v",
        fused: "attn_qkv",
    },
    attention_output: "attn_output",
    post_attention_norm: "ffn_norm",
    mlp_gate_up: "ffn_up",
    mlp_down: "ffn_down",
    post_self_attention_norm: Some("post_attention_norm"),
    post_mlp_norm: Some("post_ffw_norm"),
    final_norm: "output_norm",
    output: "output",
};

/// glm-4-9b-chat's chat template, for files that carry none (it is the same in every layout
/// published before 0414).
const DEFAULT_TEMPLATE: &str = include_str!("../../../assets/glm4-chat-template.jinja");

/// The three published layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// glm-4-9b-chat: ChatGLM's config and names, tiktoken tokenizer.
    Chat,
    /// glm-4-9b-chat-hf.
    Hf,
    /// GLM-4-9B-0414.
    V0414,
}

fn layout_of(config: &Value) -> Option<Layout> {
    match config.get("model_type").and_then(Value::as_str) {
        Some("glm") => Some(Layout::Hf),
        Some("glm4") => Some(Layout::V0414),
        _ => {
            let architectures = config.get("architectures").and_then(Value::as_array);
            let has = |name: &str| {
                architectures.is_some_and(|a| a.iter().any(|v| v.as_str() == Some(name)))
            };
            if has("GlmForCausalLM") {
                Some(Layout::Hf)
            } else if has("Glm4ForCausalLM") {
                Some(Layout::V0414)
            } else {
                None
            }
        }
    }
}

/// Whether the files are a GLM-4 model's: transformers' GLM model types, or a ChatGLM-layout
/// directory whose name, tokenizer class or tokenizer file says GLM-4 (ChatGLM2/3 ship a
/// sentencepiece protobuf, glm-4-9b-chat a tiktoken text file).
pub(crate) fn detect(source: &ModelSource, config: &Value) -> Result<Option<ModelFamily>> {
    if layout_of(config).is_some() {
        return Ok(Some(ModelFamily::Glm4));
    }
    let named_glm4 = |name: Option<&str>| {
        name.is_some_and(|n| {
            let n = n.to_ascii_lowercase();
            n.contains("glm-4") || n.contains("glm4")
        })
    };
    if named_glm4(config.get("_name_or_path").and_then(Value::as_str)) {
        return Ok(Some(ModelFamily::Glm4));
    }
    let tokenizer_config = source.json("tokenizer_config.json").ok().flatten();
    if tokenizer_config
        .as_ref()
        .and_then(|c| c.get("tokenizer_class"))
        .and_then(Value::as_str)
        == Some("ChatGLM4Tokenizer")
    {
        return Ok(Some(ModelFamily::Glm4));
    }
    if let Some(model) = source.read("tokenizer.model")? {
        if sniff(&model) == ModelFileKind::Tiktoken {
            return Ok(Some(ModelFamily::Glm4));
        }
    }
    Ok(None)
}

/// Reads a GLM-4 model of any of the three layouts.
pub(crate) fn open(source: &ModelSource) -> Result<Opened> {
    let config_bytes = source.require("config.json", "config.json")?;
    let config_path = source.file_path("config.json");
    let config_value: Value = serde_json::from_slice(&config_bytes).map_err(|e| Error::Json {
        path: config_path.clone(),
        source: e,
    })?;
    let layout = layout_of(&config_value).unwrap_or(Layout::Chat);
    let (spec, config_eos, names) = match layout {
        Layout::Chat => {
            let config =
                super::chatglm::config::ChatGlmConfig::from_bytes(&config_bytes, &config_path)?;
            let names = match source.layout.as_deref() {
                Some(id) if id == super::chatglm::LLAMA_CPP_NAMES.id => {
                    &super::chatglm::LLAMA_CPP_NAMES
                }
                _ => &super::chatglm::NAMES,
            };
            (config.arch_spec(), config.eos_token_id, names)
        }
        Layout::Hf | Layout::V0414 => {
            let config = HfGlmConfig::from_bytes(&config_bytes, &config_path)?;
            let sandwich = layout == Layout::V0414;
            let names = match (source.layout.as_deref(), sandwich) {
                (Some(id), _) if id == LLAMA_CPP_0414_NAMES.id => &LLAMA_CPP_0414_NAMES,
                (_, true) => &V0414_NAMES,
                (_, false) => &HF_NAMES,
            };
            (
                config.arch_spec(sandwich, &config_path)?,
                config.eos_token_id,
                names,
            )
        }
    };
    let mut files = vec![("config.json".to_string(), config_bytes)];

    let generation_bytes = source.read("generation_config.json")?;
    let defaults = match &generation_bytes {
        Some(bytes) => {
            let path = source.file_path("generation_config.json");
            let defaults = serde_json::from_slice(bytes).map_err(|source| Error::Json {
                path: path.clone(),
                source,
            })?;
            GenerationDefaults::checked(defaults, &path)?
        }
        None => GenerationDefaults::default(),
    };
    if let Some(bytes) = generation_bytes {
        files.push(("generation_config.json".to_string(), bytes));
    }

    let tokenizer_config_bytes = source.read("tokenizer_config.json")?;
    let tokenizer_config: Value = match &tokenizer_config_bytes {
        Some(bytes) => serde_json::from_slice(bytes).map_err(|e| Error::Json {
            path: source.file_path("tokenizer_config.json"),
            source: e,
        })?,
        None => Value::Object(Map::new()),
    };
    let tokenizer = load_tokenizer(source, layout, &tokenizer_config, &mut files)?;

    let jinja = source.read("chat_template.jinja")?;
    let mut template_config = tokenizer_config.clone();
    if jinja.is_none() && template_config.get("chat_template").is_none() {
        tracing::warn!(
            path = %source.path().display(),
            "no chat template in the model's files: using glm-4-9b-chat's"
        );
        if let Some(config) = template_config.as_object_mut() {
            config.insert("chat_template".into(), DEFAULT_TEMPLATE.into());
        }
    }
    let template = ChatTemplate::from_parts(
        &template_config,
        jinja
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        source.json("special_tokens_map.json")?.as_ref(),
    )
    .map_err(|e| Error::Template {
        path: source.file_path("tokenizer_config.json"),
        reason: e.to_string(),
    })?;
    if let Some(bytes) = tokenizer_config_bytes {
        files.push(("tokenizer_config.json".to_string(), bytes));
    }
    if let Some(bytes) = jinja {
        files.push(("chat_template.jinja".to_string(), bytes));
    }

    let mut stop_ids = Vec::new();
    add_stop_ids(
        &mut stop_ids,
        ["<|endoftext|>", "<|user|>", "<|observation|>"]
            .iter()
            .filter_map(|t| tokenizer.special_id(t)),
    );
    add_stop_ids(
        &mut stop_ids,
        defaults
            .eos_token_id
            .iter()
            .chain(config_eos.iter())
            .flat_map(|ids| ids.to_vec()),
    );
    let format = Glm4Format {
        template,
        tools_in_system_message: layout != Layout::V0414,
    };
    Ok(Opened {
        family: ModelFamily::Glm4,
        spec,
        names,
        tokenizer,
        format: Box::new(format),
        defaults,
        stop_ids,
        files,
        config_path,
    })
}

/// The tokenizer of a layout: the tiktoken `tokenizer.model` of the chat layout (special
/// tokens named by `tokenizer_config.json`, GLM-4's own list otherwise) or `tokenizer.json`.
/// Either file is accepted in any layout.
fn load_tokenizer(
    source: &ModelSource,
    layout: Layout,
    tokenizer_config: &Value,
    files: &mut Vec<(String, Vec<u8>)>,
) -> Result<Tokenizer> {
    let order: [&str; 2] = if layout == Layout::Chat {
        ["tokenizer.model", "tokenizer.json"]
    } else {
        ["tokenizer.json", "tokenizer.model"]
    };
    let (name, bytes) = match source.read(order[0])? {
        Some(bytes) => (order[0], bytes),
        None => match source.read(order[1])? {
            Some(bytes) => (order[1], bytes),
            None => {
                return Err(Error::MissingFile {
                    dir: source.path().to_path_buf(),
                    what: "tokenizer",
                    looked_for: order.join(" or "),
                })
            }
        },
    };
    let named: Vec<&str> = tokenizer_config
        .get("additional_special_tokens")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // tokenizer_config.json lists GLM-4's special tokens in id order; a list that does not
    // hold them all (another model's, or a partial one) is not the numbering.
    let specials: &[&str] = if GLM4_SPECIAL_TOKENS.iter().all(|t| named.contains(t)) {
        &named
    } else {
        &GLM4_SPECIAL_TOKENS
    };
    let tokenizer = Tokenizer::byte_level_bpe(&bytes, specials, &source.file_path(name))?;
    files.push((name.to_string(), bytes));
    Ok(tokenizer)
}

/// GLM-4's chat format: the model's own template, rendered and then tokenized with special
/// tokens recognised in the text.
#[derive(Debug)]
struct Glm4Format {
    template: ChatTemplate,
    /// glm-4-9b-chat's template reads tools from a leading system message (as GLM-4's own
    /// server sends them); 0414's from the `tools` argument.
    tools_in_system_message: bool,
}

/// One message as the chat template gets it; `content` is kept apart so it can be marked.
struct TemplateMessage<'a> {
    role: &'static str,
    metadata: Option<&'a str>,
    content: std::borrow::Cow<'a, str>,
}

/// The conversation as GLM-4's own OpenAI server (`glm_server.py`) hands it to the template: a
/// past call becomes an assistant message with the function's name as `metadata` and the
/// arguments' JSON as content (what the model writes when it calls), a tool's result an
/// `observation`.
fn template_messages<'a>(conversation: &Conversation<'a>) -> Vec<TemplateMessage<'a>> {
    use std::borrow::Cow;
    let mut messages = Vec::with_capacity(conversation.history.len() + 1);
    for message in conversation.history {
        if message.role == Role::Assistant && !message.tool_calls.is_empty() {
            if !message.content.is_empty() {
                messages.push(TemplateMessage {
                    role: "assistant",
                    metadata: None,
                    content: Cow::Borrowed(&message.content),
                });
            }
            for call in &message.tool_calls {
                messages.push(TemplateMessage {
                    role: "assistant",
                    metadata: Some(&call.name),
                    content: Cow::Owned(json_dumps(
                        &Value::Object(call.arguments.clone()),
                        &JsonDumpsOptions {
                            ensure_ascii: false,
                            ..JsonDumpsOptions::default()
                        },
                    )),
                });
            }
            continue;
        }
        messages.push(TemplateMessage {
            role: message.role.as_str(),
            metadata: None,
            content: Cow::Borrowed(&message.content),
        });
    }
    messages.push(TemplateMessage {
        role: conversation.prompt_role.as_str(),
        metadata: None,
        content: Cow::Borrowed(conversation.prompt),
    });
    messages
}

/// Marks a message's content in the rendered prompt, so it can be kept as text.
struct Placeholders {
    open: char,
    close: char,
}

impl Placeholders {
    /// Private-use characters no content contains.
    fn choose(contents: &[&str]) -> Option<Self> {
        let free: Vec<char> = ('\u{F8F0}'..='\u{F8FF}')
            .filter(|c| contents.iter().all(|t| !t.contains(*c)))
            .take(2)
            .collect();
        match free[..] {
            [open, close] => Some(Placeholders { open, close }),
            _ => None,
        }
    }

    fn mark(&self, index: usize) -> String {
        format!("{}{index}{}", self.open, self.close)
    }
}

impl Glm4Format {
    /// The template's `messages` (and `tools` argument) with each content as `contents` gives it.
    fn render(
        &self,
        conversation: &Conversation<'_>,
        messages: &[TemplateMessage<'_>],
        contents: &[String],
    ) -> Result<String> {
        let tools: Vec<Value> = conversation.tools.iter().map(Tool::to_json).collect();
        let mut values = Vec::with_capacity(messages.len() + 1);
        if !tools.is_empty() && self.tools_in_system_message {
            values.push(json!({"role": "system", "content": "", "tools": tools}));
        }
        for (message, content) in messages.iter().zip(contents) {
            let mut value = json!({"role": message.role, "content": content});
            if let Some(metadata) = message.metadata {
                value["metadata"] = metadata.into();
            }
            values.push(value);
        }
        let tools_argument =
            (!tools.is_empty() && !self.tools_in_system_message).then_some(tools.as_slice());
        self.template
            .render(&values, tools_argument, true)
            .map_err(|e| match e {
                TemplateError::Raised(_)
                | TemplateError::LimitExceeded(_)
                | TemplateError::InvalidInput(_) => Error::ConversationRejected {
                    reason: e.to_string(),
                },
                other => Error::Template {
                    path: "tokenizer_config.json".into(),
                    reason: other.to_string(),
                },
            })
    }
}

impl ChatFormat for Glm4Format {
    fn reply_style(&self) -> ReplyStyle {
        ReplyStyle::Glm4
    }

    fn build(&self, tokenizer: &Tokenizer, conversation: &Conversation<'_>) -> Result<Vec<u32>> {
        let messages = template_messages(conversation);
        let contents: Vec<&str> = messages.iter().map(|m| m.content.as_ref()).collect();
        if conversation.special_text == SpecialText::Tokens {
            let owned: Vec<String> = contents.iter().map(|c| c.to_string()).collect();
            let text = self.render(conversation, &messages, &owned)?;
            return tokenizer.encode_with_special_text(&text, &[]);
        }
        // Render with a marker in place of each non-empty content, then put the contents back
        // and keep special-token text inside them as text.
        let Some(marks) = Placeholders::choose(&contents) else {
            return Err(Error::invalid(
                "special_text",
                "text",
                "the messages use every marker character",
            ));
        };
        let marked: Vec<String> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.is_empty() {
                    String::new()
                } else {
                    marks.mark(i)
                }
            })
            .collect();
        let rendered = self.render(conversation, &messages, &marked)?;
        let mut text = String::with_capacity(rendered.len());
        let mut protected = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(start) = rest.find(marks.open) {
            text.push_str(&rest[..start]);
            let after = &rest[start + marks.open.len_utf8()..];
            let index = after
                .find(marks.close)
                .and_then(|end| after[..end].parse::<usize>().ok().map(|i| (i, end)));
            let Some((index, end)) = index.filter(|(i, _)| *i < contents.len()) else {
                return Err(Error::invalid(
                    "special_text",
                    "text",
                    "this chat template changes message contents, so they cannot be kept as text",
                ));
            };
            let begin = text.len();
            text.push_str(contents[index]);
            protected.push(begin..text.len());
            rest = &after[end + marks.close.len_utf8()..];
        }
        text.push_str(rest);
        tokenizer.encode_with_special_text(&text, &protected)
    }
}

/// Rebuilds a llama.cpp GLM-4 file's files (see [`llama_cpp`]); `None` for other
/// architectures and tokenizers.
pub(crate) fn import_llama_cpp(
    meta: &Metadata<'_>,
    architecture: &str,
) -> Result<Option<Imported>> {
    llama_cpp::import(meta, architecture)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_told_by_model_type_or_class() {
        assert_eq!(layout_of(&json!({"model_type": "glm"})), Some(Layout::Hf));
        assert_eq!(
            layout_of(&json!({"model_type": "glm4"})),
            Some(Layout::V0414)
        );
        assert_eq!(
            layout_of(&json!({"architectures": ["Glm4ForCausalLM"]})),
            Some(Layout::V0414)
        );
        assert_eq!(layout_of(&json!({"model_type": "chatglm"})), None);
    }
}
