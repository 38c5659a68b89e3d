//! Rendering a model's own Jinja chat template the way Hugging Face transformers does.
//!
//! A checkpoint's `tokenizer_config.json` (or `chat_template.jinja`) carries the Jinja template
//! that turns a message list into prompt text. To feed a model exactly the bytes it was trained
//! on, [`ChatTemplate`] reproduces transformers (>= 4.42) `apply_chat_template(messages,
//! tools=..., add_generation_prompt=..., tokenize=False)`:
//!
//! * environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the
//!   `loopcontrols` extension (`{% break %}`, `{% continue %}`), no autoescaping, lenient
//!   undefined (an undefined value prints as `""`, `is defined` works, attribute access on an
//!   undefined value is an error);
//! * Python `str`/`dict`/`list` methods (`.get`, `.strip`, `.startswith`, `.items`, ...) through
//!   `minijinja_contrib::pycompat`;
//! * transformers' globals `raise_exception(msg)` (aborts with [`TemplateError::Raised`]) and
//!   `strftime_now(fmt)`, and its `tojson(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)` filter, which is Python's `json.dumps` (see [`crate::families::python::format`]), not Jinja2's
//!   HTML-escaping, key-sorting one;
//! * printed values look like Python's `str()`: `None`, `True`, `1e+16`, `['a', 1]`,
//!   `{'k': 'v'}` (same for the `string` filter);
//! * `{% generation %}` blocks (transformers' assistant-mask extension) render their body;
//! * variables: `messages`, `tools` (`None` when not given), `documents` (`None`),
//!   `add_generation_prompt`, the tokenizer's special tokens (`bos_token`, `eos_token`, ...,
//!   `additional_special_tokens`) and caller keyword arguments (`enable_thinking`, ...).
//!
//! JSON objects keep their insertion order everywhere (serde_json `preserve_order` and
//! minijinja `preserve_order`), as Python dicts do. Rendering is bounded by a fuel budget
//! (`ChatTemplate::DEFAULT_FUEL`) and minijinja's recursion limit, so a hostile template cannot
//! loop or allocate without bound.
//!
//! Known differences from Jinja2 that remain: Python's `'%s' % x` string formatting is not
//! supported (a render error; `'{}'.format(x)` works); `~` concatenation prints floats with
//! minijinja's rules (`1e16` -> `10000000000000000.0`, Python `1e+16`); `strftime_now` uses UTC,
//! not the local time zone.

use std::borrow::Cow;
use std::fmt::Write as _;
#[cfg(test)]
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::time::SystemTime;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, Output, State, UndefinedBehavior};
use serde_json::{Map, Value};

use crate::families::python::format::{self, DumpStyle};

/// Name under which the template source is stored in the environment (shows up in errors).
const TEMPLATE_NAME: &str = "chat_template";

/// Context variables that `apply_chat_template` sets itself; keyword arguments must not reuse
/// them (Python raises `TypeError: got multiple values for keyword argument`).
const RESERVED_VARIABLES: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

/// The special-token attributes transformers puts into the template context
/// (`SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES`), besides `additional_special_tokens`.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A model file could not be read.
    #[cfg(test)]
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A model file is not valid JSON.
    #[cfg(test)]
    #[error("invalid JSON in {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: serde_json::Error,
    },
    /// The model defines no (usable) chat template.
    #[error("no chat template: {0}")]
    Missing(String),
    /// The template source does not compile (Jinja syntax error).
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`, typically to reject a conversation
    /// shape it does not support (roles out of order, unsupported role, ...).
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// Rendering used up its fuel or hit the recursion limit.
    #[error("chat template exceeded its resource limit: {0}")]
    LimitExceeded(String),
    /// Any other error while rendering (unknown filter, invalid operation, bad argument...).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// The caller's inputs cannot be passed to the template.
    #[error("invalid chat template input: {0}")]
    InvalidInput(String),
}

/// Marker attached to the minijinja error made by `raise_exception`, so that rendering can
/// report [`TemplateError::Raised`] with the template's own message.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// A compiled chat template plus the special tokens passed to it.
///
/// Cheap to share: rendering takes `&self` and the type is `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Map<String, Value>,
    fixed_now: Option<SystemTime>,
}

