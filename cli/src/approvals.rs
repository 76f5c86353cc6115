//! `bridle approvals`: list, show, decide and watch human approvals.

use std::collections::HashMap;

use anyhow::bail;
use bridle_client::control as pb;
use clap::Subcommand;
use tonic::Status;

use crate::clock::now_ms;
use crate::conn::{Conn, Reconnects};
use crate::render::{self, approval_state_name, print_json, print_line, ApprovalView};

#[derive(Subcommand)]
pub(crate) enum ApprovalsCmd {
    /// Approvals, newest first (default: pending ones).
    List {
        /// Every state, not only pending.
        #[arg(long)]
        all: bool,
        /// Only those of this run.
        #[arg(long)]
        run: Option<String>,
    },
    /// One approval in full.
    Show { approval_id: String },
    /// Approve (operator; never your own request).
    Approve {
        approval_id: String,
        #[arg(long)]
        reason: String,
        /// Also approve the sandbox's later connections to the same host
        /// and port, for the sandbox's life (egress approvals only).
        #[arg(long)]
        remember: bool,
    },
    /// Deny (operator; never your own request).
    Deny {
        approval_id: String,
        #[arg(long)]
        reason: String,
    },
    /// Pending approvals now, then each change as it happens.
    Watch,
}

pub(crate) async fn run(c: &mut Conn, cmd: ApprovalsCmd) -> anyhow::Result<u8> {
    match cmd {
        ApprovalsCmd::List { all, run } => {
            let r = c
                .approvals
                .list(pb::ListApprovalsRequest {
                    states: if all {
                        vec![]
                    } else {
                        vec![pb::ApprovalState::Pending as i32]
                    },
                    run_id: run.unwrap_or_default(),
                    page_size: 1000,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                print_json(
                    &r.approvals
                        .iter()
                        .map(ApprovalView::from)
                        .collect::<Vec<_>>(),
                );
            } else {
                render::approval_table_header();
                for a in &r.approvals {
                    println!("{}", render::approval_line(a));
                }
            }
            Ok(0)
        }
        ApprovalsCmd::Show { approval_id } => {
            let a = c
                .approvals
                .get(pb::GetApprovalRequest { approval_id })
                .await?
                .into_inner();
            if c.json {
                print_json(&ApprovalView::from(&a));
            } else {
                render::approval_details(&a, now_ms());
            }
            Ok(0)
        }
        ApprovalsCmd::Approve {
            approval_id,
            reason,
            ..
        }
        | ApprovalsCmd::Deny {
            approval_id,
            reason,
        } if reason.trim().is_empty() => {
            let _ = approval_id;
            bail!("--reason must say why")
        }
        ApprovalsCmd::Approve {
            approval_id,
            reason,
            remember,
        } => decide(c, approval_id, true, reason, remember).await,
        ApprovalsCmd::Deny {
            approval_id,
            reason,
        } => decide(c, approval_id, false, reason, false).await,
        ApprovalsCmd::Watch => watch_approvals(c).await,
    }
}

async fn decide(
    c: &mut Conn,
    approval_id: String,
    approve: bool,
    reason: String,
    remember: bool,
) -> anyhow::Result<u8> {
    let a = c
        .approvals
        .decide(pb::DecideApprovalRequest {
            approval_id,
            approve,
            reason,
            remember,
        })
        .await?
        .into_inner();
    if c.json {
        print_json(&ApprovalView::from(&a));
    } else {
        println!("{} {}", a.id, approval_state_name(a.state));
    }
    Ok(0)
}

/// `approvals watch`: the pending approvals, then each change, across
/// restarts of the control plane.
async fn watch_approvals(c: &mut Conn) -> anyhow::Result<u8> {
    let mut follower = ApprovalsFollower {
        json: c.json,
        shown: HashMap::new(),
        received: 0,
    };
    let mut reconnects = Reconnects::new();
    loop {
        let from = follower.received;
        let failure = match follower.follow(c).await {
            // The server ends this stream only when it shuts down.
            Ok(()) => Status::unavailable("the approvals stream ended").into(),
            Err(e) => e,
        };
        if follower.received > from {
            reconnects.progressed();
        }
        // The Watch has no sequence to resume from: it starts again with
        // what is pending, and what changed in between is not replayed.
        let again = "watching approvals again (changes made meanwhile are not replayed: \
                     `bridle approvals list --all`)";
        reconnects.redial(c, failure, again).await?;
    }
}

struct ApprovalsFollower {
    json: bool,
    /// Each approval as last printed (its JSON view): the pending ones come
    /// again after a reconnect, and are not printed twice.
    shown: HashMap<String, String>,
    /// Events received, all attempts together.
    received: u64,
}

impl ApprovalsFollower {
    /// One attempt: prints what the stream brings until it ends or fails.
    async fn follow(&mut self, c: &mut Conn) -> anyhow::Result<()> {
        let mut events = c
            .approvals
            .watch(pb::WatchApprovalsRequest {})
            .await?
            .into_inner();
        while let Some(ev) = events.message().await? {
            self.received += 1;
            let Some(a) = ev.approval else { continue };
            let view = serde_json::to_string(&ApprovalView::from(&a))?;
            if self.shown.get(&a.id) == Some(&view) {
                continue;
            }
            if self.json {
                print_line(&view)?;
            } else {
                print_line(render::approval_line(&a))?;
            }
            self.shown.insert(a.id, view);
        }
        Ok(())
    }
}
