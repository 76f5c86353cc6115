//! Policy enforcement at the edge: each effectful action is decided by the
//! policy engine before it happens, the decision goes with the call's audit
//! entry, and `require_approval` becomes a durable [`Approval`].
//!
//! A unary call that needs an approval fails with FAILED_PRECONDITION naming
//! the pending approval (also in the `x-bridle-approval-id` trailer); once an
//! operator approves it, the same request sent again with the header
//! `x-bridle-approval: <id>` goes through, exactly once. An interactive exec
//! instead waits on its open stream (see `api::sandboxes`).
//!
//! Nothing effectful goes ahead that the audit log could not take down:
//! while it cannot record ([`crate::audit::AuditLog::recording`]), every
//! action is refused here with UNAVAILABLE before it is decided, as every
//! call that changes something is at the audit layer (`api::audit`).

use std::sync::{Arc, Mutex};

use tonic::Status;

use crate::approvals::{self, Approval, Approvals};
use crate::auth::Principal;
use crate::policy::{Action, Decision, Facts, Policies, Resource, Verdict};

/// The header that carries an approved approval's id on a repeated request.
pub const APPROVAL_HEADER: &str = "x-bridle-approval";
/// The trailer naming the approval a refused request created.
pub const APPROVAL_ID_TRAILER: &str = "x-bridle-approval-id";

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
        self.0.lock().expect("note lock").clone()
    }

    /// Notes a decision; the strictest one of a call stays (deny over
    /// require_approval over allow).
    fn decided(&self, resource: &str, verdict: &Verdict) {
        let mut n = self.0.lock().expect("note lock");
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

    fn request_id(&self) -> String {
        self.0.lock().expect("note lock").request_id.clone()
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
}

#[derive(Clone)]
pub struct Guard {
    pub policies: Policies,
    pub approvals: Approvals,
    /// Where decisions made outside a call (a run's steps) are recorded.
    pub audit: crate::audit::AuditLog,
}

/// The note on a request, or a fresh one (a call that did not pass the
/// audit layer, as in tests).
pub fn note_of<T>(request: &tonic::Request<T>) -> AuditNote {
    request
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_else(|| AuditNote::new(crate::ids::random_hex(8)))
}

/// The approval id a request carries in [`APPROVAL_HEADER`], if any.
pub fn approval_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(APPROVAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// PERMISSION_DENIED for a `deny` verdict, naming the action, the resource,
/// the policy and its version.
pub fn denied_status(action: Action, resource: &Resource, verdict: &Verdict) -> Status {
    Status::permission_denied(format!(
        "policy denies {} on {}: {} (policy version {})",
        action.name(),
        resource.id,
        verdict.reason,
        verdict.policy_version
    ))
}

pub fn refusal_status(r: approvals::Refusal) -> Status {
    use approvals::Refusal as R;
    match r {
        R::NotFound(_) => Status::not_found(r.to_string()),
        R::NoReason => Status::invalid_argument(r.to_string()),
        R::NotPending { .. } | R::NotApproved { .. } | R::Used(_) | R::Stale { .. } => {
            Status::failed_precondition(r.to_string())
        }
        R::SelfDecision(_) | R::OtherAction(_) => Status::permission_denied(r.to_string()),
        R::Store(e) => {
            tracing::error!("approvals: {e}");
            Status::internal(format!("approvals: {e}"))
        }
    }
}

/// UNAVAILABLE for an effectful call while the audit log cannot record it.
pub fn unrecorded_status(why: &str) -> Status {
    Status::unavailable(format!(
        "the audit log cannot record: {why}; effectful calls are refused until it can (see the control plane's log)"
    ))
}

/// The status telling a caller its request waits for `a`.
pub fn pending_status(a: &Approval) -> Status {
    let mut s = Status::failed_precondition(format!(
        "{} needs an approval ({}): approval {} is pending; once an operator approves it, send the same request again with the header {APPROVAL_HEADER}: {}",
        a.summary, a.policy_reason, a.id, a.id
    ));
    if let Ok(v) = a.id.parse() {
        s.metadata_mut().insert(APPROVAL_ID_TRAILER, v);
    }
    s
}

impl Guard {
    /// Ok while the audit log records; otherwise the status that refuses
    /// an effectful call before it acts.
    pub fn recording(&self) -> Result<(), Status> {
        self.audit
            .recording()
            .map_err(|why| unrecorded_status(&why))
    }

    /// Decides one action and notes the decision on the call.
    pub fn decide(
        &self,
        note: &AuditNote,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> Verdict {
        let verdict = self
            .policies
            .engine
            .decide(principal, action, resource, facts);
        note.decided(&resource.id, &verdict);
        if verdict.decision != Decision::Allow {
            tracing::info!(
                action = action.name(),
                resource = %resource.id,
                token = %principal.token_id,
                decision = verdict.decision.as_str(),
                version = verdict.policy_version,
                "{}",
                verdict.reason
            );
        }
        verdict
    }

    /// Decides an action; a denial is the error. `require_approval` uses the
    /// approval the request carries (`approval`), or creates one.
    #[allow(clippy::too_many_arguments)]
    pub async fn clear(
        &self,
        note: &AuditNote,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
        approval: Option<&str>,
        used_by: &str,
    ) -> Result<Cleared, Status> {
        self.recording()?;
        let verdict = self.decide(note, principal, action, resource, facts);
        match verdict.decision {
            Decision::Allow => Ok(Cleared::Allowed),
            Decision::Deny => Err(denied_status(action, resource, &verdict)),
            Decision::RequireApproval => match approval {
                Some(id) => {
                    let sha = approvals::action_hash(principal, action, resource, facts);
                    self.approvals
                        .consume(id, &sha, used_by)
                        .await
                        .map(Cleared::Approved)
                        .map_err(refusal_status)
                }
                None => {
                    let a = self
                        .approvals
                        .request(approvals::Request {
                            principal,
                            action,
                            resource,
                            facts,
                            verdict: &verdict,
                            run: None,
                            request_id: &note.request_id(),
                        })
                        .await
                        .map_err(|e| Status::internal(format!("approvals: {e}")))?;
                    Ok(Cleared::Pending(a))
                }
            },
        }
    }

    /// For a unary call: goes ahead only when allowed or approved; a new
    /// approval is the error that names it.
    pub async fn authorize<T>(
        &self,
        request: &tonic::Request<T>,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> Result<(), Status> {
        self.authorize_parts(
            &note_of(request),
            request.metadata(),
            principal,
            action,
            resource,
            facts,
        )
        .await
    }

    /// [`Guard::authorize`] for a call whose request is already taken apart
    /// (a client stream).
    pub async fn authorize_parts(
        &self,
        note: &AuditNote,
        metadata: &tonic::metadata::MetadataMap,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> Result<(), Status> {
        let used_by = format!("request:{}", note.request_id());
        match self
            .clear(
                note,
                principal,
                action,
                resource,
                facts,
                approval_of(metadata).as_deref(),
                &used_by,
            )
            .await?
        {
            Cleared::Allowed | Cleared::Approved(_) => Ok(()),
            Cleared::Pending(a) => Err(pending_status(&a)),
        }
    }
}