impl ChatTemplate {
    /// Default fuel budget for one render. minijinja charges about one unit per instruction and
    /// per 64 bytes allocated; the GLM-4 templates use ~50 units per message plus one per 64
    /// bytes of text (2000 messages of 2 KB: ~160k), so this leaves >10x headroom over any
    /// real context while capping a hostile template at roughly 128 MB and well under a second.
    pub const DEFAULT_FUEL: u64 = 2_000_000;

    /// Compiles a template source with no special tokens.
    ///
    /// Fails with [`TemplateError::Syntax`] if the source is not valid Jinja.
    pub fn new(source: impl Into<String>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| TemplateError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_formatter(python_formatter);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(Self::DEFAULT_FUEL));
        env.add_filter("tojson", tojson);
        env.add_filter("string", |value: &minijinja::Value| -> String {
            let mut out = String::new();
            write_python_str(&mut out, value);
            out
        });
        env.add_function("raise_exception", raise_exception);
        let mut template = Self {
            env,
            special_tokens: Map::new(),
            fixed_now: None,
        };
        template.register_clock();
        let source = rewrite_generation_tags(&source.into());
        template
            .env
            .add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| TemplateError::Syntax(describe(&e)))?;
        Ok(template)
    }

    #[cfg(test)]
    /// Builds the template described by a parsed `tokenizer_config.json`: its `chat_template`
    /// and its special tokens ([`special_tokens_from_config`]).
    ///
    /// `chat_template` may be a string or a list of `{"name", "template"}`; then `name` picks
    /// one (`None` means `"default"`). transformers picks `"tool_use"` when tools are given and
    /// such a template exists; callers wanting that pass `Some("tool_use")`.
    pub fn from_tokenizer_config(
        config: &Value,
        name: Option<&str>,
    ) -> Result<Self, TemplateError> {
        let source = select_template(config.get("chat_template"), name)?;
        let mut template = Self::new(source)?;
        template.special_tokens = special_tokens_from_config(config);
        Ok(template)
    }

    /// The chat template of a model as transformers loads it: `jinja` (the contents of
    /// `chat_template.jinja`) when the model has that file (it overrides the config), otherwise
    /// the default `chat_template` of `tokenizer_config.json` (`config`); special tokens from
    /// `config`, completed by `special_tokens_map` (`special_tokens_map.json`).
    pub fn from_parts(
        config: &Value,
        jinja: Option<String>,
        special_tokens_map: Option<&Value>,
    ) -> Result<Self, TemplateError> {
        let mut template = match jinja {
            Some(source) => Self::new(source)?,
            None if config.get("chat_template").is_some() => {
                Self::new(select_template(config.get("chat_template"), None)?)?
            }
            None => {
                return Err(TemplateError::Missing(
                    "neither chat_template.jinja nor a chat_template in tokenizer_config.json"
                        .into(),
                ))
            }
        };
        let mut tokens = special_tokens_from_config(config);
        if let Some(map) = special_tokens_map {
            for (key, value) in special_tokens_from_config(map) {
                tokens.entry(key).or_insert(value);
            }
        }
        template.special_tokens = tokens;
        Ok(template)
    }

    /// [`ChatTemplate::from_parts`] over the files of a model directory.
    #[cfg(test)]
    pub fn from_model_dir(dir: &Path) -> Result<Self, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Object(Map::new())
        };
        let jinja_path = dir.join("chat_template.jinja");
        let jinja = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| TemplateError::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        let map_path = dir.join("special_tokens_map.json");
        let map = if map_path.is_file() {
            Some(read_json(&map_path)?)
        } else {
            None
        };
        Self::from_parts(&config, jinja, map.as_ref())
    }

    #[cfg(test)]
    /// The special tokens passed to every render (name -> string, or list of strings for
    /// `additional_special_tokens`).
    pub fn special_tokens(&self) -> &Map<String, Value> {
        &self.special_tokens
    }

    #[cfg(test)]
    /// Fixes the time `strftime_now` formats (`None`: the current time), so that templates
    /// that print today's date render reproducibly.
    pub fn set_clock(&mut self, now: Option<SystemTime>) {
        self.fixed_now = now;
        self.register_clock();
    }

    fn register_clock(&mut self) {
        let fixed = self.fixed_now;
        self.env.add_function("strftime_now", move |format: &str| {
            let now = fixed.unwrap_or_else(SystemTime::now);
            let secs = match now.duration_since(SystemTime::UNIX_EPOCH) {
                Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
            };
            strftime_utc(format, secs)
        });
    }

    /// Renders `messages` like `apply_chat_template(messages, tools=tools,
    /// add_generation_prompt=add_generation_prompt, tokenize=False)`.
    ///
    /// `messages` and `tools` are passed as given (objects in insertion order); `tools: None`
    /// is Python's `None`, so `{% if tools %}` is false but `tools is defined` is true.
    pub fn render(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        self.render_with_kwargs(messages, tools, add_generation_prompt, &Map::new())
    }

    /// Like [`render`](Self::render), plus extra template variables (transformers'
    /// `**kwargs`, e.g. `enable_thinking`), which override special tokens of the same name.
    pub fn render_with_kwargs(
        &self,
        messages: &[Value],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        kwargs: &Map<String, Value>,
    ) -> Result<String, TemplateError> {
        if let Some(key) = kwargs
            .keys()
            .find(|k| RESERVED_VARIABLES.contains(&k.as_str()))
        {
            return Err(TemplateError::InvalidInput(format!(
                "keyword argument `{key}` clashes with a variable apply_chat_template sets"
            )));
        }
        let mut ctx = self.special_tokens.clone();
        for (key, value) in kwargs {
            ctx.insert(key.clone(), value.clone());
        }
        ctx.insert("messages".into(), Value::Array(messages.to_vec()));
        ctx.insert(
            "tools".into(),
            tools.map_or(Value::Null, |t| Value::Array(t.to_vec())),
        );
        ctx.insert("documents".into(), Value::Null);
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| TemplateError::Render(describe(&e)))?;
        template
            .render(minijinja::value::Serde(&ctx))
            .map_err(|e| classify(&e))
    }
}

