//! A safe parser for ChatGLM3's `tool_call(...)` code: Python literals only, nothing is evaluated.
//!
//! ChatGLM3 writes a tool call as a fenced code block whose body is one call, for example
//! `tool_call(city="北京", days=3)`. The official remote code runs it with `eval()` against a local
//! `def tool_call(**kwargs): return kwargs`. This module accepts the subset of that Python that is
//! pure data and turns it into JSON the way `json.loads(json.dumps(kwargs))` would, so a hostile or
//! confused model can never make the server run code.
//!
//! # What is accepted
//!
//! - Exactly one call `tool_call(<kwargs>)`, keyword arguments only, optional trailing comma,
//!   or one dict literal (`eval` returns it as is and the official code uses it as the parameters),
//!   optional comments, blank lines, and a trailing newline; line breaks inside brackets and `\`
//!   line continuations as Python allows them. Leading spaces and tabs are skipped (as `eval` does).
//! - Values: `str` literals (`'`, `"`, triple quotes, prefixes `r`/`u` in any case, escapes `\n \t \\
//!   \' \" \a \b \f \v \r \ooo \xhh \uXXXX \UXXXXXXXX`, backslash-newline, unknown escapes kept as
//!   Python keeps them, adjacent-literal concatenation `'a' "b"`); `int` (decimal, `0x`/`0o`/`0b`,
//!   underscores) and `float` (`1.5`, `.5`, `5.`, `1e-3`) with any number of unary `+`/`-`; `True`,
//!   `False`, `None`; lists and tuples (both become JSON arrays); dicts.
//! - Keyword names: ASCII identifiers, plus non-ASCII identifier characters that Python's NFKC
//!   normalisation leaves unchanged (CJK, Hangul syllables, accented Latin, ...; see `pyident`).
//!
//! # What is rejected (an error, never evaluation)
//!
//! Names other than `True`/`False`/`None` (`__import__`, `os`), calls, attribute access, subscripts,
//! binary operators (`1 + 2`, `10**9`), comparisons, `if`/`lambda`/comprehensions, f-strings, bytes,
//! complex numbers, `...`, sets, `*`/`**` unpacking, positional arguments, repeated keywords, Python
//! keywords as argument names, `\N{...}` escapes (no Unicode name table here), escapes that produce a
//! lone surrogate (not representable in Rust or JSON text), floats that overflow to infinity (Python
//! would produce `inf`, which is not JSON), `0x`/`0o`/`0b` integers above `u128::MAX`, dict keys that
//! `json.dumps` refuses (tuples) or Python cannot hash (lists, dicts). Input longer than
//! [`MAX_INPUT_BYTES`] or nested deeper than [`MAX_DEPTH`] is rejected before any deep work is done;
//! the recursion depth of the parser is bounded by [`MAX_DEPTH`].
//!
//! # JSON mapping
//!
//! - Integers within `i64`/`u64` stay exact. Larger decimal integers become the nearest `f64`, the
//!   same thing `serde_json` does for a large integer in JSON text (GLM-4's path), so both families
//!   treat big numbers alike; integers so large that even `f64` overflows are an error.
//! - Dict keys follow `json.dumps`: `str` keys as they are, `int` keys as decimal, `float` keys as
//!   Python's `repr`, `True`/`False`/`None` as `"true"`/`"false"`/`"null"`. Keys that Python treats as
//!   the same dict key (`1`, `1.0` and `True`) merge first, keeping the first key and the last value,
//!   exactly like a Python dict; the resulting object is what `json.loads(json.dumps(d))` gives.

use serde_json::{Map, Number, Value};
use std::collections::HashMap;

use super::ident::{is_ident_continue, is_ident_start, is_python_ident_char};

/// Deepest nesting of lists, tuples, dicts and parentheses the parser accepts.
pub const MAX_DEPTH: usize = 64;

/// Longest tool-call code, in bytes, the parser accepts.
pub const MAX_INPUT_BYTES: usize = 1 << 20;

/// Why a piece of tool-call code was not accepted.
///
/// Positions (`at`) are byte offsets into the code that was passed in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LiteralError {
    /// The code is longer than [`MAX_INPUT_BYTES`].
    #[error("tool-call code is {len} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Length of the code in bytes.
        len: usize,
        /// The limit, [`MAX_INPUT_BYTES`].
        max: usize,
    },
    /// Containers are nested deeper than [`MAX_DEPTH`].
    #[error("nesting deeper than {max} levels at byte {at}")]
    TooDeep {
        /// Where the level that is too deep opens.
        at: usize,
        /// The limit, [`MAX_DEPTH`].
        max: usize,
    },
    /// The code is empty (or only blank lines and comments).
    #[error("tool-call code is empty: expected `tool_call(...)`")]
    Empty,
    /// The code is not a call of `tool_call`.
    #[error("expected a single call `tool_call(...)`, found `{found}` at byte {at}")]
    NotToolCall {
        /// The token found instead.
        found: String,
        /// Where it starts.
        at: usize,
    },
    /// Something that is not a literal: a name, operator, call, attribute, f-string, ...
    #[error("unsupported expression `{found}` at byte {at}: only literals are allowed")]
    Unsupported {
        /// The offending token or construct.
        found: String,
        /// Where it starts.
        at: usize,
    },
    /// A token that cannot appear here, in a way that is a Python syntax error too.
    #[error("syntax error at byte {at}: expected {expected}, found {found}")]
    Unexpected {
        /// What the grammar allows here.
        expected: &'static str,
        /// What was found (quoted token text, or `end of input`).
        found: String,
        /// Where it starts.
        at: usize,
    },
    /// A character Python does not allow outside string literals (U+3000, NBSP, `\v`, `\x1c`, NUL, ...).
    #[error("invalid character {ch:?} (U+{code:04X}) at byte {at}")]
    InvalidCharacter {
        /// The character.
        ch: char,
        /// Its code point.
        code: u32,
        /// Where it is.
        at: usize,
    },
    /// A line after a blank line starts with indentation (Python raises `IndentationError`).
    #[error("unexpected indent at byte {at}")]
    UnexpectedIndent {
        /// Where the indented line starts.
        at: usize,
    },
    /// A string literal that is malformed or that this parser does not support.
    #[error("invalid string literal at byte {at}: {reason}")]
    InvalidString {
        /// What is wrong.
        reason: &'static str,
        /// Where the literal (or the bad escape) starts.
        at: usize,
    },
    /// A number literal that is malformed.
    #[error("invalid number literal `{text}` at byte {at}: {reason}")]
    InvalidNumber {
        /// The literal's text.
        text: String,
        /// What is wrong.
        reason: &'static str,
        /// Where it starts.
        at: usize,
    },
    /// A number literal that is valid Python but cannot be represented as a JSON number here.
    #[error("number literal `{text}` at byte {at} is out of range: {reason}")]
    NumberOutOfRange {
        /// The literal's text.
        text: String,
        /// Why it cannot be represented.
        reason: &'static str,
        /// Where it starts.
        at: usize,
    },
    /// A keyword-argument name that Python would change by NFKC normalisation, or would reject.
    #[error("unsupported argument name `{name}` at byte {at}: only ASCII and NFKC-stable identifiers are accepted")]
    UnsupportedName {
        /// The name.
        name: String,
        /// Where it starts.
        at: usize,
    },
    /// A Python keyword (`True`, `if`, ...) used as an argument name.
    #[error("cannot use Python keyword `{name}` as an argument name at byte {at}")]
    KeywordAsName {
        /// The keyword.
        name: String,
        /// Where it starts.
        at: usize,
    },
    /// The same keyword argument appears twice.
    #[error("keyword argument `{name}` repeated at byte {at}")]
    RepeatedKeyword {
        /// The repeated name.
        name: String,
        /// Where the second occurrence starts.
        at: usize,
    },
    /// A positional argument (`tool_call(1)`); `tool_call` takes keyword arguments only.
    #[error("positional argument at byte {at}: tool_call takes keyword arguments only")]
    PositionalArgument {
        /// Where the argument starts.
        at: usize,
    },
    /// A dict key that Python cannot hash (`list`, `dict`) or `json.dumps` cannot write (`tuple`).
    #[error("dict key of type {kind} at byte {at} cannot become a JSON object key")]
    BadKey {
        /// The key's Python type name.
        kind: &'static str,
        /// Where the key starts.
        at: usize,
    },
}

