//! A reply as the official code hands it over: text, a tool call, or a metadata reply.
//!
//! ChatGLM3 and GLM-4 write a metadata line before every reply: empty for an ordinary answer,
//! a tool's name for a call. THUDM's `chat()` splits it off and returns either the answer text or
//! a dict; [`Reply`] is that value.

use serde_json::{Map, Value};

/// A reply as the official `chat()` returns it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Reply {
    /// A plain text answer (official: a `str`).
    Text(String),
    /// A tool call (official: `{"name": ..., "parameters": {...}}`).
    ToolCall {
        /// The function name: the metadata line, stripped.
        name: String,
        /// The keyword arguments (ChatGLM3) or the JSON object (GLM-4), in the order written.
        arguments: Map<String, Value>,
    },
    /// A reply with a metadata line but no tools in the conversation, or a tool call that could not
    /// be parsed (official: `{"name": ..., "content": ...}`).
    Metadata {
        /// The metadata line, stripped.
        name: String,
        /// Everything after the metadata line, not stripped.
        content: String,
    },
}

/// The three shapes of [`Reply`], named as in the fixtures' `chat_response_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplyKind {
    /// [`Reply::Text`]: `"text"`.
    Text,
    /// [`Reply::ToolCall`]: `"tool_call"`.
    ToolCall,
    /// [`Reply::Metadata`]: `"metadata"`.
    Metadata,
}

impl ReplyKind {
    /// `"text"`, `"tool_call"` or `"metadata"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ReplyKind::Text => "text",
            ReplyKind::ToolCall => "tool_call",
            ReplyKind::Metadata => "metadata",
        }
    }
}

impl Reply {
    /// Which of the three shapes this is.
    #[must_use]
    pub const fn kind(&self) -> ReplyKind {
        match self {
            Reply::Text(_) => ReplyKind::Text,
            Reply::ToolCall { .. } => ReplyKind::ToolCall,
            Reply::Metadata { .. } => ReplyKind::Metadata,
        }
    }

    /// The text of a [`Reply::Text`], `None` otherwise.
    #[must_use]
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Reply::Text(t) => Some(t),
            _ => None,
        }
    }

    /// The reply as the official Python value would be written as JSON: a string for text, else
    /// an object with keys `name` then `parameters` (tool call) or `content` (metadata).
    ///
    /// # Examples
    ///
    /// ```
    /// use chathub::Reply;
    /// let r = Reply::Metadata { name: "f".into(), content: "x".into() };
    /// assert_eq!(r.to_official_json().to_string(), r#"{"name":"f","content":"x"}"#);
    /// ```
    #[must_use]
    pub fn to_official_json(&self) -> Value {
        match self {
            Reply::Text(t) => Value::String(t.clone()),
            Reply::ToolCall { name, arguments } => {
                let mut m = Map::new();
                m.insert("name".to_owned(), Value::String(name.clone()));
                m.insert("parameters".to_owned(), Value::Object(arguments.clone()));
                Value::Object(m)
            }
            Reply::Metadata { name, content } => {
                let mut m = Map::new();
                m.insert("name".to_owned(), Value::String(name.clone()));
                m.insert("content".to_owned(), Value::String(content.clone()));
                Value::Object(m)
            }
        }
    }
}

/// Written as the official value is: a string for text, `{"name", "parameters"}` for a tool
/// call, `{"name", "content"}` for a metadata reply (what `chathub generate --json` prints as
/// `response`).
impl serde::Serialize for Reply {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_official_json().serialize(serializer)
    }
}
