//! ChatGLM2 and ChatGLM3: one layout, one sentencepiece tokenizer, two chat formats.
//!
//! Follows THUDM's `tokenization_chatglm.py` and `modeling_chatglm.py` (chatglm2-6b and
//! chatglm3-6b revisions): plain text always goes through sentencepiece (text that merely looks
//! like `<|user|>` stays text), special tokens get the ids right after the sentencepiece
//! vocabulary in a fixed order, and prompts are built at token level.

pub(crate) mod config;
mod llama_cpp;

use std::collections::HashMap;

use super::source::{Imported, ModelSource};
use super::{add_stop_ids, ChatFormat, Conversation, ModelFamily, Opened};
use crate::chat::generation::GenerationDefaults;
use crate::chat::message::{messages_to_tuple_history, Message, Role};
use crate::error::{Error, Result};
use crate::families::python::format::{json_dumps, python_tool_call, JsonDumpsOptions};
use crate::families::reply::ReplyStyle;
use crate::formats::gguf::Metadata;
use crate::nn::names::{QkvNames, TensorNames};
use crate::tokenizer::Tokenizer;
use config::ChatGlmConfig;

/// ChatGLM3's special tokens, in the order the official tokenizer numbers them after the
/// sentencepiece pieces. ChatGLM2 has the first five.
pub(crate) const SPECIAL_TOKENS: [&str; 9] = [
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "sop",
    "eop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
];

/// ChatGLM's checkpoint names (`modeling_chatglm.py`), which glm-4-9b-chat keeps.
pub(crate) const NAMES: TensorNames = TensorNames {
    id: "chatglm",
    embedding: "transformer.embedding.word_embeddings",
    layer: "transformer.encoder.layers.{i}",
    input_norm: "input_layernorm",
    qkv: QkvNames::Fused("self_attention.query_key_value"),
    attention_output: "self_attention.dense",
    post_attention_norm: "post_attention_layernorm",
    mlp_gate_up: "mlp.dense_h_to_4h",
    mlp_down: "mlp.dense_4h_to_h",
    post_self_attention_norm: None,
    post_mlp_norm: None,
    final_norm: "transformer.encoder.final_layernorm",
    output: "transformer.output_layer",
};

/// What llama.cpp's `convert_hf_to_gguf.py` calls the same tensors (architecture `chatglm`).
pub(crate) const LLAMA_CPP_NAMES: TensorNames = TensorNames {
    id: "llama.cpp-chatglm",
    embedding: "token_embd",
    layer: "blk.{i}",
    input_norm: "attn_norm",
    // The converter keeps ChatGLM's fused projection; glm-4-9b-chat-hf comes split.
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
    post_self_attention_norm: None,
    post_mlp_norm: None,
    final_norm: "output_norm",
    output: "output",
};

/// The tensor-name layouts a ChatGLM-layout model may come in, by their id.
pub(crate) fn names(layout: Option<&str>) -> Result<&'static TensorNames> {
    match layout {
        None | Some("chatglm") => Ok(&NAMES),
        Some("llama.cpp-chatglm") => Ok(&LLAMA_CPP_NAMES),
        Some(other) => Err(Error::invalid(
            "layout",
            other,
            "not a ChatGLM tensor layout",
        )),
    }
}

/// Tells ChatGLM2 from ChatGLM3 by the files of a download: the published name in
/// `config.json` or `tokenizer_config.json`, the eos list in `generation_config.json`, then the
/// directory's own name. Falls back to ChatGLM3.
pub(crate) fn detect(source: &ModelSource, config: &serde_json::Value) -> ModelFamily {
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
    let tokenizer_config = source
        .json("tokenizer_config.json")
        .ok()
        .flatten()
        .unwrap_or_default();
    let generation = source
        .json("generation_config.json")
        .ok()
        .flatten()
        .unwrap_or_default();
    let eos_count = |v: &serde_json::Value| v.get("eos_token_id")?.as_array().map(Vec::len);
    let dir_name = source
        .path()
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
    let detected = config
        .get("_name_or_path")
        .and_then(|v| v.as_str())
        .and_then(from_name)
        .or_else(|| {
            tokenizer_config
                .get("name_or_path")
                .and_then(|v| v.as_str())
                .and_then(from_name)
        })
        .or(match eos_count(&generation).or_else(|| eos_count(config)) {
            Some(n) if n > 1 => Some(ModelFamily::ChatGlm3),
            _ => None,
        })
        .or_else(|| dir_name.as_deref().and_then(from_name));
    detected.unwrap_or_else(|| {
        tracing::warn!(
            path = %source.path().display(),
            "cannot tell ChatGLM2 from ChatGLM3 from the files; assuming chatglm3 (override the family to change)"
        );
        ModelFamily::ChatGlm3
    })
}