/// Parse ChatGLM3 tool-call code `tool_call(k=v, ...)` into its keyword arguments.
///
/// The result is what the official `eval` would return for literal-only code, converted to JSON
/// (see the module docs for the mapping); keys keep the order they were written in.
///
/// # Examples
///
/// ```text
/// use reply::pyliteral::parse_tool_call;
/// let args = parse_tool_call("tool_call(city='北京', days=3, opts={'unit': \"c\"})").unwrap();
/// assert_eq!(serde_json::Value::Object(args).to_string(), r#"{"city":"北京","days":3,"opts":{"unit":"c"}}"#);
/// assert!(parse_tool_call("tool_call(x=__import__('os'))").is_err());
/// ```
///
/// # Errors
///
/// A [`LiteralError`] when the code is not exactly one literal-only `tool_call(...)` (see the module
/// docs for the full list), is longer than [`MAX_INPUT_BYTES`] or nests deeper than [`MAX_DEPTH`].
pub fn parse_tool_call(code: &str) -> Result<Map<String, Value>, LiteralError> {
    check_size(code)?;
    let mut p = Parser::new(code);
    if matches!(p.peek()?.tok, Tok::Punct('{')) {
        // `eval` of a bare dict literal returns the dict itself, which the official code uses as
        // the parameters.
        let dict = p.value(1)?.into_json()?;
        p.expect_end()?;
        return match dict {
            Value::Object(map) => Ok(map),
            _ => Err(LiteralError::Empty),
        };
    }
    let first = p.next()?;
    match &first.tok {
        Tok::Name(n) if n == "tool_call" => {}
        Tok::Eof => return Err(LiteralError::Empty),
        _ => {
            return Err(LiteralError::NotToolCall {
                found: p.describe(&first),
                at: first.at,
            })
        }
    }
    let open = p.next()?;
    if !matches!(open.tok, Tok::Punct('(')) {
        return Err(match open.tok {
            Tok::Newline | Tok::Eof => LiteralError::Unexpected {
                expected: "`(` after `tool_call`",
                found: p.describe(&open),
                at: open.at,
            },
            _ => LiteralError::Unsupported {
                found: p.describe(&open),
                at: open.at,
            },
        });
    }
    let mut args = Map::new();
    loop {
        let tok = p.next()?;
        let (name, at) = match tok.tok {
            Tok::Punct(')') => break,
            Tok::Name(ref n) => (n.clone(), tok.at),
            Tok::Op("**") | Tok::Op("*") => {
                return Err(LiteralError::Unsupported {
                    found: p.describe(&tok),
                    at: tok.at,
                })
            }
            Tok::Newline | Tok::Eof => {
                return Err(LiteralError::Unexpected {
                    expected: "a keyword argument or `)`",
                    found: p.describe(&tok),
                    at: tok.at,
                })
            }
            Tok::Punct(',') => {
                return Err(LiteralError::Unexpected {
                    expected: "a keyword argument or `)`",
                    found: p.describe(&tok),
                    at: tok.at,
                })
            }
            _ => return Err(LiteralError::PositionalArgument { at: tok.at }),
        };
        let eq = p.next()?;
        if !matches!(eq.tok, Tok::Op("=")) {
            return Err(if is_keyword(&name) {
                LiteralError::Unsupported { found: name, at }
            } else {
                LiteralError::PositionalArgument { at }
            });
        }
        if is_keyword(&name) {
            return Err(LiteralError::KeywordAsName { name, at });
        }
        let value = p.value(1)?.into_json()?;
        if args.contains_key(&name) {
            return Err(LiteralError::RepeatedKeyword { name, at });
        }
        args.insert(name, value);
        let sep = p.next()?;
        match sep.tok {
            Tok::Punct(',') => {}
            Tok::Punct(')') => break,
            _ => return Err(p.after_value_error(&sep, "`,` or `)`")),
        }
    }
    p.expect_end()?;
    Ok(args)
}

#[cfg(test)]
/// Parse one Python literal expression (a value as accepted inside `tool_call(...)`) into JSON.
///
/// # Examples
///
/// ```text
/// use reply::pyliteral::parse_literal;
/// assert_eq!(parse_literal("[1, -2.5, 'a' 'b', (True, None)]").unwrap().to_string(), r#"[1,-2.5,"ab",[true,null]]"#);
/// ```
///
/// # Errors
///
/// A [`LiteralError`] for anything that is not a single literal (see [`parse_tool_call`]).
pub fn parse_literal(code: &str) -> Result<Value, LiteralError> {
    check_size(code)?;
    let mut p = Parser::new(code);
    let v = p.value(1)?;
    let json = v.into_json()?;
    p.expect_end()?;
    Ok(json)
}

fn check_size(code: &str) -> Result<(), LiteralError> {
    if code.len() > MAX_INPUT_BYTES {
        return Err(LiteralError::TooLarge {
            len: code.len(),
            max: MAX_INPUT_BYTES,
        });
    }
    Ok(())
}

