//! GLM-4's pre-tokenizer: splits text into the pieces that BPE then encodes one by one.
//!
//! Both official tokenizers split with the regex [`GLM4_PATTERN`] (leftmost-first alternation,
//! with a `\s+(?!\S)` look-ahead that plain `regex` cannot express). Running a backtracking
//! regex on megabytes of hostile input is a risk, so this module is a hand-written scanner that
//! gives exactly the regex's matches in one left-to-right pass, O(n) in the text length.
//!
//! How each alternative resolves, at a match start `c` (every position starts a match, because
//! every character is a letter, a number, whitespace or "other", and some alternative accepts
//! each of these):
//! 1. `(?i:'s|'t|'re|'ve|'m|'ll|'d)`: an apostrophe followed by one of the suffixes, compared
//!    case-insensitively with Unicode simple case folding (so `'ſ`, long s, also matches).
//! 2. `[^\r\n\p{L}\p{N}]?\p{L}+`: a letter run, optionally preceded by one character that is
//!    neither `\r`/`\n` nor a letter/number (a space, tab, NBSP, punctuation, ...).
//! 3. `\p{N}{1,3}`: one to three numbers.
//! 4. ` ?[^\s\p{L}\p{N}]+[\r\n]*`: an optional U+0020 space, a run of "other" characters, then
//!    any `\r`/`\n` run.
//! 5. `\s*[\r\n]+`: a whitespace run that contains a newline, up to and including its *last*
//!    `\r`/`\n` (the `\s*` gives back characters until `[\r\n]+` can match).
//! 6. `\s+(?!\S)`: the whole whitespace run if it ends the text, otherwise the run minus its last
//!    character (which then starts the next piece), if that leaves at least one character.
//! 7. `\s+`: a lone whitespace character before a non-space.

use super::unicode_tables::{in_ranges, LETTER, NUMBER};

/// The split pattern of GLM-4's tokenizers (tiktoken `pat_str` and the `tokenizer.json`
/// `Split` pre-tokenizer), kept for documentation and for tests against `fancy-regex`.
pub const GLM4_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The character classes the pattern distinguishes. They are disjoint: White_Space characters
/// are never letters or numbers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\r` or `\n`.
    Newline,
    /// U+0020, the only space alternative 4 accepts as its optional prefix.
    Space,
    /// Any other `\s` character (tab, NBSP, U+3000, ...).
    OtherWs,
    /// Anything else: punctuation, symbols, marks, emoji, controls.
    Other,
}

impl Class {
    fn is_ws(self) -> bool {
        matches!(self, Class::Newline | Class::Space | Class::OtherWs)
    }
}

/// `\p{L}` as the `regex` crate defines it.
pub(crate) fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        in_ranges(LETTER, c)
    }
}

/// `\p{N}` as the `regex` crate defines it.
pub(crate) fn is_number(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        in_ranges(NUMBER, c)
    }
}

fn classify(c: char) -> Class {
    match c {
        '\r' | '\n' => Class::Newline,
        ' ' => Class::Space,
        c if c.is_whitespace() => Class::OtherWs,
        c if is_letter(c) => Class::Letter,
        c if is_number(c) => Class::Number,
        _ => Class::Other,
    }
}

/// Splits `text` into GLM-4 pre-tokenizer pieces; the pieces are contiguous and cover `text`.
///
/// Equal to `fancy_regex::Regex::new(GLM4_PATTERN)?.find_iter(text)`, in linear time.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

/// Iterator over the pre-tokenizer pieces of a text (see [`pieces`]).
#[derive(Clone, Debug)]
pub struct Pieces<'t> {
    text: &'t str,
    pos: usize,
}

impl<'t> Iterator for Pieces<'t> {
    type Item = &'t str;

    fn next(&mut self) -> Option<&'t str> {
        let rest = self.text.get(self.pos..)?;
        let len = match_len(rest)?;
        let piece = rest.get(..len)?;
        self.pos += len;
        Some(piece)
    }
}

/// Byte length of a run of characters of class `class` at the start of `s`, at most `max`
/// characters.
fn run_len(s: &str, class: Class, max: usize) -> usize {
    let mut len = 0;
    for (n, c) in s.chars().enumerate() {
        if n == max || classify(c) != class {
            break;
        }
        len += c.len_utf8();
    }
    len
}