/// Extracts the special tokens transformers passes to chat templates from a parsed
/// `tokenizer_config.json` (or `special_tokens_map.json`).
///
/// Takes `bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
/// `mask_token` (a string or an `AddedToken` object's `content`), `additional_special_tokens`
/// (list of strings) and the named entries of an `extra_special_tokens` object. Missing or
/// `null` entries are left out, so the template sees them as undefined.
pub fn special_tokens_from_config(config: &Value) -> Map<String, Value> {
    fn token_text(v: &Value) -> Option<&str> {
        match v {
            Value::String(s) => Some(s),
            Value::Object(o) => o.get("content").and_then(Value::as_str),
            _ => None,
        }
    }
    let mut out = Map::new();
    for key in SPECIAL_TOKEN_KEYS {
        if let Some(text) = config.get(key).and_then(token_text) {
            out.insert(key.to_owned(), Value::String(text.to_owned()));
        }
    }
    if let Some(list) = config
        .get("additional_special_tokens")
        .and_then(Value::as_array)
    {
        let texts = list
            .iter()
            .filter_map(token_text)
            .map(|s| Value::String(s.to_owned()))
            .collect();
        out.insert("additional_special_tokens".into(), Value::Array(texts));
    }
    if let Some(extra) = config
        .get("extra_special_tokens")
        .and_then(Value::as_object)
    {
        for (key, value) in extra {
            if let Some(text) = token_text(value) {
                out.entry(key.clone())
                    .or_insert_with(|| Value::String(text.to_owned()));
            }
        }
    }
    out
}

