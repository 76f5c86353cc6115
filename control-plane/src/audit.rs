//! The audit log: every call, decision and policy change, appended to a
//! hash chain. Entry `n` stores `hash_n = sha256(hash_{n-1} || "\n" ||
//! body_n)`, where `body_n` is the entry's canonical encoding (JSON with its
//! fields in a fixed order) and `hash_0` is 64 zeros. Editing, removing or
//! reordering an entry breaks the chain at that entry. Rewriting the chain
//! from some entry on is caught by checkpoints: `(seq, hash, time)` signed
//! with an ed25519 key kept in the data directory (`audit.key`, 0600; the
//! public half in `audit.pub`), so a verifier holding only the public key
//! also finds a dropped tail (a checkpoint names an entry that is gone).
//!
//! Entries are written by one task that commits whatever queued up during
//! the previous commit (as the run store does), so the chain is built in one
//! place and each caller hears back once its entry is durable.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

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
    /// The entry a stored body holds. An unreadable body still takes its
    /// place (in the chain, in a query), so verification names it instead
    /// of skipping it.
    fn stored(seq: i64, body: &str) -> Self {
        serde_json::from_str(body).unwrap_or_else(|_| Entry {
            seq: seq as u64,
            outcome: format!("(unreadable: {body})"),
            ..Entry::default()
        })
    }

    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("entries serialize")
    }
}

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
    fn message(seq: u64, hash: &str, unix_ms: i64) -> String {
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
    let mut report = Report {
        entries: 0,
        checkpoints: 0,
        first_bad: None,
    };
    let mut prev = GENESIS.to_string();
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
                let expected_seq = hashes.len() as u64 + 1;
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
    for cp in checkpoints {
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
        match hashes.get((cp.seq as usize).wrapping_sub(1)) {
            None => bad(
                &mut report,
                cp.seq,
                format!(
                    "a signed checkpoint names entry {} and the log ends at entry {}: its tail was dropped",
                    cp.seq,
                    hashes.len()
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
    report
}

/// The signing key, created (0600, with `audit.pub` beside it) on first use.
pub fn load_or_create_key(data_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = data_dir.join("audit.key");
    let key = SigningKey::from_bytes(
        &crate::key_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    );
    std::fs::write(
        data_dir.join("audit.pub"),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )?;
    Ok(key)
}

pub fn parse_public_key(text: &str) -> anyhow::Result<VerifyingKey> {
    let bytes = hex::decode(text.trim()).map_err(|_| anyhow::anyhow!("not a hex public key"))?;
    let bytes: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("a public key is 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("not an ed25519 key: {e}"))
}

/// The log on the embedded store.
#[derive(Clone)]
pub struct AuditLog {
    pool: SqlitePool,
    writer: mpsc::Sender<(Entry, oneshot::Sender<Result<u64, String>>)>,
    key: VerifyingKey,
}

impl AuditLog {
    /// Opens the log; its writer continues the chain from the stored tail.
    pub async fn open(pool: SqlitePool, key: SigningKey) -> anyhow::Result<Self> {
        let tail: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&pool)
                .await?;
        let (seq, hash) = tail
            .map(|(s, h)| (s as u64, h))
            .unwrap_or((0, GENESIS.to_string()));
        let (writer, queue) = mpsc::channel(1024);
        let verifying = key.verifying_key();
        tokio::spawn(write_loop(pool.clone(), queue, key, seq, hash));
        Ok(Self {
            pool,
            writer,
            key: verifying,
        })
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key
    }

    /// Appends `entry` (its seq and hash are assigned here) and returns its
    /// seq once it is durable.
    pub async fn append(&self, entry: Entry) -> anyhow::Result<u64> {
        let (done, answer) = oneshot::channel();
        self.writer
            .send((entry, done))
            .await
            .map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?
            .map_err(|e| anyhow::anyhow!("audit: {e}"))
    }

    /// Appends `entry` without waiting for it to be durable (it is, within
    /// one group commit).
    pub fn record(&self, entry: Entry) {
        // Queued now, in call order; the answer is not awaited.
        let (done, _answer) = oneshot::channel();
        match self.writer.try_send((entry, done)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full((entry, _))) => {
                let log = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = log.append(entry).await {
                        tracing::error!("{e:#}");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit: the writer has stopped; an entry is lost");
            }
        }
    }

    /// Up to `limit` entries after `after_seq` in order, with their hashes,
    /// those outside `[since_ms, until_ms)` left out (0: unbounded); and the
    /// seq the read got to (where to go on from).
    pub async fn entries_after(
        &self,
        after_seq: u64,
        since_ms: i64,
        until_ms: i64,
        limit: u32,
    ) -> anyhow::Result<(Vec<(Entry, String)>, Option<u64>)> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, body, hash FROM audit_log WHERE seq > $1 \
             AND ($2 = 0 OR unix_ms >= $2) AND ($3 = 0 OR unix_ms < $3) \
             ORDER BY seq LIMIT $4",
        )
        .bind(after_seq as i64)
        .bind(since_ms)
        .bind(until_ms)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let last = rows.last().map(|(seq, _, _)| *seq as u64);
        let entries = rows
            .into_iter()
            .map(|(seq, body, hash)| (Entry::stored(seq, &body), hash))
            .collect();
        Ok((entries, last))
    }

    /// Every entry and checkpoint in order, as an export would hold them.
    pub async fn lines(&self) -> anyhow::Result<Vec<Line>> {
        // Entries and checkpoints from one snapshot: read apart, a commit
        // between the two reads would show a checkpoint naming an entry the
        // first read did not see, as if the tail had been dropped.
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(i64, String, String, String)> =
            sqlx::query_as("SELECT seq, body, prev_hash, hash FROM audit_log ORDER BY seq")
                .fetch_all(&mut *tx)
                .await?;
        let mut lines = Vec::with_capacity(rows.len());
        for (seq, body, prev_hash, hash) in rows {
            lines.push(Line::Entry {
                entry: Box::new(Entry::stored(seq, &body)),
                prev_hash,
                hash,
            });
        }
        let cps: Vec<(i64, String, i64, String)> = sqlx::query_as(
            "SELECT seq, hash, unix_ms, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        lines.extend(cps.into_iter().map(|(seq, hash, unix_ms, signature)| {
            Line::Checkpoint(Checkpoint {
                seq: seq as u64,
                hash,
                unix_ms,
                signature,
            })
        }));
        Ok(lines)
    }

    pub async fn verify(&self) -> anyhow::Result<Report> {
        Ok(verify(self.lines().await?, &self.key))
    }
}

