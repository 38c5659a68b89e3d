//! Tools the model may call, and its calls: OpenAI-shaped on every face.
//!
//! A request offers tools as OpenAI does (`{"type": "function", "function": {"name",
//! "description", "parameters"}}`); history carries earlier calls on assistant messages
//! (`tool_calls`, arguments as a JSON object) and their results as `tool` messages. Each family
//! writes them into the prompt the way its own code does (ChatGLM3's OpenAI demo, GLM-4's chat
//! template), and parses the model's calls back without evaluating anything.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A function the model may call.
///
/// Deserializes from OpenAI's `{"type": "function", "function": {...}}` (and from the bare
/// function object); serializes to OpenAI's shape.
///
/// # Examples
///
/// ```
/// let tool: chathub::Tool = serde_json::from_str(
///     r#"{"type": "function", "function": {"name": "get_weather",
///         "description": "Weather of a city",
///         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}"#,
/// )?;
/// assert_eq!(tool.name, "get_weather");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Tool {
    /// The function's name, as the model writes it when calling.
    pub name: String,
    /// The function object as given (`name`, `description`, `parameters`, ... in their order),
    /// which is what the prompt shows the model.
    pub function: Map<String, Value>,
}

impl Tool {
    /// A function tool from its name, description and JSON-schema parameters.
    ///
    /// ```
    /// let tool = chathub::Tool::function(
    ///     "add",
    ///     "Add two integers",
    ///     serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}}),
    /// );
    /// assert_eq!(tool.name, "add");
    /// ```
    pub fn function(name: &str, description: &str, parameters: Value) -> Self {
        let mut function = Map::new();
        function.insert("name".into(), name.into());
        function.insert("description".into(), description.into());
        function.insert("parameters".into(), parameters);
        Tool {
            name: name.to_string(),
            function,
        }
    }

    /// Reads one OpenAI tool object.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when it is not a function tool with a non-empty name.
    pub fn from_json(value: &Value) -> Result<Self> {
        let function = match value.get("type").and_then(Value::as_str) {
            Some("function") => value.get("function"),
            Some(_) => {
                return Err(Error::invalid(
                    "tools",
                    value.get("type").map(Value::to_string).unwrap_or_default(),
                    "only tools of type \"function\" are supported",
                ))
            }
            None => value.get("function").or(Some(value)),
        };
        let Some(Value::Object(function)) = function else {
            return Err(Error::invalid(
                "tools",
                value.to_string(),
                "a tool needs a \"function\" object",
            ));
        };
        let name = match function.get("name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => {
                return Err(Error::invalid(
                    "tools",
                    Value::Object(function.clone()).to_string(),
                    "a function needs a non-empty \"name\"",
                ))
            }
        };
        Ok(Tool {
            name,
            function: function.clone(),
        })
    }

    /// OpenAI's `{"type": "function", "function": {...}}`.
    pub fn to_json(&self) -> Value {
        serde_json::json!({"type": "function", "function": self.function})
    }
}

impl Serialize for Tool {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Tool {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Tool::from_json(&value).map_err(serde::de::Error::custom)
    }
}

/// A call of a tool by the model, in a reply or in history.
///
/// Deserializes from OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`,
/// where `arguments` is a JSON object or a string holding one; serializes to that shape with
/// `arguments` as a string, as OpenAI's API sends it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ToolCall {
    /// The call's id (OpenAI's `call_...`), when it has one.
    pub id: Option<String>,
    /// The function called.
    pub name: String,
    /// Its arguments, in the order written.
    pub arguments: Map<String, Value>,
}

impl ToolCall {
    /// A call of `name` with `arguments`.
    ///
    /// ```
    /// let call = chathub::ToolCall::new("add", serde_json::json!({"a": 2, "b": 40}));
    /// assert_eq!(call.arguments["b"], 40);
    /// ```
    pub fn new(name: &str, arguments: Value) -> Self {
        ToolCall {
            id: None,
            name: name.to_string(),
            arguments: match arguments {
                Value::Object(map) => map,
                _ => Map::new(),
            },
        }
    }

    /// Reads one OpenAI tool call.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`] when the name is missing or the arguments are not a JSON
    /// object (or a string holding one).
    pub fn from_json(value: &Value) -> Result<Self> {
        let function = value.get("function").unwrap_or(value);
        let name = match function.get("name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            _ => {
                return Err(Error::invalid(
                    "tool_calls",
                    value.to_string(),
                    "a tool call needs a function name",
                ))
            }
        };
        let arguments = match function.get("arguments") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(Value::String(text)) if text.trim().is_empty() => Map::new(),
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(map)) => map,
                _ => {
                    return Err(Error::invalid(
                        "tool_calls",
                        text.clone(),
                        "arguments must be a JSON object",
                    ))
                }
            },
            Some(other) => {
                return Err(Error::invalid(
                    "tool_calls",
                    other.to_string(),
                    "arguments must be a JSON object",
                ))
            }
        };
        Ok(ToolCall {
            id: value.get("id").and_then(Value::as_str).map(str::to_string),
            name,
            arguments,
        })
    }

    /// The arguments as JSON text.
    pub fn arguments_json(&self) -> String {
        Value::Object(self.arguments.clone()).to_string()
    }

    /// OpenAI's `{"id", "type": "function", "function": {"name", "arguments": "<json>"}}`.
    pub fn to_json(&self) -> Value {
        let mut call = serde_json::json!({
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json()},
        });
        if let Some(id) = &self.id {
            call["id"] = id.clone().into();
        }
        call
    }
}

impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        ToolCall::from_json(&value).map_err(serde::de::Error::custom)
    }
}
