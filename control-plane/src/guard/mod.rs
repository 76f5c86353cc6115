//! The one authorization path: every effectful action — an RPC, a run's
//! step, and next an agent's tool call — is decided here by the policy
//! engine, put on the record, and, when the policy asks for a human, held
//! by a durable [`Approval`]. Nothing else asks the policy engine, waits on
//! an approval or writes a decision entry.
//!
//! Where the decision is recorded depends on who acts ([`Record`]): a call's
//! decision goes on that call's audit entry (the audit layer writes it, see
//! `api::audit`); work the control plane does on its own (a run's step) gets
//! an entry of its own, appended and durable before the work starts.
//!
//! A unary call that needs an approval fails with FAILED_PRECONDITION naming
//! the pending approval; the same request sent again with the header
//! `x-bridle-approval: <id>` goes through once it is approved, exactly once.
//! An interactive exec and a run instead wait for the decision
//! ([`Guard::decision`], then [`Guard::go_ahead`]).
//!
//! Nothing effectful goes ahead that the audit log could not take down:
//! while it cannot record ([`crate::audit::AuditLog::recording`]), every
//! action is refused here before it is decided.

pub mod facts;

use std::sync::{Arc, Mutex};

use crate::approvals::{self, Approval, Approvals, State};
use crate::auth::Principal;
use crate::policy::{Action, Decision, Facts, Policies, Resource, Verdict};

/// One action to decide: who asks, for what, on what, knowing what.
#[derive(Clone, Copy)]
pub struct Ask<'a> {
    pub principal: &'a Principal,
    pub action: Action,
    pub resource: &'a Resource,
    pub facts: &'a Facts,
}

impl Ask<'_> {
    /// The hash an approval of exactly this action pins.
    pub fn hash(&self) -> String {
        approvals::action_hash(self.principal, self.action, self.resource, self.facts)
    }
}

/// Where a decision is recorded.
pub enum Record<'a> {
    /// On the entry of the call that asks (written by the audit layer).
    Call(&'a AuditNote),
    /// As an entry of its own, durable before the work it allows starts:
    /// work the control plane does for a run.
    Run {
        run_id: &'a str,
        /// The step it is for (none: the run's network).
        step: Option<u32>,
        /// The entry's request id (the run and the seq of its next event).
        request_id: String,
        /// What is decided, for a person: "step 2 (build)".
        what: &'a str,
    },
    /// As an entry of its own, durable before the connection it allows is
    /// made: a sandbox's egress (a connection, a DNS lookup).
    Egress {
        sandbox_id: &'a str,
        /// The entry's request id (the sandbox and its connection number).
        request_id: String,
        /// What is decided, for a person: "CONNECT pypi.org:443".
        what: &'a str,
        /// What an approval of it covers when the approver remembers it
        /// ("network.connect pypi.org:443"): an approved, remembered
        /// approval of the same sandbox and scope lets it go ahead.
        scope: &'a str,
    },
}

impl Record<'_> {
    fn request_id(&self) -> String {
        match self {
            Record::Call(note) => note.request_id(),
            Record::Run { request_id, .. } | Record::Egress { request_id, .. } => {
                request_id.clone()
            }
        }
    }
}

/// How an action may go ahead.
pub enum Cleared {
    /// The policy allows it.
    Allowed,
    /// An approval the request carried, now used.
    Approved(Approval),
    /// It needs this new approval first.
    Pending(Approval),
    /// An approver let every action in its scope go ahead (an egress
    /// sandbox's connections to one host and port): this one is recorded
    /// and goes ahead without asking again.
    Remembered(Approval),
}

/// Why an action does not go ahead. Each says so in a sentence a person can
/// act on; `api::status` gives each its gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The audit log cannot take the decision down.
    #[error("the audit log cannot record: {0}; effectful calls are refused until it can (see the control plane's log)")]
    Unrecorded(String),
    #[error("policy denies {action} on {resource}: {reason} (policy version {version})")]
    Denied {
        action: &'static str,
        resource: String,
        reason: String,
        version: u64,
    },
    #[error("approval {0} expired with nobody deciding")]
    Expired(String),
    #[error("approval {id} was denied by {by}: {reason}")]
    NotApproved {
        id: String,
        by: String,
        reason: String,
    },
    /// The approval cannot be used (see [`approvals::Refusal`]).
    #[error(transparent)]
    Approval(#[from] approvals::Refusal),
}

impl Refused {
    fn denied(action: Action, resource: &Resource, verdict: &Verdict) -> Self {
        Refused::Denied {
            action: action.name(),
            resource: resource.id.clone(),
            reason: verdict.reason.clone(),
            version: verdict.policy_version,
        }
    }
}

/// What the audit layer records about a call besides who made it: filled by
/// the guard while the call runs (request extension).
#[derive(Clone, Default)]
pub struct AuditNote(Arc<Mutex<Note>>);

#[derive(Clone, Default, Debug)]
pub struct Note {
    pub request_id: String,
    pub resource: String,
    pub decision: String,
    pub policy_version: u64,
}