/// Builds the chain: takes what queued, hashes it in order, writes it and a
/// signed checkpoint of the new tail in one transaction.
async fn write_loop(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<(Entry, oneshot::Sender<Result<u64, String>>)>,
    key: SigningKey,
    mut seq: u64,
    mut hash: String,
) {
    let mut batch = Vec::new();
    while crate::store::next_group(&mut queue, &mut batch, 512).await {
        let (start_seq, start_hash) = (seq, hash.clone());
        let mut rows = Vec::with_capacity(batch.len());
        for (entry, _) in &mut batch {
            seq += 1;
            entry.seq = seq;
            let body = entry.canonical();
            let next = chain_hash(&hash, &body);
            rows.push((seq, entry.unix_ms, body, hash.clone(), next.clone()));
            hash = next;
        }
        let now = crate::now_ms();
        let signature = hex::encode(
            key.sign(Checkpoint::message(seq, &hash, now).as_bytes())
                .to_bytes(),
        );
        let result = write_rows(&pool, &rows, (seq, &hash, now, &signature)).await;
        if result.is_err() {
            // Nothing was written: the chain continues from where it was.
            seq = start_seq;
            hash = start_hash;
        }
        for (entry, done) in batch.drain(..) {
            let _ = done.send(match &result {
                Ok(()) => Ok(entry.seq),
                Err(e) => Err(e.to_string()),
            });
        }
    }
}