/// Python's `repr()` of a finite float, e.g. `1e+16`, `1000000000000000.0`, `1e-05`, `0.1`, `-0.0`.
///
/// `json.dumps` uses it for float dict keys; the digits are the shortest that round-trip.
#[must_use]
pub fn py_float_repr(f: f64) -> String {
    if !f.is_finite() {
        return if f.is_nan() {
            "nan".to_owned()
        } else if f > 0.0 {
            "inf".to_owned()
        } else {
            "-inf".to_owned()
        };
    }
    // `{:e}` gives the shortest round-trip digit count, but breaks exact ties upwards; Python picks
    // the correctly rounded (half-even) string of that length, which `{:.N$e}` produces.
    let shortest = format!("{:e}", f.abs());
    let n_digits = shortest
        .split('e')
        .next()
        .map_or(1, |m| m.chars().filter(char::is_ascii_digit).count());
    let sci = format!("{:.*e}", n_digits.saturating_sub(1), f.abs());
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    let decpt = exp + 1;
    let n = digits.len() as i32;
    if (-4 < decpt) && (decpt <= 16) {
        if decpt <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
        } else if decpt >= n {
            format!("{sign}{digits}{}.0", "0".repeat((decpt - n) as usize))
        } else {
            let (a, b) = digits.split_at(decpt as usize);
            format!("{sign}{a}.{b}")
        }
    } else {
        let (a, b) = digits.split_at(1);
        let mant = if b.is_empty() {
            a.to_owned()
        } else {
            format!("{a}.{b}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------------------------
// Tokens

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Str(String),
    Int(Magnitude),
    Float(f64),
    Punct(char),
    Op(&'static str),
    Newline,
    Eof,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    at: usize,
    end: usize,
}

/// An integer's absolute value: small ones exactly, big decimal ones as canonical digits.
#[derive(Debug, Clone, PartialEq)]
enum Magnitude {
    Small(u128),
    Big(String),
}

const KEYWORDS: [&str; 35] = [
    "False", "None", "True", "and", "as", "assert", "async", "await", "break", "class", "continue",
    "def", "del", "elif", "else", "except", "finally", "for", "from", "global", "if", "import",
    "in", "is", "lambda", "nonlocal", "not", "or", "pass", "raise", "return", "try", "while",
    "with", "yield",
];

fn is_keyword(s: &str) -> bool {
    KEYWORDS.contains(&s)
}

struct Lexer<'a> {
    src: &'a str,
    pos: usize,
    /// Bracket depth, for newline handling only (the parser enforces [`MAX_DEPTH`]).
    depth: usize,
    /// Whether the current logical line (at depth 0) has produced a token.
    line_has_tokens: bool,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        // `eval()` skips leading spaces and tabs of its source string.
        let pos = src.len() - src.trim_start_matches([' ', '\t']).len();
        Lexer {
            src,
            pos,
            depth: 0,
            line_has_tokens: false,
        }
    }

    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.src[self.pos..].chars().nth(n)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    /// Consume a newline (`\n`, `\r\n` or `\r`) if one is next.
    fn eat_newline(&mut self) -> bool {
        match self.peek() {
            Some('\n') => {
                self.pos += 1;
                true
            }
            Some('\r') => {
                self.pos += 1;
                if self.peek() == Some('\n') {
                    self.pos += 1;
                }
                true
            }
            _ => false,
        }
    }

    /// At the start of a physical line at depth 0: skip its indentation, and reject it when the
    /// line has content (Python's tokenizer raises `IndentationError` for an indented statement).
    fn line_start(&mut self) -> Result<(), LiteralError> {
        let start = self.pos;
        let mut indented = false;
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => indented = true,
                '\x0c' => indented = false,
                _ => break,
            }
            self.pos += 1;
        }
        // CPython quirk: a last line of only spaces/tabs (no newline) is an unexpected indent too.
        let blank = matches!(self.peek(), Some('\n' | '\r' | '#'));
        if indented && !blank {
            return Err(LiteralError::UnexpectedIndent { at: start });
        }
        Ok(())
    }

    fn next_token(&mut self) -> Result<Token, LiteralError> {
        loop {
            while matches!(self.peek(), Some(' ' | '\t' | '\x0c')) {
                self.pos += 1;
            }
            let at = self.pos;
            let Some(c) = self.peek() else {
                return Ok(Token {
                    tok: Tok::Eof,
                    at,
                    end: at,
                });
            };
            match c {
                '#' => {
                    while !matches!(self.peek(), None | Some('\n' | '\r')) {
                        self.bump();
                    }
                }
                '\\' => {
                    self.pos += 1;
                    if !self.eat_newline() || self.peek().is_none() {
                        return Err(LiteralError::Unexpected {
                            expected: "a newline after a line-continuation backslash",
                            found: self
                                .peek()
                                .map_or_else(|| "end of input".to_owned(), |c| format!("{c:?}")),
                            at: self.pos,
                        });
                    }
                }
                '\n' | '\r' => {
                    self.eat_newline();
                    if self.depth == 0 {
                        self.line_start()?;
                        if self.line_has_tokens {
                            self.line_has_tokens = false;
                            return Ok(Token {
                                tok: Tok::Newline,
                                at,
                                end: at + 1,
                            });
                        }
                    }
                }
                _ => {
                    let tok = self.token(c, at)?;
                    self.line_has_tokens = true;
                    return Ok(Token {
                        tok,
                        at,
                        end: self.pos,
                    });
                }
            }
        }
    }

    fn token(&mut self, c: char, at: usize) -> Result<Tok, LiteralError> {
        if c.is_ascii_digit() || (c == '.' && self.peek_at(1).is_some_and(|d| d.is_ascii_digit())) {
            return self.number(at);
        }
        if c == '\'' || c == '"' {
            return self.string(at, false);
        }
        if is_ident_start(c) || (!c.is_ascii() && is_python_ident_char(c)) {
            return self.name_or_prefixed_string(at);
        }
        self.pos += c.len_utf8();
        let op = match c {
            '(' | '[' | '{' => {
                self.depth += 1;
                return Ok(Tok::Punct(c));
            }
            ')' | ']' | '}' => {
                self.depth = self.depth.saturating_sub(1);
                return Ok(Tok::Punct(c));
            }
            ',' | ';' => return Ok(Tok::Punct(c)),
            ':' if self.peek() == Some('=') => {
                self.pos += 1;
                ":="
            }
            ':' => return Ok(Tok::Punct(':')),
            '=' if self.peek() == Some('=') => {
                self.pos += 1;
                "=="
            }
            '=' => "=",
            '*' if self.peek() == Some('*') => {
                self.pos += 1;
                "**"
            }
            '.' if self.src[self.pos..].starts_with("..") => {
                self.pos += 2;
                "..."
            }
            '.' => ".",
            '+' => "+",
            '-' => "-",
            '*' => "*",
            '/' => "/",
            '%' => "%",
            '@' => "@",
            '&' => "&",
            '|' => "|",
            '^' => "^",
            '~' => "~",
            '<' => "<",
            '>' => ">",
            '!' => "!",
            '`' => "`",
            '$' => "$",
            '?' => "?",
            _ => {
                return Err(LiteralError::InvalidCharacter {
                    ch: c,
                    code: u32::from(c),
                    at,
                })
            }
        };
        Ok(Tok::Op(op))
    }

    fn name_or_prefixed_string(&mut self, at: usize) -> Result<Tok, LiteralError> {
        let start = self.pos;
        while self.peek().is_some_and(is_python_ident_char) {
            self.bump();
        }
        let word = &self.src[start..self.pos];
        if matches!(self.peek(), Some('\'' | '"')) && word.len() <= 2 {
            let lower = word.to_ascii_lowercase();
            match lower.as_str() {
                "r" => return self.string(at, true),
                "u" => return self.string(at, false),
                "b" | "br" | "rb" => {
                    return Err(LiteralError::Unsupported {
                        found: "bytes literal".to_owned(),
                        at,
                    })
                }
                "f" | "fr" | "rf" => {
                    return Err(LiteralError::Unsupported {
                        found: "f-string".to_owned(),
                        at,
                    })
                }
                _ => {}
            }
        }
        let mut chars = word.chars();
        let ok = chars.next().is_some_and(is_ident_start) && chars.all(is_ident_continue);
        if !ok {
            return Err(LiteralError::UnsupportedName {
                name: word.to_owned(),
                at,
            });
        }
        Ok(Tok::Name(word.to_owned()))
    }

    /// A string literal starting at the current position (just after any prefix).
    fn string(&mut self, at: usize, raw: bool) -> Result<Tok, LiteralError> {
        let unterminated = LiteralError::InvalidString {
            reason: "unterminated string literal",
            at,
        };
        let quote = self.bump().ok_or_else(|| unterminated.clone())?;
        let triple = self.peek() == Some(quote) && self.peek_at(1) == Some(quote);
        if triple {
            self.pos += 2;
        }
        let mut out = String::new();
        loop {
            let here = self.pos;
            let Some(c) = self.peek() else {
                return Err(unterminated);
            };
            if c == quote {
                self.pos += 1;
                if !triple {
                    return Ok(Tok::Str(out));
                }
                if self.peek() == Some(quote) && self.peek_at(1) == Some(quote) {
                    self.pos += 2;
                    return Ok(Tok::Str(out));
                }
                out.push(c);
                continue;
            }
            if c == '\n' || c == '\r' {
                if !triple {
                    return Err(unterminated);
                }
                self.eat_newline();
                out.push('\n');
                continue;
            }
            if c == '\0' {
                return Err(LiteralError::InvalidCharacter {
                    ch: c,
                    code: 0,
                    at: here,
                });
            }
            self.pos += c.len_utf8();
            if c != '\\' {
                out.push(c);
                continue;
            }
            // A backslash.
            let Some(e) = self.peek() else {
                return Err(unterminated);
            };
            if raw {
                out.push('\\');
                if e == '\n' || e == '\r' {
                    self.eat_newline();
                    out.push('\n');
                } else {
                    self.pos += e.len_utf8();
                    out.push(e);
                }
                continue;
            }
            if e == '\n' || e == '\r' {
                self.eat_newline();
                continue;
            }
            self.pos += e.len_utf8();
            match e {
                '\\' | '\'' | '"' => out.push(e),
                'a' => out.push('\x07'),
                'b' => out.push('\x08'),
                'f' => out.push('\x0c'),
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'v' => out.push('\x0b'),
                '0'..='7' => {
                    let mut v = e.to_digit(8).unwrap_or(0);
                    for _ in 0..2 {
                        match self.peek().and_then(|d| d.to_digit(8)) {
                            Some(d) => {
                                v = v * 8 + d;
                                self.pos += 1;
                            }
                            None => break,
                        }
                    }
                    // At most 0o777 = 511: always a valid scalar value.
                    out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                }
                'x' | 'u' | 'U' => {
                    let n = match e {
                        'x' => 2,
                        'u' => 4,
                        _ => 8,
                    };
                    let mut v: u32 = 0;
                    for _ in 0..n {
                        match self.peek().and_then(|d| d.to_digit(16)) {
                            Some(d) => {
                                v = v * 16 + d;
                                self.pos += 1;
                            }
                            None => {
                                return Err(LiteralError::InvalidString {
                                    reason: "truncated \\x, \\u or \\U escape",
                                    at: here,
                                })
                            }
                        }
                    }
                    match char::from_u32(v) {
                        Some(ch) => out.push(ch),
                        None if (0xD800..=0xDFFF).contains(&v) => {
                            return Err(LiteralError::InvalidString {
                                reason: "escape is a lone surrogate, which JSON text cannot carry",
                                at: here,
                            })
                        }
                        None => {
                            return Err(LiteralError::InvalidString {
                                reason: "escape is above U+10FFFF",
                                at: here,
                            })
                        }
                    }
                }
                'N' => {
                    return Err(LiteralError::InvalidString {
                        reason: "named escapes \\N{...} are not supported",
                        at: here,
                    })
                }
                other => {
                    // Python keeps unknown escapes as they are (with a warning).
                    out.push('\\');
                    out.push(other);
                }
            }
        }
    }

    /// Digits of `radix` with single underscores between them; `lead_underscore` allows one
    /// underscore before the first digit (after `0x`). Returns the digits without underscores.
    fn digits(&mut self, radix: u32, lead_underscore: bool) -> String {
        let mut out = String::new();
        loop {
            match self.peek() {
                Some(c) if c.is_digit(radix) => {
                    out.push(c);
                    self.pos += 1;
                }
                Some('_')
                    if (lead_underscore || !out.is_empty())
                        && self.peek_at(1).is_some_and(|d| d.is_digit(radix)) =>
                {
                    self.pos += 1;
                }
                _ => return out,
            }
        }
    }

    fn number(&mut self, at: usize) -> Result<Tok, LiteralError> {
        let invalid = |lx: &Self, reason: &'static str| {
            // Include the rest of the would-be token in the message.
            let mut end = lx.pos;
            for c in lx.src[lx.pos..].chars() {
                if c.is_alphanumeric() || c == '_' || c == '.' {
                    end += c.len_utf8();
                } else {
                    break;
                }
            }
            LiteralError::InvalidNumber {
                text: lx.src[at..end].to_owned(),
                reason,
                at,
            }
        };
        let radix = match (self.peek(), self.peek_at(1)) {
            (Some('0'), Some('x' | 'X')) => 16,
            (Some('0'), Some('o' | 'O')) => 8,
            (Some('0'), Some('b' | 'B')) => 2,
            _ => 10,
        };
        if radix != 10 {
            self.pos += 2;
            let digits = self.digits(radix, true);
            if digits.is_empty() || self.peek().is_some_and(is_python_ident_char) {
                return Err(invalid(self, "invalid digit for its base"));
            }
            let mut v: u128 = 0;
            for d in digits.chars() {
                let d = u128::from(d.to_digit(radix).unwrap_or(0));
                v = v
                    .checked_mul(u128::from(radix))
                    .and_then(|v| v.checked_add(d))
                    .ok_or_else(|| LiteralError::NumberOutOfRange {
                        text: self.src[at..self.pos].to_owned(),
                        reason: "hex, octal and binary integers must fit in 128 bits",
                        at,
                    })?;
            }
            return Ok(Tok::Int(Magnitude::Small(v)));
        }
        let int_part = self.digits(10, false);
        let mut text = int_part.clone();
        let mut is_float = false;
        if self.peek() == Some('.') {
            self.pos += 1;
            is_float = true;
            text.push('.');
            text.push_str(&self.digits(10, false));
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            let signed = matches!(self.peek_at(1), Some('+' | '-'));
            let digit_at = if signed { 2 } else { 1 };
            if self.peek_at(digit_at).is_some_and(|d| d.is_ascii_digit()) {
                text.push('e');
                self.pos += 1;
                if signed {
                    text.push(self.bump().unwrap_or('+'));
                }
                text.push_str(&self.digits(10, false));
                is_float = true;
            }
        }
        if matches!(self.peek(), Some('j' | 'J')) {
            self.pos += 1;
            return Err(LiteralError::Unsupported {
                found: format!("{} (complex number)", &self.src[at..self.pos]),
                at,
            });
        }
        if self.peek().is_some_and(is_python_ident_char) {
            return Err(invalid(self, "invalid decimal literal"));
        }
        if is_float {
            let f: f64 = text
                .parse()
                .map_err(|_| invalid(self, "invalid decimal literal"))?;
            if !f.is_finite() {
                return Err(LiteralError::NumberOutOfRange {
                    text: self.src[at..self.pos].to_owned(),
                    reason: "the float overflows to infinity, which is not JSON",
                    at,
                });
            }
            return Ok(Tok::Float(f));
        }
        let trimmed = int_part.trim_start_matches('0');
        if trimmed.len() != int_part.len() && !trimmed.is_empty() {
            return Err(invalid(
                self,
                "leading zeros in decimal integer literals are not permitted",
            ));
        }
        if trimmed.is_empty() {
            return Ok(Tok::Int(Magnitude::Small(0)));
        }
        if let Ok(v) = trimmed.parse::<u128>() {
            return Ok(Tok::Int(Magnitude::Small(v)));
        }
        // Beyond u128: it will become the nearest f64, so it must not overflow that.
        if !trimmed.parse::<f64>().is_ok_and(f64::is_finite) {
            return Err(LiteralError::NumberOutOfRange {
                text: self.src[at..self.pos].to_owned(),
                reason: "the integer is too large even for a float",
                at,
            });
        }
        Ok(Tok::Int(Magnitude::Big(trimmed.to_owned())))
    }
}

