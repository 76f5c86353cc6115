//! The text work of the file and command tools, pure so that it is tested
//! on its own: an exact edit ([`edit`]), a range of lines ([`line_range`]),
//! and output kept to its head and tail ([`cap_head_tail`]).

use std::fmt;

/// Why an edit was not made; the text is what the model is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("old_string is empty")]
    EmptyOld,
    #[error("old_string and new_string are the same: the edit would change nothing")]
    Unchanged,
    #[error(
        "old_string was not found; it must match the file exactly, whitespace and \
         indentation included"
    )]
    NotFound,
    #[error("old_string matches {0} times; give more context or set replace_all")]
    Ambiguous(usize),
    #[error("the edited file would be {0} bytes, more than the {max} an edit may make", max = MAX_EDITED_BYTES)]
    TooLarge(usize),
}

/// The largest file an edit may produce (the file tools read no more).
pub const MAX_EDITED_BYTES: usize = 8 << 20;

/// `original` with `old` replaced by `new`. `old` must occur exactly once,
/// or, with `replace_all`, at least once (every occurrence is replaced).
/// Overlapping occurrences count: `aa` occurs twice in `aaa`, so replacing
/// it there is ambiguous. An edit whose result would pass
/// [`MAX_EDITED_BYTES`] is refused before it is made. Linear in the sizes
/// of the file and the strings, whatever they hold (they are the model's
/// and the sandbox's).
pub fn edit(original: &str, old: &str, new: &str, replace_all: bool) -> Result<String, EditError> {
    if old.is_empty() {
        return Err(EditError::EmptyOld);
    }
    if old == new {
        return Err(EditError::Unchanged);
    }
    // Non-overlapping matches: one linear search.
    let matches = original.matches(old).count();
    if matches == 0 {
        return Err(EditError::NotFound);
    }
    if !replace_all {
        // Overlapping ones too, but at most two of them are looked for.
        let n = matches.max(occurrences_up_to(original, old, 2));
        if n > 1 {
            return Err(EditError::Ambiguous(n));
        }
    }
    let replaced = if replace_all { matches } else { 1 };
    let size = original.len() - replaced * old.len() + replaced * new.len();
    if size > MAX_EDITED_BYTES {
        return Err(EditError::TooLarge(size));
    }
    Ok(if replace_all {
        original.replace(old, new)
    } else {
        original.replacen(old, new, 1)
    })
}

/// How many times `needle` (not empty) occurs in `haystack`, overlapping
/// occurrences included, counting no further than `cap`.
fn occurrences_up_to(haystack: &str, needle: &str, cap: usize) -> usize {
    // The next search starts one character into the last match, which is a
    // character boundary of `haystack` because the match starts with it.
    let step = needle.chars().next().map_or(1, char::len_utf8);
    let mut count = 0;
    let mut from = 0;
    while count < cap {
        let Some(at) = haystack.get(from..).and_then(|rest| rest.find(needle)) else {
            break;
        };
        count += 1;
        from += at + step;
    }
    count
}

/// Why a range of lines cannot be read; the text is what the model is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRangeError {
    /// A line number of 0.
    Zero,
    Backwards {
        start: u64,
        end: u64,
    },
    /// The file has fewer than `start` lines.
    PastEnd {
        start: u64,
        lines: u64,
    },
}

impl fmt::Display for LineRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LineRangeError::Zero => f.write_str("line numbers start at 1"),
            LineRangeError::Backwards { start, end } => {
                write!(f, "end_line {end} is before start_line {start}")
            }
            LineRangeError::PastEnd { start, lines: 0 } => {
                write!(
                    f,
                    "start_line {start} is past the end of the file: it is empty"
                )
            }
            LineRangeError::PastEnd { start, lines: 1 } => write!(
                f,
                "start_line {start} is past the end of the file: it has 1 line"
            ),
            LineRangeError::PastEnd { start, lines } => write!(
                f,
                "start_line {start} is past the end of the file: it has {lines} lines"
            ),
        }
    }
}

impl std::error::Error for LineRangeError {}

