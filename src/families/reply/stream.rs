//! Streaming gate: which part of a reply that is still being generated a client may see now.
//!
//! The engine feeds [`ReplyStream::push`] the raw decoded text as it grows (each delta whole UTF-8);
//! each call returns the text that may be shown now. Nothing is ever shown that the final reply
//! ([`parse_reply`]) drops or changes:
//!
//! - ChatGLM3/GLM-4: the metadata line (everything up to the segment's first `"\n"`) is never shown.
//!   Until that `"\n"` arrives nothing is shown, because the first line is either metadata (then the
//!   reply is a tool call or metadata reply and **nothing** is streamed) or, if no `"\n"` ever comes,
//!   the whole text, which is then released by [`ReplyStream::finish`].
//! - Leading whitespace (Python's definition, see [`crate::families::python::strings`]) is dropped; trailing whitespace is
//!   held back until something else follows it, and dropped at the end.
//! - A possible beginning of `"[[训练时间]]"` at the end is held back, so the marker is replaced by
//!   `"2023年"` even when it arrives split across deltas.
//! - ChatGLM3/GLM-4: a possible beginning of `"<|assistant|>"` at the end is held back too.
//!
//! For a text reply, the concatenation of everything `push` returned and the `delta` of
//! [`StreamEnd`] equals the final reply's text exactly, and for a tool-call or metadata reply it is
//! empty — with one documented exception below.
//!
//! # `<|assistant|>` inside a reply
//!
//! The official code splits the raw text at every `<|assistant|>` and returns only the last segment
//! (ChatGLM3 does emit e.g. a short thought, then `<|assistant|>` and a tool call). A segment start
//! can come at any time, and text already sent cannot be taken back, so:
//!
//! - each segment is gated on its own, exactly as above; when a new segment starts, the previous
//!   one's held-back text is discarded and [`ReplyStream::display_text`] starts again from empty;
//! - **the exception:** if text was already shown when a new segment starts, the appended deltas
//!   (`shown_before + final_text`) cannot equal the final text. [`StreamEnd::diverged`] is then true;
//!   the final reply (in [`StreamEnd::reply`]) is still exactly the official one, and the final text
//!   is always a suffix of what was streamed. A delta-based client (SSE) should treat the streamed
//!   text as preliminary when `diverged` is set (e.g. the thought before a tool call).
//! - A cumulative client (gRPC sends the full text each time) should send
//!   [`ReplyStream::display_text`]: it is always exactly the final text at the end, even in the
//!   exception; it only ever shrinks (back to empty) when a new segment starts after text was shown.
//!
//! Holding text back cannot avoid the exception: any position may be followed by `<|assistant|>`,
//! so only not streaming at all would.

use std::mem;

use crate::families::python::strings::{python_is_blank, python_isspace, python_strip};
use crate::families::reply::{
    parse_reply, ParsedReply, Reply, ReplyStyle, ASSISTANT_TOKEN, TRAINING_TIME_MARKER,
    TRAINING_TIME_REPLACEMENT,
};

#[cfg(test)]
/// What the stream knows about the current segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamPhase {
    /// ChatGLM3/GLM-4 before the segment's first `"\n"`: could still be text or a tool call.
    Undecided,
    /// The segment is a text reply (ChatGLM2 always is); its content is being streamed.
    Text,
    /// The segment has a non-blank metadata line: a tool call or metadata reply; nothing is shown.
    Hidden,
}

/// The end of a stream: the last delta and the final reply.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEnd {
    /// Text to show after everything [`ReplyStream::push`] returned (possibly empty).
    pub delta: String,
    /// The full text shown for the final segment: the final reply's text for a text reply, empty
    /// otherwise (what a cumulative stream sends last).
    pub display_text: String,
    /// The final reply, exactly as [`parse_reply`] gives it for the whole raw text.
    pub reply: ParsedReply,
    /// `true` when the concatenated deltas are **not** the final reply's text (or not empty for a
    /// tool-call/metadata reply): text was shown before an `<|assistant|>` started a new segment.
    pub diverged: bool,
}

