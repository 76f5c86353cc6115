//! `bridle.control.v1.Approvals`: operators list, watch and decide the
//! approvals policy asks for; a requester can follow its own.

use std::pin::Pin;

use bridle_proto::control::v1 as pb;
use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{authorize, note_of, status};
use crate::approvals::{Approval, State};
use crate::auth::{Principal, Role};
use crate::guard::{Ask, Guard};
use crate::policy::{Action, Facts, Resource, ResourceKind};

pub struct ApprovalsApi {
    pub guard: Guard,
    pub shutdown: watch::Receiver<bool>,
}

/// Operators and admins see every approval; anyone else the ones its own
/// requests caused.
fn sees_all(p: &Principal) -> bool {
    matches!(p.role, Role::Admin | Role::Operator)
}

fn visible(p: &Principal, a: &Approval) -> bool {
    sees_all(p) || a.requested_by_token == p.token_id
}

fn store_error(e: sqlx::Error) -> Status {
    status::internal("approvals", e)
}

pub fn state_pb(s: State) -> pb::ApprovalState {
    match s {
        State::Pending => pb::ApprovalState::Pending,
        State::Approved => pb::ApprovalState::Approved,
        State::Denied => pb::ApprovalState::Denied,
        State::Expired => pb::ApprovalState::Expired,
    }
}

pub fn approval_pb(a: Approval) -> pb::Approval {
    pb::Approval {
        state: state_pb(a.state()) as i32,
        id: a.id,
        requested_by_token: a.requested_by_token,
        requested_by: a.requested_by,
        owner: a.owner,
        action: a.action,
        resource: a.resource,
        summary: a.summary,
        run_id: a.run_id,
        step: a.step as u32,
        action_sha256: a.action_sha256,
        policy: a.policy,
        policy_reason: a.policy_reason,
        policy_version: a.policy_version as u64,
        created_unix_ms: a.created_unix_ms,
        expires_unix_ms: a.expires_unix_ms,
        decided_by: a.decided_by,
        decision_reason: a.decision_reason,
        decided_unix_ms: a.decided_unix_ms,
        used: !a.used_by.is_empty(),
        scope: a.scope,
        remember: a.remember,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::approvals_server::Approvals for ApprovalsApi {
    async fn list(
        &self,
        request: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let principal = super::caller(&request)?;
        let req = request.into_inner();
        let mut states = Vec::new();
        for s in &req.states {
            states.push(match pb::ApprovalState::try_from(*s) {
                Ok(pb::ApprovalState::Pending) => State::Pending,
                Ok(pb::ApprovalState::Approved) => State::Approved,
                Ok(pb::ApprovalState::Denied) => State::Denied,
                Ok(pb::ApprovalState::Expired) => State::Expired,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "states: {s} is not an ApprovalState"
                    )))
                }
            });
        }
        let limit = match req.page_size {
            0 => 100,
            n => n.min(1000),
        } as usize;
        let offset: usize = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("page_token: not one this server gave"))?
        };
        let own = (!sees_all(&principal)).then_some(principal.token_id.as_str());
        let mut found = self
            .guard
            .approvals
            .list(&states, &req.run_id, own, limit + 1, offset)
            .await
            .map_err(store_error)?;
        let more = found.len() > limit;
        found.truncate(limit);
        Ok(Response::new(pb::ListApprovalsResponse {
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
            approvals: found.into_iter().map(approval_pb).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let principal = super::caller(&request)?;
        let id = request.into_inner().approval_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("approval_id is required"));
        }
        match self.guard.approvals.get(&id).await.map_err(store_error)? {
            Some(a) if visible(&principal, &a) => Ok(Response::new(approval_pb(a))),
            _ => Err(Status::not_found(format!("approval {id} does not exist"))),
        }
    }

    async fn decide(
        &self,
        request: Request<pb::DecideApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let principal = super::caller(&request)?;
        let note = note_of(&request);
        let req = request.get_ref();
        if req.approval_id.is_empty() {
            return Err(Status::invalid_argument("approval_id is required"));
        }
        if req.reason.trim().is_empty() {
            return Err(Status::invalid_argument(
                "a reason is required to decide an approval",
            ));
        }
        if !sees_all(&principal) {
            return Err(Status::permission_denied(
                "approvals are decided by the operator (or admin) role",
            ));
        }
        let a = self
            .guard
            .approvals
            .get(&req.approval_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| {
                Status::not_found(format!("approval {} does not exist", req.approval_id))
            })?;
        let resource = Resource {
            kind: ResourceKind::Approval,
            id: a.id.clone(),
            owner: a.owner.clone(),
        };
        let facts = Facts {
            run_id: a.run_id.clone(),
            ..Facts::default()
        };
        let ask = Ask {
            principal: &principal,
            action: Action::ApprovalDecide,
            resource: &resource,
            facts: &facts,
        };
        authorize(&self.guard, &note, request.metadata(), ask).await?;
        let req = request.into_inner();
        let decided = self
            .guard
            .approvals
            .decide_remembering(
                &req.approval_id,
                &principal,
                req.approve,
                req.reason.trim(),
                &note.get().request_id,
                req.remember,
            )
            .await
            .map_err(status::approval)?;
        Ok(Response::new(approval_pb(decided)))
    }

    type WatchStream = BoxStream<pb::ApprovalEvent>;

    async fn watch(
        &self,
        request: Request<pb::WatchApprovalsRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let principal = super::caller(&request)?;
        // Subscribed before reading what is pending: nothing falls between.
        let mut changes = self.guard.approvals.subscribe();
        let own = (!sees_all(&principal)).then_some(principal.token_id.as_str());
        let pending = self
            .guard
            .approvals
            .list(&[State::Pending], "", own, usize::MAX, 0)
            .await
            .map_err(store_error)?;
        let (tx, rx) = mpsc::channel(64);
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            for a in pending.into_iter().rev() {
                let ev = pb::ApprovalEvent {
                    approval: Some(approval_pb(a)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                let a = tokio::select! {
                    a = changes.recv() => a,
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => {
                        let _ = tx.send(Err(Status::unavailable("the control plane is shutting down; watch again"))).await;
                        return;
                    }
                };
                match a {
                    Ok(a) if visible(&principal, &a) => {
                        let ev = pb::ApprovalEvent {
                            approval: Some(approval_pb(a)),
                        };
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "this watcher fell {n} changes behind; watch again"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