async fn write_rows(
    pool: &SqlitePool,
    rows: &[(u64, i64, String, String, String)],
    checkpoint: (u64, &str, i64, &str),
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for chunk in rows.chunks(150) {
        let sql = format!(
            "INSERT INTO audit_log (seq, unix_ms, body, prev_hash, hash) VALUES {}",
            crate::store::placeholders(chunk.len(), 5)
        );
        let mut q = sqlx::query(&sql);
        for (seq, unix_ms, body, prev, hash) in chunk {
            q = q
                .bind(*seq as i64)
                .bind(*unix_ms)
                .bind(body)
                .bind(prev)
                .bind(hash);
        }
        q.execute(&mut *tx).await?;
    }
    let (seq, hash, unix_ms, signature) = checkpoint;
    sqlx::query(
        "INSERT INTO audit_checkpoints (seq, hash, unix_ms, signature) VALUES ($1, $2, $3, $4)",
    )
    .bind(seq as i64)
    .bind(hash)
    .bind(unix_ms)
    .bind(signature)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn log() -> (tempfile::TempDir, AuditLog, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("db"))
            .await
            .unwrap();
        let key = load_or_create_key(dir.path()).unwrap();
        let log = AuditLog::open(store.pool().clone(), key).await.unwrap();
        (dir, log, store)
    }

    fn entry(i: u64) -> Entry {
        Entry {
            unix_ms: i as i64,
            request_id: format!("req-{i}"),
            token_id: "t1".into(),
            principal: "alice".into(),
            role: "submitter".into(),
            owner: "alice".into(),
            action: "Sandboxes/Exec".into(),
            resource: format!("sb-{i}"),
            decision: "allow".into(),
            policy_version: 1,
            outcome: "ok".into(),
            ..Entry::default()
        }
    }

    async fn filled() -> (tempfile::TempDir, AuditLog, crate::store::Store) {
        let (d, log, store) = log().await;
        for i in 1..=10 {
            assert_eq!(log.append(entry(i)).await.unwrap(), i);
        }
        (d, log, store)
    }

    async fn exec(store: &crate::store::Store, sql: &str) {
        sqlx::query(sql).execute(store.pool()).await.unwrap();
    }

    #[tokio::test]
    async fn an_untouched_log_verifies_and_continues_after_reopening() {
        let (d, log, store) = filled().await;
        let r = log.verify().await.unwrap();
        assert!(r.ok(), "{r:?}");
        assert_eq!(r.entries, 10);
        assert!(r.checkpoints >= 1);
        drop(log);
        let key = load_or_create_key(d.path()).unwrap();
        let again = AuditLog::open(store.pool().clone(), key).await.unwrap();
        assert_eq!(again.append(entry(11)).await.unwrap(), 11);
        assert!(again.verify().await.unwrap().ok());
        // The public key on disk verifies an export offline.
        let public =
            parse_public_key(&std::fs::read_to_string(d.path().join("audit.pub")).unwrap())
                .unwrap();
        let exported: Vec<String> = again
            .lines()
            .await
            .unwrap()
            .iter()
            .map(|l| serde_json::to_string(l).unwrap())
            .collect();
        let parsed = exported.iter().map(|l| serde_json::from_str(l).unwrap());
        assert!(verify(parsed, &public).ok());
        assert!(!verify(
            again.lines().await.unwrap(),
            &SigningKey::from_bytes(&[9; 32]).verifying_key()
        )
        .ok());
    }

    async fn first_bad(log: &AuditLog) -> (u64, String) {
        let r = log.verify().await.unwrap();
        r.first_bad
            .clone()
            .unwrap_or_else(|| panic!("tampering not found: {r:?}"))
    }

    #[tokio::test]
    async fn an_edited_field_is_found() {
        let (_d, log, store) = filled().await;
        exec(
            &store,
            "UPDATE audit_log SET body = replace(body, '\"allow\"', '\"deny\"') WHERE seq = 4",
        )
        .await;
        let (seq, why) = first_bad(&log).await;
        assert_eq!(seq, 4);
        assert!(why.contains("edited"), "{why}");
    }

    #[tokio::test]
    async fn a_removed_entry_is_found() {
        let (_d, log, store) = filled().await;
        exec(&store, "DELETE FROM audit_log WHERE seq = 6").await;
        assert_eq!(first_bad(&log).await.0, 7);
    }

    #[tokio::test]
    async fn swapped_entries_are_found() {
        let (_d, log, store) = filled().await;
        exec(&store, "UPDATE audit_log SET seq = -3 WHERE seq = 3").await;
        exec(&store, "UPDATE audit_log SET seq = 3 WHERE seq = 5").await;
        exec(&store, "UPDATE audit_log SET seq = 5 WHERE seq = -3").await;
        assert_eq!(first_bad(&log).await.0, 5);
    }

    #[tokio::test]
    async fn a_dropped_tail_is_found() {
        let (_d, log, store) = filled().await;
        exec(&store, "DELETE FROM audit_log WHERE seq > 7").await;
        let (_, why) = first_bad(&log).await;
        assert!(why.contains("tail was dropped"), "{why}");
    }

    #[tokio::test]
    async fn a_rewritten_chain_is_found_by_its_checkpoints() {
        let (_d, log, store) = filled().await;
        // Edit entry 8 and recompute every hash after it, as someone
        // without the signing key could.
        let lines = log.lines().await.unwrap();
        let mut prev = GENESIS.to_string();
        for line in lines {
            if let Line::Entry { mut entry, .. } = line {
                if entry.seq == 8 {
                    entry.outcome = "PERMISSION_DENIED".into();
                }
                let body = entry.canonical();
                let hash = chain_hash(&prev, &body);
                sqlx::query(
                    "UPDATE audit_log SET body = $1, prev_hash = $2, hash = $3 WHERE seq = $4",
                )
                .bind(&body)
                .bind(&prev)
                .bind(&hash)
                .bind(entry.seq as i64)
                .execute(store.pool())
                .await
                .unwrap();
                prev = hash;
            }
        }
        let (_, why) = first_bad(&log).await;
        assert!(why.contains("rewritten"), "{why}");
    }
}
