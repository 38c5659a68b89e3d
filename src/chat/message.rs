//! OpenAI-style chat messages, the shape history arrives in from every adapter.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::chat::tools::ToolCall;
use crate::error::Error;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the assistant (honoured by ChatGLM3; ChatGLM2 has no place for them).
    System,
    /// The person chatting (the default: who asks a new question).
    #[default]
    User,
    /// The model's earlier replies.
    Assistant,
    /// A tool's result (ChatGLM3/GLM-4's `observation`, OpenAI's `tool`).
    #[serde(alias = "tool")]
    Observation,
}

impl Role {
    /// The role's name as the protocols spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Observation => "observation",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    /// Parses `system`, `user`, `assistant`, `observation` or OpenAI's `tool` (an
    /// observation) (exact, lower-case).
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "system" => Ok(Role::System),
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "observation" | "tool" => Ok(Role::Observation),
            _ => Err(Error::UnknownRole {
                index: 0,
                role: s.to_string(),
            }),
        }
    }
}

/// One chat message.
///
/// # Examples
///
/// ```
/// use chathub::{Message, Role};
/// let m = Message::user("你好");
/// assert_eq!(m.role, Role::User);
/// assert_eq!(Message::new("assistant", "hi")?.role, Role::Assistant);
/// # Ok::<(), chathub::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written (`null` in JSON reads as empty, as OpenAI sends it for a message that
    /// only calls tools).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub content: String,
    /// The tools an assistant message called (OpenAI's `tool_calls`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// Which call a tool result answers (OpenAI's `tool_call_id`; the models do not use it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.unwrap_or_default())
}

impl Message {
    /// A message with a role given as text, as adapters receive it.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownRole`] for anything but `system`, `user`, `assistant`, `observation`.
    pub fn new(role: &str, content: impl Into<String>) -> Result<Self, Error> {
        Ok(Self::with_role(role.parse()?, content))
    }

    pub(crate) fn with_role(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::with_role(Role::System, content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::with_role(Role::User, content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::with_role(Role::Assistant, content)
    }

    /// An assistant message that calls tools (its `content` is any text written before the
    /// calls, often empty).
    ///
    /// ```
    /// use chathub::{Message, ToolCall};
    /// let m = Message::assistant_tool_calls("", vec![ToolCall::new("add", serde_json::json!({"a": 1}))]);
    /// assert_eq!(m.tool_calls[0].name, "add");
    /// ```
    pub fn assistant_tool_calls(content: impl Into<String>, tool_calls: Vec<ToolCall>) -> Self {
        Message {
            tool_calls,
            ..Self::with_role(Role::Assistant, content)
        }
    }

    /// A tool's result, answering the call with id `tool_call_id` (OpenAI's `tool` message; an
    /// `observation` for the models).
    pub fn tool_result(content: impl Into<String>, tool_call_id: Option<String>) -> Self {
        Message {
            tool_call_id,
            ..Self::with_role(Role::Observation, content)
        }
    }

    /// An `observation` (tool result) message.
    pub fn observation(content: impl Into<String>) -> Self {
        Self::with_role(Role::Observation, content)
    }
}

/// Parses `(role, content)` pairs as adapters receive them, naming the position of a bad role.
///
/// # Errors
///
/// [`Error::UnknownRole`] with the index of the first message whose role is unknown.
pub fn parse_history<'a, I>(pairs: I) -> Result<Vec<Message>, Error>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    pairs
        .into_iter()
        .enumerate()
        .map(|(index, (role, content))| match role.parse() {
            Ok(role) => Ok(Message::with_role(role, content)),
            Err(_) => Err(Error::UnknownRole {
                index,
                role: role.to_string(),
            }),
        })
        .collect()
}

/// Converts role messages into ChatGLM2's `(query, response)` tuples.
///
/// This is the product's rule (the article's `messages_to_tuple_history`): messages before the
/// first `user` are skipped; consecutive `user` contents are joined with `"\n\n"`; an
/// `assistant` message appends its content (joined with `"\n\n"` if the reply already has some),
/// closes the turn and appends the tuple; a turn that never gets a reply is dropped; other roles
/// inside a turn are ignored.
///
/// # Examples
///
/// ```
/// use chathub::{messages_to_tuple_history, Message};
/// let history = [
///     Message::system("be brief"),
///     Message::user("q1"),
///     Message::user("q1b"),
///     Message::assistant("r1"),
///     Message::user("unanswered"),
/// ];
/// assert_eq!(
///     messages_to_tuple_history(&history),
///     vec![("q1\n\nq1b".to_string(), "r1".to_string())]
/// );
/// ```
pub fn messages_to_tuple_history(messages: &[Message]) -> Vec<(String, String)> {
    fn join(into: &mut String, content: &str) {
        if !into.is_empty() {
            into.push_str("\n\n");
        }
        into.push_str(content);
    }
    let mut tuples = Vec::new();
    let (mut query, mut response) = (String::new(), String::new());
    let mut in_turn = false;
    for message in messages {
        in_turn |= message.role == Role::User;
        if !in_turn {
            continue;
        }
        match message.role {
            Role::User => join(&mut query, &message.content),
            Role::Assistant => {
                join(&mut response, &message.content);
                tuples.push((std::mem::take(&mut query), std::mem::take(&mut response)));
                in_turn = false;
            }
            Role::System | Role::Observation => {}
        }
    }
    tuples
}