#[cfg(test)]
fn read_json(path: &Path) -> Result<Value, TemplateError> {
    let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TemplateError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Picks the template source out of a `chat_template` config entry.
fn select_template(entry: Option<&Value>, name: Option<&str>) -> Result<String, TemplateError> {
    match entry {
        Some(Value::String(s)) => match name {
            None | Some("default") => Ok(s.clone()),
            Some(other) => Err(TemplateError::Missing(format!(
                "only a default template exists, not `{other}`"
            ))),
        },
        Some(Value::Array(list)) => {
            let wanted = name.unwrap_or("default");
            list.iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some(wanted))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned)
                .ok_or_else(|| {
                    let names: Vec<&str> = list
                        .iter()
                        .filter_map(|t| t.get("name").and_then(Value::as_str))
                        .collect();
                    TemplateError::Missing(format!("no template named `{wanted}` (have {names:?})"))
                })
        }
        Some(other) => Err(TemplateError::Missing(format!(
            "chat_template is neither a string nor a list but {other}"
        ))),
        None => Err(TemplateError::Missing(
            "tokenizer config has no chat_template".into(),
        )),
    }
}

/// Turns transformers' `{% generation %}` / `{% endgeneration %}` (from its `AssistantTracker`
/// extension, which minijinja does not know) into `{% if true %}` / `{% endif %}`, keeping the
/// whitespace-control markers so trimming stays the same.
fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        match parse_generation_tag(tag) {
            Some((len, left, is_end, right)) => {
                out.push_str("{%");
                out.push_str(left);
                out.push_str(if is_end { " endif " } else { " if true " });
                out.push_str(right);
                out.push_str("%}");
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// If `tag` starts with a `generation`/`endgeneration` block tag, returns its length, its left
/// and right whitespace-control markers and whether it is the end tag.
fn parse_generation_tag(tag: &str) -> Option<(usize, &str, bool, &str)> {
    let body = tag.strip_prefix("{%")?;
    let left = if body.starts_with(['-', '+']) {
        &body[..1]
    } else {
        ""
    };
    let after_left = &body[left.len()..];
    let trimmed = after_left.trim_start();
    let (is_end, after_word) = if let Some(r) = trimmed.strip_prefix("endgeneration") {
        (true, r)
    } else if let Some(r) = trimmed.strip_prefix("generation") {
        (false, r)
    } else {
        return None;
    };
    let after_ws = after_word.trim_start();
    if after_ws.len() == after_word.len() && !after_word.starts_with(['-', '+', '%']) {
        return None; // e.g. `{% generation_foo %}`
    }
    let right = if after_ws.starts_with(['-', '+']) {
        &after_ws[..1]
    } else {
        ""
    };
    let after_right = after_ws[right.len()..].strip_prefix("%}")?;
    Some((tag.len() - after_right.len(), left, is_end, right))
}

/// Describes a minijinja error with its location.
fn describe(err: &minijinja::Error) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        let _ = write!(msg, ": {inner}");
        source = inner.source();
    }
    msg
}

/// Maps a render error to the matching [`TemplateError`] variant.
fn classify(err: &minijinja::Error) -> TemplateError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(inner) = source {
        if let Some(raised) = inner.downcast_ref::<RaisedException>() {
            return TemplateError::Raised(raised.0.clone());
        }
        source = inner.source();
    }
    match err.kind() {
        ErrorKind::OutOfFuel => TemplateError::LimitExceeded(describe(err)),
        ErrorKind::InvalidOperation if err.detail() == Some("recursion limit exceeded") => {
            TemplateError::LimitExceeded(describe(err))
        }
        ErrorKind::SyntaxError => TemplateError::Syntax(describe(err)),
        _ => TemplateError::Render(describe(err)),
    }
}