/// Reads a ChatGLM2/3 model's config, tokenizer and defaults.
pub(crate) fn open(source: &ModelSource, family: ModelFamily) -> Result<Opened> {
    let config_bytes = source.require("config.json", "config.json")?;
    let config_path = source.file_path("config.json");
    let config = ChatGlmConfig::from_bytes(&config_bytes, &config_path)?;
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
    let tokenizer_bytes = source.require("tokenizer.model", "tokenizer.model")?;
    let specials: &[&str] = match family {
        ModelFamily::ChatGlm2 => &SPECIAL_TOKENS[..5],
        _ => &SPECIAL_TOKENS,
    };
    let tokenizer = Tokenizer::sentencepiece(
        &tokenizer_bytes,
        specials,
        &source.file_path("tokenizer.model"),
    )?;
    let (format, mut stop_ids): (Box<dyn ChatFormat>, Vec<u32>) = match family {
        ModelFamily::ChatGlm2 => (Box::new(ChatGlm2Format::new(&tokenizer)), vec![]),
        _ => {
            let format = ChatGlm3Format::new(&tokenizer);
            let stops = vec![format.user, format.observation];
            (Box::new(format), stops)
        }
    };
    if let Some(eos) = tokenizer.piece_id("</s>") {
        stop_ids.insert(0, eos);
    }
    add_stop_ids(
        &mut stop_ids,
        defaults
            .eos_token_id
            .iter()
            .chain(config.eos_token_id.iter())
            .flat_map(|ids| ids.to_vec()),
    );
    let mut files = vec![
        ("config.json".to_string(), config_bytes),
        ("tokenizer.model".to_string(), tokenizer_bytes),
    ];
    if let Some(bytes) = generation_bytes {
        files.push(("generation_config.json".to_string(), bytes));
    }
    if let Some(bytes) = source.read("tokenizer_config.json")? {
        files.push(("tokenizer_config.json".to_string(), bytes));
    }
    Ok(Opened {
        family,
        spec: config.arch_spec(),
        names: names(source.layout.as_deref())?,
        tokenizer,
        format,
        defaults,
        stop_ids,
        files,
        config_path,
    })
}

/// Ids of the special tokens a ChatGLM prompt uses.
fn special(tokenizer: &Tokenizer, text: &'static str) -> u32 {
    // The family's token list covers every token it asks for.
    tokenizer.special_id(text).unwrap_or(0)
}

/// ChatGLM2's `build_prompt`: `[gMASK] sop sp("[Round 1]\n\n问：q1\n\n答：r1\n\n...")` over the
/// history turned into (query, response) tuples.
#[derive(Debug)]
struct ChatGlm2Format {
    prefix: [u32; 2],
}

impl ChatGlm2Format {
    fn new(tokenizer: &Tokenizer) -> Self {
        ChatGlm2Format {
            prefix: [special(tokenizer, "[gMASK]"), special(tokenizer, "sop")],
        }
    }
}

impl ChatFormat for ChatGlm2Format {
    fn reply_style(&self) -> ReplyStyle {
        ReplyStyle::ChatGlm2
    }

    fn build(&self, tokenizer: &Tokenizer, conversation: &Conversation<'_>) -> Result<Vec<u32>> {
        if !conversation.tools.is_empty() {
            return Err(Error::invalid(
                "tools",
                conversation.tools.len(),
                "ChatGLM2 cannot call tools",
            ));
        }
        if conversation.prompt_role != Role::User {
            return Err(Error::invalid(
                "prompt_role",
                conversation.prompt_role,
                "ChatGLM2 takes only the user's questions (it has no tool role)",
            ));
        }
        let tuples = messages_to_tuple_history(conversation.history);
        let mut text = String::new();
        for (i, (query, response)) in tuples.iter().enumerate() {
            text.push_str(&format!(
                "[Round {}]\n\n问：{query}\n\n答：{response}\n\n",
                i + 1
            ));
        }
        text.push_str(&format!(
            "[Round {}]\n\n问：{}\n\n答：",
            tuples.len() + 1,
            conversation.prompt
        ));
        let mut ids = self.prefix.to_vec();
        ids.extend(tokenizer.encode(&text)?);
        Ok(ids)
    }
}

/// ChatGLM3's `build_chat_input`: `[gMASK] sop`, then `<|role|> sp(metadata + "\n")
/// sp(content)` per message, then `<|assistant|>`.
#[derive(Debug)]
struct ChatGlm3Format {
    prefix: [u32; 2],
    roles: HashMap<Role, u32>,
    assistant: u32,
    user: u32,
    observation: u32,
}

impl ChatGlm3Format {
    fn new(tokenizer: &Tokenizer) -> Self {
        let role = |text| special(tokenizer, text);
        ChatGlm3Format {
            prefix: [role("[gMASK]"), role("sop")],
            roles: [
                (Role::System, role("<|system|>")),
                (Role::User, role("<|user|>")),
                (Role::Assistant, role("<|assistant|>")),
                (Role::Observation, role("<|observation|>")),
            ]
            .into_iter()
            .collect(),
            assistant: role("<|assistant|>"),
            user: role("<|user|>"),
            observation: role("<|observation|>"),
        }
    }

