//! The audit log's hash chain, checked offline: what an export holds and
//! how it is verified, with nothing but the control plane's public key.
//!
//! Entry `n` stores `hash_n = sha256(hash_{n-1} || "\n" || body_n)`, where
//! `body_n` is the entry's canonical encoding ([`Entry::canonical`]: JSON
//! with its fields in a fixed order) and `hash_0` is [`GENESIS`]. Editing,
//! removing or reordering an entry breaks the chain at that entry. Rewriting
//! the chain from some entry on is caught by checkpoints: `(seq, hash,
//! time)` signed with the control plane's ed25519 key ([`Checkpoint`]), so
//! a verifier holding only the public key also finds a dropped tail (a
//! checkpoint names an entry that is gone). The control plane writes the
//! chain (its `audit` module); this module is the format and the check.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a hex public key")]
    NotHex,
    #[error("a public key is 32 bytes")]
    WrongLength,
    #[error("not an ed25519 key: {0}")]
    NotEd25519(ed25519_dalek::SignatureError),
    /// A line of an export is not an entry or a checkpoint (`line` counts
    /// from 1).
    #[error("line {line}: not an audit export line: {error}")]
    NotAnExportLine {
        line: usize,
        error: serde_json::Error,
    },
}

/// The previous hash of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One thing that happened. Field order is the canonical order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub unix_ms: i64,
    /// The request's id (also sent back as `x-request-id`).
    pub request_id: String,
    /// The caller's token id, name, role and owner; empty when the call
    /// carried no valid token.
    pub token_id: String,
    pub principal: String,
    pub role: String,
    pub owner: String,
    /// What was asked, e.g. `Sandboxes/Exec` or `approval.decide`.
    pub action: String,
    /// What it was asked of (a sandbox, run or approval id, a path).
    pub resource: String,
    /// `allow`, `deny`, `require_approval`, or empty where no policy ran.
    pub decision: String,
    pub policy_version: u64,
    /// `ok`, or the gRPC code and message that ended the call.
    pub outcome: String,
}

impl Entry {
    /// The entry's body as the chain hashes it: JSON, its fields in the
    /// order they are declared, no spaces. Never change it: existing chains
    /// verify only with exactly this encoding.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("entries serialize")
    }
}

/// `sha256(prev || "\n" || body)`, hex: the hash of an entry whose
/// canonical body is `body`, chained to the entry before it (`prev`).
pub fn chain_hash(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    hex::encode(h.finalize())
}

/// A signed statement that the chain's entry `seq` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub unix_ms: i64,
    /// ed25519 over [`Checkpoint::message`], hex.
    pub signature: String,
}

impl Checkpoint {
    /// What is signed: that entry `seq` has hash `hash`, at `unix_ms`.
    pub fn message(seq: u64, hash: &str, unix_ms: i64) -> String {
        format!("bridle-audit-checkpoint\n{seq}\n{hash}\n{unix_ms}")
    }
}

/// One line of an export: an entry with its hashes, or a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Entry {
        entry: Box<Entry>,
        prev_hash: String,
        hash: String,
    },
    Checkpoint(Checkpoint),
}

/// What verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub entries: u64,
    pub checkpoints: u64,
    /// The first problem: the entry it is at (0: not at an entry) and what.
    pub first_bad: Option<(u64, String)>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Checks a chain and its checkpoints, in the order given.
pub fn verify(lines: impl IntoIterator<Item = Line>, key: &VerifyingKey) -> Report {
    verify_from(1, GENESIS.to_string(), lines, key)
}

