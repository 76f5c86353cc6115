//! The one mapping from domain errors to gRPC statuses. Handlers return
//! their domain errors through these functions (or `?`, through the `From`
//! impls here); nothing else picks a code.

use tonic::Status;

use crate::approvals::{Approval, Refusal};
use crate::guard::Refused;
use crate::runs::executor;
use crate::sandboxes::Error as SandboxError;

/// The header that carries an approved approval's id on a repeated request.
pub const APPROVAL_HEADER: &str = "x-bridle-approval";
/// The trailer naming the approval a refused request created.
pub const APPROVAL_ID_TRAILER: &str = "x-bridle-approval-id";

/// Why the guard refused an action.
pub fn refused(e: Refused) -> Status {
    match e {
        Refused::Unrecorded(_) => Status::unavailable(e.to_string()),
        Refused::Denied { .. } | Refused::Expired(_) | Refused::NotApproved { .. } => {
            Status::permission_denied(e.to_string())
        }
        Refused::Approval(r) => approval(r),
    }
}

impl From<Refused> for Status {
    fn from(e: Refused) -> Self {
        refused(e)
    }
}

/// An approval that could not be decided or used.
pub fn approval(r: Refusal) -> Status {
    match r {
        Refusal::NotFound(_) => Status::not_found(r.to_string()),
        Refusal::NoReason | Refusal::NotRememberable(_) => Status::invalid_argument(r.to_string()),
        Refusal::NotPending { .. }
        | Refusal::NotApproved { .. }
        | Refusal::Used(_)
        | Refusal::Stale { .. } => Status::failed_precondition(r.to_string()),
        Refusal::SelfDecision(_) | Refusal::OtherAction(_) => {
            Status::permission_denied(r.to_string())
        }
        Refusal::Store(e) => internal("approvals", e),
    }
}

/// The status telling a caller its request waits for approval `a`.
pub fn pending(a: &Approval) -> Status {
    let mut s = Status::failed_precondition(format!(
        "{} needs an approval ({}): approval {} is pending; once an operator approves it, send the same request again with the header {APPROVAL_HEADER}: {}",
        a.summary, a.policy_reason, a.id, a.id
    ));
    if let Ok(v) = a.id.parse() {
        s.metadata_mut().insert(APPROVAL_ID_TRAILER, v);
    }
    s
}

/// A sandbox error.
pub fn sandbox(e: SandboxError) -> Status {
    use crate::runtime::Error as Runtime;
    match e {
        SandboxError::NotFound(_) | SandboxError::SnapshotNotFound(_) => {
            Status::not_found(e.to_string())
        }
        SandboxError::Invalid(_) => Status::invalid_argument(e.to_string()),
        SandboxError::PermissionDenied(m) => Status::permission_denied(m),
        SandboxError::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        SandboxError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        SandboxError::NotReady { .. } => Status::unavailable(e.to_string()),
        SandboxError::Runtime(Runtime::ImageMissing(_) | Runtime::NotFound(_)) => {
            Status::failed_precondition(e.to_string())
        }
        SandboxError::Runtime(_) => Status::unavailable(e.to_string()),
        // The agent's own status, passed on with its code.
        SandboxError::Agent(s) => s,
        SandboxError::Store(_) | SandboxError::Io(_) | SandboxError::Disk(_) => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
    }
}

impl From<SandboxError> for Status {
    fn from(e: SandboxError) -> Self {
        sandbox(e)
    }
}

/// A run's error.
pub fn run(e: executor::Error) -> Status {
    match e {
        executor::Error::NotFound(id) => Status::not_found(format!("run {id} not found")),
        executor::Error::Stopping => Status::unavailable("the control plane is shutting down"),
        e => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
    }
}

impl From<executor::Error> for Status {
    fn from(e: executor::Error) -> Self {
        run(e)
    }
}

/// A policy change that was not made.
pub fn policy_change(e: crate::policy::Refusal) -> Status {
    use crate::policy::Refusal;
    match e {
        Refusal::Invalid(problems) => {
            let lines: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            Status::invalid_argument(format!("the policy set is not valid: {}", lines.join("; ")))
        }
        Refusal::Changed { in_force, expected } => Status::aborted(format!(
            "the policy set changed: version {in_force} is in force, not {expected}"
        )),
        Refusal::Race => {
            Status::aborted("another policy change was stored at the same time; read the set again")
        }
        Refusal::Store(e) => internal("policy store", e),
    }
}

/// A failure of the control plane's own (a store, the audit log): logged,
/// and INTERNAL for the caller, saying where.
pub fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    tracing::error!("{what}: {e:#}");
    Status::internal(format!("{what}: {e:#}"))
}
