//! `bridle.control.v1.Audit`: reading and verifying the audit log (admin and
//! auditor), and [`AuditLayer`], which records every call made to the
//! control plane.

use std::pin::Pin;
use std::task::{Context, Poll};

use bridle_proto::control::v1 as pb;
use futures::Stream;
use tonic::codegen::http;
use tonic::{Request, Response, Status};

use crate::audit::{AuditLog, Entry};
use crate::auth::{Auth, Principal, Role};

pub struct AuditApi {
    pub log: AuditLog,
    /// To find the approvals of a run (`run_id` in a query).
    pub approvals: crate::approvals::Approvals,
}

fn require_reader(p: &Principal) -> Result<(), Status> {
    match p.role {
        Role::Admin | Role::Auditor => Ok(()),
        _ => Err(Status::permission_denied(
            "the audit log is read by the admin and auditor roles",
        )),
    }
}

fn internal(e: anyhow::Error) -> Status {
    super::status::internal("audit", e)
}

fn entry_pb(e: Entry, hash: String) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        unix_ms: e.unix_ms,
        request_id: e.request_id,
        token_id: e.token_id,
        principal: e.principal,
        role: e.role,
        owner: e.owner,
        action: e.action,
        resource: e.resource,
        decision: e.decision,
        policy_version: e.policy_version,
        outcome: e.outcome,
        hash,
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditApi {
    async fn query(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let principal = super::caller(&request)?;
        require_reader(&principal)?;
        let req = request.into_inner();
        let limit = match req.page_size {
            0 => 100,
            n => n.min(1000),
        } as usize;
        let after: u64 = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse()
                .map_err(|_| Status::invalid_argument("page_token: not one this server gave"))?
        };
        // A run's entries: calls about it, its steps' decisions (request id
        // `<run>:<seq>`), and its approvals (their entries name the approval).
        let run_prefix = format!("{}:", req.run_id);
        let run_approvals: std::collections::HashSet<String> = if req.run_id.is_empty() {
            Default::default()
        } else {
            self.approvals
                .list(&[], &req.run_id, None, usize::MAX, 0)
                .await
                .map_err(|e| internal(e.into()))?
                .into_iter()
                .map(|a| a.id)
                .collect()
        };
        let of_run = |e: &Entry| {
            req.run_id.is_empty()
                || e.resource == req.run_id
                || e.request_id.starts_with(&run_prefix)
                || run_approvals.contains(&e.resource)
        };
        let keep = |e: &Entry| {
            (req.principal.is_empty()
                || e.token_id == req.principal
                || e.principal == req.principal)
                && e.action.starts_with(&req.action)
                && (req.resource.is_empty() || e.resource == req.resource)
                && of_run(e)
        };
        // Read in pages from the store (the time window is applied there),
        // until the page is full or the log ends.
        let mut entries = Vec::new();
        let mut more = false;
        let mut from = after;
        'read: loop {
            let (page, last) = self
                .log
                .entries_after(from, req.since_unix_ms, req.until_unix_ms, 1000)
                .await
                .map_err(internal)?;
            let Some(last) = last else { break };
            for (e, hash) in page {
                if !keep(&e) {
                    continue;
                }
                if entries.len() == limit {
                    more = true;
                    break 'read;
                }
                entries.push(entry_pb(e, hash));
            }
            from = last;
        }
        let next_page_token = match (more, entries.last()) {
            (true, Some(last)) => last.seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::QueryAuditResponse {
            entries,
            next_page_token,
        }))
    }

    type ExportStream =
        Pin<Box<dyn Stream<Item = Result<pb::ExportAuditChunk, Status>> + Send + 'static>>;

    async fn export(
        &self,
        request: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let principal = super::caller(&request)?;
        require_reader(&principal)?;
        let lines = self.log.lines().await.map_err(internal)?;
        let mut chunks = Vec::new();
        let mut data = Vec::new();
        for line in &lines {
            serde_json::to_writer(&mut data, line).map_err(|e| internal(e.into()))?;
            data.push(b'\n');
            if data.len() >= 1 << 20 {
                chunks.push(Ok(pb::ExportAuditChunk {
                    data: std::mem::take(&mut data).into(),
                }));
            }
        }
        if !data.is_empty() {
            chunks.push(Ok(pb::ExportAuditChunk { data: data.into() }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let principal = super::caller(&request)?;
        require_reader(&principal)?;
        let report = self.log.verify().await.map_err(internal)?;
        let (first_bad_seq, problem) = report.first_bad.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: report.ok(),
            entries: report.entries,
            checkpoints: report.checkpoints,
            first_bad_seq,
            problem,
            public_key: hex::encode(self.log.public_key().as_bytes()),
        }))
    }
}