/// Incremental gate over a reply being generated; see the module docs.
///
/// # Examples
///
/// ```text
/// use reply::reply::ReplyStyle;
/// use reply::stream::ReplyStream;
///
/// let mut s = ReplyStream::new(ReplyStyle::ChatGlm3, false);
/// let mut shown = String::new();
/// for delta in ["\n", " 截至[[训练", "时间]]", "。 ", "\n"] {
///     shown += &s.push(delta);
/// }
/// let end = s.finish();
/// shown += &end.delta;
/// assert_eq!(shown, "截至2023年。");
/// assert_eq!(end.reply.reply.as_text(), Some("截至2023年。"));
/// assert!(!end.diverged);
/// ```
#[derive(Debug, Clone)]
pub struct ReplyStream {
    style: ReplyStyle,
    tools_given: bool,
    raw: String,
    /// A proper prefix of [`ASSISTANT_TOKEN`] at the end of `raw`, not yet given to the segment.
    boundary: String,
    segment: Segment,
    /// Visible text of the current segment (everything shown since it started).
    display: String,
    emitted_any: bool,
    diverged: bool,
    /// Within the current `push`, where the current segment's part of the output starts.
    seg_mark: usize,
}

#[derive(Debug, Clone)]
enum Segment {
    /// Before the segment's first `"\n"`: the line so far.
    Metadata(String),
    /// Blank metadata line (or ChatGLM2): content goes through the gate.
    Content(ContentGate),
    /// Non-blank metadata line: nothing is shown.
    Hidden,
}

/// Python `strip()` plus the marker replacement, one character at a time.
#[derive(Debug, Clone, Default)]
struct ContentGate {
    /// Whether a non-whitespace character has been seen (leading whitespace is dropped before).
    started: bool,
    /// Whitespace run after the last shown character, held until non-whitespace follows.
    ws: String,
    /// A proper prefix of the marker at the end, held until it completes or breaks.
    partial: String,
}

impl ContentGate {
    fn feed(&mut self, text: &str, out: &mut String) {
        for ch in text.chars() {
            if python_isspace(ch) {
                if !self.started {
                    continue;
                }
                // The marker has no whitespace: a pending partial can no longer complete.
                out.push_str(&self.partial);
                self.partial.clear();
                self.ws.push(ch);
                continue;
            }
            self.started = true;
            out.push_str(&self.ws);
            self.ws.clear();
            if self.partial.is_empty() && !TRAINING_TIME_MARKER.starts_with(ch) {
                out.push(ch);
                continue;
            }
            self.partial.push(ch);
            if self.partial == TRAINING_TIME_MARKER {
                out.push_str(TRAINING_TIME_REPLACEMENT);
                self.partial.clear();
            } else if !TRAINING_TIME_MARKER.starts_with(self.partial.as_str()) {
                // Release the shortest head whose remainder can still start a marker.
                let cut = self
                    .partial
                    .char_indices()
                    .map(|(i, _)| i)
                    .skip(1)
                    .find(|&i| TRAINING_TIME_MARKER.starts_with(&self.partial[i..]))
                    .unwrap_or(self.partial.len());
                out.push_str(&self.partial[..cut]);
                self.partial.drain(..cut);
            }
        }
    }

    /// End of the content: trailing whitespace is dropped, an incomplete marker is plain text.
    fn finish(&mut self, out: &mut String) {
        out.push_str(&self.partial);
        self.partial.clear();
        self.ws.clear();
    }
}

impl ReplyStream {
    /// A gate for one reply of the given family; `tools_given` as for [`parse_reply`].
    #[must_use]
    pub fn new(style: ReplyStyle, tools_given: bool) -> Self {
        let segment = match style {
            ReplyStyle::ChatGlm2 => Segment::Content(ContentGate::default()),
            ReplyStyle::ChatGlm3 | ReplyStyle::Glm4 => Segment::Metadata(String::new()),
        };
        ReplyStream {
            style,
            tools_given,
            raw: String::new(),
            boundary: String::new(),
            segment,
            display: String::new(),
            emitted_any: false,
            diverged: false,
            seg_mark: 0,
        }
    }

    /// Feed the next piece of raw decoded text; returns the text that may be shown now (often
    /// empty). Runs in time proportional to `delta`.
    pub fn push(&mut self, delta: &str) -> String {
        self.raw.push_str(delta);
        let mut out = String::new();
        self.seg_mark = 0;
        if self.style == ReplyStyle::ChatGlm2 {
            self.feed_segment(delta, &mut out);
        } else {
            self.scan(delta, &mut out);
        }
        let mark = self.seg_mark.min(out.len());
        self.display.push_str(&out[mark..]);
        self.emitted_any |= !out.is_empty();
        out
    }

    /// Everything shown for the current segment so far: what a cumulative stream (gRPC) sends.
    ///
    /// At the end (see [`StreamEnd::display_text`]) it is exactly the final reply's text.
    #[must_use]
    pub fn display_text(&self) -> &str {
        &self.display
    }