/// transformers' `raise_exception` global.
fn raise_exception(message: &minijinja::Value) -> Result<minijinja::Value, minijinja::Error> {
    let mut text = String::new();
    write_python_str(&mut text, message);
    Err(
        minijinja::Error::new(ErrorKind::InvalidOperation, text.clone())
            .with_source(RaisedException(text)),
    )
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` filter: Python's `json.dumps` with those arguments (positional or
/// keyword).
fn tojson(
    value: &minijinja::Value,
    args: &[minijinja::Value],
    kwargs: Kwargs,
) -> Result<String, minijinja::Error> {
    const PARAMS: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > PARAMS.len() {
        return Err(minijinja::Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let mut params: [Option<minijinja::Value>; 4] = Default::default();
    for (slot, arg) in params.iter_mut().zip(args) {
        *slot = Some(arg.clone());
    }
    for (slot, name) in params.iter_mut().zip(PARAMS) {
        if let Some(v) = kwargs.get::<Option<minijinja::Value>>(name)? {
            *slot = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = params;
    let is_set = |v: &Option<minijinja::Value>| v.as_ref().is_some_and(|v| !v.is_none());
    let ensure_ascii = ensure_ascii.is_some_and(|v| v.is_true());
    let sort_keys = sort_keys.is_some_and(|v| v.is_true());
    let indent: Option<Cow<'_, str>> = match indent.as_ref().filter(|v| !v.is_none()) {
        None => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            Cow::Owned(s.to_owned())
        } else if let Some(n) = v.as_i64() {
            Cow::Owned(" ".repeat(usize::try_from(n).unwrap_or(0).min(1024)))
        } else {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: indent must be an integer or a string, not {}",
                    v.kind()
                ),
            ));
        }),
    };
    let (item_sep, key_sep) = if is_set(&separators) {
        let seps: Vec<String> = separators
            .iter()
            .flat_map(|v| v.try_iter().into_iter().flatten())
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        match <[String; 2]>::try_from(seps) {
            Ok([item, key]) => (Cow::Owned(item), Cow::Owned(key)),
            Err(_) => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ))
            }
        }
    } else if indent.is_some() {
        (Cow::Borrowed(","), Cow::Borrowed(": "))
    } else {
        (Cow::Borrowed(", "), Cow::Borrowed(": "))
    };
    let json = to_json(value)?;
    let style = DumpStyle {
        indent: indent.as_deref(),
        ensure_ascii,
        sort_keys,
        item_sep: &item_sep,
        key_sep: &key_sep,
    };
    let mut out = String::new();
    style.write_value(&mut out, &json, 0);
    Ok(out)
}

/// Converts a template value into JSON the way Python's `json` module sees the object
/// (map keys become strings; undefined values and other objects are not serializable).
fn to_json(value: &minijinja::Value) -> Result<Value, minijinja::Error> {
    let not_serializable = |what: &str| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: object of type {what} is not JSON serializable"),
        )
    };
    Ok(match value.kind() {
        ValueKind::Undefined => return Err(not_serializable("Undefined")),
        ValueKind::None => Value::Null,
        ValueKind::Bool => Value::Bool(value.is_true()),
        ValueKind::Number => {
            // `as_i64` also accepts integral floats (1.0), which Python prints as floats.
            if !value.is_integer() {
                let f = f64::try_from(value.clone())?;
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| not_serializable("non-finite float"))?
            } else if let Some(i) = value.as_i64() {
                Value::from(i)
            } else if let Ok(u) = u64::try_from(value.clone()) {
                Value::from(u)
            } else {
                // Python ints are unbounded; serde_json's are 64-bit.
                return Err(not_serializable("int beyond 64 bits"));
            }
        }
        ValueKind::String => Value::String(value.as_str().unwrap_or_default().to_owned()),
        ValueKind::Seq | ValueKind::Iterable => Value::Array(
            value
                .try_iter()?
                .map(|item| to_json(&item))
                .collect::<Result<_, _>>()?,
        ),
        ValueKind::Map => {
            let mut map = Map::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_owned(),
                    ValueKind::None => "null".to_owned(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_owned(),
                    ValueKind::Number => {
                        let mut s = String::new();
                        write_python_str(&mut s, &key);
                        s
                    }
                    other => return Err(not_serializable(&format!("{other} (as key)"))),
                };
                map.insert(key, to_json(&item)?);
            }
            Value::Object(map)
        }
        other => return Err(not_serializable(&other.to_string())),
    })
}

/// Output formatter: prints values as Python's `str()` would (no autoescaping).
fn python_formatter(
    out: &mut Output,
    _state: &mut State,
    value: &minijinja::Value,
) -> Result<(), minijinja::Error> {
    if let Some(s) = value.as_str() {
        return out.write_str(s).map_err(minijinja::Error::from);
    }
    let mut text = String::new();
    write_python_str(&mut text, value);
    out.write_str(&text).map_err(minijinja::Error::from)
}

/// Appends Python's `str(value)`: strings verbatim, everything else as `repr`.
fn write_python_str(out: &mut String, value: &minijinja::Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(value.as_str().unwrap_or_default()),
        _ => write_python_repr(out, value),
    }
}

/// Appends Python's `repr(value)` for a template value.
fn write_python_repr(out: &mut String, value: &minijinja::Value) {
    match value.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) => out.push_str(&format::python_float_repr(f)),
            Err(_) => {
                let _ = write!(out, "{value}");
            }
        },
        ValueKind::String => {
            out.push_str(&format::python_str_repr(value.as_str().unwrap_or_default()))
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let tuple = value.is_tuple();
            out.push(if tuple { '(' } else { '[' });
            let mut count = 0;
            if let Ok(iter) = value.try_iter() {
                for item in iter {
                    if count > 0 {
                        out.push_str(", ");
                    }
                    write_python_repr(out, &item);
                    count += 1;
                }
            }
            if tuple && count == 1 {
                out.push(',');
            }
            out.push(if tuple { ')' } else { ']' });
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = value.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write_python_repr(out, &key);
                    out.push_str(": ");
                    if let Ok(item) = value.get_item(&key) {
                        write_python_repr(out, &item);
                    }
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
}

/// Formats a Unix time (UTC) with C `strftime` directives, as Python's
/// `datetime.now().strftime(format)` does on Linux for the common directives: `%Y %y %m %d %e
/// %H %I %M %S %p %j %a %A %b %h %B %F %T %D %Z %z %%`, plus glibc's `%-d` style (no padding).
/// Other directives are copied verbatim.
fn strftime_utc(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        secs_of_day / 3600,
        (secs_of_day / 60) % 60,
        secs_of_day % 60,
    );
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = DAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.next_if_eq(&'-').is_some();
        let Some(spec) = chars.next() else {
            out.push('%');
            if no_pad {
                out.push('-');
            }
            break;
        };
        let num = |out: &mut String, n: i64, width: usize, pad: char| {
            let s = n.to_string();
            if !no_pad {
                for _ in s.len()..width {
                    out.push(pad);
                }
            }
            out.push_str(&s);
        };
        match spec {
            'Y' => num(&mut out, year, 0, '0'),
            'y' => num(&mut out, year.rem_euclid(100), 2, '0'),
            'm' => num(&mut out, month, 2, '0'),
            'd' => num(&mut out, day, 2, '0'),
            'e' => num(&mut out, day, 2, ' '),
            'H' => num(&mut out, hour, 2, '0'),
            'I' => num(&mut out, hour12, 2, '0'),
            'M' => num(&mut out, minute, 2, '0'),
            'S' => num(&mut out, second, 2, '0'),
            'j' => num(&mut out, day_of_year, 3, '0'),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'a' => out.push_str(&day_name[..3]),
            'A' => out.push_str(day_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'B' => out.push_str(month_name),
            'F' => {
                let _ = write!(out, "{year:04}-{month:02}-{day:02}");
            }
            'T' => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            'D' => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            'Z' => out.push_str("UTC"),
            'z' => out.push_str("+0000"),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Day count since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/python")
    }

    fn model_dir(layout: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/glm4/glm4-{layout}-tiny"))
    }

    fn render_str(source: &str, ctx: Value) -> Result<String, TemplateError> {
        let t = ChatTemplate::new(source)?;
        let kwargs = ctx.as_object().cloned().unwrap_or_default();
        t.render_with_kwargs(&[], None, false, &kwargs)
    }

    /// The 12 chat cases and 3 tools cases of shared/fixtures/glm4 (transformers >= 4.42
    /// rendering), byte for byte.
    #[test]
    fn glm4_fixture_prompts_match() {
        let path = data_dir().join("glm4_cases.json");
        let cases: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).expect("glm4_cases.json readable"),
        )
        .expect("glm4_cases.json parses");
        let cases = cases.as_array().expect("list of cases");
        assert_eq!(cases.len(), 15);
        for case in cases {
            let id = case["id"].as_str().expect("id");
            let layout = case["layout"].as_str().expect("layout");
            let template = ChatTemplate::from_model_dir(&model_dir(layout))
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            let messages = case["messages"].as_array().expect("messages");
            let tools = case
                .get("tools")
                .and_then(Value::as_array)
                .map(Vec::as_slice);
            let got = template
                .render(messages, tools, true)
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(got, case["expected"].as_str().expect("expected"), "{id}");
        }
    }

    #[test]
    fn special_tokens_come_from_the_config() {
        let t = ChatTemplate::from_model_dir(&model_dir("chat")).expect("loads");
        assert_eq!(t.special_tokens()["eos_token"], "<|endoftext|>");
        assert_eq!(t.special_tokens()["pad_token"], "<|endoftext|>");
        assert_eq!(
            t.special_tokens()["additional_special_tokens"][2],
            "[gMASK]"
        );
        assert!(t.special_tokens().get("bos_token").is_none());
        let cfg = json!({
            "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ img }}",
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "unk_token": null,
            "extra_special_tokens": {"img": "<image>"},
        });
        let t = ChatTemplate::from_tokenizer_config(&cfg, None).expect("compiles");
        assert_eq!(
            t.render(&[], None, false).expect("renders"),
            "<s>|</s>||<image>"
        );
    }

    #[test]
    fn named_templates_are_selected() {
        let cfg = json!({"chat_template": [
            {"name": "default", "template": "D"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ]});
        let d = ChatTemplate::from_tokenizer_config(&cfg, None).expect("default");
        assert_eq!(d.render(&[], None, true).expect("renders"), "D");
        let t = ChatTemplate::from_tokenizer_config(&cfg, Some("tool_use")).expect("tool_use");
        assert_eq!(
            t.render(&[], Some(&[json!({})]), true).expect("renders"),
            "T1"
        );
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&cfg, Some("rag")),
            Err(TemplateError::Missing(_))
        ));
        assert!(matches!(
            ChatTemplate::from_tokenizer_config(&json!({}), None),
            Err(TemplateError::Missing(_))
        ));
    }

    /// Key order survives serde_json -> minijinja -> tojson, for messages and tools alike.
    #[test]
    fn insertion_order_is_kept() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m | tojson }}|{% for k, v in m.items() %}{{ k }},{% endfor %}|{{ m }}{% endfor %}",
        )
        .expect("compiles");
        let msg: Value =
            serde_json::from_str(r#"{"zeta": 1, "alpha": {"y": [1.0, 2], "b": null}, "mid": "é"}"#)
                .expect("json");
        let got = t.render(&[msg], None, false).expect("renders");
        assert_eq!(
            got,
            r#"{"zeta": 1, "alpha": {"y": [1.0, 2], "b": null}, "mid": "é"}|zeta,alpha,mid,|{'zeta': 1, 'alpha': {'y': [1.0, 2], 'b': None}, 'mid': 'é'}"#
        );
    }

    /// Snippets rendered by real Jinja2 in transformers' environment
    /// (tests/data/gen_template_cases.py): Python methods, printing, loop controls, macros,
    /// `{% generation %}`, whitespace control, filters, tojson, real-template idioms, errors.
    #[test]
    fn matches_jinja2_reference_table() {
        let path = data_dir().join("template_cases.json");
        let table: Value = serde_json::from_str(
            &std::fs::read_to_string(&path).expect("template_cases.json readable"),
        )
        .expect("template_cases.json parses");
        let cases = table["cases"].as_array().expect("cases");
        assert!(cases.len() > 40, "{}", cases.len());
        let mut failures = Vec::new();
        for case in cases {
            let src = case["template"].as_str().expect("template");
            let result = ChatTemplate::new(src).and_then(|t| {
                t.render_with_kwargs(
                    case["messages"].as_array().expect("messages"),
                    case["tools"].as_array().map(Vec::as_slice),
                    case["add_generation_prompt"].as_bool().expect("flag"),
                    case["kwargs"].as_object().expect("kwargs"),
                )
            });
            let ok = match (&result, case.get("expected"), case["error"].as_str()) {
                (Ok(got), Some(want), _) => got == want,
                (Err(TemplateError::Raised(msg)), None, Some(err)) => {
                    err.strip_prefix("raise: ") == Some(msg.as_str())
                }
                (Err(TemplateError::Render(_)), None, Some(err)) => !err.starts_with("raise: "),
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{src}\n  got  {result:?}\n  want {:?}",
                    case.get("expected").unwrap_or(&case["error"])
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn errors_are_values_not_panics() {
        match ChatTemplate::new("{% for x in %}") {
            Err(TemplateError::Syntax(msg)) => assert!(msg.contains("syntax error"), "{msg}"),
            other => panic!("expected a syntax error, got {other:?}"),
        }
        assert!(matches!(
            ChatTemplate::new("{% if x %}"),
            Err(TemplateError::Syntax(_))
        ));
        let raised = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok",
        )
        .expect("compiles");
        match raised.render(&[json!({"role": "assistant", "content": "x"})], None, true) {
            Err(TemplateError::Raised(msg)) => assert_eq!(
                msg,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(
            raised
                .render(&[json!({"role": "user", "content": "x"})], None, true)
                .expect("renders"),
            "ok"
        );
        let unknown = ChatTemplate::new("{{ 'a' | no_such_filter }}");
        let err = match unknown {
            Err(e) => e,
            Ok(t) => t.render(&[], None, true).expect_err("unknown filter fails"),
        };
        assert!(err.to_string().contains("no_such_filter"), "{err}");
        assert!(matches!(
            render_str("{{ messages }}", json!({})).map(|_| ()),
            Ok(())
        ));
        let clash = ChatTemplate::new("x").expect("compiles");
        let mut kwargs = Map::new();
        kwargs.insert("messages".into(), json!([]));
        assert!(matches!(
            clash.render_with_kwargs(&[], None, true, &kwargs),
            Err(TemplateError::InvalidInput(_))
        ));
    }

    #[test]
    fn hostile_templates_are_bounded() {
        for src in [
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "{{ 'x' * 1000000000000 }}",
            "{% set ns = namespace(s='ab') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        ] {
            let t = ChatTemplate::new(src).expect("compiles");
            match t.render(&[], None, true) {
                Err(TemplateError::LimitExceeded(_) | TemplateError::Render(_)) => {}
                other => panic!("{src}: expected a limit error, got {other:?}"),
            }
        }
    }

    /// A large but legitimate conversation (about 4 MB of text) fits the default fuel.
    #[test]
    fn default_fuel_fits_long_conversations() {
        let t = ChatTemplate::from_model_dir(&model_dir("0414")).expect("loads");
        let long = "长文本 long text ".repeat(100);
        let messages: Vec<Value> = (0..2000)
            .map(
                |i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": long}),
            )
            .collect();
        let out = t.render(&messages, None, true).expect("renders");
        assert!(out.len() > 2000 * long.len());
    }

    #[test]
    fn strftime_now_is_controllable() {
        let mut t = ChatTemplate::new(
            "{{ strftime_now('%d %b %Y') }}|{{ strftime_now('%-d %B %Y %H:%M:%S %a %A %j %p %I %y %F %%') }}",
        )
        .expect("compiles");
        // 2024-07-26 13:05:09 UTC, a Friday, day 208.
        t.set_clock(Some(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_722_000_309),
        ));
        assert_eq!(
            t.render(&[], None, true).expect("renders"),
            "26 Jul 2024|26 July 2024 13:25:09 Fri Friday 208 PM 01 24 2024-07-26 %"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %e", 0), "1970-01-01  1");
        assert_eq!(strftime_utc("%F %T", 951_782_400), "2000-02-29 00:00:00");
        assert_eq!(strftime_utc("%F", -86_400), "1969-12-31");
        t.set_clock(None);
        assert!(t.render(&[], None, true).is_ok());
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
