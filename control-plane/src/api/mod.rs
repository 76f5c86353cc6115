//! The gRPC services, one module each. A request is authenticated once, by
//! the audit layer (`audit::AuditLayer`), which hands the principal to the
//! handler ([`caller`]); it is converted to domain types here (validation
//! happens once, at this edge), and every domain error is mapped to a status
//! by [`status`].

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod runs;
pub mod sandboxes;
pub mod status;

use tonic::{Request, Status};

use crate::auth::Principal;
use crate::guard::{Ask, AuditNote, Cleared, Guard, Record};

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

/// Who made a call, as the audit layer authenticated it (request
/// extension): the principal, or the status that refuses the call.
#[derive(Clone)]
pub struct Caller(pub Result<Principal, Status>);

/// The authenticated principal of a call. A call that did not pass the
/// audit layer has none and is refused.
pub fn caller<T>(request: &Request<T>) -> Result<Principal, Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller(authenticated)) => authenticated.clone(),
        None => Err(Status::unauthenticated(
            "the call was not authenticated (it did not pass the audit layer)",
        )),
    }
}

/// The note on a request, or a fresh one (a call that did not pass the
/// audit layer).
pub fn note_of<T>(request: &Request<T>) -> AuditNote {
    request
        .extensions()
        .get::<AuditNote>()
        .cloned()
        .unwrap_or_else(|| AuditNote::new(crate::ids::random_hex(8)))
}

/// The approval id a request carries in [`status::APPROVAL_HEADER`], if any.
pub fn approval_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(status::APPROVAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// For a unary call: goes ahead only when allowed or approved (with the
/// approval the request carries); a new approval is the error that names it.
pub async fn authorize(
    guard: &Guard,
    note: &AuditNote,
    metadata: &tonic::metadata::MetadataMap,
    ask: Ask<'_>,
) -> Result<(), Status> {
    let used_by = format!("request:{}", note.request_id());
    match guard
        .clear(
            &Record::Call(note),
            ask,
            approval_of(metadata).as_deref(),
            &used_by,
        )
        .await?
    {
        Cleared::Allowed | Cleared::Approved(_) | Cleared::Remembered(_) => Ok(()),
        Cleared::Pending(a) => Err(status::pending(&a)),
    }
}
