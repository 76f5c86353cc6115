//! What a failure looks like to the caller of `bridle`: one line on stderr
//! and an exit code by kind.

use tonic::{Code, Status};

/// Exit codes by failure kind: 1 other, 2 usage, 3 not found,
/// 4 not authenticated or not allowed, 5 server unreachable or unavailable,
/// 6 refused as invalid or in the wrong state.
pub fn exit_code(s: &Status) -> u8 {
    match s.code() {
        Code::NotFound => 3,
        Code::Unauthenticated | Code::PermissionDenied => 4,
        Code::Unavailable | Code::DeadlineExceeded => 5,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::ResourceExhausted
        | Code::OutOfRange => 6,
        _ => 1,
    }
}

/// The error as one line: a gRPC status as `kind: message`, anything else
/// with its causes.
pub fn one_line(e: &anyhow::Error) -> String {
    let text = match e.downcast_ref::<Status>() {
        Some(s) => format!("{}: {}", code_name(s.code()), s.message()),
        None => format!("{e:#}"),
    };
    text.replace('\n', " ")
}

/// A gRPC code as a person reads it.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::NotFound => "not found",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::Unavailable => "unavailable",
        Code::Cancelled => "cancelled",
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::DeadlineExceeded => "deadline exceeded",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_kind() {
        assert_eq!(exit_code(&Status::not_found("x")), 3);
        assert_eq!(exit_code(&Status::unauthenticated("x")), 4);
        assert_eq!(exit_code(&Status::permission_denied("x")), 4);
        assert_eq!(exit_code(&Status::unavailable("x")), 5);
        assert_eq!(exit_code(&Status::invalid_argument("x")), 6);
        assert_eq!(exit_code(&Status::internal("x")), 1);
    }

    #[test]
    fn a_status_is_one_line_naming_its_kind() {
        let e = anyhow::Error::new(Status::unavailable("cannot reach\nit"));
        assert_eq!(one_line(&e), "unavailable: cannot reach it");
    }
}