/// [`verify`] for the part of a chain that starts at entry `first` (1 or
/// more), whose previous hash is taken to be `prev` (from entry 1:
/// `GENESIS`). The control plane checks the tail it continues from this way.
pub fn verify_from(
    first: u64,
    mut prev: String,
    lines: impl IntoIterator<Item = Line>,
    key: &VerifyingKey,
) -> Report {
    let mut report = Report {
        entries: 0,
        checkpoints: 0,
        first_bad: None,
    };
    let mut hashes: Vec<String> = Vec::new();
    let mut checkpoints = Vec::new();
    let bad = |report: &mut Report, seq: u64, why: String| {
        if report.first_bad.is_none() {
            report.first_bad = Some((seq, why));
        }
    };
    for line in lines {
        match line {
            Line::Entry {
                entry,
                prev_hash,
                hash,
            } => {
                report.entries += 1;
                let expected_seq = first + hashes.len() as u64;
                if entry.seq != expected_seq {
                    bad(
                        &mut report,
                        entry.seq,
                        format!("entry {} where entry {expected_seq} should be: an entry was removed or moved", entry.seq),
                    );
                }
                if prev_hash != prev {
                    bad(
                        &mut report,
                        entry.seq,
                        "its previous hash is not the hash of the entry before it".into(),
                    );
                }
                let actual = chain_hash(&prev_hash, &entry.canonical());
                if actual != hash {
                    bad(
                        &mut report,
                        entry.seq,
                        "its content does not match its hash: the entry was edited".into(),
                    );
                }
                prev = hash.clone();
                hashes.push(hash);
            }
            Line::Checkpoint(cp) => {
                report.checkpoints += 1;
                checkpoints.push(cp);
            }
        }
    }
    // The seq of the last entry given (by position, as the checks above).
    let end = first - 1 + hashes.len() as u64;
    for cp in &checkpoints {
        let signed = hex::decode(&cp.signature)
            .ok()
            .and_then(|s| Signature::from_slice(&s).ok())
            .is_some_and(|sig| {
                key.verify(
                    Checkpoint::message(cp.seq, &cp.hash, cp.unix_ms).as_bytes(),
                    &sig,
                )
                .is_ok()
            });
        if !signed {
            bad(
                &mut report,
                cp.seq,
                format!(
                    "the checkpoint at entry {} is not signed by this key",
                    cp.seq
                ),
            );
            continue;
        }
        match cp
            .seq
            .checked_sub(first)
            .and_then(|i| hashes.get(i as usize))
        {
            None => bad(
                &mut report,
                cp.seq,
                format!(
                    "a signed checkpoint names entry {} and the log ends at entry {end}: its tail was dropped",
                    cp.seq
                ),
            ),
            Some(h) if *h != cp.hash => bad(
                &mut report,
                cp.seq,
                format!(
                    "entry {} differs from what was signed at the checkpoint: the chain was rewritten",
                    cp.seq
                ),
            ),
            Some(_) => {}
        }
    }
    // Every commit writes its entries and a checkpoint of the last one in
    // one transaction: an entry after the last checkpoint was not written
    // by this log, or the checkpoints after it were removed.
    let covered = checkpoints.iter().map(|cp| cp.seq).max();
    let uncovered = covered.map_or(first, |c| c + 1);
    if end >= uncovered {
        bad(
            &mut report,
            uncovered,
            match covered {
                Some(c) => format!(
                    "entry {uncovered} comes after the last signed checkpoint (entry {c}): entries were added, or the checkpoints of the tail were removed"
                ),
                None => format!(
                    "no signed checkpoint covers entry {uncovered}: entries were added, or the checkpoints were removed"
                ),
            },
        );
    }
    report
}

/// The control plane's public key as `audit.pub` holds it (hex).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, Error> {
    let bytes = hex::decode(text.trim()).map_err(|_| Error::NotHex)?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| Error::WrongLength)?;
    VerifyingKey::from_bytes(&bytes).map_err(Error::NotEd25519)
}