/// Length of the piece starting at the beginning of `rest`, `None` when `rest` is empty.
fn match_len(rest: &str) -> Option<usize> {
    let c = rest.chars().next()?;
    let l0 = c.len_utf8();
    let class = classify(c);
    let after = rest.get(l0..).unwrap_or("");
    let len = match class {
        Class::Letter => l0 + run_len(after, Class::Letter, usize::MAX),
        Class::Number => l0 + run_len(after, Class::Number, 2),
        _ => {
            if c == '\'' {
                if let Some(n) = contraction_len(after) {
                    return Some(1 + n);
                }
            }
            let next = after.chars().next().map(classify);
            if class != Class::Newline && next == Some(Class::Letter) {
                // Alternative 2 with its optional prefix.
                l0 + run_len(after, Class::Letter, usize::MAX)
            } else if class == Class::Other {
                // Alternative 4 without the space.
                other_then_newlines(rest)
            } else if class == Class::Space && next == Some(Class::Other) {
                // Alternative 4 with the space.
                l0 + other_then_newlines(after)
            } else {
                whitespace_len(rest)
            }
        }
    };
    Some(len)
}

/// `[^\s\p{L}\p{N}]+[\r\n]*` at the start of `s` (which starts with an "other" character).
fn other_then_newlines(s: &str) -> usize {
    let n = run_len(s, Class::Other, usize::MAX);
    n + run_len(s.get(n..).unwrap_or(""), Class::Newline, usize::MAX)
}

/// Alternatives 5 to 7 for a whitespace run starting at the beginning of `s`.
fn whitespace_len(s: &str) -> usize {
    let mut run_end = 0;
    let mut last_newline_end = None;
    let mut last_char_start = 0;
    let mut count = 0usize;
    for c in s.chars() {
        let class = classify(c);
        if !class.is_ws() {
            break;
        }
        last_char_start = run_end;
        run_end += c.len_utf8();
        count += 1;
        if class == Class::Newline {
            last_newline_end = Some(run_end);
        }
    }
    if let Some(end) = last_newline_end {
        end
    } else if run_end == s.len() || count == 1 {
        run_end
    } else {
        last_char_start
    }
}

