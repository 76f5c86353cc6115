//! `bridle audit`: query, export and verify the audit log; an export is
//! verified offline with only the public key (`bridle_client::audit`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use bridle_client::audit;
use bridle_client::control as pb;
use bridle_client::units::parse_duration;
use clap::Subcommand;
use tonic::Status;

use crate::clock::now_ms;
use crate::conn::Conn;
use crate::render::{self, print_json, AuditEntryView, VerdictView};

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Check the hash chain and the signed checkpoints: names the first bad
    /// entry and exits 1. With --file, checks an export offline.
    Verify {
        /// An export (`bridle audit export > F`) to check without a server.
        #[arg(long, requires = "public_key")]
        file: Option<PathBuf>,
        /// The control plane's public key file (`<data dir>/audit.pub`).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// The whole log as JSON lines, with hashes and signed checkpoints.
    Export,
    /// Entries, oldest first.
    Query {
        /// Only this token id or principal name.
        #[arg(long)]
        principal: Option<String>,
        /// Only actions starting with this (e.g. `Runs/`).
        #[arg(long)]
        action: Option<String>,
        /// Only entries about this resource.
        #[arg(long)]
        resource: Option<String>,
        /// Only entries of this run: calls about it, its steps' policy
        /// decisions, its approvals.
        #[arg(long)]
        run: Option<String>,
        /// Only entries newer than this long ago (e.g. `90s`, `15m`, `2h`).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only entries older than this long ago.
        #[arg(long, value_parser = parse_duration)]
        until: Option<Duration>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub(crate) async fn run(c: &mut Conn, cmd: AuditCmd) -> anyhow::Result<u8> {
    match cmd {
        AuditCmd::Verify { .. } => {
            let r = c
                .audit
                .verify(pb::VerifyAuditRequest {})
                .await?
                .into_inner();
            Ok(audit_verdict(
                c.json,
                r.ok,
                r.entries,
                r.checkpoints,
                r.first_bad_seq,
                &r.problem,
            ))
        }
        AuditCmd::Export => {
            let mut s = c
                .audit
                .export(pb::ExportAuditRequest {})
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = s.message().await? {
                std::io::Write::write_all(&mut out, &chunk.data)?;
            }
            Ok(0)
        }
        AuditCmd::Query {
            principal,
            action,
            resource,
            run,
            since,
            until,
            limit,
        } => {
            let ago =
                |d: Option<Duration>| d.map_or(0, |d| (now_ms() - d.as_millis() as i64).max(1));
            let r = c
                .audit
                .query(pb::QueryAuditRequest {
                    principal: principal.unwrap_or_default(),
                    action: action.unwrap_or_default(),
                    resource: resource.unwrap_or_default(),
                    run_id: run.unwrap_or_default(),
                    since_unix_ms: ago(since),
                    until_unix_ms: ago(until),
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                print_json(
                    &r.entries
                        .iter()
                        .map(AuditEntryView::from)
                        .collect::<Vec<_>>(),
                );
            } else {
                render::audit_table(&r.entries);
            }
            Ok(0)
        }
    }
}

fn audit_verdict(
    json: bool,
    ok: bool,
    entries: u64,
    checkpoints: u64,
    bad: u64,
    problem: &str,
) -> u8 {
    if json {
        print_json(&VerdictView {
            ok,
            entries,
            checkpoints,
            first_bad_seq: bad,
            problem,
        });
    }
    if ok {
        if !json {
            println!("ok: {entries} entries, {checkpoints} signed checkpoints");
        }
        0
    } else {
        eprintln!("bridle: audit log: entry {bad}: {problem}");
        1
    }
}

/// `audit verify --file F --public-key K`: an export checked offline.
pub(crate) fn verify_export(file: &Path, key: &Path, json: bool) -> anyhow::Result<u8> {
    let key = std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = audit::parse_public_key(&key).context("--public-key")?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let lines = audit::parse_export(&text).map_err(|e| match e {
        audit::Error::NotAnExportLine { line, error } => {
            anyhow::Error::new(Status::invalid_argument(format!(
                "{}:{line}: not an audit export line: {error}",
                file.display()
            )))
        }
        e => anyhow::Error::new(e),
    })?;
    let r = audit::verify(lines, &key);
    let (bad, problem) = r.first_bad.clone().unwrap_or_default();
    Ok(audit_verdict(
        json,
        r.ok(),
        r.entries,
        r.checkpoints,
        bad,
        &problem,
    ))
}
