//! Stop strings: text that ends a reply, never shown, even when a token splits it.
//!
//! Text is released to the caller only once no stop string can still begin inside it, so a
//! stop string that arrives across several tokens is cut out before any of it is shown.

use std::ops::Range;

/// The reply text so far, with the part not yet released to the caller held back.
#[derive(Debug)]
pub(crate) struct StopGate<'a> {
    stops: &'a [String],
    /// Bytes a stop string could still have begun in, at the end of the text.
    hold: usize,
    text: String,
    released: usize,
}

impl<'a> StopGate<'a> {
    pub(crate) fn new(stops: &'a [String]) -> Self {
        StopGate {
            stops,
            hold: stops.iter().map(String::len).max().unwrap_or(1) - 1,
            text: String::new(),
            released: 0,
        }
    }

    /// Adds decoded text. Returns the range of [`StopGate::text`] that may now be shown, and
    /// whether a stop string was found (the text is then cut just before it).
    pub(crate) fn push(&mut self, piece: &str) -> (Range<usize>, bool) {
        self.text.push_str(piece);
        let from = floor_boundary(&self.text, self.released.saturating_sub(self.hold));
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            return (self.release(at), true);
        }
        let safe = floor_boundary(&self.text, self.text.len().saturating_sub(self.hold));
        (self.release(safe.max(self.released)), false)
    }

    /// Releases whatever is held back (the reply ended without a stop string).
    pub(crate) fn finish(&mut self) -> Range<usize> {
        self.release(self.text.len())
    }

    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    pub(crate) fn into_text(self) -> String {
        self.text
    }

    fn release(&mut self, end: usize) -> Range<usize> {
        let range = self.released..end;
        self.released = end;
        range
    }
}

fn floor_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut gate = StopGate::new(&stops);
        let mut shown = Vec::new();
        for piece in pieces {
            let (range, hit) = gate.push(piece);
            shown.push(gate.text()[range].to_string());
            if hit {
                return (shown, gate.into_text(), true);
            }
        }
        let range = gate.finish();
        shown.push(gate.text()[range].to_string());
        (shown, gate.into_text(), false)
    }

    #[test]
    fn without_stops_everything_passes_at_once() {
        let (shown, text, hit) = run(&[], &["ab", "c"]);
        assert_eq!(shown, ["ab", "c", ""]);
        assert_eq!((text.as_str(), hit), ("abc", false));
    }

    #[test]
    fn a_stop_split_across_pieces_is_never_shown() {
        let (shown, text, hit) = run(&["END"], &["hello E", "N", "D and more"]);
        assert_eq!(shown.concat(), "hello ");
        assert_eq!((text.as_str(), hit), ("hello ", true));
    }

    #[test]
    fn held_text_comes_out_when_the_stop_does_not_complete() {
        let (shown, text, hit) = run(&["END"], &["hello E", "N", "jo"]);
        assert_eq!(shown.concat(), "hello ENjo");
        assert_eq!((text.as_str(), hit), ("hello ENjo", false));
    }

    #[test]
    fn multibyte_text_is_held_on_character_boundaries() {
        let (shown, text, hit) = run(&["。结束"], &["你好。", "结", "束吧"]);
        assert_eq!(shown.concat(), "你好");
        assert_eq!((text.as_str(), hit), ("你好", true));
    }
}