/// The lines of an export (`bridle audit export`: one JSON object a line),
/// blank lines skipped.
pub fn parse_export(text: &str) -> Result<Vec<Line>, Error> {
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str(line)
            .map_err(|error| Error::NotAnExportLine { line: n + 1, error })?;
        lines.push(parsed);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    /// The bytes the chain is made of must never change: an existing log
    /// verifies only if today's code hashes its entries exactly as they
    /// were hashed when written (values computed independently).
    #[test]
    fn the_encoding_and_the_hash_are_fixed() {
        let entry = Entry {
            seq: 1,
            unix_ms: 1_700_000_000_000,
            request_id: "req-1".into(),
            token_id: "t1".into(),
            principal: "alice".into(),
            role: "submitter".into(),
            owner: "alice".into(),
            action: "Sandboxes/Exec".into(),
            resource: "sb-1".into(),
            decision: "allow".into(),
            policy_version: 2,
            outcome: "failed precondition: \"caf\u{e9}\"\nnext line".into(),
        };
        let body = entry.canonical();
        assert_eq!(
            body,
            "{\"seq\":1,\"unix_ms\":1700000000000,\"request_id\":\"req-1\",\"token_id\":\"t1\",\
             \"principal\":\"alice\",\"role\":\"submitter\",\"owner\":\"alice\",\
             \"action\":\"Sandboxes/Exec\",\"resource\":\"sb-1\",\"decision\":\"allow\",\
             \"policy_version\":2,\"outcome\":\"failed precondition: \\\"caf\u{e9}\\\"\\nnext line\"}"
        );
        assert_eq!(
            chain_hash(GENESIS, &body),
            "3c0257a9ba26469376279a2c880399dca724fa83cc3ae8f6ae4d42c68d997a86"
        );
        assert_eq!(
            Checkpoint::message(7, "ab", 9),
            "bridle-audit-checkpoint\n7\nab\n9"
        );
    }

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            unix_ms: seq as i64,
            principal: "alice".into(),
            action: "Sandboxes/Exec".into(),
            resource: format!("sb-{seq}"),
            decision: "allow".into(),
            outcome: "ok".into(),
            ..Entry::default()
        }
    }

    /// `n` entries chained from `GENESIS`, with a checkpoint of the last one
    /// signed by `key`.
    fn chain(n: u64, key: &SigningKey) -> Vec<Line> {
        let mut lines = Vec::new();
        let mut prev = GENESIS.to_string();
        for seq in 1..=n {
            let e = entry(seq);
            let hash = chain_hash(&prev, &e.canonical());
            lines.push(Line::Entry {
                entry: Box::new(e),
                prev_hash: prev,
                hash: hash.clone(),
            });
            prev = hash;
        }
        lines.push(checkpoint(key, n, &prev));
        lines
    }

    fn checkpoint(key: &SigningKey, seq: u64, hash: &str) -> Line {
        let signature = key.sign(Checkpoint::message(seq, hash, 5).as_bytes());
        Line::Checkpoint(Checkpoint {
            seq,
            hash: hash.to_string(),
            unix_ms: 5,
            signature: hex::encode(signature.to_bytes()),
        })
    }

    fn first_bad(lines: Vec<Line>, key: &SigningKey) -> (u64, String) {
        let r = verify(lines, &key.verifying_key());
        r.first_bad
            .clone()
            .unwrap_or_else(|| panic!("tampering not found: {r:?}"))
    }

    #[test]
    fn an_untouched_chain_verifies_and_only_with_its_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let r = verify(chain(5, &key), &key.verifying_key());
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.entries, r.checkpoints), (5, 1));
        let other = SigningKey::from_bytes(&[8; 32]);
        let (_, why) = first_bad(chain(5, &key), &other);
        assert!(why.contains("not signed by this key"), "{why}");
    }

    #[test]
    fn an_edited_entry_is_found() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut lines = chain(5, &key);
        if let Line::Entry { entry, .. } = &mut lines[3] {
            entry.decision = "deny".into();
        }
        let (seq, why) = first_bad(lines, &key);
        assert_eq!(seq, 4);
        assert!(why.contains("edited"), "{why}");
    }

    #[test]
    fn a_removed_entry_is_found() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut lines = chain(5, &key);
        lines.remove(2);
        let (seq, why) = first_bad(lines, &key);
        assert_eq!(seq, 4);
        assert!(why.contains("removed or moved"), "{why}");
    }

    #[test]
    fn a_dropped_tail_and_an_unsigned_tail_are_found() {
        let key = SigningKey::from_bytes(&[7; 32]);
        // Entries 4 and 5 dropped, their checkpoint kept.
        let mut lines = chain(5, &key);
        lines.drain(3..5);
        let (_, why) = first_bad(lines, &key);
        assert!(why.contains("tail was dropped"), "{why}");
        // Entries added after the last checkpoint.
        let mut lines = chain(5, &key);
        lines.retain(|l| !matches!(l, Line::Checkpoint(_)));
        let Line::Entry { hash, .. } = lines[2].clone() else {
            panic!("the third line is entry 3");
        };
        lines.push(checkpoint(&key, 3, &hash));
        let (seq, why) = first_bad(lines, &key);
        assert_eq!(seq, 4);
        assert!(why.contains("after the last signed checkpoint"), "{why}");
    }

    #[test]
    fn a_rewritten_chain_is_found_by_its_checkpoint() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = chain(5, &key);
        // Entry 2 edited and every hash recomputed, as someone without the
        // signing key could; the old checkpoint kept.
        let mut lines = Vec::new();
        let mut prev = GENESIS.to_string();
        for line in &signed {
            match line {
                Line::Entry { entry, .. } => {
                    let mut e = (**entry).clone();
                    if e.seq == 2 {
                        e.outcome = "PERMISSION_DENIED".into();
                    }
                    let hash = chain_hash(&prev, &e.canonical());
                    lines.push(Line::Entry {
                        entry: Box::new(e),
                        prev_hash: prev,
                        hash: hash.clone(),
                    });
                    prev = hash;
                }
                Line::Checkpoint(cp) => lines.push(Line::Checkpoint(cp.clone())),
            }
        }
        let (_, why) = first_bad(lines, &key);
        assert!(why.contains("rewritten"), "{why}");
    }

    #[test]
    fn an_export_round_trips_and_its_errors_name_the_line() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let text: String = chain(3, &key)
            .iter()
            .map(|l| serde_json::to_string(l).unwrap() + "\n\n")
            .collect();
        let lines = parse_export(&text).unwrap();
        assert!(verify(lines, &key.verifying_key()).ok());
        assert!(
            text.starts_with("{\"entry\":{\"entry\":{\"seq\":1,"),
            "{text}"
        );
        assert!(
            text.contains("{\"checkpoint\":{\"seq\":3,\"hash\":"),
            "{text}"
        );
        let e = parse_export("\n{\"nonsense\":1}\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 2: not an audit export line: "),
            "{e}"
        );
    }

    #[test]
    fn public_keys_are_read_as_audit_pub_holds_them() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let text = format!("{}\n", hex::encode(key.verifying_key().as_bytes()));
        assert_eq!(parse_public_key(&text).unwrap(), key.verifying_key());
        assert!(matches!(parse_public_key("zz"), Err(Error::NotHex)));
        assert!(matches!(parse_public_key("abcd"), Err(Error::WrongLength)));
    }
}