    /// `build_single_message`: `<|role|> sp(metadata + "\n") sp(content)`.
    fn message(
        &self,
        tokenizer: &Tokenizer,
        role: Role,
        metadata: &str,
        content: &str,
        ids: &mut Vec<u32>,
    ) -> Result<()> {
        ids.push(self.roles[&role]);
        ids.extend(tokenizer.encode(&format!("{metadata}\n"))?);
        ids.extend(tokenizer.encode(content)?);
        Ok(())
    }
}

/// The system message THUDM's OpenAI demo gives ChatGLM3 when a request offers tools and has no
/// system message of its own.
const TOOLS_SYSTEM_PROMPT: &str =
    "Answer the following questions as best as you can. You have access to the following tools:";

/// A message as ChatGLM3's `build_chat_input` takes it: role, metadata line, content.
struct ChatGlm3Message<'a> {
    role: Role,
    metadata: std::borrow::Cow<'a, str>,
    content: std::borrow::Cow<'a, str>,
}

/// The history in ChatGLM3's terms, as its OpenAI demo (`openai_api_demo/utils.py`) maps an
/// OpenAI request: tools become a system message (the request's own system text, else the demo's
/// sentence) whose content is followed by `json.dumps(functions, indent=4,
/// ensure_ascii=False)`; a past call becomes an assistant message with the function's name as
/// metadata and `tool_call(k=v, ...)` in a Python fence as content; a tool's result becomes an
/// observation.
fn chatglm3_messages<'a>(conversation: &Conversation<'a>) -> Vec<ChatGlm3Message<'a>> {
    use std::borrow::Cow;
    let mut messages = Vec::with_capacity(conversation.history.len() + 2);
    let mut system_used = None;
    if !conversation.tools.is_empty() {
        system_used = conversation
            .history
            .iter()
            .position(|m| m.role == Role::System);
        let text = system_used.map_or(TOOLS_SYSTEM_PROMPT, |i| {
            conversation.history[i].content.as_str()
        });
        let functions = serde_json::Value::Array(
            conversation
                .tools
                .iter()
                .map(|t| serde_json::Value::Object(t.function.clone()))
                .collect(),
        );
        let dumped = json_dumps(
            &functions,
            &JsonDumpsOptions {
                indent: Some(4),
                ensure_ascii: false,
                ..JsonDumpsOptions::default()
            },
        );
        messages.push(ChatGlm3Message {
            role: Role::System,
            metadata: Cow::Borrowed(""),
            content: Cow::Owned(format!("{text}\n{dumped}")),
        });
    }
    for (i, message) in conversation.history.iter().enumerate() {
        if Some(i) == system_used {
            continue;
        }
        push_message(&mut messages, message);
    }
    messages.push(ChatGlm3Message {
        role: conversation.prompt_role,
        metadata: Cow::Borrowed(""),
        content: Cow::Borrowed(conversation.prompt),
    });
    messages
}

fn push_message<'a>(messages: &mut Vec<ChatGlm3Message<'a>>, message: &'a Message) {
    use std::borrow::Cow;
    if message.role == Role::Assistant && !message.tool_calls.is_empty() {
        if !message.content.is_empty() {
            messages.push(ChatGlm3Message {
                role: Role::Assistant,
                metadata: Cow::Borrowed(""),
                content: Cow::Borrowed(&message.content),
            });
        }
        for call in &message.tool_calls {
            messages.push(ChatGlm3Message {
                role: Role::Assistant,
                metadata: Cow::Borrowed(&call.name),
                content: Cow::Owned(python_tool_call(&call.arguments)),
            });
        }
        return;
    }
    messages.push(ChatGlm3Message {
        role: message.role,
        metadata: Cow::Borrowed(""),
        content: Cow::Borrowed(&message.content),
    });
}

impl ChatFormat for ChatGlm3Format {
    fn reply_style(&self) -> ReplyStyle {
        ReplyStyle::ChatGlm3
    }

    fn build(&self, tokenizer: &Tokenizer, conversation: &Conversation<'_>) -> Result<Vec<u32>> {
        let mut ids = self.prefix.to_vec();
        for message in chatglm3_messages(conversation) {
            self.message(
                tokenizer,
                message.role,
                &message.metadata,
                &message.content,
                &mut ids,
            )?;
        }
        ids.push(self.assistant);
        Ok(ids)
    }
}

/// Rebuilds a llama.cpp ChatGLM3 file's config and tokenizer (see [`llama_cpp`]); `None` for
/// other architectures and tokenizers.
pub(crate) fn import_llama_cpp(
    meta: &Metadata<'_>,
    architecture: &str,
) -> Result<Option<Imported>> {
    llama_cpp::import(meta, architecture)
}
