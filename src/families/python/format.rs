//! Python-compatible text formatting of JSON values.
//!
//! Prompt formats of ChatGLM-family models were defined by Python code, so the exact bytes a
//! model was trained on come from Python's formatting rules rather than from serde_json's:
//!
//! * [`json_dumps`] reproduces `json.dumps(value, indent=..., ensure_ascii=..., sort_keys=...,
//!   separators=...)`. ChatGLM3 renders tools as `content + "\n" + json.dumps(tools, indent=4,
//!   ensure_ascii=False)`, and transformers' chat-template `tojson` filter is `json.dumps` too
//!   (see [`crate::families::template`]).
//! * `python_repr` reproduces `repr(json.loads(text))`: Python literals with Python's quoting
//!   and escaping of strings, `True`/`False`/`None`, and floats as `repr(float)` prints them.
//! * [`python_tool_call`] writes a past tool call the way ChatGLM3 puts it back into a prompt:
//!   ```` ```python\ntool_call(a=2, b='x')\n``` ````.
//!
//! Objects are written in the map's iteration order, which is insertion order when serde_json's
//! `preserve_order` feature is on (as Python dicts keep it). Integers are written exactly; a
//! JSON number that serde_json stored as a float (it has a fraction or exponent, or does not fit
//! in 64 bits) is written as Python's `repr(float)` (`1.0`, `1e+16`, `1.5e-07`).

mod unicode;

use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

/// Options of [`json_dumps`], mirroring the keyword arguments of Python's `json.dumps`.
///
/// [`Default`] gives Python's defaults: no indent, `ensure_ascii=True`, `sort_keys=False`,
/// default separators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonDumpsOptions {
    /// `indent`: `None` writes everything on one line; `Some(n)` puts every item on its own
    /// line indented by `n` spaces per level (`Some(0)` still breaks lines, as in Python).
    pub indent: Option<usize>,
    /// `ensure_ascii`: write every non-ASCII character as `\uXXXX` (surrogate pairs above
    /// U+FFFF) instead of verbatim.
    pub ensure_ascii: bool,
    /// `sort_keys`: write object members sorted by key (code point order) instead of in the
    /// map's order.
    pub sort_keys: bool,
    /// `separators`: `(item_separator, key_separator)`. `None` means Python's default, `(", ",
    /// ": ")` without indent and `(",", ": ")` with indent.
    pub separators: Option<(String, String)>,
}

impl Default for JsonDumpsOptions {
    fn default() -> Self {
        Self {
            indent: None,
            ensure_ascii: true,
            sort_keys: false,
            separators: None,
        }
    }
}

/// Formats `value` exactly as Python's `json.dumps(json.loads(text), **opts)` would.
///
/// This is how tool schemas and arguments reach ChatGLM3/GLM-4 prompts: any byte that differs
/// from Python's output changes the token ids the model sees.
pub fn json_dumps(value: &Value, opts: &JsonDumpsOptions) -> String {
    let indent = opts.indent.map(|n| " ".repeat(n));
    let (item_sep, key_sep) = match (&opts.separators, indent.is_some()) {
        (Some((item, key)), _) => (item.as_str(), key.as_str()),
        (None, false) => (", ", ": "),
        (None, true) => (",", ": "),
    };
    let style = DumpStyle {
        indent: indent.as_deref(),
        ensure_ascii: opts.ensure_ascii,
        sort_keys: opts.sort_keys,
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.write_value(&mut out, value, 0);
    out
}

/// Fully resolved `json.dumps` arguments; `indent` is the per-level indent string.
///
/// Python also accepts a string as `indent` (`indent="\t"`); the template `tojson` filter needs
/// that, so the writer works with strings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DumpStyle<'a> {
    pub(crate) indent: Option<&'a str>,
    pub(crate) ensure_ascii: bool,
    pub(crate) sort_keys: bool,
    pub(crate) item_sep: &'a str,
    pub(crate) key_sep: &'a str,
}

impl DumpStyle<'_> {
    /// Writes `value` at nesting `level` (0 for the top).
    pub(crate) fn write_value(&self, out: &mut String, value: &Value, level: usize) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(true) => out.push_str("true"),
            Value::Bool(false) => out.push_str("false"),
            Value::Number(n) => write_number(out, n),
            Value::String(s) => write_json_str(out, s, self.ensure_ascii),
            Value::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i == 0, level + 1);
                    self.write_value(out, item, level + 1);
                }
                self.close(out, level);
                out.push(']');
            }
            Value::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                out.push('{');
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i == 0, level + 1);
                    write_json_str(out, key, self.ensure_ascii);
                    out.push_str(self.key_sep);
                    self.write_value(out, item, level + 1);
                }
                self.close(out, level);
                out.push('}');
            }
        }
    }

    /// Writes what precedes an item: the item separator (unless first) and, with indent, a
    /// newline plus the indent of `level`.
    fn separate(&self, out: &mut String, first: bool, level: usize) {
        if !first {
            out.push_str(self.item_sep);
        }
        self.newline(out, level);
    }

    /// Writes what precedes a closing bracket at `level`.
    fn close(&self, out: &mut String, level: usize) {
        self.newline(out, level);
    }

    fn newline(&self, out: &mut String, level: usize) {
        if let Some(unit) = self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(unit);
            }
        }
    }
}