/// Lines `start` to `end` of `text`, 1-based and inclusive, with their line
/// ends. An `end` past the last line reads to the end (`u64::MAX`: the rest
/// of the file); a `start` past it is an error that says how long the file
/// is. A line ends at `\n` (a `\r` before it stays part of the line).
pub fn line_range(text: &str, start: u64, end: u64) -> Result<&str, LineRangeError> {
    if start == 0 || end == 0 {
        return Err(LineRangeError::Zero);
    }
    if end < start {
        return Err(LineRangeError::Backwards { start, end });
    }
    let mut line = 0u64;
    let mut from = None;
    let mut to = 0usize;
    for piece in text.split_inclusive('\n') {
        line += 1;
        if line == start {
            from = Some(to);
        }
        to += piece.len();
        if line == end {
            break;
        }
    }
    match from {
        Some(from) => Ok(&text[from..to]),
        // Without a break the loop counted every line.
        None => Err(LineRangeError::PastEnd { start, lines: line }),
    }
}

/// What [`cap_head_tail`] left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Bytes of the input left out between the head and the tail.
    pub cut_bytes: usize,
    /// Bytes of the whole input.
    pub total_bytes: usize,
}

/// The line put where bytes were cut.
pub fn cut_marker(cut_bytes: usize) -> String {
    format!("\n[… {cut_bytes} bytes cut …]\n")
}

/// `bytes` as text of at most `max` bytes of the input: all of it when it
/// fits (then nothing is lost), else its head and its tail, about half each,
/// with [`cut_marker`] between them (the marker is not counted in `max`).
/// The cut points move to character boundaries, so no character is split
/// (up to 3 bytes fewer are kept on each side); bytes that are not UTF-8
/// come out as U+FFFD.
pub fn cap_head_tail(bytes: &[u8], max: usize) -> (String, Option<Cut>) {
    if bytes.len() <= max {
        return (String::from_utf8_lossy(bytes).into_owned(), None);
    }
    let head_budget = max / 2;
    let tail_budget = max - head_budget;
    // bytes.len() > max, so both positions are inside the input and the
    // head ends before the tail starts.
    let head_end = char_start_at_or_before(bytes, head_budget);
    let tail_start = char_start_at_or_after(bytes, bytes.len() - tail_budget);
    let cut = Cut {
        cut_bytes: tail_start - head_end,
        total_bytes: bytes.len(),
    };
    let text = format!(
        "{}{}{}",
        String::from_utf8_lossy(&bytes[..head_end]),
        cut_marker(cut.cut_bytes),
        String::from_utf8_lossy(&bytes[tail_start..]),
    );
    (text, Some(cut))
}

/// A UTF-8 continuation byte (`10xx_xxxx`): not the start of a character.
fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// `at`, moved back to the start of the character it is in. A character
/// is at most 4 bytes, so at most 3 steps: input that is not UTF-8 is cut
/// where it is.
fn char_start_at_or_before(bytes: &[u8], at: usize) -> usize {
    let mut i = at;
    while i > 0 && at - i < 3 && bytes.get(i).is_some_and(|&b| is_continuation(b)) {
        i -= 1;
    }
    i
}