    #[cfg(test)]
    /// What is known about the current segment.
    #[must_use]
    pub fn phase(&self) -> StreamPhase {
        match self.segment {
            Segment::Metadata(_) => StreamPhase::Undecided,
            Segment::Content(_) => StreamPhase::Text,
            Segment::Hidden => StreamPhase::Hidden,
        }
    }

    #[cfg(test)]
    /// Whether text was shown before a new `<|assistant|>` segment started (see the module docs).
    #[must_use]
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    /// End of generation: releases what was held back and parses the final reply.
    #[must_use]
    pub fn finish(mut self) -> StreamEnd {
        let mut out = String::new();
        let held = mem::take(&mut self.boundary);
        self.feed_segment(&held, &mut out);
        match &mut self.segment {
            Segment::Metadata(line) => {
                // No "\n" in the segment: all of it is content.
                let mut gate = ContentGate::default();
                gate.feed(line, &mut out);
                gate.finish(&mut out);
            }
            Segment::Content(gate) => gate.finish(&mut out),
            Segment::Hidden => {}
        }
        self.display.push_str(&out);
        self.emitted_any |= !out.is_empty();
        let reply = parse_reply(self.style, &self.raw, self.tools_given);
        let consistent = match &reply.reply {
            Reply::Text(t) => self.display == *t,
            _ => self.display.is_empty(),
        };
        debug_assert!(consistent, "stream gate disagrees with parse_reply");
        StreamEnd {
            delta: out,
            display_text: self.display,
            reply,
            diverged: self.diverged || !consistent,
        }
    }

    /// Split `delta` at `<|assistant|>` boundaries, holding back a possible partial token.
    fn scan(&mut self, delta: &str, out: &mut String) {
        let mut text = String::new();
        for ch in delta.chars() {
            if self.boundary.is_empty() && ch != '<' {
                text.push(ch);
                continue;
            }
            self.boundary.push(ch);
            if self.boundary == ASSISTANT_TOKEN {
                self.boundary.clear();
                self.feed_segment(&text, out);
                text.clear();
                self.new_segment(out);
            } else if !ASSISTANT_TOKEN.starts_with(self.boundary.as_str()) {
                // The token has a single '<', at its start: only a new '<' can begin another one.
                if ch == '<' {
                    self.boundary.pop();
                    text.push_str(&self.boundary);
                    self.boundary.clear();
                    self.boundary.push('<');
                } else {
                    text.push_str(&self.boundary);
                    self.boundary.clear();
                }
            }
        }
        self.feed_segment(&text, out);
    }

    fn new_segment(&mut self, out: &str) {
        // Text already shown (in earlier calls or earlier in this one) cannot be taken back.
        if self.emitted_any || !out.is_empty() {
            self.diverged = true;
        }
        self.display.clear();
        self.seg_mark = out.len();
        self.segment = Segment::Metadata(String::new());
    }