/// Writes a JSON number: integers verbatim, floats as Python's `float.__repr__`.
fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    } else {
        // Only reachable with serde_json's arbitrary_precision feature: the literal text.
        out.push_str(&n.to_string());
    }
}

/// Writes `s` as a JSON string literal with Python's escaping (`encode_basestring` or, with
/// `ensure_ascii`, `encode_basestring_ascii`).
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c < ' ' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c if ensure_ascii && !(' '..='~').contains(&c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Formats `f` as Python's `repr(float)` (shortest round-trip digits; scientific notation when
/// the decimal exponent is below -4 or at least 16): `1.0`, `0.0001`, `1e-05`, `1e+16`,
/// `1.5e-07`, `-0.0`, `inf`, `nan`.
///
/// Needed wherever Python would print a float: [`json_dumps`], `python_repr`, and values
/// printed by chat templates.
pub fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f < 0.0 { "-inf" } else { "inf" }.to_owned();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.5e-7", "1e16", "0e0".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if digits.bytes().all(|b| b == b'0') {
        return format!("{sign}0.0");
    }
    // Python's `decpt`: value = 0.DIGITS * 10^decpt.
    let decpt = exp + 1;
    let len = digits.len() as i32;
    let mut out = String::from(sign);
    if !(-4 < decpt && decpt <= 16) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(
            out,
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.unsigned_abs()
        );
    } else if decpt <= 0 {
        out.push_str("0.");
        for _ in 0..-decpt {
            out.push('0');
        }
        out.push_str(&digits);
    } else if decpt >= len {
        out.push_str(&digits);
        for _ in 0..decpt - len {
            out.push('0');
        }
        out.push_str(".0");
    } else {
        let (int_part, frac_part) = digits.split_at(decpt as usize);
        out.push_str(int_part);
        out.push('.');
        out.push_str(frac_part);
    }
    out
}

/// Formats `s` as Python's `repr(str)`: single quotes unless the string contains `'` and no
/// `"`; `\\`, `\t`, `\n`, `\r` and the chosen quote escaped; other control characters and
/// non-printable characters as `\xNN`, `\uNNNN` or `\UNNNNNNNN`; printable non-ASCII (CJK,
/// emoji, accents) kept.
pub fn python_str_repr(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    write_str_repr(&mut out, s);
    out
}

fn write_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            c if c == quote || c == '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c < ' ' || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if c.is_ascii() || unicode::is_printable(c) => out.push(c),
            c => {
                let code = u32::from(c);
                let _ = if code <= 0xff {
                    write!(out, "\\x{code:02x}")
                } else if code <= 0xffff {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
        }
    }
    out.push(quote);
}

#[cfg(test)]
/// Formats `value` as Python's `repr()` of the object `json.loads` would build from it:
/// `{'a': [1, 2.0, None, True, 'x']}`.
///
/// ChatGLM3 writes past tool calls as Python calls (see [`python_tool_call`]), so the argument
/// values must look exactly like Python literals.
pub fn python_repr(value: &Value) -> String {
    let mut out = String::new();
    write_repr(&mut out, value);
    out
}

fn write_repr(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str_repr(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str_repr(out, key);
                out.push_str(": ");
                write_repr(out, item);
            }
            out.push('}');
        }
    }
}