/// `at`, moved forward past the rest of the character it is in (at most 3
/// steps, as above).
fn char_start_at_or_after(bytes: &[u8], at: usize) -> usize {
    let mut i = at;
    while i - at < 3 && bytes.get(i).is_some_and(|&b| is_continuation(b)) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_edit_replaces_the_one_occurrence() {
        assert_eq!(
            edit("fn a() {}\nfn b() {}\n", "fn b", "fn c", false).unwrap(),
            "fn a() {}\nfn c() {}\n"
        );
        // Multi-byte text around and in the strings.
        assert_eq!(
            edit("héllo wörld", "wö", "wo", false).unwrap(),
            "héllo world"
        );
        assert_eq!(edit("😀x😀", "x", "€", false).unwrap(), "😀€😀");
    }

    #[test]
    fn an_edit_that_is_not_exactly_once_says_how_many_times_it_matched() {
        assert_eq!(edit("abc", "x", "y", false), Err(EditError::NotFound));
        assert!(EditError::NotFound
            .to_string()
            .starts_with("old_string was not found"));
        assert_eq!(edit("x x x", "x", "y", false), Err(EditError::Ambiguous(3)));
        assert_eq!(
            EditError::Ambiguous(3).to_string(),
            "old_string matches 3 times; give more context or set replace_all"
        );
        // Overlapping occurrences make it ambiguous too.
        assert_eq!(edit("aaa", "aa", "b", false), Err(EditError::Ambiguous(2)));
        assert_eq!(edit("ééé", "éé", "e", false), Err(EditError::Ambiguous(2)));
        // replace_all does not make a missing string found.
        assert_eq!(edit("abc", "x", "y", true), Err(EditError::NotFound));
    }

    #[test]
    fn replace_all_replaces_every_occurrence_once() {
        assert_eq!(edit("x x x", "x", "y", true).unwrap(), "y y y");
        // The replacement contains the old string: replaced once, not again.
        assert_eq!(edit("a a", "a", "aa", true).unwrap(), "aa aa");
        // One occurrence with replace_all is fine.
        assert_eq!(edit("a b", "b", "c", true).unwrap(), "a c");
    }

    #[test]
    fn an_edit_that_changes_nothing_is_refused() {
        assert_eq!(edit("abc", "b", "b", false), Err(EditError::Unchanged));
        // An edit that would grow the file past the cap is refused before
        // anything is built (a million `a`s, each made a kilobyte).
        let big = "a".repeat(1 << 20);
        let huge = "b".repeat(1 << 10);
        assert!(matches!(
            edit(&big, "a", &huge, true),
            Err(EditError::TooLarge(n)) if n == (1 << 30)
        ));
        // Ambiguity is found without counting every overlapping match.
        assert_eq!(
            edit(&big, &"a".repeat(1 << 19), "x", false),
            Err(EditError::Ambiguous(2))
        );
        assert_eq!(edit("abc", "", "x", true), Err(EditError::EmptyOld));
    }

    #[test]
    fn line_ranges_are_one_based_and_inclusive() {
        let text = "a\nb\nc\n";
        assert_eq!(line_range(text, 1, 1).unwrap(), "a\n");
        assert_eq!(line_range(text, 2, 3).unwrap(), "b\nc\n");
        assert_eq!(line_range(text, 1, 3).unwrap(), text);
        // An end past the last line reads to the end.
        assert_eq!(line_range(text, 2, 99).unwrap(), "b\nc\n");
        assert_eq!(line_range(text, 3, u64::MAX).unwrap(), "c\n");
        // The last line may have no line end.
        assert_eq!(line_range("a\nb", 2, 2).unwrap(), "b");
        // \r stays with its line; multi-byte text is sliced whole.
        assert_eq!(line_range("a\r\nb\r\n", 1, 1).unwrap(), "a\r\n");
        assert_eq!(line_range("é\nü😀\nx", 2, 2).unwrap(), "ü😀\n");
    }

    #[test]
    fn a_line_range_past_the_end_or_backwards_is_a_clear_error() {
        assert_eq!(
            line_range("a\nb\nc\n", 4, 4),
            Err(LineRangeError::PastEnd { start: 4, lines: 3 })
        );
        assert_eq!(
            line_range("a\nb\nc\n", 4, 9).unwrap_err().to_string(),
            "start_line 4 is past the end of the file: it has 3 lines"
        );
        assert_eq!(
            line_range("a", 2, 2).unwrap_err().to_string(),
            "start_line 2 is past the end of the file: it has 1 line"
        );
        assert_eq!(
            line_range("", 1, 1).unwrap_err().to_string(),
            "start_line 1 is past the end of the file: it is empty"
        );
        assert_eq!(line_range("a\n", 0, 1), Err(LineRangeError::Zero));
        assert_eq!(line_range("a\n", 1, 0), Err(LineRangeError::Zero));
        assert_eq!(
            line_range("a\nb\nc\n", 3, 2).unwrap_err().to_string(),
            "end_line 2 is before start_line 3"
        );
    }

    #[test]
    fn output_under_the_cap_is_kept_whole() {
        assert_eq!(cap_head_tail(b"", 0), (String::new(), None));
        assert_eq!(cap_head_tail(b"hello", 5), ("hello".to_string(), None));
        assert_eq!(
            cap_head_tail("héllo😀".as_bytes(), 100),
            ("héllo😀".to_string(), None)
        );
    }

    #[test]
    fn output_over_the_cap_keeps_its_head_and_tail_and_says_what_was_cut() {
        let (text, cut) = cap_head_tail(b"0123456789", 4);
        assert_eq!(text, "01\n[… 6 bytes cut …]\n89");
        assert_eq!(
            cut,
            Some(Cut {
                cut_bytes: 6,
                total_bytes: 10
            })
        );
        // An odd cap gives the tail the extra byte.
        let (text, _) = cap_head_tail(b"0123456789", 5);
        assert_eq!(text, "01\n[… 5 bytes cut …]\n789");
        // A cap of 0 keeps only the marker.
        let (text, cut) = cap_head_tail(b"abc", 0);
        assert_eq!(text, cut_marker(3));
        assert_eq!(cut.map(|c| c.cut_bytes), Some(3));
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        // "aé": the head's one byte is "a"; the tail's one byte would be
        // the second half of "é", so the tail is empty.
        let (text, cut) = cap_head_tail("aé".as_bytes(), 2);
        assert_eq!(text, format!("a{}", cut_marker(2)));
        assert_eq!(cut.map(|c| c.cut_bytes), Some(2));
        // Three 4-byte characters in 6 bytes: neither half holds one whole.
        let (text, cut) = cap_head_tail("😀😀😀".as_bytes(), 6);
        assert_eq!(text, cut_marker(12));
        assert_eq!(cut.map(|c| c.cut_bytes), Some(12));
        // In 8 bytes, one on each side.
        let (text, _) = cap_head_tail("😀😀😀".as_bytes(), 8);
        assert_eq!(text, format!("😀{}😀", cut_marker(4)));
        // "€" is 3 bytes: a head budget of 4 keeps "a€", not half of "€".
        let (text, _) = cap_head_tail("a€€€€b".as_bytes(), 8);
        assert_eq!(text, format!("a€{}€b", cut_marker(6)));
    }

    #[test]
    fn bytes_that_are_not_utf8_come_out_replaced() {
        let (text, cut) = cap_head_tail(&[b'a', 0xFF, b'b'], 10);
        assert_eq!(text, "a\u{FFFD}b");
        assert_eq!(cut, None);
        // A run of stray continuation bytes is cut where the budget says
        // (after at most 3 steps), and still comes out as valid text.
        let bytes = [0x80u8; 20];
        let (text, cut) = cap_head_tail(&bytes, 10);
        assert!(text.contains("bytes cut"));
        assert!(text.starts_with('\u{FFFD}'));
        let cut = cut.unwrap();
        assert!(20 - cut.cut_bytes <= 10, "{cut:?}");
    }

    proptest! {
        /// Any bytes, any cap: whole when they fit; otherwise at most `max`
        /// bytes of the input kept (at most 6 fewer, for the character
        /// boundaries), and the cut reported exactly.
        #[test]
        fn the_cap_holds_for_any_bytes(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            max in 0usize..320,
        ) {
            let (text, cut) = cap_head_tail(&bytes, max);
            match cut {
                None => {
                    prop_assert!(bytes.len() <= max);
                    prop_assert_eq!(text, String::from_utf8_lossy(&bytes).into_owned());
                }
                Some(cut) => {
                    prop_assert!(bytes.len() > max);
                    prop_assert_eq!(cut.total_bytes, bytes.len());
                    let kept = bytes.len() - cut.cut_bytes;
                    prop_assert!(kept <= max, "kept {kept} of cap {max}");
                    prop_assert!(kept + 6 >= max, "kept {kept} of cap {max}");
                    prop_assert!(text.contains(&cut_marker(cut.cut_bytes)));
                }
            }
        }

        /// Text in, text out: the head is a prefix of the input and the tail
        /// a suffix, both whole characters, and together with the cut they
        /// are the whole input.
        #[test]
        fn a_cut_of_text_keeps_a_prefix_and_a_suffix(
            text in "[a-zé€😀\\n]{0,80}",
            max in 0usize..100,
        ) {
            let (capped, cut) = cap_head_tail(text.as_bytes(), max);
            match cut {
                None => prop_assert_eq!(capped, text),
                Some(cut) => {
                    let marker = cut_marker(cut.cut_bytes);
                    let (head, tail) = capped.split_once(&marker).unwrap();
                    prop_assert!(text.starts_with(head));
                    prop_assert!(text.ends_with(tail));
                    prop_assert_eq!(head.len() + cut.cut_bytes + tail.len(), text.len());
                    prop_assert!(head.len() + tail.len() <= max);
                }
            }
        }

        /// An edit with replace_all leaves no occurrence of a string that
        /// the replacement cannot recreate.
        #[test]
        fn replace_all_leaves_none_behind(
            text in "[ab€]{0,40}",
        ) {
            match edit(&text, "a€", "b", true) {
                Ok(edited) => prop_assert!(!edited.contains("a€")),
                Err(e) => {
                    prop_assert_eq!(e, EditError::NotFound);
                    prop_assert!(!text.contains("a€"));
                }
            }
        }
    }
}
