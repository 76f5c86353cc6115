//! Human approvals: durable, pinned to one exact action, decided by an
//! operator other than the requester, single use, and expiring closed.
//!
//! A `require_approval` verdict creates a pending approval holding a hash of
//! the action (principal, action, resource and facts). Whoever waits for it
//! (a run's driver, an interactive exec) is woken by [`Approvals::wait`];
//! every change is also broadcast for `Approvals.Watch` and appended to the
//! audit log.

use std::time::Duration;

use sha2::Digest;
use sqlx::SqlitePool;
use tokio::sync::broadcast;

use crate::audit::{AuditLog, Entry};
use crate::auth::Principal;
use crate::policy::{Action, Facts, Resource, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    Approved,
    Denied,
    Expired,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "approved" => State::Approved,
            "denied" => State::Denied,
            "expired" => State::Expired,
            _ => State::Pending,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Approval {
    pub id: String,
    #[sqlx(try_from = "String")]
    pub state: StateText,
    pub requested_by_token: String,
    pub requested_by: String,
    pub owner: String,
    pub action: String,
    pub resource: String,
    pub summary: String,
    pub run_id: String,
    pub step: i64,
    pub action_sha256: String,
    pub policy: String,
    pub policy_reason: String,
    pub policy_version: i64,
    pub created_unix_ms: i64,
    pub expires_unix_ms: i64,
    pub decided_by: String,
    pub decision_reason: String,
    pub decided_unix_ms: i64,
    pub used_by: String,
    /// What the approval covers beyond its one action when it is
    /// remembered (a sandbox's connections to one host and port); empty:
    /// it cannot be.
    pub scope: String,
    /// The approver chose to let later actions in `scope` go ahead.
    pub remember: bool,
}

/// The stored state column, read into a [`State`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateText(pub State);

impl From<String> for StateText {
    fn from(s: String) -> Self {
        StateText(State::parse(&s))
    }
}

impl Approval {
    pub fn state(&self) -> State {
        self.state.0
    }
}

/// What a new approval is for.
pub struct Request<'a> {
    pub principal: &'a Principal,
    pub action: Action,
    pub resource: &'a Resource,
    pub facts: &'a Facts,
    pub verdict: &'a Verdict,
    /// The run and step it holds up, if any.
    pub run: Option<(&'a str, u32)>,
    pub request_id: &'a str,
    /// What it would cover if remembered (empty: it cannot be).
    pub scope: &'a str,
}

/// Why an approval could not be decided or used.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("approval {0} does not exist")]
    NotFound(String),
    #[error("approval {id} is {state}, not pending")]
    NotPending { id: String, state: &'static str },
    #[error("approval {0} was requested by this same principal, which can never decide it")]
    SelfDecision(String),
    #[error("a reason is required")]
    NoReason,
    #[error("approval {0} cannot be remembered: only a sandbox's network connections can")]
    NotRememberable(String),
    #[error("approval {id} is {state}; only an approved approval can be used")]
    NotApproved { id: String, state: &'static str },
    #[error("approval {0} was granted for a different action (another command, path, resource or principal)")]
    OtherAction(String),
    #[error("approval {0} has already been used")]
    Used(String),
    #[error("approval {id} was approved more than {secs} s ago and never used; request it again")]
    Stale { id: String, secs: u64 },
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
}

/// The hash an approval pins: principal, action, resource and every fact,
/// in one canonical (sorted-key JSON) encoding.
pub fn action_hash(
    principal: &Principal,
    action: Action,
    resource: &Resource,
    facts: &Facts,
) -> String {
    use serde_json::json;
    let mut labels: Vec<String> = facts
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    // serde_json's Value::Object sorts keys only without `preserve_order`;
    // a BTreeMap sorts them whatever the features.
    let mut body: std::collections::BTreeMap<&str, serde_json::Value> = [
        ("token", json!(principal.token_id)),
        ("owner", json!(principal.owner)),
        ("action", json!(action.name())),
        (
            "resource",
            json!(format!("{:?}:{}", resource.kind, resource.id)),
        ),
        ("resource_owner", json!(resource.owner)),
        ("image", json!(facts.image)),
        ("argv", json!(facts.argv)),
        ("command", json!(facts.command)),
        ("path", json!(facts.path)),
        ("network", json!(facts.network)),
        ("memory_bytes", json!(facts.memory_bytes)),
        ("cpu_millis", json!(facts.cpu_millis)),
        ("pids", json!(facts.pids)),
        ("run_id", json!(facts.run_id)),
        ("labels", json!(labels)),
    ]
    .into_iter()
    .collect();
    // Pinned only when set, so the hashes of every other action stay as
    // they were.
    for (name, value) in [
        ("tool", &facts.tool),
        ("arguments", &facts.arguments),
        ("model", &facts.model),
        ("provider", &facts.provider),
        ("host", &facts.host),
        ("scheme", &facts.scheme),
        ("sni", &facts.sni),
        ("address", &facts.address),
    ] {
        if !value.is_empty() {
            body.insert(name, json!(value));
        }
    }
    if facts.port != 0 {
        body.insert("port", json!(facts.port));
    }
    let canonical = serde_json::to_string(&body).expect("JSON of strings and numbers");
    hex::encode(sha2::Sha256::digest(canonical.as_bytes()))
}

/// A one-line account of the action, for the person deciding.
pub fn summary(action: Action, resource: &Resource, facts: &Facts) -> String {
    let what = if !facts.host.is_empty() {
        let address = if facts.address.is_empty() {
            String::new()
        } else {
            format!(" ({} address {})", facts.address_class, facts.address)
        };
        format!("{} {}:{}{address}", facts.scheme, facts.host, facts.port)
    } else if !facts.tool.is_empty() {
        format!("{} {}", facts.tool, facts.arguments)
    } else if !facts.model.is_empty() {
        format!("model {} ({})", facts.model, facts.provider)
    } else if !facts.command.is_empty() {
        facts.command.clone()
    } else if !facts.path.is_empty() {
        facts.path.clone()
    } else if !facts.network.is_empty() {
        format!("network {}", facts.network)
    } else {
        facts.image.clone()
    };
    format!("{} on {}: {what}", action.name(), resource.id)
}

#[derive(Clone)]
pub struct Approvals {
    pool: SqlitePool,
    audit: AuditLog,
    changes: broadcast::Sender<Approval>,
    ttl: Duration,
    webhook: Option<String>,
}

const COLUMNS: &str = "id, state, requested_by_token, requested_by, owner, action, resource, \
    summary, run_id, step, action_sha256, policy, policy_reason, policy_version, \
    created_unix_ms, expires_unix_ms, decided_by, decision_reason, decided_unix_ms, used_by, \
    scope, remember";

impl Approvals {
    pub fn new(pool: SqlitePool, audit: AuditLog, ttl: Duration, webhook: Option<String>) -> Self {
        Self {
            pool,
            audit,
            changes: broadcast::channel(1024).0,
            ttl,
            webhook,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Approval> {
        self.changes.subscribe()
    }

    /// Records a pending approval (durably, and in the audit log) and
    /// tells watchers and the webhook.
    pub async fn request(&self, r: Request<'_>) -> Result<Approval, sqlx::Error> {
        let now = crate::clock::now_ms();
        let (run_id, step) = r
            .run
            .map(|(id, s)| (id.to_string(), s as i64))
            .unwrap_or_default();
        let a = Approval {
            id: format!("ap-{}", crate::ids::random_hex(8)),
            state: StateText(State::Pending),
            requested_by_token: r.principal.token_id.clone(),
            requested_by: r.principal.name.clone(),
            owner: r.principal.owner.clone(),
            action: r.action.name().to_string(),
            resource: r.resource.id.clone(),
            summary: summary(r.action, r.resource, r.facts),
            run_id,
            step,
            action_sha256: action_hash(r.principal, r.action, r.resource, r.facts),
            policy: r.verdict.policies.join(", "),
            policy_reason: r.verdict.reason.clone(),
            policy_version: r.verdict.policy_version as i64,
            created_unix_ms: now,
            expires_unix_ms: now + self.ttl.as_millis() as i64,
            decided_by: String::new(),
            decision_reason: String::new(),
            decided_unix_ms: 0,
            used_by: String::new(),
            scope: r.scope.to_string(),
            remember: false,
        };
        sqlx::query(&format!(
            "INSERT INTO approvals ({COLUMNS}) VALUES {}",
            crate::store::placeholders(1, 22)
        ))
        .bind(&a.id)
        .bind(State::Pending.as_str())
        .bind(&a.requested_by_token)
        .bind(&a.requested_by)
        .bind(&a.owner)
        .bind(&a.action)
        .bind(&a.resource)
        .bind(&a.summary)
        .bind(&a.run_id)
        .bind(a.step)
        .bind(&a.action_sha256)
        .bind(&a.policy)
        .bind(&a.policy_reason)
        .bind(a.policy_version)
        .bind(a.created_unix_ms)
        .bind(a.expires_unix_ms)
        .bind("")
        .bind("")
        .bind(0i64)
        .bind("")
        .bind(&a.scope)
        .bind(false)
        .execute(&self.pool)
        .await?;
        self.audit_event(
            &a,
            "approval.requested",
            r.principal,
            r.request_id,
            &a.summary,
        )
        .await;
        tracing::info!(approval = %a.id, action = %a.action, resource = %a.resource, "approval pending");
        self.notify(&a);
        if let Some(url) = self.webhook.clone() {
            tokio::spawn(notify_webhook(url, a.clone()));
        }
        Ok(a)
    }

    pub async fn get(&self, id: &str) -> Result<Option<Approval>, sqlx::Error> {
        self.expire_due().await?;
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM approvals WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
    }

    /// Newest first, after `before` (an id from the last page), at most `limit`.
    pub async fn list(
        &self,
        states: &[State],
        run_id: &str,
        owner: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Approval>, sqlx::Error> {
        self.expire_due().await?;
        let all: Vec<Approval> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM approvals ORDER BY created_unix_ms DESC, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(all
            .into_iter()
            .filter(|a| states.is_empty() || states.contains(&a.state()))
            .filter(|a| run_id.is_empty() || a.run_id == run_id)
            .filter(|a| owner.is_none_or(|o| a.requested_by_token == o))
            .skip(offset)
            .take(limit)
            .collect())
    }

    /// Approves or denies a pending approval.
    pub async fn decide(
        &self,
        id: &str,
        by: &Principal,
        approve: bool,
        reason: &str,
        request_id: &str,
    ) -> Result<Approval, Refusal> {
        self.decide_remembering(id, by, approve, reason, request_id, false)
            .await
    }

    /// [`Approvals::decide`], and when `remember`, the approval also lets
    /// later actions in its scope go ahead (an egress sandbox's connections
    /// to the same host and port, for the sandbox's life).
    pub async fn decide_remembering(
        &self,
        id: &str,
        by: &Principal,
        approve: bool,
        reason: &str,
        request_id: &str,
        remember: bool,
    ) -> Result<Approval, Refusal> {
        if reason.trim().is_empty() {
            return Err(Refusal::NoReason);
        }
        let a = self
            .get(id)
            .await?
            .ok_or_else(|| Refusal::NotFound(id.into()))?;
        if remember && approve && a.scope.is_empty() {
            return Err(Refusal::NotRememberable(id.into()));
        }
        if a.requested_by_token == by.token_id {
            return Err(Refusal::SelfDecision(id.into()));
        }
        // A sandbox's own connections (egress) are asked for by the sandbox
        // on its owner's behalf: nobody acting for that owner decides them.
        if a.requested_by_token.starts_with("sandbox:") && by.owner == a.owner {
            return Err(Refusal::SelfDecision(id.into()));
        }
        let state = if approve {
            State::Approved
        } else {
            State::Denied
        };
        let now = crate::clock::now_ms();
        let changed = sqlx::query(
            "UPDATE approvals SET state = $1, decided_by = $2, decision_reason = $3, decided_unix_ms = $4, \
             remember = $6 WHERE id = $5 AND state = 'pending' AND expires_unix_ms > $4",
        )
        .bind(state.as_str())
        .bind(&by.name)
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(remember && approve)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if changed == 0 {
            // Lost to expiry or another decision: say which.
            self.expire_due().await?;
            let now = self
                .get(id)
                .await?
                .ok_or_else(|| Refusal::NotFound(id.into()))?;
            return Err(Refusal::NotPending {
                id: id.into(),
                state: now.state().as_str(),
            });
        }
        let a = self
            .get(id)
            .await?
            .ok_or_else(|| Refusal::NotFound(id.into()))?;
        let said = if a.remember {
            format!("{reason} (remembered: {})", a.scope)
        } else {
            reason.to_string()
        };
        self.audit_event(
            &a,
            &format!("approval.{}", state.as_str()),
            by,
            request_id,
            &said,
        )
        .await;
        tracing::info!(approval = %id, state = state.as_str(), by = %by.name, "approval decided");
        self.notify(&a);
        Ok(a)
    }

    /// The approved, remembered approval of `resource` whose scope is
    /// `scope`, if there is one: it lets the action go ahead without asking
    /// again.
    pub async fn remembered(
        &self,
        resource: &str,
        scope: &str,
    ) -> Result<Option<Approval>, sqlx::Error> {
        if scope.is_empty() {
            return Ok(None);
        }
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM approvals WHERE resource = $1 AND scope = $2 \
             AND remember = 1 AND state = 'approved' ORDER BY decided_unix_ms LIMIT 1"
        ))
        .bind(resource)
        .bind(scope)
        .fetch_optional(&self.pool)
        .await
    }

    /// Uses an approved approval for the action hashed as `sha`, once:
    /// `used_by` names the use (an exec id), and the same use may claim it
    /// again (a retry after a crash), nobody else.
    pub async fn consume(&self, id: &str, sha: &str, used_by: &str) -> Result<Approval, Refusal> {
        let a = self
            .get(id)
            .await?
            .ok_or_else(|| Refusal::NotFound(id.into()))?;
        if a.state() != State::Approved {
            return Err(Refusal::NotApproved {
                id: id.into(),
                state: a.state().as_str(),
            });
        }
        if a.action_sha256 != sha {
            return Err(Refusal::OtherAction(id.into()));
        }
        // First use within the ttl of the decision, except by a run (its
        // step is the one use it can have, resumed whenever the control
        // plane is back); the same use (a retry after a crash) may reclaim
        // it whenever.
        let fresh_since = crate::clock::now_ms() - self.ttl.as_millis() as i64;
        let changed = sqlx::query(
            "UPDATE approvals SET used_by = $1 WHERE id = $2 AND state = 'approved' \
             AND action_sha256 = $3 \
             AND (used_by = $1 OR (used_by = '' AND (run_id != '' OR decided_unix_ms > $4)))",
        )
        .bind(used_by)
        .bind(id)
        .bind(sha)
        .bind(fresh_since)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if changed == 0 {
            let now = self.get(id).await?;
            return Err(match now {
                Some(a) if a.used_by.is_empty() => Refusal::Stale {
                    id: id.into(),
                    secs: self.ttl.as_secs(),
                },
                _ => Refusal::Used(id.into()),
            });
        }
        let a = self
            .get(id)
            .await?
            .ok_or_else(|| Refusal::NotFound(id.into()))?;
        Ok(a)
    }

    /// Waits until the approval is no longer pending (expiring it when its
    /// time is up) and answers it.
    pub async fn wait(&self, id: &str) -> Result<Approval, Refusal> {
        let mut changes = self.subscribe();
        loop {
            let a = self
                .get(id)
                .await?
                .ok_or_else(|| Refusal::NotFound(id.into()))?;
            if a.state() != State::Pending {
                return Ok(a);
            }
            let left = (a.expires_unix_ms - crate::clock::now_ms()).max(0) as u64;
            // Woken by any change; a missed broadcast (lagged) costs at most
            // one re-read, and expiry is checked on every read.
            let _ =
                tokio::time::timeout(Duration::from_millis(left.min(5_000) + 1), changes.recv())
                    .await;
        }
    }

    /// Expires pending approval `id` now: what waited for it has given up
    /// (an egress connection that could not wait any longer), so nobody
    /// approves something that no longer waits.
    pub async fn give_up(&self, id: &str, why: &str) -> Result<(), sqlx::Error> {
        self.expire(id, crate::clock::now_ms(), why).await
    }

    /// Expires `id` if it is still pending, on the record and to watchers.
    async fn expire(&self, id: &str, now: i64, why: &str) -> Result<(), sqlx::Error> {
        let changed = sqlx::query(
            "UPDATE approvals SET state = 'expired', decided_unix_ms = $1 \
             WHERE id = $2 AND state = 'pending'",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if changed == 0 {
            return Ok(());
        }
        let a: Approval = sqlx::query_as(&format!("SELECT {COLUMNS} FROM approvals WHERE id = $1"))
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        let system = Principal {
            token_id: "system".into(),
            name: "control plane".into(),
            role: crate::auth::Role::Admin,
            owner: String::new(),
        };
        self.audit_event(&a, "approval.expired", &system, "", why)
            .await;
        tracing::info!(approval = %id, "approval expired: {why}");
        self.notify(&a);
        Ok(())
    }

    /// Marks every pending approval past its time `expired`, each on the
    /// audit log.
    pub async fn expire_due(&self) -> Result<(), sqlx::Error> {
        let now = crate::clock::now_ms();
        let due: Vec<(String,)> = sqlx::query_as(
            "SELECT id FROM approvals WHERE state = 'pending' AND expires_unix_ms <= $1",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for (id,) in due {
            self.expire(&id, now, "nobody decided in time").await?;
        }
        Ok(())
    }

    fn notify(&self, a: &Approval) {
        let _ = self.changes.send(a.clone());
    }

    /// Approval events go on the audit log before anyone acts on them.
    async fn audit_event(
        &self,
        a: &Approval,
        what: &str,
        by: &Principal,
        request_id: &str,
        detail: &str,
    ) {
        let entry = Entry {
            unix_ms: crate::clock::now_ms(),
            request_id: request_id.to_string(),
            token_id: by.token_id.clone(),
            principal: by.name.clone(),
            role: by.role.as_str().to_string(),
            owner: by.owner.clone(),
            action: what.to_string(),
            resource: a.id.clone(),
            decision: String::new(),
            policy_version: a.policy_version as u64,
            outcome: format!("{} {}: {detail}", a.action, a.resource),
            ..Entry::default()
        };
        if let Err(e) = self.audit.append(entry).await {
            tracing::error!(approval = %a.id, "audit: {e:#}");
        }
    }
}

/// POSTs the pending approval as JSON to `url` (http or https; a failure
/// is logged, never retried: the approval itself is durable either way).
async fn notify_webhook(url: String, a: Approval) {
    let body = serde_json::json!({
        "approval_id": a.id,
        "state": "pending",
        "action": a.action,
        "resource": a.resource,
        "summary": a.summary,
        "requested_by": a.requested_by,
        "owner": a.owner,
        "run_id": a.run_id,
        "policy_reason": a.policy_reason,
        "expires_unix_ms": a.expires_unix_ms,
    });
    if let Err(e) = post_json(&url, &body).await {
        tracing::warn!(approval = %a.id, url = %url, "approval webhook failed: {e:#}");
    }
}

/// How long the webhook may take to accept the connection.
const WEBHOOK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole call may take, connecting included.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(20);

/// Only the answer's status is read; its body is dropped unread, so a
/// webhook cannot make the control plane hold more than the headers.
async fn post_json(url: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    anyhow::ensure!(
        url.starts_with("http://") || url.starts_with("https://"),
        "only http:// and https:// webhooks are supported"
    );
    // Approvals come at a person's pace: a client per call is cheap enough.
    let client = reqwest::Client::builder()
        .connect_timeout(WEBHOOK_CONNECT_TIMEOUT)
        .timeout(WEBHOOK_TIMEOUT)
        // The configured URL is the one called: no proxy from the
        // environment, no redirect followed (a 3xx is a failure).
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent("bridle")
        .build()?;
    let answer = client.post(url).json(body).send().await?;
    let status = answer.status();
    drop(answer);
    anyhow::ensure!(status.is_success(), "the webhook answered {status}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ResourceKind;

    fn p(token: &str) -> Principal {
        Principal {
            token_id: token.into(),
            name: token.into(),
            role: crate::auth::Role::Submitter,
            owner: "alice".into(),
        }
    }

    #[test]
    fn the_hash_pins_every_part_of_the_action() {
        let r = Resource {
            kind: ResourceKind::Sandbox,
            id: "sb-1".into(),
            owner: "alice".into(),
        };
        let f = Facts {
            argv: vec!["git".into(), "push".into()],
            command: "git push".into(),
            ..Facts::default()
        };
        let base = action_hash(&p("t1"), Action::Exec, &r, &f);
        assert_eq!(base, action_hash(&p("t1"), Action::Exec, &r, &f));
        let other_argv = Facts {
            argv: vec!["git".into(), "push".into(), "--force".into()],
            command: "git push --force".into(),
            ..Facts::default()
        };
        assert_ne!(base, action_hash(&p("t1"), Action::Exec, &r, &other_argv));
        assert_ne!(base, action_hash(&p("t2"), Action::Exec, &r, &f));
        assert_ne!(base, action_hash(&p("t1"), Action::Network, &r, &f));
        let other_sb = Resource {
            id: "sb-2".into(),
            ..r.clone()
        };
        assert_ne!(base, action_hash(&p("t1"), Action::Exec, &other_sb, &f));
    }
}
