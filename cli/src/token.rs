//! `bridle token`: make, list and revoke API tokens (admin), or show your
//! own.

use std::time::Duration;

use bridle_client::control as pb;
use bridle_client::units::parse_duration;
use clap::Subcommand;

use crate::conn::Conn;
use crate::render::{self, print_json, TokenView};

#[derive(Subcommand)]
pub(crate) enum TokenCmd {
    /// Create a token; prints its secret once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "operator", "submitter", "auditor"])]
        role: String,
        /// Tenant the token acts for (default: its name).
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    List {
        /// Include revoked tokens.
        #[arg(long)]
        all: bool,
    },
    Revoke {
        id: String,
    },
    Whoami,
}

pub(crate) async fn run(c: &mut Conn, cmd: TokenCmd) -> anyhow::Result<()> {
    match cmd {
        TokenCmd::Create {
            name,
            role,
            owner,
            ttl,
        } => {
            let role = match role.as_str() {
                "admin" => pb::Role::Admin,
                "operator" => pb::Role::Operator,
                "auditor" => pb::Role::Auditor,
                _ => pb::Role::Submitter,
            };
            let r = c
                .admin
                .create_token(pb::CreateTokenRequest {
                    name,
                    role: role as i32,
                    owner,
                    ttl_seconds: ttl.map(|d| d.as_secs()).unwrap_or(0),
                })
                .await?
                .into_inner();
            if c.json {
                let token = r.token.unwrap_or_default();
                print_json(&TokenView::from(&token).with_secret(&r.secret));
            } else {
                println!("{}", r.secret);
            }
        }
        TokenCmd::List { all } => {
            let list = c
                .admin
                .list_tokens(pb::ListTokensRequest {
                    include_revoked: all,
                })
                .await?
                .into_inner()
                .tokens;
            if c.json {
                print_json(&list.iter().map(TokenView::from).collect::<Vec<_>>());
            } else {
                render::token_table(&list);
            }
        }
        TokenCmd::Revoke { id } => {
            c.admin
                .revoke_token(pb::RevokeTokenRequest { token_id: id })
                .await?;
        }
        TokenCmd::Whoami => {
            let t = c.admin.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            if c.json {
                print_json(&TokenView::from(&t));
            } else {
                render::whoami(&t);
            }
        }
    }
    Ok(())
}
