//! Secret values out of recorded output. Output arrives in chunks, and a
//! secret can be split between two of them (`pass` + `word` in one, the
//! rest in the next), so the redactor hands back how much of its input it
//! could decide: the tail that may still turn into a secret waits for the
//! next chunk, or for the end of the stream.

/// What replaces each secret value.
pub const MASK: &[u8] = b"***";

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Distinct non-empty values, longest first, so the longest match wins.
    secrets: Vec<Vec<u8>>,
}

impl Redactor {
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut secrets: Vec<Vec<u8>> = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(|v| v.as_bytes().to_vec())
            .collect();
        secrets.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        secrets.dedup();
        Self { secrets }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Redacts `data` and says how many of its bytes the result covers.
    /// Unless `last`, the bytes after that could be the start of a secret:
    /// the caller passes them again, followed by what comes next. With
    /// `last` everything is decided.
    pub fn redact(&self, data: &[u8], last: bool) -> (Vec<u8>, usize) {
        if self.secrets.is_empty() {
            return (data.to_vec(), data.len());
        }
        let mut out = Vec::with_capacity(data.len());
        let mut i = 0;
        while i < data.len() {
            let rest = &data[i..];
            // A secret that could still begin here waits for more data,
            // even when a shorter one matches already.
            if !last
                && self
                    .secrets
                    .iter()
                    .any(|s| s.len() > rest.len() && s.starts_with(rest))
            {
                return (out, i);
            }
            match self.secrets.iter().find(|s| rest.starts_with(s)) {
                Some(s) => {
                    out.extend_from_slice(MASK);
                    i += s.len();
                }
                None => {
                    out.push(data[i]);
                    i += 1;
                }
            }
        }
        (out, data.len())
    }
}

/// Redacts a whole, complete text.
pub fn redact_all<'a>(data: &[u8], secrets: impl IntoIterator<Item = &'a str>) -> Vec<u8> {
    Redactor::new(secrets).redact(data, true).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `chunks` the way the executor does: undecided bytes are carried
    /// over in front of the next chunk.
    fn stream(r: &Redactor, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut carry = Vec::new();
        for (n, c) in chunks.iter().enumerate() {
            carry.extend_from_slice(c);
            let (done, used) = r.redact(&carry, n + 1 == chunks.len());
            out.extend(done);
            carry.drain(..used);
        }
        out.extend(r.redact(&carry, true).0);
        out
    }

    #[test]
    fn whole_values_are_masked() {
        assert_eq!(
            redact_all(b"token=hunter2; again hunter2.", ["hunter2"]),
            b"token=***; again ***."
        );
        assert_eq!(
            redact_all(b"nothing here", ["hunter2", ""]),
            b"nothing here"
        );
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let r = Redactor::new(["hunter2"]);
        assert_eq!(stream(&r, &[b"pw=hun", b"ter2!"]), b"pw=***!");
        assert_eq!(
            stream(&r, &[b"h", b"u", b"n", b"t", b"e", b"r", b"2"]),
            b"***"
        );
        // A prefix that turns out not to be the secret comes out as it was.
        assert_eq!(stream(&r, &[b"hunt", b"ing"]), b"hunting");
        // The undecided tail is as short as it can be.
        assert_eq!(r.redact(b"abc hun", false), (b"abc ".to_vec(), 4));
    }

    #[test]
    fn the_longest_value_wins_even_when_it_is_still_arriving() {
        let r = Redactor::new(["abc", "abcdef"]);
        assert_eq!(stream(&r, &[b"xabc", b"def"]), b"x***");
        assert_eq!(stream(&r, &[b"xabc", b"dx"]), b"x***dx");
    }

    proptest! {
        /// However the output is cut into chunks, the result is the same as
        /// redacting it whole, and the secret never survives.
        #[test]
        fn chunking_never_changes_the_result(
            text in proptest::collection::vec(prop_oneof![Just(b's'), Just(b'e'), Just(b'c'), Just(b'x')], 0..60),
            cuts in proptest::collection::vec(0usize..60, 0..8),
        ) {
            let r = Redactor::new(["sec", "secsex"]);
            let whole = r.redact(&text, true).0;
            let mut cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= text.len()).collect();
            cuts.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut at = 0;
            for c in cuts {
                chunks.push(&text[at..c]);
                at = c;
            }
            chunks.push(&text[at..]);
            let streamed = stream(&r, &chunks);
            prop_assert_eq!(&streamed, &whole);
            prop_assert!(!streamed.windows(3).any(|w| w == b"sec"));
        }
    }
}
