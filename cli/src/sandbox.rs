//! `bridle sandbox`: create, list, look at, pause, resume, snapshot, fork
//! and remove sandboxes; `exec` and `cp` have modules of their own.

use std::collections::HashMap;
use std::time::Duration;

use bridle_client::control as pb;
use bridle_client::sandbox as agent_pb;
use bridle_client::units::{parse_duration, parse_size};
use clap::{Args, Subcommand};

use crate::args::key_values;
use crate::conn::Conn;
use crate::render::{self, print_json, DeletedView, SandboxView, SnapshotView};
use crate::{cp, exec};

#[derive(Subcommand)]
pub(crate) enum SandboxCmd {
    /// Create a sandbox; prints its id.
    Create(CreateArgs),
    List {
        /// Only sandboxes with this label (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    Get {
        id: String,
    },
    /// Run a command; stdin, a terminal, signals and the exit code pass through.
    Exec(exec::ExecArgs),
    /// Copy a file in or out: `cp ./file ID:path`, `cp ID:path ./file` (`-` is stdin/stdout).
    Cp {
        src: String,
        dst: String,
    },
    /// Store a snapshot of the workspace; prints its id.
    Snapshot {
        id: String,
        /// Subpath of the workspace.
        #[arg(long, default_value = "")]
        path: String,
        /// Glob to leave out (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
    },
    /// List your snapshots.
    Snapshots,
    /// Delete a snapshot.
    RmSnapshot {
        id: String,
    },
    /// An egress sandbox's connections: each decision (network.connect)
    /// and each connection's end, with bytes and duration, from the audit
    /// log (auditors and admins).
    NetLog {
        id: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// A new sandbox with a copy of this one's workspace; prints its id.
    Fork {
        id: String,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Delete sandboxes (container, workspace and all).
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    #[arg(long)]
    image: Option<String>,
    /// Memory limit: 512m, 2g, or bytes.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// CPU limit in CPUs: 0.5, 2.
    #[arg(long)]
    cpus: Option<f64>,
    #[arg(long)]
    pids: Option<u64>,
    /// Size of the workspace's filesystem: 256m, 4g (the server's limit
    /// applies).
    #[arg(long, value_parser = parse_size)]
    disk: Option<u64>,
    #[arg(long, value_parser = ["none", "bridge", "egress"])]
    network: Option<String>,
    /// Environment for every exec (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Delete the sandbox after this long: 30m, 2h, 1d.
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Delete the sandbox after this long without use.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    #[arg(long)]
    from_snapshot: Option<String>,
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
}

pub(crate) async fn run(c: &mut Conn, cmd: SandboxCmd) -> anyhow::Result<u8> {
    match cmd {
        SandboxCmd::Create(a) => {
            let network = match a.network.as_deref() {
                Some("bridge") => pb::NetworkMode::Bridge,
                Some("egress") => pb::NetworkMode::Egress,
                Some(_) => pb::NetworkMode::None,
                None => pb::NetworkMode::Unspecified,
            };
            let s = c
                .sandboxes
                .create(pb::CreateSandboxRequest {
                    image: a.image.unwrap_or_default(),
                    limits: Some(pb::Limits {
                        memory_bytes: a.memory,
                        cpu_millis: a.cpus.map(|c| (c * 1000.0).round() as u64),
                        pids: a.pids,
                        disk_bytes: a.disk,
                    }),
                    network: network as i32,
                    env: key_values(&a.env, "--env")?,
                    ttl_seconds: a.ttl.map(|d| d.as_secs()).unwrap_or(0),
                    idle_timeout_seconds: a.idle_timeout.map(|d| d.as_secs()).unwrap_or(0),
                    from_snapshot: a.from_snapshot.unwrap_or_default(),
                    labels: key_values(&a.labels, "--label")?,
                })
                .await?
                .into_inner();
            if c.json {
                print_json(&SandboxView::from(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::List { labels } => {
            let list = c
                .sandboxes
                .list(pb::ListSandboxesRequest {
                    labels: key_values(&labels, "--label")?,
                })
                .await?
                .into_inner()
                .sandboxes;
            if c.json {
                print_json(&list.iter().map(SandboxView::from).collect::<Vec<_>>());
            } else {
                render::sandbox_table(&list);
            }
        }
        SandboxCmd::Get { id } => {
            let s = c
                .sandboxes
                .get(pb::GetSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(&SandboxView::from(&s));
            } else {
                render::sandbox_details(&s);
            }
        }
        SandboxCmd::Exec(a) => return exec::run(c, a).await,
        SandboxCmd::Cp { src, dst } => cp::run(c, &src, &dst).await?,
        SandboxCmd::Snapshot { id, path, exclude } => {
            let s = c
                .sandboxes
                .snapshot(pb::SnapshotRequest {
                    sandbox_id: id,
                    path,
                    exclude,
                    compression: agent_pb::Compression::Zstd as i32,
                })
                .await?
                .into_inner();
            if c.json {
                print_json(&SnapshotView::from(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::Snapshots => {
            let list = c
                .sandboxes
                .list_snapshots(pb::ListSnapshotsRequest {})
                .await?
                .into_inner()
                .snapshots;
            if c.json {
                print_json(&list.iter().map(SnapshotView::from).collect::<Vec<_>>());
            } else {
                render::snapshot_table(&list);
            }
        }
        SandboxCmd::RmSnapshot { id } => {
            c.sandboxes
                .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: id })
                .await?;
        }
        SandboxCmd::NetLog { id, limit } => {
            let r = c
                .audit
                .query(pb::QueryAuditRequest {
                    action: "egress/".into(),
                    resource: id,
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            if c.json {
                print_json(
                    &r.entries
                        .iter()
                        .map(render::AuditEntryView::from)
                        .collect::<Vec<_>>(),
                );
            } else {
                render::audit_table(&r.entries);
            }
        }
        SandboxCmd::Fork { id, ttl } => {
            let s = c
                .sandboxes
                .fork(pb::ForkRequest {
                    sandbox_id: id,
                    ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
                    labels: HashMap::new(),
                })
                .await?
                .into_inner();
            if c.json {
                print_json(&SandboxView::from(&s));
            } else {
                println!("{}", s.id);
            }
        }
        SandboxCmd::Pause { id } => {
            let s = c
                .sandboxes
                .pause(pb::PauseSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(&SandboxView::from(&s));
            }
        }
        SandboxCmd::Resume { id } => {
            let s = c
                .sandboxes
                .resume(pb::ResumeSandboxRequest { sandbox_id: id })
                .await?
                .into_inner();
            if c.json {
                print_json(&SandboxView::from(&s));
            }
        }
        SandboxCmd::Rm { ids } => {
            for id in ids {
                c.sandboxes
                    .delete(pb::DeleteSandboxRequest {
                        sandbox_id: id.clone(),
                    })
                    .await?;
                if c.json {
                    print_json(&DeletedView { deleted: &id });
                }
            }
        }
    }
    Ok(0)
}
