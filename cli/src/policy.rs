//! `bridle policy`: show, check and change the Cedar policy set in force.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bridle_client::control as pb;
use clap::Subcommand;

use crate::conn::Conn;
use crate::render::{self, print_json, PolicyView};

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Print the set in force (its version goes to stderr).
    Get,
    /// Check a policy file against the schema; problems as FILE:LINE:COL.
    Validate { file: PathBuf },
    /// Put a policy file in force as the next version (admin).
    Set {
        file: PathBuf,
        /// Refuse if the version in force is not this one.
        #[arg(long)]
        expected_version: Option<u64>,
    },
}

pub(crate) async fn run(c: &mut Conn, cmd: PolicyCmd) -> anyhow::Result<u8> {
    let read = |file: &Path| {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
    };
    match cmd {
        PolicyCmd::Get => {
            let p = c
                .admin
                .get_policy(pb::GetPolicyRequest {})
                .await?
                .into_inner();
            if c.json {
                print_json(&PolicyView::from(&p));
            } else {
                render::policy(&p);
            }
            Ok(0)
        }
        PolicyCmd::Validate { file } => {
            let source = read(&file)?;
            let r = c
                .admin
                .validate_policy(pb::ValidatePolicyRequest { source })
                .await?
                .into_inner();
            if r.ok {
                println!("ok");
                return Ok(0);
            }
            for p in &r.problems {
                eprintln!(
                    "{}:{}:{}: {}",
                    file.display(),
                    p.line,
                    p.column,
                    p.message.replace('\n', " ")
                );
            }
            Ok(6)
        }
        PolicyCmd::Set {
            file,
            expected_version,
        } => {
            let source = read(&file)?;
            let p = c
                .admin
                .set_policy(pb::SetPolicyRequest {
                    source,
                    expected_version: expected_version.unwrap_or(0),
                })
                .await?
                .into_inner();
            println!("{}", p.version);
            Ok(0)
        }
    }
}