/// Formats a past tool call the way ChatGLM3 expects it in an assistant turn:
/// ```` ```python\ntool_call(a=2, b='x')\n``` ```` (arguments in map order, values as
/// `python_repr`).
///
/// ChatGLM3's OpenAI-compatible demo turns an OpenAI `tool_calls` entry into this text (with
/// the function name as the message's `metadata`), so replaying history needs the same bytes.
pub fn python_tool_call(arguments: &Map<String, Value>) -> String {
    let mut out = String::from("```python\ntool_call(");
    for (i, (name, value)) in arguments.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(name);
        out.push('=');
        write_repr(&mut out, value);
    }
    out.push_str(")\n```");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn data_path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/python")
            .join(name)
    }

    fn load(name: &str) -> Value {
        let path = data_path(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    fn parse(text: &str) -> Value {
        serde_json::from_str(text).unwrap_or_else(|e| panic!("parsing {text:?}: {e}"))
    }

    /// Every case of tests/data/pyfmt_cases.json (generated by gen_pyfmt_cases.py with the real
    /// Python 3) must match byte for byte.
    #[test]
    fn json_dumps_matches_python_table() {
        let table = load("pyfmt_cases.json");
        let cases = table["dumps"].as_array().expect("dumps cases");
        assert!(cases.len() > 900, "{}", cases.len());
        let mut failures = Vec::new();
        for case in cases {
            let input = case["input"].as_str().expect("input");
            let opts = JsonDumpsOptions {
                indent: case["indent"].as_u64().map(|n| n as usize),
                ensure_ascii: case["ensure_ascii"].as_bool().expect("ensure_ascii"),
                sort_keys: case["sort_keys"].as_bool().expect("sort_keys"),
                separators: case["separators"].as_array().map(|s| {
                    (
                        s[0].as_str().expect("sep").to_owned(),
                        s[1].as_str().expect("sep").to_owned(),
                    )
                }),
            };
            let got = json_dumps(&parse(input), &opts);
            let want = case["expected"].as_str().expect("expected");
            if got != want {
                failures.push(format!("{input} {opts:?}\n  got  {got:?}\n  want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn python_repr_matches_python_table() {
        let table = load("pyfmt_cases.json");
        let mut failures = Vec::new();
        for case in table["repr"].as_array().expect("repr cases") {
            let input = case["input"].as_str().expect("input");
            let got = python_repr(&parse(input));
            let want = case["expected"].as_str().expect("expected");
            if got != want {
                failures.push(format!("{input}\n  got  {got:?}\n  want {want:?}"));
            }
        }
        for case in table["tool_call"].as_array().expect("tool_call cases") {
            let input = case["input"].as_str().expect("input");
            let args = parse(input);
            let got = python_tool_call(args.as_object().expect("object"));
            let want = case["expected"].as_str().expect("expected");
            if got != want {
                failures.push(format!("{input}\n  got  {got:?}\n  want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn float_repr_spot_checks() {
        for (f, want) in [
            (1.0, "1.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (123.456, "123.456"),
            (-2.5e300, "-2.5e+300"),
            (f64::INFINITY, "inf"),
            (f64::NEG_INFINITY, "-inf"),
            (f64::NAN, "nan"),
        ] {
            assert_eq!(python_float_repr(f), want, "{f:e}");
        }
    }

    #[test]
    fn key_order_is_insertion_order() {
        let v = parse(r#"{"z": 1, "a": {"y": 2, "b": 3}}"#);
        assert_eq!(
            json_dumps(&v, &JsonDumpsOptions::default()),
            r#"{"z": 1, "a": {"y": 2, "b": 3}}"#
        );
        assert_eq!(python_repr(&v), "{'z': 1, 'a': {'y': 2, 'b': 3}}");
        let sorted = JsonDumpsOptions {
            sort_keys: true,
            ..Default::default()
        };
        assert_eq!(
            json_dumps(&v, &sorted),
            r#"{"a": {"b": 3, "y": 2}, "z": 1}"#
        );
    }

    #[test]
    fn escapes_and_defaults() {
        let v = json!("a\"b\\c/d\u{7f}\u{1b}é😀");
        assert_eq!(
            json_dumps(&v, &JsonDumpsOptions::default()),
            r#""a\"b\\c/d\u007f\u001b\u00e9\ud83d\ude00""#
        );
        let raw = JsonDumpsOptions {
            ensure_ascii: false,
            ..Default::default()
        };
        assert_eq!(json_dumps(&v, &raw), "\"a\\\"b\\\\c/d\u{7f}\\u001bé😀\"");
        assert_eq!(python_str_repr("a'b"), "\"a'b\"");
        assert_eq!(python_str_repr("\u{200b}\u{7}"), "'\\u200b\\x07'");
    }

    /// ChatGLM3's openai_api_demo: the system message gets `json.dumps(tools, indent=4,
    /// ensure_ascii=False)` of the function objects, and a past call becomes `tool_call(...)`.
    #[test]
    fn chatglm3_official_history_strings() {
        for name in [
            "chatglm3_tools_default_system.json",
            "chatglm3_tools_own_system.json",
        ] {
            let case = load(name);
            let history = case["official_history"].as_array().expect("history");
            let functions: Vec<Value> = case["tools"]
                .as_array()
                .expect("tools")
                .iter()
                .map(|t| t["function"].clone())
                .collect();
            assert_eq!(Value::Array(functions.clone()), history[0]["tools"]);
            let dumped = json_dumps(
                &Value::Array(functions),
                &JsonDumpsOptions {
                    indent: Some(4),
                    ensure_ascii: false,
                    ..Default::default()
                },
            );
            assert_eq!(
                dumped,
                case["tools_json_dumps_indent4"].as_str().expect("expected")
            );
            for msg in history.iter().filter(|m| m["role"] == "assistant") {
                let args = json!({"a": 2, "b": 40});
                let args = args.as_object().expect("object");
                assert_eq!(msg["content"], python_tool_call(args));
                assert_eq!(msg["metadata"], "add");
            }
        }
    }
}
