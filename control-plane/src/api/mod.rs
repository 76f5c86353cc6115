//! The gRPC services, one module each. Requests are authenticated first,
//! converted to domain types here (validation happens once, at this edge),
//! and every domain error is mapped to a status by one function.

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod runs;
pub mod sandboxes;

use tonic::Status;

use crate::sandboxes::Error;

pub use crate::sandboxes::RESERVED_EXEC_ID_PREFIX;

/// Refuses an exec id a client may not use.
pub fn client_exec_id(exec_id: &str) -> Result<(), Status> {
    if exec_id.starts_with(RESERVED_EXEC_ID_PREFIX) {
        return Err(Status::invalid_argument(format!(
            "exec ids starting with {RESERVED_EXEC_ID_PREFIX:?} are the control plane's own; choose another"
        )));
    }
    Ok(())
}

/// The one mapping from sandbox errors to gRPC statuses.
pub fn sandbox_status(e: Error) -> Status {
    match e {
        Error::NotFound(_) | Error::SnapshotNotFound(_) => Status::not_found(e.to_string()),
        Error::Invalid(_) => Status::invalid_argument(e.to_string()),
        Error::PermissionDenied(m) => Status::permission_denied(m),
        Error::FailedPrecondition(_) => Status::failed_precondition(e.to_string()),
        Error::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        Error::NotReady { .. } => Status::unavailable(e.to_string()),
        Error::Runtime(crate::runtime::Error::ImageMissing(_)) => {
            Status::failed_precondition(e.to_string())
        }
        Error::Runtime(crate::runtime::Error::NotFound(_)) => {
            Status::failed_precondition(e.to_string())
        }
        Error::Runtime(_) => Status::unavailable(e.to_string()),
        // The agent's own status, passed on with its code.
        Error::Agent(s) => s,
        Error::Store(_) | Error::Io(_) | Error::Disk(_) => {
            tracing::error!("{e}");
            Status::internal(e.to_string())
        }
    }
}