impl AuditNote {
    pub fn new(request_id: String) -> Self {
        Self(Arc::new(Mutex::new(Note {
            request_id,
            ..Note::default()
        })))
    }

    pub fn get(&self) -> Note {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Note> {
        // A note is plain data: one left by a panicking holder is still whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Notes a decision; the strictest one of a call stays (deny over
    /// require_approval over allow).
    fn decided(&self, resource: &str, verdict: &Verdict) {
        let mut n = self.lock();
        let rank = |d: &str| match d {
            "deny" => 3,
            "require_approval" => 2,
            "allow" => 1,
            _ => 0,
        };
        if rank(verdict.decision.as_str()) >= rank(&n.decision) {
            n.decision = verdict.decision.as_str().to_string();
            n.resource = resource.to_string();
            n.policy_version = verdict.policy_version;
        }
    }

    pub fn request_id(&self) -> String {
        self.lock().request_id.clone()
    }
}

#[derive(Clone)]
pub struct Guard {
    pub policies: Policies,
    pub approvals: Approvals,
    /// Where decisions made outside a call (a run's steps) are recorded.
    pub audit: crate::audit::AuditLog,
}

impl Guard {
    /// Ok while the audit log records; otherwise why an effectful action is
    /// refused before it acts.
    pub fn recording(&self) -> Result<(), Refused> {
        self.audit.recording().map_err(Refused::Unrecorded)
    }

    /// Decides `ask` and records the decision where `record` says, before
    /// anything acts on it. Only a `deny` is refused: for actions whose
    /// `require_approval` is settled later (a run is submitted whole; each
    /// of its steps is decided again when it starts).
    pub async fn screen(&self, record: &Record<'_>, ask: Ask<'_>) -> Result<Verdict, Refused> {
        self.recording()?;
        let verdict =
            self.policies
                .engine
                .decide(ask.principal, ask.action, ask.resource, ask.facts);
        if verdict.decision != Decision::Allow {
            tracing::info!(
                action = ask.action.name(),
                resource = %ask.resource.id,
                token = %ask.principal.token_id,
                decision = verdict.decision.as_str(),
                version = verdict.policy_version,
                "{}",
                verdict.reason
            );
        }
        match record {
            Record::Call(note) => note.decided(&ask.resource.id, &verdict),
            Record::Run {
                run_id,
                request_id,
                what,
                ..
            } => {
                let action = format!("run/{}", ask.action.name());
                self.own_entry(&ask, &verdict, action, run_id, request_id, what)
                    .await?
            }
            Record::Egress {
                sandbox_id,
                request_id,
                what,
                ..
            } => {
                let action = format!("egress/{}", ask.action.name());
                self.own_entry(&ask, &verdict, action, sandbox_id, request_id, what)
                    .await?
            }
        }
        if verdict.decision == Decision::Deny {
            return Err(Refused::denied(ask.action, ask.resource, &verdict));
        }
        Ok(verdict)
    }

    /// Writes the decision on work the control plane does on its own (a
    /// run's step, a sandbox's connection) as an entry of its own, durable
    /// before the work starts: nothing happens that is not on the record.
    async fn own_entry(
        &self,
        ask: &Ask<'_>,
        verdict: &Verdict,
        action: String,
        subject: &str,
        request_id: &str,
        what: &str,
    ) -> Result<(), Refused> {
        let entry = crate::audit::Entry {
            unix_ms: crate::clock::now_ms(),
            request_id: request_id.to_string(),
            token_id: ask.principal.token_id.clone(),
            principal: ask.principal.name.clone(),
            role: ask.principal.role.as_str().to_string(),
            owner: ask.principal.owner.clone(),
            action,
            resource: ask.resource.id.clone(),
            decision: verdict.decision.as_str().to_string(),
            policy_version: verdict.policy_version,
            outcome: format!("{subject} {what}: {}", verdict.reason),
            ..Default::default()
        };
        if let Err(e) = self.audit.append(entry).await {
            tracing::error!(subject, "audit: {e:#}");
            return Err(Refused::Unrecorded(format!("{e:#}")));
        }
        Ok(())
    }

    /// Decides `ask`; a denial is the error. `require_approval` uses the
    /// approval the request carried (`approval`, for the use `used_by`), or
    /// creates one.
    pub async fn clear(
        &self,
        record: &Record<'_>,
        ask: Ask<'_>,
        approval: Option<&str>,
        used_by: &str,
    ) -> Result<Cleared, Refused> {
        let verdict = self.screen(record, ask).await?;
        if verdict.decision == Decision::Allow {
            return Ok(Cleared::Allowed);
        }
        if let Some(id) = approval {
            return self
                .use_approval(id, ask, used_by)
                .await
                .map(Cleared::Approved);
        }
        let (run, scope) = match record {
            Record::Run { run_id, step, .. } => (Some((*run_id, step.unwrap_or(0))), ""),
            Record::Call(_) => (None, ""),
            Record::Egress { scope, .. } => (None, *scope),
        };
        if let Some(a) = self
            .approvals
            .remembered(&ask.resource.id, scope)
            .await
            .map_err(approvals::Refusal::Store)?
        {
            return Ok(Cleared::Remembered(a));
        }
        let a = self
            .approvals
            .request(approvals::Request {
                principal: ask.principal,
                action: ask.action,
                resource: ask.resource,
                facts: ask.facts,
                verdict: &verdict,
                run,
                request_id: &record.request_id(),
                scope,
            })
            .await
            .map_err(approvals::Refusal::Store)?;
        Ok(Cleared::Pending(a))
    }

    /// Waits until approval `id` is decided (or expires), and answers it.
    pub async fn decision(&self, id: &str) -> Result<Approval, Refused> {
        Ok(self.approvals.wait(id).await?)
    }

    /// Whether a decided approval lets `ask` go ahead now: approved, still
    /// recordable, and used once, by `used_by`.
    pub async fn go_ahead(
        &self,
        decided: &Approval,
        ask: Ask<'_>,
        used_by: &str,
    ) -> Result<Approval, Refused> {
        match decided.state() {
            State::Approved => self.use_approval(&decided.id, ask, used_by).await,
            State::Expired => Err(Refused::Expired(decided.id.clone())),
            State::Denied => Err(Refused::NotApproved {
                id: decided.id.clone(),
                by: decided.decided_by.clone(),
                reason: decided.decision_reason.clone(),
            }),
            State::Pending => Err(approvals::Refusal::NotApproved {
                id: decided.id.clone(),
                state: State::Pending.as_str(),
            }
            .into()),
        }
    }

    /// Uses approved approval `id` for exactly `ask`, once (the same
    /// `used_by` may claim it again: a retry after a crash). The audit log
    /// may have stopped recording meanwhile: then nothing is used.
    pub async fn use_approval(
        &self,
        id: &str,
        ask: Ask<'_>,
        used_by: &str,
    ) -> Result<Approval, Refused> {
        self.recording()?;
        Ok(self.approvals.consume(id, &ask.hash(), used_by).await?)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::auth::Role;
    use crate::policy::ResourceKind;

    fn admin() -> Principal {
        Principal {
            token_id: "t-admin".into(),
            name: "admin".into(),
            role: Role::Admin,
            owner: "admin".into(),
        }
    }

    async fn guard() -> (tempfile::TempDir, Guard, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("db"))
            .await
            .unwrap();
        let key = crate::audit::load_or_create_key(dir.path()).unwrap();
        let audit = crate::audit::AuditLog::open(store.pool().clone(), key)
            .await
            .unwrap();
        let guard = Guard {
            policies: Policies::load(store.pool().clone()).await.unwrap(),
            approvals: Approvals::new(
                store.pool().clone(),
                audit.clone(),
                Duration::from_secs(60),
                None,
            ),
            audit,
        };
        (dir, guard, store)
    }

    /// What the guard says to an admin creating a sandbox (which the
    /// default policies allow), for a call and for a run.
    async fn create_sandbox(guard: &Guard, record: &Record<'_>) -> Result<(), Refused> {
        let resource = Resource {
            kind: ResourceKind::Sandbox,
            id: "new".into(),
            owner: "admin".into(),
        };
        let ask = Ask {
            principal: &admin(),
            action: Action::SandboxCreate,
            resource: &resource,
            facts: &Facts::default(),
        };
        guard
            .clear(record, ask, None, "request:req-test")
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn nothing_is_decided_while_the_audit_log_cannot_record() {
        let (_d, guard, store) = guard().await;
        let note = AuditNote::new("req-test".into());
        let call = Record::Call(&note);
        let run = Record::Run {
            run_id: "run-1",
            step: Some(0),
            request_id: "run-1:3".into(),
            what: "step 1 (build)",
        };
        create_sandbox(&guard, &call).await.unwrap();
        create_sandbox(&guard, &run).await.unwrap();
        assert_eq!(note.get().decision, "allow");

        sqlx::query(
            "CREATE TRIGGER boom BEFORE INSERT ON audit_log BEGIN SELECT RAISE(ABORT, 'boom'); END",
        )
        .execute(store.pool())
        .await
        .unwrap();
        // A run's decision is its own entry: it cannot be written, so the
        // step does not go ahead, and the log now refuses everything.
        let refused = create_sandbox(&guard, &run)
            .await
            .expect_err("a run's step went ahead unrecorded");
        assert!(matches!(refused, Refused::Unrecorded(_)), "{refused}");
        let note = AuditNote::new("req-2".into());
        let refused = create_sandbox(&guard, &Record::Call(&note))
            .await
            .expect_err("an effectful call went ahead while the audit log could not record");
        assert!(matches!(refused, Refused::Unrecorded(_)), "{refused}");
        let message = refused.to_string();
        assert!(
            message.contains("the audit log cannot record")
                && message.contains("boom")
                && message.contains("refused until it can"),
            "{message}"
        );
        // Refused before it was decided: nothing noted.
        assert_eq!(note.get().decision, "");
    }
}