/// The calls that go on while the audit log cannot record: those that
/// change nothing, and `Runs/Cancel`, which only stops work (a cancel is on
/// the run's own record, and a run must always be stoppable). Every other
/// call is refused with UNAVAILABLE before its handler runs; a call added
/// later is refused too until it is listed here.
const GOES_ON_UNRECORDED: &[&str] = &[
    "Sandboxes/Get",
    "Sandboxes/List",
    "Sandboxes/Attach",
    "Sandboxes/ListSnapshots",
    "Runs/Get",
    "Runs/List",
    "Runs/Watch",
    "Runs/Logs",
    "Runs/Cancel",
    "Approvals/List",
    "Approvals/Get",
    "Approvals/Watch",
    "Audit/Query",
    "Audit/Export",
    "Audit/Verify",
    "Admin/ListTokens",
    "Admin/WhoAmI",
    "Admin/GetPolicy",
    "Admin/ValidatePolicy",
    "ServerReflection/ServerReflectionInfo",
];

/// Records every call (but health checks) in the audit log: who, which RPC,
/// how it ended (for a stream: whether it opened), under a request id that
/// the answer carries as `x-request-id`. The entry is handed to the log's
/// group-committing writer without holding up the answer. While the log
/// cannot record, a call that would change something is refused here,
/// before it acts (and the refusal is recorded, should the log come back).
#[derive(Clone)]
pub struct AuditLayer {
    pub auth: Auth,
    pub log: AuditLog,
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuditService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuditService<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S, B, RB> tower::Service<http::Request<B>> for AuditService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready service goes to this call; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = req.uri().path();
        if path.starts_with("/grpc.health.") {
            return Box::pin(inner.call(req));
        }
        let action = path
            .rsplit_once('.')
            .map(|(_, a)| a)
            .unwrap_or(path)
            .to_string();
        let refused = if GOES_ON_UNRECORDED.contains(&action.as_str()) {
            None
        } else {
            self.layer
                .log
                .recording()
                .err()
                .map(|why| super::status::refused(crate::guard::Refused::Unrecorded(why)))
        };
        // Authenticated once, here: the handler reads the outcome.
        let authenticated = self.layer.auth.authenticate_headers(req.headers());
        req.extensions_mut()
            .insert(super::Caller(authenticated.clone()));
        let principal = authenticated.ok();
        let request_id = crate::ids::random_hex(8);
        // The handler notes what it decided (resource, decision, policy
        // version) for this entry.
        let note = crate::guard::AuditNote::new(request_id.clone());
        req.extensions_mut().insert(note.clone());
        let log = self.layer.log.clone();
        Box::pin(async move {
            let mut response = match refused {
                Some(status) => status.into_http(),
                None => inner.call(req).await?,
            };
            let headers = response.headers_mut();
            // A call that failed at once answers with its status in the
            // headers (trailers-only); a stream that opened has none yet.
            let outcome = match tonic::Status::from_header_map(headers) {
                Some(s) if s.code() != tonic::Code::Ok => {
                    format!("{:?}: {}", s.code(), s.message())
                }
                _ => "ok".to_string(),
            };
            if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                headers.insert("x-request-id", v);
            }
            let p = principal.unwrap_or(Principal {
                token_id: String::new(),
                name: String::new(),
                role: Role::Auditor,
                owner: String::new(),
            });
            let authenticated = !p.token_id.is_empty();
            let decided = note.get();
            log.record(Entry {
                unix_ms: crate::clock::now_ms(),
                request_id,
                role: if authenticated {
                    p.role.as_str().to_string()
                } else {
                    String::new()
                },
                token_id: p.token_id,
                principal: p.name,
                owner: p.owner,
                action,
                resource: decided.resource,
                decision: decided.decision,
                policy_version: decided.policy_version,
                outcome,
                ..Entry::default()
            });
            Ok(response)
        })
    }
}