// ---------------------------------------------------------------------------------------------
// Values

/// A parsed Python value, before conversion to JSON.
#[derive(Debug, Clone)]
enum PyVal {
    None,
    Bool(bool),
    Int {
        neg: bool,
        mag: Magnitude,
    },
    Float(f64),
    Str(String),
    /// A list or a tuple (`true`).
    Seq(Vec<PyVal>, bool),
    /// Dict entries in source order, and where the dict starts.
    Dict(Vec<(PyVal, usize, PyVal)>),
}

/// Identity of a dict key under Python's `==`/`hash`: `1 == 1.0 == True`, `0 == -0.0 == False`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum KeyId {
    Str(String),
    /// An integral number, as canonical decimal digits with sign.
    Integral(String),
    /// A non-integral float, by its bits.
    Fraction(u64),
    None,
}

fn int_decimal(neg: bool, mag: &Magnitude) -> String {
    let digits = match mag {
        Magnitude::Small(v) => v.to_string(),
        Magnitude::Big(s) => s.clone(),
    };
    if neg && digits != "0" {
        format!("-{digits}")
    } else {
        digits
    }
}

impl PyVal {
    fn type_name(&self) -> &'static str {
        match self {
            PyVal::None => "NoneType",
            PyVal::Bool(_) => "bool",
            PyVal::Int { .. } => "int",
            PyVal::Float(_) => "float",
            PyVal::Str(_) => "str",
            PyVal::Seq(_, true) => "tuple",
            PyVal::Seq(_, false) => "list",
            PyVal::Dict(_) => "dict",
        }
    }

    /// The key's identity and its `json.dumps` text, or an error for keys JSON cannot have.
    fn key(&self, at: usize) -> Result<(KeyId, String), LiteralError> {
        Ok(match self {
            PyVal::Str(s) => (KeyId::Str(s.clone()), s.clone()),
            PyVal::None => (KeyId::None, "null".to_owned()),
            PyVal::Bool(b) => (
                KeyId::Integral(if *b { "1" } else { "0" }.to_owned()),
                if *b { "true" } else { "false" }.to_owned(),
            ),
            PyVal::Int { neg, mag } => {
                let d = int_decimal(*neg, mag);
                (KeyId::Integral(d.clone()), d)
            }
            PyVal::Float(f) => {
                let id = if f.fract() == 0.0 {
                    if *f == 0.0 {
                        KeyId::Integral("0".to_owned())
                    } else {
                        KeyId::Integral(format!("{f:.0}"))
                    }
                } else {
                    KeyId::Fraction(f.to_bits())
                };
                (id, py_float_repr(*f))
            }
            other => {
                return Err(LiteralError::BadKey {
                    kind: other.type_name(),
                    at,
                })
            }
        })
    }

    /// Convert to JSON. Recursion depth is bounded by the parser's [`MAX_DEPTH`].
    fn into_json(self) -> Result<Value, LiteralError> {
        Ok(match self {
            PyVal::None => Value::Null,
            PyVal::Bool(b) => Value::Bool(b),
            PyVal::Str(s) => Value::String(s),
            PyVal::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            PyVal::Int { neg, mag } => int_to_json(neg, &mag),
            PyVal::Seq(items, _) => Value::Array(
                items
                    .into_iter()
                    .map(PyVal::into_json)
                    .collect::<Result<_, _>>()?,
            ),
            PyVal::Dict(entries) => {
                // Python dict semantics first (first key kept, last value wins) ...
                let mut index: HashMap<KeyId, usize> = HashMap::new();
                let mut merged: Vec<(String, PyVal)> = Vec::new();
                for (k, at, v) in entries {
                    let (id, text) = k.key(at)?;
                    match index.get(&id) {
                        Some(&i) => merged[i].1 = v,
                        None => {
                            index.insert(id, merged.len());
                            merged.push((text, v));
                        }
                    }
                }
                // ... then JSON object semantics for keys whose text collides ("1" and 1).
                let mut map = Map::new();
                for (k, v) in merged {
                    map.insert(k, v.into_json()?);
                }
                Value::Object(map)
            }
        })
    }
}

