//! The audit log: every call, decision and policy change, appended to a
//! hash chain. Entry `n` stores `hash_n = sha256(hash_{n-1} || "\n" ||
//! body_n)`, where `body_n` is the entry's canonical encoding (JSON with its
//! fields in a fixed order) and `hash_0` is 64 zeros. Editing, removing or
//! reordering an entry breaks the chain at that entry. Rewriting the chain
//! from some entry on is caught by checkpoints: `(seq, hash, time)` signed
//! with an ed25519 key kept in the data directory (`audit.key`, 0600; the
//! public half in `audit.pub`), so a verifier holding only the public key
//! also finds a dropped tail (a checkpoint names an entry that is gone).
//! The format and its verification live in `bridle_client::audit`, so that
//! an export is checked offline without the server; this module stores,
//! chains and signs.
//!
//! Entries are written by one task that commits whatever queued up during
//! the previous commit (as the run store does), so the chain is built in one
//! place and each caller hears back once its entry is durable.
//!
//! The log fails closed. It opens only over a tail that verifies (or, when
//! told to, continues after the damage and records it first: [`OnDamage`]).
//! A commit that fails puts it in a failed state, logged once, that
//! [`AuditLog::recording`] reports: effectful calls check it before they act
//! (`guard`, `api::audit`) and are refused while it lasts. Every later group
//! tries again; the first that commits clears the state and starts with an
//! `audit.unrecorded` entry counting what could not be written meanwhile
//! (each such entry is in the control plane's log, `audit: not recorded`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bridle_client::audit::verify_from;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

pub use bridle_client::audit::{
    chain_hash, parse_public_key, verify, Checkpoint, Entry, Line, Report, GENESIS,
};

/// The entry a stored body holds. An unreadable body still takes its place
/// (in the chain, in a query), so verification names it instead of
/// skipping it.
fn stored_entry(seq: i64, body: &str) -> Entry {
    serde_json::from_str(body).unwrap_or_else(|_| Entry {
        seq: seq as u64,
        outcome: format!("(unreadable: {body})"),
        ..Entry::default()
    })
}

/// What opening a log whose stored tail does not verify does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse, naming the first bad entry ([`Damaged`]).
    #[default]
    Refuse,
    /// Keep the log as it is and continue the chain after everything it
    /// holds, the first new entry (`audit.damage`) saying what was found.
    /// Verifying the whole log goes on naming the damage.
    Continue,
}

/// Why a log did not open: its tail does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the audit log is damaged at entry {seq}: {problem}. The control plane does not start over a damaged audit log. \
     Keep a copy of the data directory to investigate; then restore its database from a backup, or start once with \
     `--set audit.continue_after_damage=true` (BRIDLE_AUDIT__CONTINUE_AFTER_DAMAGE=true) to keep the log as it is and \
     continue the chain after it, the first new entry (`audit.damage`) recording what was found \
     (`bridle audit verify` goes on naming the damage)"
)]
pub struct Damaged {
    pub seq: u64,
    pub problem: String,
}

/// Where the stored chain ends, what the writer continues from.
struct Tail {
    /// The highest seq an entry or a checkpoint holds: new entries go after
    /// it, so that a new checkpoint never collides with an old one.
    last_seq: u64,
    /// The last stored entry (0: none) and its hash (`GENESIS`): new
    /// entries chain from it.
    last_entry: u64,
    last_hash: String,
    /// The first problem in the tail.
    first_bad: Option<(u64, String)>,
}

