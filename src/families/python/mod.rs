//! Python's behaviour where the official code's output depends on it: `json.dumps` and
//! `repr` (tools written into prompts), `str.strip` (replies), and literal syntax (ChatGLM3's
//! `tool_call(...)` lines, parsed without evaluating anything).

pub(crate) mod format;
mod ident;
pub(crate) mod literal;
pub(crate) mod strings;