/// An integer as JSON: exact within `i64`/`u64`, otherwise the nearest `f64` (the lexer has
/// already rejected integers whose `f64` would be infinite).
fn int_to_json(neg: bool, mag: &Magnitude) -> Value {
    if let Magnitude::Small(v) = mag {
        if !neg {
            if let Ok(u) = u64::try_from(*v) {
                return Value::Number(Number::from(u));
            }
        } else if let Ok(i) = i64::try_from(*v).map(|i| -i) {
            return Value::Number(Number::from(i));
        } else if *v == 1u128 << 63 {
            return Value::Number(Number::from(i64::MIN));
        }
    }
    int_decimal(neg, mag)
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

// ---------------------------------------------------------------------------------------------
// Parser

struct Parser<'a> {
    lx: Lexer<'a>,
    peeked: Option<Token>,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Self {
        Parser {
            lx: Lexer::new(src),
            peeked: None,
        }
    }

    fn next(&mut self) -> Result<Token, LiteralError> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self.lx.next_token(),
        }
    }

    fn peek(&mut self) -> Result<&Token, LiteralError> {
        let t = match self.peeked.take() {
            Some(t) => t,
            None => self.lx.next_token()?,
        };
        Ok(self.peeked.insert(t))
    }

    /// A short description of a token for error messages.
    fn describe(&self, t: &Token) -> String {
        match t.tok {
            Tok::Eof => "end of input".to_owned(),
            Tok::Newline => "end of line".to_owned(),
            _ => {
                let text = self.lx.src.get(t.at..t.end).unwrap_or("");
                let mut s: String = text.chars().take(40).collect();
                if s.len() < text.len() {
                    s.push('…');
                }
                s
            }
        }
    }

    /// The error for a token that follows a complete value where only `expected` may come.
    fn after_value_error(&self, t: &Token, expected: &'static str) -> LiteralError {
        match t.tok {
            Tok::Op(_) | Tok::Punct('(' | '[' | '{' | ';') | Tok::Name(_) => {
                LiteralError::Unsupported {
                    found: self.describe(t),
                    at: t.at,
                }
            }
            _ => LiteralError::Unexpected {
                expected,
                found: self.describe(t),
                at: t.at,
            },
        }
    }

    /// After the top-level value: only newlines may follow.
    fn expect_end(&mut self) -> Result<(), LiteralError> {
        loop {
            let t = self.next()?;
            match t.tok {
                Tok::Newline => {}
                Tok::Eof => return Ok(()),
                _ => return Err(self.after_value_error(&t, "end of input")),
            }
        }
    }

    /// One value; `depth` is the nesting level a container opened here would have (1 for a
    /// top-level argument). Recursion only happens through containers, so it is bounded by
    /// [`MAX_DEPTH`].
    fn value(&mut self, depth: usize) -> Result<PyVal, LiteralError> {
        let t = self.next()?;
        if depth > MAX_DEPTH && matches!(t.tok, Tok::Punct('[' | '(' | '{')) {
            return Err(LiteralError::TooDeep {
                at: t.at,
                max: MAX_DEPTH,
            });
        }
        match t.tok {
            Tok::Op(op @ ("-" | "+")) => {
                let mut neg = op == "-";
                loop {
                    let u = self.next()?;
                    match u.tok {
                        Tok::Op("-") => neg = !neg,
                        Tok::Op("+") => {}
                        Tok::Int(mag) => {
                            let zero = mag == Magnitude::Small(0);
                            return Ok(PyVal::Int {
                                neg: neg && !zero,
                                mag,
                            });
                        }
                        Tok::Float(f) => return Ok(PyVal::Float(if neg { -f } else { f })),
                        _ => {
                            return Err(LiteralError::Unsupported {
                                found: format!("{op}{}", self.describe(&u)),
                                at: t.at,
                            })
                        }
                    }
                }
            }
            Tok::Str(mut s) => {
                while let Tok::Str(_) = self.peek()?.tok {
                    if let Tok::Str(more) = self.next()?.tok {
                        s.push_str(&more);
                    }
                }
                Ok(PyVal::Str(s))
            }
            Tok::Int(mag) => Ok(PyVal::Int { neg: false, mag }),
            Tok::Float(f) => Ok(PyVal::Float(f)),
            Tok::Name(ref n) => match n.as_str() {
                "True" => Ok(PyVal::Bool(true)),
                "False" => Ok(PyVal::Bool(false)),
                "None" => Ok(PyVal::None),
                _ => Err(LiteralError::Unsupported {
                    found: n.clone(),
                    at: t.at,
                }),
            },
            Tok::Punct('[') => {
                let items = self.sequence(depth, ']')?;
                Ok(PyVal::Seq(items, false))
            }
            Tok::Punct('(') => {
                if matches!(self.peek()?.tok, Tok::Punct(')')) {
                    self.next()?;
                    return Ok(PyVal::Seq(Vec::new(), true));
                }
                let first = self.value(depth + 1)?;
                let sep = self.next()?;
                match sep.tok {
                    Tok::Punct(')') => Ok(first),
                    Tok::Punct(',') => {
                        let mut items = vec![first];
                        items.extend(self.sequence(depth, ')')?);
                        Ok(PyVal::Seq(items, true))
                    }
                    _ => Err(self.after_value_error(&sep, "`,` or `)`")),
                }
            }
            Tok::Punct('{') => self.dict(depth, t.at),
            Tok::Newline | Tok::Eof | Tok::Punct(',' | ')' | ']' | '}' | ':') => {
                Err(LiteralError::Unexpected {
                    expected: "a value",
                    found: self.describe(&t),
                    at: t.at,
                })
            }
            _ => Err(LiteralError::Unsupported {
                found: self.describe(&t),
                at: t.at,
            }),
        }
    }

    /// Items up to `close` (the opening bracket is consumed), with an optional trailing comma.
    fn sequence(&mut self, depth: usize, close: char) -> Result<Vec<PyVal>, LiteralError> {
        let mut items = Vec::new();
        loop {
            if matches!(self.peek()?.tok, Tok::Punct(c) if c == close) {
                self.next()?;
                return Ok(items);
            }
            items.push(self.value(depth + 1)?);
            let sep = self.next()?;
            match sep.tok {
                Tok::Punct(',') => {}
                Tok::Punct(c) if c == close => return Ok(items),
                _ => {
                    return Err(self.after_value_error(
                        &sep,
                        if close == ']' {
                            "`,` or `]`"
                        } else {
                            "`,` or `)`"
                        },
                    ))
                }
            }
        }
    }

    fn dict(&mut self, depth: usize, open_at: usize) -> Result<PyVal, LiteralError> {
        let mut entries = Vec::new();
        loop {
            let (close, unpack, key_at) = {
                let next = self.peek()?;
                (
                    matches!(next.tok, Tok::Punct('}')),
                    matches!(next.tok, Tok::Op("**")),
                    next.at,
                )
            };
            if close {
                self.next()?;
                return Ok(PyVal::Dict(entries));
            }
            if unpack {
                return Err(LiteralError::Unsupported {
                    found: "**".to_owned(),
                    at: key_at,
                });
            }
            let key = self.value(depth + 1)?;
            let colon = self.next()?;
            match colon.tok {
                Tok::Punct(':') => {}
                Tok::Punct(',' | '}') if entries.is_empty() => {
                    return Err(LiteralError::Unsupported {
                        found: "set literal".to_owned(),
                        at: open_at,
                    })
                }
                _ => return Err(self.after_value_error(&colon, "`:`")),
            }
            let value = self.value(depth + 1)?;
            entries.push((key, key_at, value));
            let sep = self.next()?;
            match sep.tok {
                Tok::Punct(',') => {}
                Tok::Punct('}') => return Ok(PyVal::Dict(entries)),
                _ => return Err(self.after_value_error(&sep, "`,` or `}`")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(code: &str) -> Result<Value, LiteralError> {
        parse_tool_call(code).map(Value::Object)
    }

    fn lit(code: &str) -> Value {
        match parse_literal(code) {
            Ok(v) => v,
            Err(e) => panic!("{code:?}: {e}"),
        }
    }

    #[test]
    fn simple_calls() {
        assert_eq!(call("tool_call()").unwrap(), json!({}));
        assert_eq!(
            call("tool_call(a=2, b=40)").unwrap(),
            json!({"a": 2, "b": 40})
        );
        assert_eq!(
            call("tool_call(city='北京', unit=\"c\",)\n").unwrap(),
            json!({"city": "北京", "unit": "c"})
        );
        assert_eq!(
            call(" \t tool_call (\n  a = 1 ,  # comment\n  b=[1,\n 2],\n)\n\n# trailing\n")
                .unwrap(),
            json!({"a": 1, "b": [1, 2]})
        );
        assert_eq!(call("\n\ntool_call(a=1)\r\n").unwrap(), json!({"a": 1}));
        assert_eq!(call("\\\ntool_call(a=\\\n1)").unwrap(), json!({"a": 1}));
        assert_eq!(
            call("tool_call(城市='北京')").unwrap(),
            json!({"城市": "北京"})
        );
        assert_eq!(
            call("tool_call(match=1, _=2)").unwrap(),
            json!({"match": 1, "_": 2})
        );
    }

    #[test]
    fn keyword_order_is_kept() {
        let args = parse_tool_call("tool_call(z=1, a=2, m=3)").unwrap();
        let keys: Vec<&str> = args.keys().map(String::as_str).collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn strings() {
        assert_eq!(lit(r#"'a' "b" '''c''' """d""""#), json!("abcd"));
        assert_eq!(
            lit(r#"'\n\t\\\'\"\a\b\f\v\r'"#),
            json!("\n\t\\'\"\x07\x08\x0c\x0b\r")
        );
        assert_eq!(lit(r"'\x41\u00e9\U0001F600\101\0\777'"), json!("Aé😀A\0ǿ"));
        assert_eq!(lit(r"'\d\8'"), json!("\\d\\8"));
        assert_eq!(lit("'a\\\nb'"), json!("ab"));
        assert_eq!(lit("'''a\r\nb\rc'''"), json!("a\nb\nc"));
        assert_eq!(lit(r"r'\n' R'\'' u'x' U'y'"), json!("\\n\\'xy"));
        assert_eq!(lit("r'a\\\nb'"), json!("a\\\nb"));
        assert_eq!(lit("('x'\n 'y')"), json!("xy"));
        assert_eq!(lit("'''it's \"q\" '' ok'''"), json!("it's \"q\" '' ok"));
        assert_eq!(lit("'中文\u{1c}\u{3000}'"), json!("中文\u{1c}\u{3000}"));
    }

    #[test]
    fn bad_strings() {
        for code in [
            "'abc",
            "'a\nb'",
            "'a\rb'",
            "'''abc''",
            r"'\x4'",
            r"'\u12'",
            r"'\U00110000'",
            r"'\ud800'",
            r"'\N{DIGIT ONE}'",
            r"r'x\'",
            "'\\",
            "'a\0'",
        ] {
            assert!(parse_literal(code).is_err(), "{code:?}");
        }
        assert!(matches!(
            parse_literal("b'x'"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_literal("f'{x}'"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(parse_literal("'x' b'y'").is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(lit("0"), json!(0));
        assert_eq!(lit("00"), json!(0));
        assert_eq!(lit("-0"), json!(0));
        assert_eq!(lit("1_000"), json!(1000));
        assert_eq!(lit("0x_1f"), json!(31));
        assert_eq!(lit("0O17"), json!(15));
        assert_eq!(lit("0b1_0"), json!(2));
        assert_eq!(lit("-5"), json!(-5));
        assert_eq!(lit("- - 5"), json!(5));
        assert_eq!(lit("+-+5"), json!(-5));
        assert_eq!(lit("1.5"), json!(1.5));
        assert_eq!(lit(".5"), json!(0.5));
        assert_eq!(lit("5."), json!(5.0));
        assert_eq!(lit("1.e5"), json!(100000.0));
        assert_eq!(lit("1E+3"), json!(1000.0));
        assert_eq!(lit("1e5_0"), json!(1e50));
        assert_eq!(lit("1_000.000_1"), json!(1000.0001));
        assert_eq!(lit("09.5"), json!(9.5));
        assert_eq!(lit("-0.0").to_string(), "-0.0");
        assert_eq!(lit("9223372036854775807"), json!(i64::MAX));
        assert_eq!(lit("-9223372036854775808"), json!(i64::MIN));
        assert_eq!(lit("18446744073709551615"), json!(u64::MAX));
        assert_eq!(lit("18446744073709551616"), json!(18446744073709551616.0));
        assert_eq!(lit("-9223372036854775809"), json!(-9223372036854775809.0));
        assert_eq!(lit(&"9".repeat(300)), json!(1e300));
        assert_eq!(lit("1e-400"), json!(0.0));
    }

    #[test]
    fn bad_numbers() {
        for code in [
            "09", "0777", "1__0", "1_", "1_e5", "1e", "1e_5", "1_.5", "1._5", "0x", "0b2", "0o8",
            "12abc", "1e400", "-1e400", "1j", "1.5J", "0x1for",
        ] {
            assert!(parse_literal(code).is_err(), "{code:?}");
        }
        assert!(matches!(
            parse_literal(&"9".repeat(400)),
            Err(LiteralError::NumberOutOfRange { .. })
        ));
        assert!(matches!(
            parse_literal(&format!("0x{}", "f".repeat(33))),
            Err(LiteralError::NumberOutOfRange { .. })
        ));
    }

    #[test]
    fn containers() {
        assert_eq!(lit("[]"), json!([]));
        assert_eq!(lit("()"), json!([]));
        assert_eq!(lit("(1)"), json!(1));
        assert_eq!(lit("((((1))))"), json!(1));
        assert_eq!(lit("(1,)"), json!([1]));
        assert_eq!(lit("(1, 2,)"), json!([1, 2]));
        assert_eq!(lit("[1, [2, (3, {})],]"), json!([1, [2, [3, {}]]]));
        assert_eq!(lit("{}"), json!({}));
        assert_eq!(
            lit("{'a': 1, \"b\": [True, False, None],}"),
            json!({"a": 1, "b": [true, false, null]})
        );
        for code in [
            "[1,,2]", "[,]", "(,)", "[1 2]", "{'a' 1}", "{'a': }", "[1", "(1", "{'a': 1",
        ] {
            assert!(parse_literal(code).is_err(), "{code:?}");
        }
    }

    #[test]
    fn dict_keys_follow_python_then_json_dumps() {
        assert_eq!(
            lit("{1: 'a', 1.5: 'b', True: 'c', None: 'd', -0.0: 'e', 1e16: 'f', 1e-5: 'g', 0.0001: 'h'}"),
            json!({"1": "c", "1.5": "b", "null": "d", "-0.0": "e", "1e+16": "f", "1e-05": "g", "0.0001": "h"})
        );
        // 0, 0.0, -0.0 and False are one key: the first key's text, the last value.
        assert_eq!(lit("{0: 1, False: 2, -0.0: 3}"), json!({"0": 3}));
        // A str key "1" and an int key 1 are different Python keys but the same JSON key.
        assert_eq!(
            lit("{'1': 'a', 2: 'x', 1: 'b'}"),
            json!({"1": "b", "2": "x"})
        );
        assert_eq!(lit("{'k': 1, 'k': 2}"), json!({"k": 2}));
        assert!(matches!(
            parse_literal("{(1, 2): 3}"),
            Err(LiteralError::BadKey { kind: "tuple", .. })
        ));
        assert!(matches!(
            parse_literal("{[1]: 3}"),
            Err(LiteralError::BadKey { kind: "list", .. })
        ));
        assert!(matches!(
            parse_literal("{1, 2}"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_literal("{1}"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_literal("{**a}"),
            Err(LiteralError::Unsupported { .. })
        ));
    }

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e300, "1.5e+300"),
            (0.1 + 0.2, "0.30000000000000004"),
            (5e-324, "5e-324"),
            (1e22, "1e+22"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (-0.0, "-0.0"),
            (0.0, "0.0"),
            (-2.5, "-2.5"),
            (100.0, "100.0"),
            (1234.5678, "1234.5678"),
            // Exactly halfway between ...096.62 and ...096.63: Python rounds half to even.
            (190401870259096.62, "190401870259096.62"),
        ];
        for (f, s) in cases {
            assert_eq!(py_float_repr(f), s, "{f:e}");
        }
    }

    #[test]
    fn rejects_code() {
        let cases = [
            ("tool_call(x=__import__('os'))", "__import__"),
            ("tool_call(x=os.system('ls'))", "os"),
            ("tool_call(x=1 + 2)", "+"),
            ("tool_call(x=10**9)", "**"),
            ("tool_call(x=(1).real)", "."),
            ("tool_call(x='a'.upper())", "."),
            ("tool_call(x=[1][0])", "["),
            ("tool_call(x=lambda: 1)", "lambda"),
            ("tool_call(x=[i for i in ()])", "i"),
            ("tool_call(x=[1 for i in ()])", "for"),
            ("tool_call(x=1 if 1 else 2)", "if"),
            ("tool_call(x=-True)", "-True"),
            ("tool_call(x=not 1)", "not"),
            ("tool_call(x=...)", "..."),
            ("tool_call(x=[*[1]])", "*"),
            ("tool_call(**{'a': 1})", "**"),
            ("tool_call(x=1)(y=2)", "("),
            ("tool_call(x=1)[0]", "["),
            ("tool_call(x=1).x", "."),
            ("tool_call(x=1);", ";"),
            ("tool_call(x=1); import os", ";"),
            ("tool_call(x=(y:=1))", "y"),
            ("tool_call(x=~1)", "~"),
            ("tool_call(x=inf)", "inf"),
            ("tool_call(x=nan)", "nan"),
        ];
        for (code, found_part) in cases {
            match parse_tool_call(code) {
                Err(LiteralError::Unsupported { found, .. }) => {
                    assert!(found.contains(found_part), "{code:?}: found {found:?}")
                }
                other => panic!("{code:?}: {other:?}"),
            }
        }
        let msg = parse_tool_call("tool_call(x=__import__('os'))")
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "unsupported expression `__import__` at byte 12: only literals are allowed"
        );
    }

    #[test]
    fn rejects_bad_call_shapes() {
        assert_eq!(parse_tool_call(""), Err(LiteralError::Empty));
        assert_eq!(
            parse_tool_call("\n# only a comment\n"),
            Err(LiteralError::Empty)
        );
        assert!(matches!(
            parse_tool_call("get_weather(city='x')"),
            Err(LiteralError::NotToolCall { .. })
        ));
        assert_eq!(call("{'a': 1, 2: [3]}").unwrap(), json!({"a": 1, "2": [3]}));
        assert_eq!(call("{}\n").unwrap(), json!({}));
        assert!(matches!(
            parse_tool_call("[1]"),
            Err(LiteralError::NotToolCall { .. })
        ));
        assert!(matches!(
            parse_tool_call("{'a': 1}.keys()"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_tool_call("{1, 2}"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call\n(a=1)"),
            Err(LiteralError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(1)"),
            Err(LiteralError::PositionalArgument { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a)"),
            Err(LiteralError::PositionalArgument { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(,)"),
            Err(LiteralError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=1, a=2)"),
            Err(LiteralError::RepeatedKeyword { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(True=1)"),
            Err(LiteralError::KeywordAsName { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(\u{ff41}=1)"),
            Err(LiteralError::UnsupportedName { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=1)\n  \n tool_call(b=1)"),
            Err(LiteralError::UnexpectedIndent { .. })
        ));
        assert!(matches!(
            parse_tool_call("\n  tool_call(a=1)"),
            Err(LiteralError::UnexpectedIndent { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=1)\ntool_call(b=1)"),
            Err(LiteralError::Unsupported { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=\u{3000}1)"),
            Err(LiteralError::InvalidCharacter { code: 0x3000, .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=\u{a0}1)"),
            Err(LiteralError::InvalidCharacter { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=\u{b}1)"),
            Err(LiteralError::InvalidCharacter { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=1)\0"),
            Err(LiteralError::InvalidCharacter { .. })
        ));
        assert!(matches!(
            parse_tool_call("\u{feff}tool_call(a=1)"),
            Err(LiteralError::InvalidCharacter { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call(a=1\\ )"),
            Err(LiteralError::Unexpected { .. })
        ));
        assert!(matches!(
            parse_tool_call("tool_call()\n "),
            Err(LiteralError::UnexpectedIndent { .. })
        ));
        assert!(parse_tool_call("tool_call()\n \n").is_ok());
        assert!(parse_tool_call("tool_call()\\\n").is_err());
        assert!(parse_tool_call("tool_call()\\\n ").is_ok());
        assert!(parse_tool_call("tool_call(a=1").is_err());
        assert!(parse_tool_call("tool_call(a=").is_err());
        assert!(parse_tool_call("tool_call(a=1))").is_err());
    }

    #[test]
    fn hostile_input_is_bounded() {
        let deep = "[".repeat(1_000_000);
        assert!(matches!(
            parse_literal(&deep),
            Err(LiteralError::TooDeep { max: 64, .. })
        ));
        let deep_call = format!("tool_call(a={})", "(".repeat(100_000));
        assert!(matches!(
            parse_tool_call(&deep_call),
            Err(LiteralError::TooDeep { .. })
        ));
        let dict_deep = format!("tool_call(a={})", "{1:".repeat(100_000));
        assert!(matches!(
            parse_tool_call(&dict_deep),
            Err(LiteralError::TooDeep { .. })
        ));
        let ok_depth = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_literal(&ok_depth).is_ok());
        let too_deep = format!(
            "{}1{}",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert!(matches!(
            parse_literal(&too_deep),
            Err(LiteralError::TooDeep { .. })
        ));
        let huge = format!("tool_call(a='{}')", "x".repeat(MAX_INPUT_BYTES));
        assert!(matches!(
            parse_tool_call(&huge),
            Err(LiteralError::TooLarge { .. })
        ));
        let unbalanced = "]]]]))))}}}}".repeat(1000);
        assert!(parse_tool_call(&unbalanced).is_err());
        let signs = format!("tool_call(a={}1)", "-".repeat(500_000));
        assert_eq!(call(&signs).unwrap(), json!({"a": 1}));
        let unterminated = format!("tool_call(a='{}", "y".repeat(500_000));
        assert!(parse_tool_call(&unterminated).is_err());
    }

    #[test]
    fn error_messages_name_the_problem() {
        let e = parse_tool_call("tool_call(a=1, a=2)").unwrap_err();
        assert_eq!(e.to_string(), "keyword argument `a` repeated at byte 15");
        let e = parse_literal("0777").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid number literal `0777` at byte 0: leading zeros in decimal integer literals are not permitted"
        );
        let e = parse_literal("[1 2]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "syntax error at byte 3: expected `,` or `]`, found 2"
        );
        let e = parse_tool_call("tool_call(a=\u{3000}1)").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid character '\\u{3000}' (U+3000) at byte 12"
        );
    }
}