/// Checks the tail of the stored chain: the last checkpoint (signed by
/// `key`, naming an entry that is there with that hash) and every entry
/// from it on (linked, unedited, none after the last checkpoint).
///
/// Only the tail, not the whole chain: the writer depends on nothing else,
/// and a full check costs a hash per entry and a signature check per group
/// commit ever made, which grows without bound (minutes at start for a big
/// log). Damage further back does not stop new entries from being chained
/// correctly; `bridle audit verify` (the whole chain) names it.
async fn check_tail(pool: &SqlitePool, key: &VerifyingKey) -> anyhow::Result<Tail> {
    // One snapshot, as `AuditLog::lines` reads.
    let mut tx = pool.begin().await?;
    let (last_entry,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM audit_log")
        .fetch_one(&mut *tx)
        .await?;
    let (last_checkpoint,): (i64,) =
        sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM audit_checkpoints")
            .fetch_one(&mut *tx)
            .await?;
    let (last_entry, last_checkpoint) = (last_entry.max(0) as u64, last_checkpoint.max(0) as u64);
    // From the last checkpoint, or from the last entry when the
    // checkpoints go further (a dropped tail); from the start when there
    // is no checkpoint or no entry at all.
    let from = last_entry.min(last_checkpoint).max(1);
    let rows: Vec<(i64, String, String, String)> = sqlx::query_as(
        "SELECT seq, body, prev_hash, hash FROM audit_log WHERE seq >= $1 ORDER BY seq",
    )
    .bind(from as i64)
    .fetch_all(&mut *tx)
    .await?;
    let checkpoints: Vec<(i64, String, i64, String)> = sqlx::query_as(
        "SELECT seq, hash, unix_ms, signature FROM audit_checkpoints WHERE seq >= $1 ORDER BY seq",
    )
    .bind(from as i64)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let last_hash = rows
        .last()
        .map(|(_, _, _, hash)| hash.clone())
        .unwrap_or_else(|| GENESIS.to_string());
    // The first entry's link to the one before it is vouched for by the
    // checkpoints (a signed hash covers every hash before it), not here.
    let prev = match rows.first() {
        Some((_, _, prev_hash, _)) if from > 1 => prev_hash.clone(),
        _ => GENESIS.to_string(),
    };
    let lines = rows
        .into_iter()
        .map(entry_line)
        .chain(checkpoints.into_iter().map(checkpoint_line));
    let report = verify_from(from, prev, lines, key);
    Ok(Tail {
        last_seq: last_entry.max(last_checkpoint),
        last_entry,
        last_hash,
        first_bad: report.first_bad,
    })
}

fn entry_line((seq, body, prev_hash, hash): (i64, String, String, String)) -> Line {
    Line::Entry {
        entry: Box::new(stored_entry(seq, &body)),
        prev_hash,
        hash,
    }
}

fn checkpoint_line((seq, hash, unix_ms, signature): (i64, String, i64, String)) -> Line {
    Line::Checkpoint(Checkpoint {
        seq: seq as u64,
        hash,
        unix_ms,
        signature,
    })
}

/// The signing key, created (0600, with `audit.pub` beside it) on first use.
pub fn load_or_create_key(data_dir: &Path) -> anyhow::Result<SigningKey> {
    let path = data_dir.join("audit.key");
    let key = SigningKey::from_bytes(
        &crate::keys::key_file(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
    );
    std::fs::write(
        data_dir.join("audit.pub"),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )?;
    Ok(key)
}

/// Why the log cannot record, while it cannot (none: it records). Set and
/// cleared by the writer, read by every effectful call.
type Failure = Arc<Mutex<Option<String>>>;

/// The log on the embedded store.
#[derive(Clone)]
pub struct AuditLog {
    pool: SqlitePool,
    writer: mpsc::Sender<(Entry, oneshot::Sender<Result<u64, String>>)>,
    key: VerifyingKey,
    failure: Failure,
}

impl AuditLog {
    /// Opens the log over a stored tail that verifies (else [`Damaged`]);
    /// its writer continues the chain from there.
    pub async fn open(pool: SqlitePool, key: SigningKey) -> anyhow::Result<Self> {
        Self::open_with(pool, key, OnDamage::Refuse).await
    }

    /// [`AuditLog::open`], over a damaged tail doing what `on_damage` says.
    pub async fn open_with(
        pool: SqlitePool,
        key: SigningKey,
        on_damage: OnDamage,
    ) -> anyhow::Result<Self> {
        let verifying = key.verifying_key();
        let tail = check_tail(&pool, &verifying)
            .await
            .context("reading the audit log's tail")?;
        if let Some((seq, problem)) = &tail.first_bad {
            let damaged = Damaged {
                seq: *seq,
                problem: problem.clone(),
            };
            if on_damage == OnDamage::Refuse {
                return Err(damaged.into());
            }
            tracing::warn!(
                "audit: entry {seq}: {problem}; continuing the chain after entry {} as configured (audit.continue_after_damage)",
                tail.last_seq
            );
        }
        let (writer, queue) = mpsc::channel(1024);
        let failure = Failure::default();
        tokio::spawn(write_loop(
            pool.clone(),
            queue,
            key,
            tail.last_seq,
            tail.last_hash.clone(),
            failure.clone(),
        ));
        let log = Self {
            pool,
            writer,
            key: verifying,
            failure,
        };
        if let Some((seq, problem)) = tail.first_bad {
            // On the record before anything else is.
            log.append(Entry {
                unix_ms: crate::clock::now_ms(),
                principal: "control-plane".into(),
                action: "audit.damage".into(),
                resource: format!("entry {seq}"),
                outcome: format!(
                    "{problem}; the log is kept as it was and the chain continues after entry {} (chained to entry {}), as audit.continue_after_damage says",
                    tail.last_seq, tail.last_entry
                ),
                ..Entry::default()
            })
            .await
            .context("recording the damage found in the audit log")?;
        }
        Ok(log)
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key
    }

    /// Ok while entries are recorded; else why not (the last commit failed,
    /// or the writer is gone). Effectful calls check this before they act
    /// (`guard::Guard::recording`), so none goes ahead that the log could
    /// not take down.
    pub fn recording(&self) -> Result<(), String> {
        if self.writer.is_closed() {
            return Err("the audit writer has stopped".into());
        }
        match &*self.failure.lock().expect("audit failure lock") {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
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
            .map(|(seq, body, hash)| (stored_entry(seq, &body), hash))
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
        let mut lines: Vec<Line> = rows.into_iter().map(entry_line).collect();
        let cps: Vec<(i64, String, i64, String)> = sqlx::query_as(
            "SELECT seq, hash, unix_ms, signature FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        lines.extend(cps.into_iter().map(checkpoint_line));
        Ok(lines)
    }

    pub async fn verify(&self) -> anyhow::Result<Report> {
        Ok(verify(self.lines().await?, &self.key))
    }
}

/// How many times a commit that met a busy or locked database is tried
/// before the log counts as failing (each try waits out the store's busy
/// timeout first).
const WRITE_TRIES: u32 = 3;

/// Entries that could not be committed while the log was failing.
struct Unrecorded {
    count: u64,
    since_ms: i64,
    error: String,
}

impl Unrecorded {
    /// The entry that opens the first commit after the failure.
    fn entry(&self) -> Entry {
        Entry {
            unix_ms: crate::clock::now_ms(),
            principal: "control-plane".into(),
            action: "audit.unrecorded".into(),
            outcome: format!(
                "{} entries could not be recorded from unix ms {} on ({}); each is in the control plane's log (\"audit: not recorded\"), and effectful calls were refused meanwhile",
                self.count, self.since_ms, self.error
            ),
            ..Entry::default()
        }
    }
}

/// Whether a failed commit is worth trying again at once: the database
/// busy or locked (`SQLITE_BUSY`, `SQLITE_LOCKED` and their extended
/// codes), or no connection free.
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => d
            .code()
            .and_then(|c| c.parse::<i32>().ok())
            .is_some_and(|c| matches!(c & 0xff, 5 | 6)),
        _ => false,
    }
}

/// Builds the chain: takes what queued, hashes it in order, writes it and a
/// signed checkpoint of the new tail in one transaction. A group that does
/// not commit puts the log in the failed state (`failure`); the next group
/// is tried all the same, and the first that commits ends the state.
async fn write_loop(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<(Entry, oneshot::Sender<Result<u64, String>>)>,
    key: SigningKey,
    mut seq: u64,
    mut hash: String,
    failure: Failure,
) {
    let mut batch = Vec::new();
    let mut unrecorded: Option<Unrecorded> = None;
    while crate::store::next_group(&mut queue, &mut batch, 512).await {
        let (start_seq, start_hash) = (seq, hash.clone());
        // After a failure, the first commit says first what is missing.
        let mut note = unrecorded.as_ref().map(Unrecorded::entry);
        let mut rows = Vec::with_capacity(batch.len() + 1);
        for entry in note.iter_mut().chain(batch.iter_mut().map(|(e, _)| e)) {
            seq += 1;
            entry.seq = seq;
            let body = entry.canonical();
            let next = chain_hash(&hash, &body);
            rows.push((seq, entry.unix_ms, body, hash.clone(), next.clone()));
            hash = next;
        }
        let now = crate::clock::now_ms();
        let signature = hex::encode(
            key.sign(Checkpoint::message(seq, &hash, now).as_bytes())
                .to_bytes(),
        );
        let mut result = write_rows(&pool, &rows, (seq, &hash, now, &signature)).await;
        let mut tries = 1;
        while tries < WRITE_TRIES && result.as_ref().is_err_and(transient) {
            tokio::time::sleep(Duration::from_millis(100 << tries)).await;
            result = write_rows(&pool, &rows, (seq, &hash, now, &signature)).await;
            tries += 1;
        }
        match &result {
            Ok(()) => {
                if let Some(u) = unrecorded.take() {
                    *failure.lock().expect("audit failure lock") = None;
                    tracing::warn!(
                        "audit: the log records again; {} entries could not be recorded meanwhile (entry {} says so)",
                        u.count,
                        start_seq + 1
                    );
                }
            }
            Err(e) => {
                // Nothing was written: the chain continues from where it was.
                seq = start_seq;
                hash = start_hash;
                let error = e.to_string();
                let changed = unrecorded.as_ref().is_none_or(|u| u.error != error);
                if changed {
                    // Once per failure (and again if its cause changes), not
                    // once per group.
                    tracing::error!(
                        "the audit log cannot record: {error}; effectful calls are refused until it can"
                    );
                }
                *failure.lock().expect("audit failure lock") = Some(error.clone());
                let u = unrecorded.get_or_insert_with(|| Unrecorded {
                    count: 0,
                    since_ms: batch.first().map_or(now, |(e, _)| e.unix_ms),
                    error: String::new(),
                });
                u.count += batch.len() as u64;
                u.error = error;
            }
        }
        for (mut entry, done) in batch.drain(..) {
            let answer = match &result {
                Ok(()) => Ok(entry.seq),
                Err(e) => {
                    // Not in the chain, so here: the entry as it would have
                    // been, without the seq it did not get.
                    entry.seq = 0;
                    tracing::warn!(entry = %entry.canonical(), "audit: not recorded");
                    Err(e.to_string())
                }
            };
            let _ = done.send(answer);
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

    async fn count(store: &crate::store::Store, table: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(store.pool())
            .await
            .unwrap();
        n
    }

    #[tokio::test]
    async fn a_log_whose_tail_was_dropped_does_not_open() {
        let (d, log, store) = filled().await;
        drop(log);
        // Entries 8 to 10 go; their signed checkpoints stay.
        exec(&store, "DELETE FROM audit_log WHERE seq > 7").await;
        let key = load_or_create_key(d.path()).unwrap();
        let Err(e) = AuditLog::open(store.pool().clone(), key).await else {
            panic!("a log whose tail was dropped opened");
        };
        let damaged = e
            .downcast_ref::<Damaged>()
            .unwrap_or_else(|| panic!("not a Damaged: {e:#}"));
        assert_eq!(damaged.seq, 8, "{damaged}");
        let text = format!("{e:#}");
        for part in [
            "damaged at entry 8",
            "names entry 8 and the log ends at entry 7: its tail was dropped",
            "audit.continue_after_damage=true",
        ] {
            assert!(text.contains(part), "{part:?} not in: {text}");
        }
        // Nothing was written.
        assert_eq!(count(&store, "audit_log").await, 7);
        assert_eq!(count(&store, "audit_checkpoints").await, 10);
    }

    #[tokio::test]
    async fn entries_after_the_last_checkpoint_do_not_open() {
        let (d, log, store) = filled().await;
        drop(log);
        // The other way round: the checkpoints of the tail removed.
        exec(&store, "DELETE FROM audit_checkpoints WHERE seq > 7").await;
        let key = load_or_create_key(d.path()).unwrap();
        let Err(e) = AuditLog::open(store.pool().clone(), key).await else {
            panic!("a log whose tail has no checkpoints opened");
        };
        let damaged = e.downcast_ref::<Damaged>().unwrap();
        assert_eq!(damaged.seq, 8, "{damaged}");
        assert!(
            damaged.problem.contains("after the last signed checkpoint"),
            "{damaged}"
        );
    }

    #[tokio::test]
    async fn a_damaged_log_continues_when_told_to_with_the_damage_on_record() {
        let (d, log, store) = filled().await;
        drop(log);
        exec(&store, "DELETE FROM audit_log WHERE seq > 7").await;
        let key = || load_or_create_key(d.path()).unwrap();
        let again = AuditLog::open_with(store.pool().clone(), key(), OnDamage::Continue)
            .await
            .unwrap();
        // The first new entry says what was found; it goes after the old
        // checkpoints (8 to 10) instead of colliding with them.
        let (after, _) = again.entries_after(7, 0, 0, 100).await.unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        let damage = &after[0].0;
        assert_eq!(
            (damage.seq, damage.action.as_str(), damage.resource.as_str()),
            (11, "audit.damage", "entry 8"),
            "{damage:?}"
        );
        assert!(damage.outcome.contains("tail was dropped"), "{damage:?}");
        assert_eq!(again.append(entry(12)).await.unwrap(), 12);
        assert!(again.recording().is_ok());
        // Verifying the whole log goes on naming the damage...
        assert!(!again.verify().await.unwrap().ok());
        // ...while the next start, not told anything, opens: the tail it
        // continues from verifies.
        drop(again);
        let third = AuditLog::open(store.pool().clone(), key()).await.unwrap();
        assert_eq!(third.append(entry(13)).await.unwrap(), 13);
    }

    #[tokio::test]
    async fn a_log_that_cannot_append_says_why_until_it_can() {
        let (_d, log, store) = filled().await;
        assert!(log.recording().is_ok());

        exec(
            &store,
            "CREATE TRIGGER boom BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
        .await;
        let e = log.append(entry(11)).await.unwrap_err();
        assert!(format!("{e:#}").contains("boom"), "{e:#}");
        // Failed, and saying why.
        let why = log.recording().unwrap_err();
        assert!(why.contains("boom"), "{why}");
        // (What the guard makes of it: `guard::tests`.)
        // A queued entry is not lost quietly either: its sender hears.
        assert!(log.append(entry(12)).await.is_err());
        assert!(log.recording().is_err());
        assert_eq!(count(&store, "audit_log").await, 10);

        // Once it can record again, the first entry says what is missing.
        exec(&store, "DROP TRIGGER boom").await;
        assert_eq!(log.append(entry(13)).await.unwrap(), 12);
        assert!(log.recording().is_ok());
        let (after, _) = log.entries_after(10, 0, 0, 100).await.unwrap();
        let note = &after[0].0;
        assert_eq!((note.seq, note.action.as_str()), (11, "audit.unrecorded"));
        assert!(
            note.outcome.starts_with("2 entries could not be recorded")
                && note.outcome.contains("boom"),
            "{note:?}"
        );
        assert_eq!(after[1].0.request_id, "req-13");
        assert!(log.verify().await.unwrap().ok());
    }
}