/// Length in bytes of a contraction suffix (`s t re ve m ll d`, case-insensitive) at the start of
/// `s`, which follows an apostrophe.
fn contraction_len(s: &str) -> Option<usize> {
    let mut it = s.chars();
    let first = it.next()?;
    match first {
        // U+017F LATIN SMALL LETTER LONG S case-folds to 's'.
        's' | 'S' | '\u{17F}' => Some(first.len_utf8()),
        't' | 'T' | 'm' | 'M' | 'd' | 'D' => Some(1),
        'r' | 'R' | 'v' | 'V' => matches!(it.next(), Some('e' | 'E')).then_some(2),
        'l' | 'L' => matches!(it.next(), Some('l' | 'L')).then_some(2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn regex_pieces(re: &fancy_regex::Regex, text: &str) -> Vec<String> {
        re.find_iter(text)
            .map(|m| match m {
                Ok(m) => m.as_str().to_string(),
                Err(e) => panic!("fancy-regex failed on {text:?}: {e}"),
            })
            .collect()
    }

    fn ours(text: &str) -> Vec<String> {
        pieces(text).map(str::to_string).collect()
    }

    fn pattern() -> fancy_regex::Regex {
        fancy_regex::Regex::new(GLM4_PATTERN).unwrap()
    }

    #[test]
    fn readme_examples() {
        assert_eq!(ours("a     b"), ["a", "    ", " b"]);
        assert_eq!(ours("12345678"), ["123", "456", "78"]);
        assert_eq!(ours("'RE"), ["'RE"]);
        assert_eq!(ours("   \n  x"), ["   \n", " ", " x"]);
        assert_eq!(ours(""), Vec::<String>::new());
    }

    #[test]
    fn fixture_texts_match_regex() {
        let re = pattern();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/glm4/tokenizer/encode_cases.json"
        );
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut n = 0;
        for case in cases["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(ours(text), regex_pieces(&re, text), "text {text:?}");
            n += 1;
        }
        assert_eq!(n, 27);
    }

    const NASTY: &[&str] = &[
        " ",
        " ",
        " ",
        "\t",
        "\r",
        "\n",
        "\r\n",
        "\u{a0}",
        "\u{3000}",
        "\u{85}",
        "\u{2028}",
        "\u{b}",
        "\u{c}",
        "a",
        "b",
        "Z",
        "é",
        "e\u{301}",
        "\u{301}",
        "ж",
        "中",
        "文",
        "ア",
        "한",
        "ß",
        "ſ",
        "\u{212a}",
        "0",
        "7",
        "٣",
        "Ⅻ",
        "½",
        "²",
        "'",
        "'",
        "s",
        "S",
        "t",
        "T",
        "re",
        "RE",
        "rE",
        "ve",
        "VE",
        "m",
        "M",
        "ll",
        "LL",
        "lL",
        "d",
        "D",
        ".",
        ",",
        "!",
        "?",
        "(",
        ")",
        "\"",
        "-",
        "_",
        "+",
        "$",
        "€",
        "😀",
        "👨\u{200d}👩",
        "\u{200d}",
        "\u{fe0f}",
        "\u{0}",
        "\u{7f}",
        "<|user|>",
        "[gMASK]",
        "\u{ffff}",
        "\u{10ffff}",
    ];

    #[test]
    fn random_nasty_strings_match_regex() {
        let re = pattern();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6c6d);
        for _ in 0..4000 {
            let len = rng.random_range(0..24);
            let text: String = (0..len)
                .map(|_| NASTY[rng.random_range(0..NASTY.len())])
                .collect();
            assert_eq!(ours(&text), regex_pieces(&re, &text), "text {text:?}");
        }
    }

    #[test]
    fn random_scalar_values_match_regex() {
        let re = pattern();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let len = rng.random_range(0..16);
            let text: String = (0..len)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        NASTY[rng.random_range(0..NASTY.len())].to_string()
                    } else {
                        let c = loop {
                            if let Some(c) = char::from_u32(rng.random_range(0..0x11_0000)) {
                                break c;
                            }
                        };
                        c.to_string()
                    }
                })
                .collect();
            assert_eq!(ours(&text), regex_pieces(&re, &text), "text {text:?}");
        }
    }

    /// Every Unicode scalar value is classified exactly as the regex classes (and the
    /// case-insensitive contraction letters) classify it.
    #[test]
    fn classes_match_regex_for_every_char() {
        let letter = fancy_regex::Regex::new(r"^\p{L}$").unwrap();
        let number = fancy_regex::Regex::new(r"^\p{N}$").unwrap();
        let space = fancy_regex::Regex::new(r"^\s$").unwrap();
        let fold = fancy_regex::Regex::new(r"^(?i:s|t|m|d|r|v|l|e)$").unwrap();
        let mut buf = [0u8; 4];
        for c in (0..=0x10_FFFFu32).filter_map(char::from_u32) {
            let s = c.encode_utf8(&mut buf);
            assert_eq!(is_letter(c), letter.is_match(s).unwrap(), "L {c:?}");
            assert_eq!(is_number(c), number.is_match(s).unwrap(), "N {c:?}");
            assert_eq!(c.is_whitespace(), space.is_match(s).unwrap(), "s {c:?}");
            let folds = matches!(
                c.to_ascii_lowercase(),
                's' | 't' | 'm' | 'd' | 'r' | 'v' | 'l' | 'e'
            ) || c == '\u{17F}';
            assert_eq!(folds, fold.is_match(s).unwrap(), "fold {c:?}");
        }
    }

    /// Hostile shapes are scanned in linear time and still agree with the regex.
    #[test]
    fn long_hostile_runs() {
        let re = pattern();
        for unit in [" ", "\n ", " \t", "a", "1", "!", "' ", " \u{a0}x", "\r\n\r"] {
            let text = unit.repeat(20_000);
            assert_eq!(ours(&text), regex_pieces(&re, &text), "unit {unit:?}");
        }
        let big = " ".repeat(1 << 20) + "x";
        assert_eq!(pieces(&big).count(), 2);
    }
}
