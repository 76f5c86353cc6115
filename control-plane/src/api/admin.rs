//! `bridle.control.v1.Admin`: tokens. Everything but WhoAmI needs `admin`.

use bridle_proto::control::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::{make_token, Auth, Role, TokenRecord};

pub struct AdminApi {
    pub auth: Auth,
    pub policies: crate::policy::Policies,
    pub guard: crate::guard::Guard,
}

fn problems_pb(problems: Vec<crate::policy::Problem>) -> Vec<pb::PolicyProblem> {
    problems
        .into_iter()
        .map(|p| pb::PolicyProblem {
            line: p.line as u32,
            column: p.column as u32,
            message: p.message,
        })
        .collect()
}

fn require_policy_reader(p: &crate::auth::Principal) -> Result<(), Status> {
    match p.role {
        Role::Admin | Role::Operator | Role::Auditor => Ok(()),
        Role::Submitter => Err(Status::permission_denied(
            "policies are read by the admin, operator and auditor roles",
        )),
    }
}

fn role_pb(r: Role) -> pb::Role {
    match r {
        Role::Admin => pb::Role::Admin,
        Role::Operator => pb::Role::Operator,
        Role::Submitter => pb::Role::Submitter,
        Role::Auditor => pb::Role::Auditor,
    }
}

pub fn token_pb(t: TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        name: t.name,
        role: role_pb(t.role) as i32,
        owner: t.owner,
        created_unix_ms: t.created_unix_ms,
        expires_unix_ms: t.expires_unix_ms,
        revoked_unix_ms: t.revoked_unix_ms,
        created_by: t.created_by,
    }
}

fn store_status(e: crate::store::Error) -> Status {
    super::status::internal("store", e)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let principal = super::caller(&request)?;
        principal.require_admin()?;
        let req = request.into_inner();
        let name = req.name.trim();
        if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "name is required: 1 to 128 printable characters",
            ));
        }
        let role = match pb::Role::try_from(req.role) {
            Ok(pb::Role::Admin) => Role::Admin,
            Ok(pb::Role::Operator) => Role::Operator,
            Ok(pb::Role::Submitter) => Role::Submitter,
            Ok(pb::Role::Auditor) => Role::Auditor,
            _ => {
                return Err(Status::invalid_argument(
                    "role is required: admin, operator, submitter or auditor",
                ))
            }
        };
        let owner = if req.owner.trim().is_empty() {
            name
        } else {
            req.owner.trim()
        };
        if owner.chars().any(char::is_control) {
            return Err(Status::invalid_argument("owner must be printable"));
        }
        let now = crate::clock::now_ms();
        let expires = match req.ttl_seconds {
            0 => 0,
            s => now.saturating_add(
                i64::try_from(s)
                    .unwrap_or(i64::MAX / 2)
                    .saturating_mul(1000),
            ),
        };
        let token = make_token(name, role, owner, expires, &principal.token_id, now);
        self.auth
            .insert(token.record.clone())
            .await
            .map_err(store_status)?;
        tracing::info!(token = %token.record.id, role = role.as_str(), owner, by = %principal.token_id, "token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(token_pb(token.record)),
            secret: token.secret,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let principal = super::caller(&request)?;
        principal.require_admin()?;
        let include_revoked = request.into_inner().include_revoked;
        let tokens = self
            .auth
            .list()
            .into_iter()
            .filter(|t| include_revoked || t.revoked_unix_ms == 0)
            .map(token_pb)
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let principal = super::caller(&request)?;
        principal.require_admin()?;
        let id = request.into_inner().token_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("token_id is required"));
        }
        if !self
            .auth
            .revoke(&id, crate::clock::now_ms())
            .await
            .map_err(store_status)?
        {
            return Err(Status::not_found(format!(
                "token {id} not found (or already revoked)"
            )));
        }
        tracing::info!(token = %id, by = %principal.token_id, "token revoked");
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let principal = super::caller(&request)?;
        let record = self
            .auth
            .get(&principal.token_id)
            .ok_or_else(|| Status::unauthenticated("invalid token"))?;
        Ok(Response::new(token_pb(record)))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let principal = super::caller(&request)?;
        require_policy_reader(&principal)?;
        let s = self
            .policies
            .in_force()
            .await
            .map_err(|e| super::status::internal("policy store", e))?;
        Ok(Response::new(pb::PolicyInfo {
            version: s.version,
            source: s.source,
            set_by: s.set_by,
            set_unix_ms: s.set_unix_ms,
        }))
    }

    async fn validate_policy(
        &self,
        request: Request<pb::ValidatePolicyRequest>,
    ) -> Result<Response<pb::ValidatePolicyResponse>, Status> {
        let principal = super::caller(&request)?;
        require_policy_reader(&principal)?;
        let req = request.into_inner();
        Ok(Response::new(
            match self.policies.engine.validate(&req.source) {
                Ok(()) => pb::ValidatePolicyResponse {
                    ok: true,
                    problems: Vec::new(),
                },
                Err(problems) => pb::ValidatePolicyResponse {
                    ok: false,
                    problems: problems_pb(problems),
                },
            },
        ))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::PolicyInfo>, Status> {
        let principal = super::caller(&request)?;
        principal.require_admin()?;
        let (_, version) = self.policies.engine.current();
        let resource = crate::policy::Resource {
            kind: crate::policy::ResourceKind::PolicySet,
            id: format!("policy-v{version}"),
            owner: String::new(),
        };
        let ask = crate::guard::Ask {
            principal: &principal,
            action: crate::policy::Action::PolicyChange,
            resource: &resource,
            facts: &crate::policy::Facts::default(),
        };
        super::authorize(
            &self.guard,
            &super::note_of(&request),
            request.metadata(),
            ask,
        )
        .await?;
        let req = request.into_inner();
        let next = self
            .policies
            .change(&req.source, &principal.token_id, req.expected_version)
            .await
            .map_err(super::status::policy_change)?;
        Ok(Response::new(pb::PolicyInfo {
            version: next.version,
            source: next.source,
            set_by: next.set_by,
            set_unix_ms: next.set_unix_ms,
        }))
    }
}
