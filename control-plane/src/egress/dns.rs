//! Which names a sandbox's resolver refuses before policy is asked:
//! malformed names, and names that carry data. DNS exfiltration hides data
//! in the labels of names under a domain its author serves
//! (`<base32 of a secret>.x.evil.org`): every lookup reaches that domain's
//! server whatever the answer. Long labels of high entropy are what such
//! data looks like and what host names do not; they are refused (NXDOMAIN),
//! and the refusal is on the record.

/// Labels longer than this are refused outright.
pub const MAX_LABEL: usize = 40;
/// Labels at least this long are refused when their entropy is high.
pub const ENTROPY_MIN_LEN: usize = 16;
/// Shannon entropy (bits per character) above which such a label is data.
pub const MAX_ENTROPY_BITS: f64 = 3.5;
/// Labels a name may have at most.
pub const MAX_LABELS: usize = 10;

/// Why a name is refused, for the record.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("not a host name: {0}")]
    Malformed(String),
    #[error(
        "label {label:?} is {len} characters long (at most {MAX_LABEL}): names do not carry data"
    )]
    LongLabel { label: String, len: usize },
    #[error(
        "label {label:?} looks like data ({bits:.2} bits per character, at most \
         {MAX_ENTROPY_BITS} for labels of {ENTROPY_MIN_LEN} or more)"
    )]
    Entropy { label: String, bits: f64 },
    #[error("{0} labels (at most {MAX_LABELS})")]
    TooDeep(usize),
}

/// The name, lower case and without its trailing dot, if the resolver may
/// ask policy about it.
pub fn check(name: &str) -> Result<String, Refusal> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err(Refusal::Malformed("1 to 253 characters".into()));
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() > MAX_LABELS {
        return Err(Refusal::TooDeep(labels.len()));
    }
    for label in &labels {
        let ok = !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Refusal::Malformed(format!("label {label:?}")));
        }
        if label.len() > MAX_LABEL {
            return Err(Refusal::LongLabel {
                label: label.to_string(),
                len: label.len(),
            });
        }
        if label.len() >= ENTROPY_MIN_LEN {
            let bits = entropy(label);
            if bits > MAX_ENTROPY_BITS {
                return Err(Refusal::Entropy {
                    label: label.to_string(),
                    bits,
                });
            }
        }
    }
    Ok(name)
}

/// Shannon entropy of `s`'s bytes, in bits per byte.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_pass_and_data_does_not() {
        for ok in [
            "pypi.org",
            "files.pythonhosted.org.",
            "GitHub.com",
            "registry-1.docker.io",
            "d3ix8xbm0qx3ju.cloudfront.net",
            "objects.githubusercontent.com",
            "_acme-challenge.example.com",
            "ec2-54-23-101-12.compute-1.amazonaws.com",
        ] {
            assert!(check(ok).is_ok(), "{ok}: {:?}", check(ok));
        }
        assert_eq!(check("PyPI.org.").unwrap(), "pypi.org");
        // Base32 and hex of a secret, as exfiltration tools encode it.
        let refused = [
            "mzxw6ytboi4dgnzzhe2tkmbt.x.evil.org",
            "4a1f9c0b7e2d83f65c91a0e4b7d2f3a8.evil.org",
            &format!("{}.evil.org", "a".repeat(41)),
            "a.b.c.d.e.f.g.h.i.j.k",
            "bad..name",
            "-x.org",
            "x y.org",
        ];
        for name in refused {
            assert!(check(name).is_err(), "{name} passed");
        }
        assert!(matches!(
            check("mzxw6ytboi4dgnzzhe2tkmbt.x.evil.org"),
            Err(Refusal::Entropy { .. })
        ));
    }
}
