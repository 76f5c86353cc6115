//! Roles, and [`Principal`]: who a request is, and the one rule for what
//! each role sees and may change.

use std::str::FromStr;

use tonic::Status;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Operator,
    Submitter,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Submitter => "submitter",
            Role::Auditor => "auditor",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "submitter" => Ok(Role::Submitter),
            "auditor" => Ok(Role::Auditor),
            other => Err(format!(
                "unknown role {other:?} (admin, operator, submitter, auditor)"
            )),
        }
    }
}

/// Who is calling: the token's identity, never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    pub owner: String,
}

impl Principal {
    /// Whether records of `owner` exist for this principal at all. Others'
    /// records answer NOT_FOUND, exactly like ids that do not exist.
    pub fn sees(&self, owner: Option<&str>) -> bool {
        match self.role {
            Role::Admin | Role::Auditor => true,
            Role::Operator | Role::Submitter => owner == Some(self.owner.as_str()),
        }
    }

    /// Whether this principal may change sandboxes it can see.
    pub fn require_write(&self) -> Result<(), Status> {
        match self.role {
            Role::Auditor => Err(Status::permission_denied("the auditor role is read-only")),
            _ => Ok(()),
        }
    }

    pub fn require_admin(&self) -> Result<(), Status> {
        if self.role == Role::Admin {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "this needs the admin role; token {} has {}",
                self.token_id,
                self.role.as_str()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_by_role() {
        let p = |role| Principal {
            token_id: "t".into(),
            name: "n".into(),
            role,
            owner: "a".into(),
        };
        assert!(p(Role::Submitter).sees(Some("a")));
        assert!(!p(Role::Submitter).sees(Some("b")));
        assert!(
            !p(Role::Submitter).sees(None),
            "pooled sandboxes belong to no one"
        );
        assert!(p(Role::Admin).sees(Some("b")));
        assert!(p(Role::Auditor).sees(Some("b")));
        assert!(p(Role::Auditor).require_write().is_err());
        assert!(p(Role::Operator).require_admin().is_err());
    }
}
