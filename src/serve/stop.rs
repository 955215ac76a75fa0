//! Text-level stop strings (`"stop"` of the OpenAI API), applied to streamed text.
//!
//! Generated text arrives piece by piece. A stop string may span pieces, so the text that could be
//! the start of a stop string is held back until the next piece decides: either it completes a stop
//! string (the text is cut there and never sent) or it does not (the held text is released). A client
//! therefore never sees any part of a stop string.

/// Finds stop strings in text fed piece by piece, releasing only text that cannot be part of one.
#[derive(Debug, Clone, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released: a suffix that is a prefix of some stop string.
    held: String,
    stopped: bool,
}

/// What one piece of text releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text safe to send now (possibly empty).
    pub text: String,
    /// Whether a stop string was completed; `text` ends right before it and nothing follows.
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop strings; empty strings are ignored.
    pub(crate) fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Feeds the next piece of text. After a stop, everything is swallowed.
    pub(crate) fn push(&mut self, piece: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return Released {
                text: piece.to_string(),
                stopped: false,
            };
        }
        self.held.push_str(piece);
        // The earliest complete stop string wins.
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first {
            self.held.truncate(at);
            self.stopped = true;
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.partial_suffix_len();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        Released {
            text,
            stopped: false,
        }
    }

    /// Releases the held text at the end of generation (no further piece can complete a stop).
    pub(crate) fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Length in bytes of the longest suffix of the held text that is a proper prefix of a stop
    /// string (a whole stop string would have matched already).
    fn partial_suffix_len(&self) -> usize {
        let held = self.held.as_str();
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        // Suffixes start at char boundaries; try the longest possible first.
        let lowest = held.len().saturating_sub(longest.saturating_sub(1));
        (lowest..held.len())
            .filter(|&i| held.is_char_boundary(i))
            .find(|&i| {
                let suffix = &held[i..];
                self.stops.iter().any(|s| s.starts_with(suffix))
            })
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `pieces` and returns everything released, and whether a stop string ended it.
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let r = m.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push(m.finish());
        (out, false)
    }

    #[test]
    fn without_stops_text_passes_at_once() {
        let (out, stopped) = run(&[], &["a", "bc", ""]);
        assert_eq!(out, ["a", "bc", "", ""]);
        assert!(!stopped);
    }

    #[test]
    fn a_stop_inside_one_piece_cuts_it() {
        let (out, stopped) = run(&["END"], &["hello", " worldEND more"]);
        assert_eq!(out, ["hello", " world"]);
        assert!(stopped);
    }

    #[test]
    fn a_stop_split_over_pieces_is_never_released() {
        let (out, stopped) = run(&["</s>"], &["one <", "/", "s", "> two"]);
        assert_eq!(out, ["one ", "", "", ""]);
        assert!(stopped);
        assert!(!out.concat().contains('<'));
    }

    #[test]
    fn a_false_start_is_released_when_it_cannot_match() {
        let (out, stopped) = run(&["###"], &["a #", "# b", " c"]);
        assert_eq!(out, ["a ", "## b", " c", ""]);
        assert!(!stopped);
        assert_eq!(out.concat(), "a ## b c");
    }

    #[test]
    fn held_text_is_released_at_the_end() {
        let (out, stopped) = run(&["STOP"], &["text ST"]);
        assert_eq!(out, ["text ", "ST"]);
        assert!(!stopped);
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let (out, stopped) = run(&["world", "lo w"], &["hello world"]);
        assert_eq!(out, ["hel"]);
        assert!(stopped);
    }

    #[test]
    fn partial_matches_respect_char_boundaries() {
        // "é" is two bytes; a stop starting with its second byte cannot exist in valid UTF-8, but a
        // stop starting with "é" must hold it back.
        let (out, stopped) = run(&["éx"], &["café", "y"]);
        assert_eq!(out, ["caf", "éy", ""]);
        assert!(!stopped);
        let (out, stopped) = run(&["éx"], &["café", "x!"]);
        assert_eq!(out, ["caf", ""]);
        assert!(stopped);
    }

    #[test]
    fn nothing_follows_a_stop() {
        let mut m = StopMatcher::new(vec!["x".into()]);
        assert!(m.push("ax").stopped);
        let after = m.push("more");
        assert_eq!(after.text, "");
        assert!(after.stopped);
        assert_eq!(m.finish(), "");
    }

    #[test]
    fn empty_stop_strings_are_ignored() {
        let (out, stopped) = run(&[""], &["abc"]);
        assert_eq!(out, ["abc", ""]);
        assert!(!stopped);
    }
}