    fn feed_segment(&mut self, text: &str, out: &mut String) {
        if text.is_empty() {
            return;
        }
        match &mut self.segment {
            Segment::Metadata(line) => match text.split_once('\n') {
                None => line.push_str(text),
                Some((head, rest)) => {
                    line.push_str(head);
                    if python_is_blank(line) {
                        let mut gate = ContentGate::default();
                        gate.feed(rest, out);
                        self.segment = Segment::Content(gate);
                    } else {
                        debug_assert!(!python_strip(line).is_empty());
                        self.segment = Segment::Hidden;
                    }
                }
            },
            Segment::Content(gate) => gate.feed(text, out),
            Segment::Hidden => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::families::python::strings::{python_lstrip, python_rstrip};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const STYLES: [ReplyStyle; 3] = [ReplyStyle::ChatGlm2, ReplyStyle::ChatGlm3, ReplyStyle::Glm4];

    /// Longest suffix of `s` that is a proper, non-empty prefix of `pat`.
    fn partial_suffix_len(s: &str, pat: &str) -> usize {
        s.char_indices()
            .map(|(i, _)| i)
            .find(|&i| pat.starts_with(&s[i..]) && s.len() - i < pat.len())
            .map_or(0, |i| s.len() - i)
    }

    /// From scratch: what should be visible for the current segment after `raw` (not finished).
    /// This is the most that can be shown: every part held back could still change.
    fn expected_display(style: ReplyStyle, raw: &str) -> String {
        let content = if style == ReplyStyle::ChatGlm2 {
            raw
        } else {
            let cut = partial_suffix_len(raw, ASSISTANT_TOKEN);
            let seg = crate::families::reply::last_segment(&raw[..raw.len() - cut]);
            match seg.split_once('\n') {
                Some((meta, rest)) if python_is_blank(meta) => rest,
                _ => return String::new(),
            }
        };
        let u = python_lstrip(content);
        let trimmed = python_rstrip(u);
        // Trailing whitespace is held; otherwise a possible start of the marker at the very end is.
        let u = if trimmed.len() < u.len() {
            trimmed
        } else {
            &u[..u.len() - partial_suffix_len(u, TRAINING_TIME_MARKER)]
        };
        u.replace(TRAINING_TIME_MARKER, TRAINING_TIME_REPLACEMENT)
    }

    /// Stream `deltas`, checking the display after every push; returns (concat, end).
    fn run(style: ReplyStyle, tools: bool, deltas: &[&str]) -> (String, StreamEnd) {
        let mut s = ReplyStream::new(style, tools);
        let mut shown = String::new();
        let mut raw = String::new();
        for d in deltas {
            raw.push_str(d);
            let before = s.display_text().to_owned();
            let out = s.push(d);
            shown.push_str(&out);
            assert_eq!(
                s.display_text(),
                expected_display(style, &raw),
                "{style:?} raw={raw:?} deltas={deltas:?}"
            );
            if !s.diverged() {
                assert_eq!(s.display_text(), format!("{before}{out}"));
            }
        }
        let end = s.finish();
        shown.push_str(&end.delta);
        (shown, end)
    }

    fn check(style: ReplyStyle, tools: bool, deltas: &[&str]) {
        let raw: String = deltas.concat();
        let (shown, end) = run(style, tools, deltas);
        let expected = parse_reply(style, &raw, tools);
        assert_eq!(end.reply, expected);
        let final_text = expected.reply.as_text().unwrap_or("");
        assert_eq!(end.display_text, final_text, "{style:?} {raw:?}");
        if end.diverged {
            assert_ne!(style, ReplyStyle::ChatGlm2);
            assert!(raw.contains(ASSISTANT_TOKEN), "{raw:?}");
            assert!(shown.ends_with(final_text) && shown.len() > final_text.len());
        } else {
            assert_eq!(shown, final_text, "{style:?} {deltas:?}");
        }
        // Diverged exactly when some earlier segment would have shown text by itself.
        if style != ReplyStyle::ChatGlm2 {
            let shown_before = raw.match_indices(ASSISTANT_TOKEN).any(|(i, _)| {
                // Just before the token's last character, the old segment was still current.
                let before = &raw[..i + ASSISTANT_TOKEN.len() - 1];
                !expected_display(style, before).is_empty()
            });
            assert_eq!(end.diverged, shown_before, "{raw:?}");
        }
    }

    #[test]
    fn basic_cases() {
        for style in STYLES {
            for tools in [false, true] {
                check(style, tools, &["\n", " hello", " ", "world ", "\u{1c}\n"]);
                check(style, tools, &["[[训", "练时", "间]]"]);
                check(
                    style,
                    tools,
                    &["\n[", "[训练时间]", "]", "[[", "[训练时间]]x"],
                );
                check(style, tools, &["no newline ", "at all "]);
                check(style, tools, &["\n", "a", "<|assis", "tant|>", "\nb"]);
                check(style, tools, &["\na<|assis", "tXnt|>b"]);
                check(style, tools, &["f\n```python\ntool_call(a=1)\n```"]);
                check(style, tools, &["f", "\n{\"a\": 1}"]);
                check(
                    style,
                    tools,
                    &["\nthink<|assistant|>f\n```python\ntool_call(a=1)\n```"],
                );
                check(style, tools, &[""]);
                check(style, tools, &[]);
            }
        }
    }

    #[test]
    fn marker_split_everywhere() {
        let raw = "\n  x [[训练时间]]y[[[训练时间]]][[训练时间  ";
        let chars: Vec<&str> = raw
            .char_indices()
            .map(|(i, c)| &raw[i..i + c.len_utf8()])
            .collect();
        for style in STYLES {
            check(style, false, &chars);
            check(style, false, &[raw]);
        }
    }

    #[test]
    fn tool_call_streams_nothing() {
        let raw = "get_weather\n```python\ntool_call(city='北京')\n```";
        for style in [ReplyStyle::ChatGlm3, ReplyStyle::Glm4] {
            let mut s = ReplyStream::new(style, true);
            for c in raw.chars() {
                assert_eq!(s.push(&c.to_string()), "");
            }
            assert_eq!(s.phase(), StreamPhase::Hidden);
            let end = s.finish();
            assert_eq!(end.delta, "");
            assert!(!end.diverged);
        }
    }

    #[test]
    fn phases() {
        let mut s = ReplyStream::new(ReplyStyle::ChatGlm3, false);
        assert_eq!(s.phase(), StreamPhase::Undecided);
        assert_eq!(s.push("  "), "");
        assert_eq!(s.phase(), StreamPhase::Undecided);
        assert_eq!(s.push("\n hi"), "hi");
        assert_eq!(s.phase(), StreamPhase::Text);
        assert_eq!(s.push("<|assistant|>name"), "");
        assert!(s.diverged());
        assert_eq!(s.display_text(), "");
        assert_eq!(s.phase(), StreamPhase::Undecided);
        assert_eq!(s.push("\nbody"), "");
        assert_eq!(s.phase(), StreamPhase::Hidden);
        let end = s.finish();
        assert!(end.diverged);
        assert_eq!(end.reply.reply.kind().as_str(), "metadata");
        assert_eq!(
            ReplyStream::new(ReplyStyle::ChatGlm2, false).phase(),
            StreamPhase::Text
        );
    }

    #[test]
    fn long_streams_are_linear() {
        // 300k characters, one per push, full of marker and token starts: must finish quickly.
        let unit = "[[训练<|assist[x] <|<|assistant|>\n";
        let raw = unit.repeat(300_000 / unit.chars().count());
        for style in STYLES {
            let mut s = ReplyStream::new(style, false);
            let mut shown = 0usize;
            let mut buf = [0u8; 4];
            for c in raw.chars() {
                shown += s.push(c.encode_utf8(&mut buf)).len();
            }
            let end = s.finish();
            assert_eq!(end.reply, parse_reply(style, &raw, false));
            assert!(shown + end.delta.len() > 0);
        }
    }

    #[test]
    fn boundary_in_one_delta_keeps_all_output() {
        let mut s = ReplyStream::new(ReplyStyle::ChatGlm3, false);
        assert_eq!(s.push("\nabc <|assistant|>\ndef "), "abcdef");
        assert_eq!(s.display_text(), "def");
        let end = s.finish();
        assert!(end.diverged);
        assert_eq!(end.display_text, "def");
        assert_eq!(end.reply.reply.as_text(), Some("def"));
    }

    const PIECES: [&str; 30] = [
        " ",
        "  ",
        "\n",
        "\n",
        "\t",
        "\r",
        "\u{1c}",
        "\u{1f}",
        "\u{3000}",
        "\u{85}",
        "\u{a0}",
        "\u{200b}",
        "[",
        "[[",
        "训练",
        "时间",
        "]]",
        "]",
        "[[训练时间]]",
        "<|assistant|>",
        "<|",
        "assistant",
        "|>",
        "<",
        "a",
        "Hi",
        "你好",
        "😀",
        "tool_call(a=1)",
        "```python\n",
    ];

    fn random_raw(rng: &mut StdRng) -> String {
        let n = rng.random_range(0..24);
        let mut raw = String::new();
        if rng.random_bool(0.3) {
            raw.push_str(["f", " f ", "\u{1c}", "", " "][rng.random_range(0..5)]);
            raw.push('\n');
        }
        for _ in 0..n {
            raw.push_str(PIECES[rng.random_range(0..PIECES.len())]);
        }
        raw
    }

    fn random_split<'a>(rng: &mut StdRng, raw: &'a str) -> Vec<&'a str> {
        let bounds: Vec<usize> = raw.char_indices().map(|(i, _)| i).skip(1).collect();
        let mut cuts: Vec<usize> = bounds
            .into_iter()
            .filter(|_| rng.random_bool(0.35))
            .collect();
        cuts.push(raw.len());
        let mut out = Vec::new();
        let mut start = 0;
        for c in cuts {
            out.push(&raw[start..c]);
            start = c;
        }
        if rng.random_bool(0.1) {
            out.insert(0, "");
        }
        out
    }

    #[test]
    fn random_streams_match_parse_reply() {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let mut diverged = 0;
        for _ in 0..20_000 {
            let raw = random_raw(&mut rng);
            let deltas = random_split(&mut rng, &raw);
            let style = STYLES[rng.random_range(0..3)];
            let tools = rng.random_bool(0.5);
            check(style, tools, &deltas);
            let (_, end) = run(style, tools, &[raw.as_str()]);
            diverged += usize::from(end.diverged);
        }
        assert!(
            diverged > 100,
            "the exception path should be exercised ({diverged})"
        );
    }
}
