//! The egress proxy: one connection of a sandbox, from its first byte to
//! its close. The head is read within a deadline and a size bound (a client
//! that trickles it — slowloris — is dropped), the name is resolved once by
//! the control plane and the address it gets is the one connected to (a
//! name that resolves elsewhere later changes nothing), policy decides
//! (`network.connect`, or `network.connect_private` for an address that is
//! not public), the decision is on the audit log before the connection is
//! made, and a tunnel to port 443 must then say, in its ClientHello, the
//! name it was allowed for. What the sandbox is refused, it is told in a
//! 403 whose body names the policy.
//!
//! The connection comes from anywhere that reads and writes bytes: the
//! sandbox's relay in production, an in-memory pipe in the tests.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::address::{self, Class};
use super::sni::{self, Hello};
use super::target::{self, HeadError, Scheme, Target};
use crate::auth::{Principal, Role};
use crate::guard::{Ask, Cleared, Guard, Record, Refused};
use crate::policy::{Action, Facts, Resource, ResourceKind};

/// Why a connection goes no further, and what the client is told.
struct Refusal {
    status: u16,
    decision: String,
    why: String,
}

/// Resolves a name to the addresses a connection may use.
pub type Resolve =
    Arc<dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync>;

/// The host's resolver.
pub fn system_resolver() -> Resolve {
    Arc::new(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

#[derive(Clone)]
pub struct Settings {
    /// The whole head must be in within this.
    pub head_timeout: Duration,
    pub connect_timeout: Duration,
    /// How long a connection waits for an approval before it is refused.
    pub approval_wait: Duration,
    /// A connection that moves no byte either way for this long is closed
    /// (a command cannot hold the proxy's resources by doing nothing).
    pub idle_timeout: Duration,
    /// Private networks taken as public (a lab's or a test suite's network
    /// that stands in for the internet); none in production.
    pub treat_as_public: Vec<(IpAddr, u8)>,
    /// Headers added to plain-HTTP requests to a host (`[[egress.credentials]]`).
    pub credentials: Vec<Credential>,
}

/// A header the proxy sets on a host's plain-HTTP requests: the sandbox
/// uses the service without ever holding the secret.
#[derive(Clone)]
pub struct Credential {
    /// Lower case, without a trailing dot.
    pub host: String,
    pub port: u16,
    pub header: String,
    pub value: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credential({} {:?} {}: ***)",
            self.host, self.port, self.header
        )
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            head_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            approval_wait: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(300),
            treat_as_public: Vec::new(),
            credentials: Vec::new(),
        }
    }
}

/// Whose connection it is.
#[derive(Clone, Debug)]
pub struct Origin {
    pub sandbox_id: String,
    pub owner: String,
    /// Numbers the sandbox's connections for the audit log.
    pub connection: u64,
    /// The run (or agent session) the sandbox is for, if it is a run's.
    pub run_id: String,
}

impl Origin {
    /// Who asks for the sandbox's egress: the sandbox, on its owner's
    /// behalf (so nobody acting for that owner decides its approvals).
    pub(super) fn principal(&self) -> Principal {
        Principal {
            token_id: format!("sandbox:{}", self.sandbox_id),
            name: format!("sandbox {}", self.sandbox_id),
            role: Role::Submitter,
            owner: self.owner.clone(),
        }
    }

    pub(super) fn resource(&self) -> Resource {
        Resource {
            kind: ResourceKind::Sandbox,
            id: self.sandbox_id.clone(),
            owner: self.owner.clone(),
        }
    }

    /// An audit entry of the sandbox's egress (`egress/…`): how a
    /// connection ended, what a query was answered.
    pub(super) fn entry(
        &self,
        request_id: String,
        action: &str,
        decision: &str,
        outcome: String,
    ) -> crate::audit::Entry {
        crate::audit::Entry {
            unix_ms: crate::clock::now_ms(),
            request_id,
            token_id: format!("sandbox:{}", self.sandbox_id),
            principal: format!("sandbox {}", self.sandbox_id),
            role: Role::Submitter.as_str().to_string(),
            owner: self.owner.clone(),
            action: action.to_string(),
            resource: self.sandbox_id.clone(),
            decision: decision.to_string(),
            outcome,
            ..Default::default()
        }
    }
}

/// How a connection ended, for the record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub host: String,
    pub port: u16,
    pub scheme: String,
    pub address: String,
    pub sni: String,
    /// `allow`, `deny`, `require_approval` or empty (refused before policy).
    pub decision: String,
    /// The approval the connection went ahead on, if it needed one.
    pub approval: String,
    /// The header of the credential the proxy added, if it added one.
    pub credential: String,
    /// Bytes from the sandbox out, and back in.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub duration_ms: u64,
    /// Empty when it ran to its end; else why it was refused or broke.
    pub error: String,
}

pub struct Proxy {
    pub(super) guard: Guard,
    pub(super) resolve: Resolve,
    pub(super) settings: Settings,
    /// Names a sandbox's connections resolved lately: (sandbox, name, port)
    /// → the address, the policy version that allowed the lookup, and when.
    /// A connection to a name found here is not looked up again (so it
    /// needs no new `network.resolve` decision: nothing reaches the name's
    /// server); its `network.connect` is decided and recorded as ever.
    resolved: std::sync::Mutex<HashMap<ResolvedKey, (SocketAddr, u64, Instant)>>,
}

/// A sandbox, a name, a port.
type ResolvedKey = (String, String, u16);

/// How long a name's lookup serves a sandbox's later connections.
const RESOLVED_FOR: Duration = Duration::from_secs(30);
/// Names kept at most, for all sandboxes (expired ones are dropped first).
const RESOLVED_MAX: usize = 4096;

impl Proxy {
    pub fn new(guard: Guard, resolve: Resolve, settings: Settings) -> Self {
        Proxy {
            guard,
            resolve,
            settings,
            resolved: Default::default(),
        }
    }

    /// Serves one connection of `origin`'s sandbox and answers how it ended
    /// (its decision is on the audit log already; the caller records the
    /// outcome).
    pub async fn serve<S>(&self, origin: &Origin, mut client: S) -> Outcome
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let started = Instant::now();
        let mut outcome = Outcome::default();
        if let Err(e) = self.run(origin, &mut client, &mut outcome).await {
            outcome.error = e;
        }
        let _ = client.shutdown().await;
        outcome.duration_ms = started.elapsed().as_millis() as u64;
        outcome
    }

    async fn run<S>(
        &self,
        origin: &Origin,
        client: &mut S,
        outcome: &mut Outcome,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let target = match read_head(client, self.settings.head_timeout).await {
            Ok(target) => target,
            Err(HeadError::Partial) => {
                return Err(format!(
                    "no whole request head within {:?} (or the client closed first)",
                    self.settings.head_timeout
                ))
            }
            Err(e) => {
                answer(client, e.status(), &e.to_string()).await;
                return Err(e.to_string());
            }
        };
        outcome.host = target.host.clone();
        outcome.port = target.port;
        outcome.scheme = target.scheme.as_str().to_string();
        let addr = match self.address(origin, &target).await {
            Ok(addr) => addr,
            Err(refusal) => {
                outcome.decision = refusal.decision;
                answer(client, refusal.status, &refusal.why).await;
                return Err(refusal.why);
            }
        };
        outcome.address = addr.ip().to_string();
        let class = self.class(addr.ip());
        let action = match class {
            Class::Public => Action::NetworkConnect,
            _ => Action::NetworkConnectPrivate,
        };
        let facts = Facts {
            host: target.host.clone(),
            port: u64::from(target.port),
            scheme: target.scheme.as_str().to_string(),
            address: addr.ip().to_string(),
            address_class: class.as_str().to_string(),
            run_id: origin.run_id.clone(),
            ..Facts::default()
        };
        let what = match target.scheme {
            Scheme::Connect => format!("CONNECT {}:{} ({addr})", target.host, target.port),
            Scheme::Http => format!("HTTP {}:{} ({addr})", target.host, target.port),
        };
        match self.decide(origin, action, &facts, &what).await {
            Ok((decision, approval)) => {
                outcome.decision = decision;
                outcome.approval = approval;
            }
            Err((decision, why)) => {
                outcome.decision = decision;
                answer(client, 403, &why).await;
                return Err(why);
            }
        }
        let upstream =
            tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connecting to {addr} timed out"))
                .and_then(|r| r.map_err(|e| format!("connecting to {addr}: {e}")));
        let mut upstream = match upstream {
            Ok(s) => s,
            Err(why) => {
                answer(client, 502, &why).await;
                return Err(why);
            }
        };
        let mut first = target.rest.clone();
        match target.scheme {
            Scheme::Connect => {
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .map_err(|e| format!("answering the client: {e}"))?;
                if target.port == 443 {
                    let sni = self.client_hello(client, &mut first).await?;
                    if sni.is_empty() {
                        return Err(
                            "a tunnel to port 443 must name its server in its ClientHello".into(),
                        );
                    }
                    if sni != target.host {
                        outcome.sni = sni.clone();
                        let why = format!(
                            "the TLS server name {sni:?} is not the host the tunnel was allowed for ({})",
                            target.host
                        );
                        return Err(why);
                    }
                    outcome.sni = sni;
                }
            }
            Scheme::Http => {
                let credential = self
                    .settings
                    .credentials
                    .iter()
                    .find(|c| c.host == target.host && c.port == target.port);
                let head = match credential {
                    // TRACE answers with the request it got: the credential.
                    Some(_) if is_trace(&target.forward_head) => {
                        let why = "bridle: TRACE is not sent where the proxy adds a credential";
                        answer(client, 403, why).await;
                        return Err(why.into());
                    }
                    Some(c) => {
                        outcome.credential = c.header.clone();
                        target::with_header(&target.forward_head, &c.header, &c.value)
                    }
                    None => target.forward_head.clone(),
                };
                upstream
                    .write_all(&head)
                    .await
                    .map_err(|e| format!("sending the request on: {e}"))?;
            }
        }
        if !first.is_empty() {
            upstream
                .write_all(&first)
                .await
                .map_err(|e| format!("sending on: {e}"))?;
            outcome.bytes_out += first.len() as u64;
        }
        let mut moved = (0, 0);
        let result = pipe(
            client,
            &mut upstream,
            self.settings.idle_timeout,
            &mut moved,
        )
        .await;
        outcome.bytes_out += moved.0;
        outcome.bytes_in += moved.1;
        result
    }

    /// Puts how a connection ended on the audit log (its decision is there
    /// already): where it went, the bytes each way, how long, and why it
    /// ended early if it did.
    pub async fn record(&self, origin: &Origin, outcome: &Outcome) {
        let target = if outcome.host.is_empty() {
            "no request".to_string()
        } else {
            format!(
                "{} {}:{} ({})",
                outcome.scheme, outcome.host, outcome.port, outcome.address
            )
        };
        let mut how = if outcome.error.is_empty() {
            "closed".to_string()
        } else {
            format!("ended: {}", outcome.error)
        };
        if !outcome.approval.is_empty() {
            how = format!("approval {}; {how}", outcome.approval);
        }
        if !outcome.credential.is_empty() {
            how = format!("credential {} added; {how}", outcome.credential);
        }
        let entry = origin.entry(
            format!("{}:c{}", origin.sandbox_id, origin.connection),
            "egress/connection",
            &outcome.decision,
            format!(
                "{target}: {how}; {} bytes out, {} in, {} ms",
                outcome.bytes_out, outcome.bytes_in, outcome.duration_ms
            ),
        );
        if let Err(e) = self.guard.audit.append(entry).await {
            tracing::error!(sandbox = %origin.sandbox_id, "audit: {e:#}");
        }
    }

    /// The address to connect to: the host itself if it is one, else the
    /// first the resolver gives (connected to as it is, never resolved
    /// again). A name is looked up only once `network.resolve` allowed it
    /// (and it passed the resolver's checks): a lookup reaches the name's
    /// server, so looking up a denied name would still carry its labels out.
    async fn address(&self, origin: &Origin, target: &Target) -> Result<SocketAddr, Refusal> {
        let literal = target.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, target.port));
        }
        let name = super::dns::check(&target.host).map_err(|e| Refusal {
            status: 403,
            decision: String::new(),
            why: format!("bridle: the name {:?} is refused: {e}", target.host),
        })?;
        let key = (origin.sandbox_id.clone(), name.clone(), target.port);
        let version = self.guard.policies.engine.version();
        if let Some((addr, v, at)) = self.resolved.lock().expect("lock").get(&key) {
            if *v == version && at.elapsed() < RESOLVED_FOR {
                return Ok(*addr);
            }
        }
        let facts = Facts {
            host: name.clone(),
            scheme: "dns".into(),
            run_id: origin.run_id.clone(),
            ..Facts::default()
        };
        let what = format!("resolve {name}");
        if let Err((decision, why)) = self
            .decide(origin, Action::NetworkResolve, &facts, &what)
            .await
        {
            return Err(Refusal {
                status: 403,
                decision,
                why,
            });
        }
        let bad_gateway = |why: String| Refusal {
            status: 502,
            decision: "allow".into(),
            why,
        };
        // Fully qualified: no search domain is tried.
        let found = tokio::time::timeout(
            self.settings.connect_timeout,
            (self.resolve)(format!("{name}."), target.port),
        )
        .await
        .map_err(|_| bad_gateway(format!("resolving {name} timed out")))?
        .map_err(|e| bad_gateway(format!("{name} does not resolve: {e}")))?;
        let addr = found
            .into_iter()
            .next()
            .ok_or_else(|| bad_gateway(format!("{name} has no address")))?;
        let mut resolved = self.resolved.lock().expect("lock");
        if resolved.len() >= RESOLVED_MAX {
            resolved.retain(|_, (_, _, at)| at.elapsed() < RESOLVED_FOR);
            if resolved.len() >= RESOLVED_MAX {
                resolved.clear();
            }
        }
        resolved.insert(key, (addr, version, Instant::now()));
        Ok(addr)
    }

    /// The address's class; a private address in a network configured as
    /// public is public. Only private ranges can be: loopback, link-local
    /// and the metadata address stay what they are whatever the config says.
    fn class(&self, ip: IpAddr) -> Class {
        let class = address::classify(ip);
        let listed = self
            .settings
            .treat_as_public
            .iter()
            .any(|(net, bits)| in_network(ip, *net, *bits));
        if class == Class::Private && listed {
            return Class::Public;
        }
        class
    }

    /// The decision, through the guard, as the sandbox's owner; Ok with the
    /// decision (and the approval that let it go ahead, if one did) when the
    /// connection may go ahead, Err with the decision and what the sandbox
    /// is told otherwise. An approval is waited for within `approval_wait`;
    /// an approval remembered for the sandbox's host and port is used
    /// without asking again.
    async fn decide(
        &self,
        origin: &Origin,
        action: Action,
        facts: &Facts,
        what: &str,
    ) -> Result<(String, String), (String, String)> {
        let (principal, resource) = (origin.principal(), origin.resource());
        let ask = Ask {
            principal: &principal,
            action,
            resource: &resource,
            facts,
        };
        let scope = scope(action, facts);
        let record = Record::Egress {
            sandbox_id: &origin.sandbox_id,
            request_id: format!("{}:c{}", origin.sandbox_id, origin.connection),
            what,
            scope: &scope,
        };
        let used_by = format!("{}-c{}", origin.sandbox_id, origin.connection);
        let refused = |decision: &str, r: Refused| {
            (decision.to_string(), format!("bridle: {what} refused: {r}"))
        };
        match self.guard.clear(&record, ask, None, &used_by).await {
            Ok(Cleared::Allowed | Cleared::Approved(_)) => Ok(("allow".into(), String::new())),
            Ok(Cleared::Remembered(a)) => {
                Ok(("require_approval".into(), format!("{} (remembered)", a.id)))
            }
            Ok(Cleared::Pending(approval)) => {
                let decided = tokio::time::timeout(
                    self.settings.approval_wait,
                    self.guard.decision(&approval.id),
                )
                .await;
                let decided = match decided {
                    Err(_) => {
                        // Nobody may approve a connection that is gone.
                        let why = "the connection that asked for it stopped waiting";
                        if let Err(e) = self.guard.approvals.give_up(&approval.id, why).await {
                            tracing::warn!(approval = %approval.id, "expiring: {e}");
                        }
                        return Err((
                            "require_approval".into(),
                            format!(
                                "bridle: {what} waits for approval {} (not decided within {} s)",
                                approval.id,
                                self.settings.approval_wait.as_secs()
                            ),
                        ));
                    }
                    Ok(Err(r)) => return Err(refused("require_approval", r)),
                    Ok(Ok(a)) => a,
                };
                match self.guard.go_ahead(&decided, ask, &used_by).await {
                    Ok(a) => Ok(("require_approval".into(), a.id)),
                    Err(r) => Err(refused("require_approval", r)),
                }
            }
            Err(r @ Refused::Denied { .. }) => Err(refused("deny", r)),
            Err(r) => Err(refused("", r)),
        }
    }

    /// The server name of the tunnel's ClientHello (empty: none), reading
    /// it into `first` (sent on afterwards) within the head's deadline.
    async fn client_hello<S>(&self, client: &mut S, first: &mut Vec<u8>) -> Result<String, String>
    where
        S: AsyncRead + Unpin,
    {
        let deadline = tokio::time::Instant::now() + self.settings.head_timeout;
        loop {
            match sni::server_name(first) {
                Hello::Server(name) => return Ok(name),
                Hello::NoName => return Ok(String::new()),
                Hello::NotTls => {
                    return Err("a tunnel to port 443 did not begin with a TLS ClientHello".into())
                }
                Hello::Ech => {
                    return Err(
                        "a tunnel to port 443 uses Encrypted Client Hello, which hides the server it is for"
                            .into(),
                    )
                }
                Hello::Partial => {}
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, client.read(&mut chunk))
                .await
                .map_err(|_| "the TLS ClientHello did not arrive in time".to_string())?
                .map_err(|e| format!("reading the ClientHello: {e}"))?;
            if n == 0 {
                return Err("the client closed before its ClientHello".into());
            }
            first.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What an approval of a connection covers if its approver remembers it:
/// the action, the scheme, the host and port, and the class of the address
/// (with the address itself when it is not public, so that a name later
/// pointed elsewhere is asked for again). A connection to loopback,
/// link-local, the metadata address or an unroutable one has no scope: such
/// an approval is for its one connection only.
fn scope(action: Action, facts: &Facts) -> String {
    if action == Action::NetworkResolve {
        return format!("{} {}", action.name(), facts.host);
    }
    let at = format!(
        "{} {} {}:{}",
        action.name(),
        facts.scheme,
        facts.host,
        facts.port
    );
    match facts.address_class.as_str() {
        "public" => at,
        "private" => format!("{at} private {}", facts.address),
        _ => String::new(),
    }
}

/// Copies both ways between the client and the upstream until both have
/// closed, counting the bytes each way in `moved` (out, in); an error when
/// the connection breaks or moves nothing for `idle`.
async fn pipe<A, B>(
    client: &mut A,
    upstream: &mut B,
    idle: Duration,
    moved: &mut (u64, u64),
) -> Result<(), String>
where
    A: AsyncRead + AsyncWrite + Unpin + Send,
    B: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut client_in, mut client_out) = tokio::io::split(client);
    let (mut upstream_in, mut upstream_out) = tokio::io::split(upstream);
    let mut out_buf = vec![0u8; 256 << 10];
    let mut in_buf = vec![0u8; 256 << 10];
    let (mut client_done, mut upstream_done) = (false, false);
    while !(client_done && upstream_done) {
        tokio::select! {
            r = client_in.read(&mut out_buf), if !client_done => match r {
                Ok(0) | Err(_) => {
                    client_done = true;
                    let _ = upstream_out.shutdown().await;
                }
                Ok(n) => {
                    upstream_out
                        .write_all(&out_buf[..n])
                        .await
                        .map_err(|e| format!("the connection broke: {e}"))?;
                    moved.0 += n as u64;
                }
            },
            r = upstream_in.read(&mut in_buf), if !upstream_done => match r {
                Ok(0) | Err(_) => {
                    upstream_done = true;
                    let _ = client_out.shutdown().await;
                }
                Ok(n) => {
                    client_out
                        .write_all(&in_buf[..n])
                        .await
                        .map_err(|e| format!("the connection broke: {e}"))?;
                    moved.1 += n as u64;
                }
            },
            _ = tokio::time::sleep(idle) => {
                return Err(format!("closed after {idle:?} without a byte either way"));
            }
        }
    }
    Ok(())
}

/// Reads a request head within `limit`, bounded by [`target::MAX_HEAD_BYTES`].
async fn read_head<S: AsyncRead + Unpin>(
    client: &mut S,
    limit: Duration,
) -> Result<Target, HeadError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::with_capacity(1024);
    loop {
        match target::parse(&buf) {
            Err(HeadError::Partial) => {}
            other => return other,
        }
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) | Err(_) => return Err(HeadError::Partial),
        };
        if n == 0 {
            return Err(HeadError::Partial);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Tells the client why, in a short HTTP answer (best effort: it may be
/// gone).
async fn answer<S: AsyncWrite + Unpin>(client: &mut S, status: u16, why: &str) {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        431 => "Request Header Fields Too Large",
        _ => "Bad Gateway",
    };
    let body = format!("{why}\n");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = client.write_all(head.as_bytes()).await;
    let _ = client.write_all(body.as_bytes()).await;
}

/// Whether a request head is a TRACE (or the older TRACK), which a server
/// answers with the request itself.
fn is_trace(head: &[u8]) -> bool {
    let method = head.split(|b| *b == b' ').next().unwrap_or_default();
    method.eq_ignore_ascii_case(b"TRACE") || method.eq_ignore_ascii_case(b"TRACK")
}

fn in_network(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let bits = u32::from(bits.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let bits = u32::from(bits.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::approvals::State;

    /// What the tests' policy allows: `allowed.test`, and `held.test` after
    /// an operator's approval; nothing else.
    const POLICY: &str = r#"
@id("test-resolve")
permit (principal, action == Bridle::Action::"network.resolve", resource)
when { resource.owner == principal.owner && context.host like "*.test" };

@id("test-allowed")
permit (principal, action == Bridle::Action::"network.connect", resource)
when { resource.owner == principal.owner && context.host == "allowed.test" };

@id("test-loopback")
permit (principal, action == Bridle::Action::"network.connect_private", resource)
when {
  resource.owner == principal.owner && context.address_class == "loopback" &&
  (context.host == "allowed.test" || context.host == "127.0.0.1")
};

@id("test-held")
@approval("a human looks first")
permit (principal, action == Bridle::Action::"network.connect_private", resource)
when {
  resource.owner == principal.owner && context.address_class == "loopback" &&
  context.host == "held.test"
};

@id("test-held-public")
@approval("a human looks first")
permit (principal, action == Bridle::Action::"network.connect", resource)
when { resource.owner == principal.owner && context.host == "held.test" };
"#;

    struct World {
        _dir: tempfile::TempDir,
        guard: Guard,
    }

    async fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::Store::open(&dir.path().join("bridle.db"))
            .await
            .unwrap();
        let audit = crate::audit::AuditLog::open(
            db.pool().clone(),
            ed25519_dalek::SigningKey::from_bytes(&[9; 32]),
        )
        .await
        .unwrap();
        let policies = crate::policy::Policies::load(db.pool().clone())
            .await
            .unwrap();
        let source = format!("{}\n{POLICY}", crate::policy::DEFAULT_POLICIES);
        policies.change(&source, "test", 0).await.unwrap();
        let guard = Guard {
            policies,
            approvals: crate::approvals::Approvals::new(
                db.pool().clone(),
                audit.clone(),
                Duration::from_secs(60),
                None,
            ),
            audit,
        };
        World { _dir: dir, guard }
    }

    /// Every name resolves to `upstream`.
    fn resolver(upstream: SocketAddr) -> Resolve {
        Arc::new(move |_host, _port| Box::pin(async move { Ok(vec![upstream]) }))
    }

    /// A proxy whose every name resolves to `upstream` (on this host's
    /// loopback: the tests' policy allows `network.connect_private` to it
    /// for the test hosts).
    fn proxy(world: &World, upstream: SocketAddr) -> Arc<Proxy> {
        proxy_with(world, resolver(upstream), Vec::new())
    }

    fn proxy_with(world: &World, resolve: Resolve, public: Vec<(IpAddr, u8)>) -> Arc<Proxy> {
        let settings = Settings {
            head_timeout: Duration::from_millis(500),
            treat_as_public: public,
            ..Settings::default()
        };
        Arc::new(Proxy::new(world.guard.clone(), resolve, settings))
    }

    fn origin() -> Origin {
        Origin {
            sandbox_id: "sb-1".into(),
            owner: "alice".into(),
            connection: 1,
            run_id: String::new(),
        }
    }

    /// An upstream that answers one HTTP request (keeping its head) or, when
    /// `echo`, sends back what it gets.
    async fn upstream(echo: bool) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if echo {
                            let _ = conn.write_all(&buf[..n]).await;
                        } else if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            let _ = conn
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
                                .await;
                            break;
                        }
                    }
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    /// Sends `request` through the proxy and reads the answer to its end.
    async fn through(proxy: &Arc<Proxy>, request: &[u8]) -> (String, Outcome) {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve(&origin(), server).await })
        };
        client.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut answer));
        read.await.expect("the proxy answers").unwrap();
        // The answer is whole: the client closes, as an HTTP client does
        // after `Connection: close`.
        drop(client);
        let outcome = tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("the proxy ends the connection")
            .unwrap();
        (String::from_utf8_lossy(&answer).into_owned(), outcome)
    }

    #[tokio::test]
    async fn plain_http_to_an_allowed_host_goes_through_in_origin_form() {
        let world = world().await;
        let (addr, mut heads) = upstream(false).await;
        let proxy = proxy(&world, addr);
        let (answer, outcome) = through(
            &proxy,
            b"GET http://allowed.test/simple/ HTTP/1.1\r\nHost: allowed.test\r\n\
              Proxy-Authorization: Basic c2VjcmV0\r\n\r\n",
        )
        .await;
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(outcome.decision, "allow");
        assert_eq!(outcome.error, "");
        assert_eq!(outcome.bytes_in, answer.len() as u64);
        let head = String::from_utf8(heads.recv().await.unwrap()).unwrap();
        assert!(head.starts_with("GET /simple/ HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("Connection: close"), "{head}");
        assert!(
            !head.contains("c2VjcmV0"),
            "the proxy's credentials are not passed on"
        );
    }

    #[tokio::test]
    async fn a_host_policy_does_not_allow_gets_a_403_naming_the_policy() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let proxy = proxy(&world, addr);
        let (answer, outcome) = through(&proxy, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("policy denies network.connect"), "{answer}");
        assert_eq!(outcome.decision, "deny");
    }

    #[tokio::test]
    async fn an_allowed_name_that_resolves_to_a_private_address_is_refused() {
        let world = world().await;
        // `allowed.test` resolving into 10/8 is the rebinding case: its
        // connection is `network.connect_private`, which only loopback has
        // here; configuring 169.254/16 as public lifts nothing but private
        // ranges, so the metadata address stays refused.
        let private: SocketAddr = "10.0.0.5:80".parse().unwrap();
        let public = vec![("169.254.0.0".parse().unwrap(), 16)];
        let proxy = proxy_with(&world, resolver(private), public);
        let (answer, outcome) = through(&proxy, b"GET http://allowed.test/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("network.connect_private"), "{answer}");
        assert_eq!(outcome.address, "10.0.0.5");
        let (answer, _) = through(
            &proxy,
            b"GET http://169.254.169.254/latest/ HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(answer.contains("network.connect_private"), "{answer}");
        // A private network configured as public is public.
        let lifted = proxy_with(
            &world,
            resolver(private),
            vec![("10.0.0.0".parse().unwrap(), 8)],
        );
        let (answer, _) = through(&lifted, b"GET http://evil.test/ HTTP/1.1\r\n\r\n").await;
        assert!(
            answer.contains("policy denies network.connect on"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn a_tunnel_to_443_must_name_its_host_in_the_client_hello() {
        let world = world().await;
        let (addr, _) = upstream(true).await;
        let proxy = proxy(&world, addr);
        let hello = super::super::sni::tests_support::client_hello(Some("allowed.test"));
        let mut request = b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n".to_vec();
        request.extend_from_slice(&hello);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve(&origin(), server).await })
        };
        client.write_all(&request).await.unwrap();
        let established = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let mut got = vec![0u8; established.len() + hello.len()];
        tokio::time::timeout(Duration::from_secs(30), client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got[..established.len()], established);
        assert_eq!(
            &got[established.len()..],
            &hello[..],
            "the hello reached the host"
        );
        drop(client);
        let outcome = serving.await.unwrap();
        assert_eq!(outcome.sni, "allowed.test");
        assert_eq!(outcome.bytes_out, hello.len() as u64);

        // Another name in the hello: the tunnel is closed, nothing sent on.
        let fronted = super::super::sni::tests_support::client_hello(Some("evil.test"));
        let mut request = b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n".to_vec();
        request.extend_from_slice(&fronted);
        let (answer, outcome) = through(&proxy, &request).await;
        assert_eq!(answer, "HTTP/1.1 200 Connection established\r\n\r\n");
        assert!(outcome.error.contains("TLS server name"), "{outcome:?}");
        assert_eq!(outcome.bytes_out, 0);
    }

    #[tokio::test]
    async fn a_head_that_trickles_in_is_dropped() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let proxy = proxy(&world, addr);
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve(&origin(), server).await })
        };
        client
            .write_all(b"GET http://allowed.test/ HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("the proxy gives up on a slow head")
            .unwrap();
        assert!(
            outcome.error.contains("no whole request head"),
            "{outcome:?}"
        );
        assert_eq!(outcome.decision, "", "nothing was decided");
    }

    #[tokio::test]
    async fn a_held_host_waits_for_an_operator_then_goes_through() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let proxy = proxy(&world, addr);
        let approvals = world.guard.approvals.clone();
        let approver = tokio::spawn(async move {
            let operator = Principal {
                token_id: "t-ops".into(),
                name: "ops".into(),
                role: Role::Operator,
                owner: "ops".into(),
            };
            for _ in 0..3000 {
                let pending = approvals
                    .list(&[State::Pending], "", None, 10, 0)
                    .await
                    .unwrap();
                if let Some(a) = pending.first() {
                    approvals
                        .decide(&a.id, &operator, true, "the mirror is fine", "req-1")
                        .await
                        .unwrap();
                    return a.summary.clone();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("no approval was asked for");
        });
        let (answer, outcome) = through(&proxy, b"GET http://held.test/ HTTP/1.1\r\n\r\n").await;
        let summary = approver.await.unwrap();
        assert!(summary.contains("held.test"), "{summary}");
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(outcome.decision, "require_approval");
    }

    /// A credential configured for a host is added to its plain-HTTP
    /// requests by the proxy (the sandbox never holds it); what the command
    /// sent in that header is replaced, and other hosts never get it.
    #[tokio::test]
    async fn the_proxy_adds_a_hosts_credential_and_only_to_that_host() {
        let world = world().await;
        let (addr, mut heads) = upstream(false).await;
        let settings = Settings {
            credentials: vec![Credential {
                host: "allowed.test".into(),
                port: 80,
                header: "Authorization".into(),
                value: "Bearer s3cr3t-token".into(),
            }],
            ..Settings::default()
        };
        let proxy = Arc::new(Proxy::new(world.guard.clone(), resolver(addr), settings));
        let (answer, outcome) = through(
            &proxy,
            b"GET http://allowed.test/repo HTTP/1.1\r\nauthorization: Bearer forged\r\n\r\n",
        )
        .await;
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(outcome.credential, "Authorization");
        assert!(!answer.contains("s3cr3t"), "{answer}");
        let head = tokio::time::timeout(Duration::from_secs(30), heads.recv())
            .await
            .expect("the upstream got the request")
            .unwrap();
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.contains("\r\nAuthorization: Bearer s3cr3t-token\r\n\r\n"),
            "{head}"
        );
        assert!(!head.contains("forged"), "{head}");
        assert!(head.starts_with("GET /repo HTTP/1.1\r\n"), "{head}");
        // A TRACE would be answered with the credential: never sent.
        let (answer, outcome) =
            through(&proxy, b"TRACE http://allowed.test/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert_eq!(outcome.credential, "");

        // The held host is not the credential's: it never gets it.
        let settings = Settings {
            credentials: proxy.settings.credentials.clone(),
            ..Settings::default()
        };
        let other = Arc::new(Proxy::new(world.guard.clone(), resolver(addr), settings));
        let request = format!("GET http://127.0.0.1:{}/ HTTP/1.1\r\n\r\n", addr.port());
        let (answer, outcome) = through(&other, request.as_bytes()).await;
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(outcome.credential, "");
        let head = tokio::time::timeout(Duration::from_secs(30), heads.recv())
            .await
            .expect("the upstream got the request")
            .unwrap();
        let head = String::from_utf8(head).unwrap();
        assert!(!head.contains("s3cr3t"), "{head}");
        let (entries, _) = world
            .guard
            .audit
            .entries_after(0, 0, 0, 1000)
            .await
            .unwrap();
        assert!(
            entries
                .iter()
                .all(|(e, _)| !format!("{e:?}").contains("s3cr3t")),
            "the value is never on the record"
        );
    }

    /// What a remembered approval covers: the action, scheme, host and port,
    /// and the address class — with the address itself when private, and
    /// nothing at all (one connection only) for loopback, link-local, the
    /// metadata address or an unroutable one.
    #[test]
    fn a_remembered_approval_covers_one_scheme_host_port_and_class() {
        let facts = |scheme: &str, host: &str, port, address: &str, class: &str| Facts {
            host: host.into(),
            port,
            scheme: scheme.into(),
            address: address.into(),
            address_class: class.into(),
            ..Facts::default()
        };
        let connect = Action::NetworkConnect;
        let private = Action::NetworkConnectPrivate;
        let at = |a, f: Facts| scope(a, &f);
        let public = at(
            connect,
            facts("http", "pypi.org", 80, "151.101.0.223", "public"),
        );
        assert_eq!(public, "network.connect http pypi.org:80");
        // Another scheme, port or host is another scope.
        for other in [
            at(
                connect,
                facts("connect", "pypi.org", 80, "151.101.0.223", "public"),
            ),
            at(
                connect,
                facts("http", "pypi.org", 8080, "151.101.0.223", "public"),
            ),
            at(
                connect,
                facts("http", "pypi.org.evil", 80, "151.101.0.223", "public"),
            ),
        ] {
            assert_ne!(other, public);
        }
        // A private address is pinned: the name pointed elsewhere asks again.
        assert_eq!(
            at(
                private,
                facts("http", "git.internal", 80, "10.0.0.5", "private")
            ),
            "network.connect_private http git.internal:80 private 10.0.0.5"
        );
        for class in ["loopback", "link_local", "metadata", "unroutable"] {
            assert_eq!(
                at(private, facts("http", "x.test", 80, "127.0.0.1", class)),
                ""
            );
        }
    }

    /// An approval of a connection to loopback (or link-local, metadata)
    /// cannot be remembered; a connection whose approval nobody decided
    /// before it gave up is refused and its approval expires with it, so
    /// nobody approves something that no longer waits.
    #[tokio::test]
    async fn held_connections_expire_with_their_wait_and_loopback_is_never_remembered() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let settings = Settings {
            head_timeout: Duration::from_millis(500),
            approval_wait: Duration::from_millis(300),
            ..Settings::default()
        };
        let waiting = Arc::new(Proxy::new(world.guard.clone(), resolver(addr), settings));
        let approvals = world.guard.approvals.clone();
        let (answer, outcome) = through(&waiting, b"GET http://held.test/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("waits for approval"), "{answer}");
        assert_eq!(outcome.approval, "");
        let all = approvals.list(&[], "", None, 10, 0).await.unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].state(), State::Expired);
        assert_eq!(all[0].scope, "", "a loopback connection has no scope");
        let operator = Principal {
            token_id: "t-ops".into(),
            name: "ops".into(),
            role: Role::Operator,
            owner: "ops".into(),
        };
        let late = approvals
            .decide(&all[0].id, &operator, true, "too late", "req-2")
            .await;
        assert!(late.is_err());

        // Pending, and an operator tries to remember it: refused.
        let proxy = proxy(&world, addr);
        let approver = {
            let approvals = approvals.clone();
            tokio::spawn(async move {
                for _ in 0..3000 {
                    let pending = approvals
                        .list(&[State::Pending], "", None, 10, 0)
                        .await
                        .unwrap();
                    if let Some(a) = pending.first() {
                        let remembered = approvals
                            .decide_remembering(&a.id, &operator, true, "ok", "req-3", true)
                            .await;
                        approvals
                            .decide(&a.id, &operator, false, "no, then", "req-4")
                            .await
                            .unwrap();
                        return remembered;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("no approval was asked for");
            })
        };
        let (answer, _) = through(&proxy, b"GET http://held.test/ HTTP/1.1\r\n\r\n").await;
        let remembered = approver.await.unwrap();
        assert!(
            matches!(
                remembered,
                Err(crate::approvals::Refusal::NotRememberable(_))
            ),
            "{remembered:?}"
        );
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
    }

    /// A DNS query for `name`, of `kind`, as a sandbox's resolver library
    /// sends it.
    fn dns_query(id: u16, name: &str, kind: hickory_proto::rr::RecordType) -> Vec<u8> {
        use hickory_proto::op::{Message, Query};
        use hickory_proto::rr::Name;
        let mut m = Message::new();
        m.set_id(id).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        m.to_vec().unwrap()
    }

    /// The sandbox's resolver answers a name policy allows with what the
    /// host resolves, and every other name with NXDOMAIN without looking
    /// it up (an exfiltration-shaped label, a name policy denies); other
    /// record types get no records; each answer is on the audit log.
    #[tokio::test]
    async fn the_resolver_answers_only_names_policy_allows() {
        use hickory_proto::op::{Message, ResponseCode};
        use hickory_proto::rr::{RData, RecordType};
        let world = world().await;
        let lookups = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = lookups.clone();
        let resolve: Resolve = Arc::new(move |host, _port| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(host, "allowed.test.", "looked up fully qualified");
            Box::pin(async move {
                Ok(vec![
                    "203.0.113.7:0".parse().unwrap(),
                    "[2001:db8::7]:0".parse().unwrap(),
                    "203.0.113.7:0".parse().unwrap(),
                ])
            })
        });
        let proxy = Proxy::new(world.guard.clone(), resolve, Settings::default());
        let ask = |id, name: &str, kind| {
            let proxy = &proxy;
            let query = dns_query(id, name, kind);
            async move {
                let answer = proxy.answer_dns(&origin(), &query).await.unwrap();
                Message::from_vec(&answer).unwrap()
            }
        };
        let allowed = ask(7, "allowed.test.", RecordType::A).await;
        assert_eq!(allowed.id(), 7);
        assert_eq!(allowed.response_code(), ResponseCode::NoError);
        let found: Vec<_> = allowed.answers().iter().map(|r| r.data().clone()).collect();
        assert_eq!(
            found,
            vec![RData::A(
                "203.0.113.7".parse::<std::net::Ipv4Addr>().unwrap().into()
            )]
        );
        let six = ask(8, "allowed.test.", RecordType::AAAA).await;
        assert_eq!(six.answers().len(), 1);
        assert_eq!(lookups.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Refused without a lookup: a name policy denies, a label carrying
        // data; a TXT record of an allowed name has no records.
        for name in ["nope.example.", "mzxw6ytboi4dgnzzhe2tkmbt.allowed.test."] {
            let refused = ask(9, name, RecordType::A).await;
            assert_eq!(refused.response_code(), ResponseCode::NXDomain, "{name}");
            assert!(refused.answers().is_empty());
        }
        let txt = ask(10, "allowed.test.", RecordType::TXT).await;
        assert_eq!(txt.response_code(), ResponseCode::NoError);
        assert!(txt.answers().is_empty());
        assert_eq!(lookups.load(std::sync::atomic::Ordering::SeqCst), 2);

        // Not a DNS message: no answer; two questions: FORMERR.
        assert!(proxy
            .answer_dns(&origin(), b"GET / HTTP/1.1\r\n\r\n")
            .await
            .is_none());
        let mut two = Message::from_vec(&dns_query(11, "allowed.test.", RecordType::A)).unwrap();
        two.add_query(hickory_proto::op::Query::query(
            hickory_proto::rr::Name::from_ascii("nope.example.").unwrap(),
            RecordType::A,
        ));
        let answer = proxy
            .answer_dns(&origin(), &two.to_vec().unwrap())
            .await
            .unwrap();
        assert_eq!(
            Message::from_vec(&answer).unwrap().response_code(),
            ResponseCode::FormErr
        );

        // Each answer on the record, with the decision.
        let (entries, _) = world
            .guard
            .audit
            .entries_after(0, 0, 0, 1000)
            .await
            .unwrap();
        let dns: Vec<String> = entries
            .iter()
            .filter(|(e, _)| e.action == "egress/dns")
            .map(|(e, _)| format!("{} {}", e.decision, e.outcome))
            .collect();
        assert_eq!(dns.len(), 5, "{dns:#?}");
        assert_eq!(dns[0], "allow A allowed.test: NOERROR 203.0.113.7");
        assert_eq!(dns[1], "allow AAAA allowed.test: NOERROR 2001:db8::7");
        assert!(
            dns[2].starts_with("deny A nope.example: NXDOMAIN"),
            "{}",
            dns[2]
        );
        assert!(
            dns[3].starts_with(
                " A mzxw6ytboi4dgnzzhe2tkmbt.allowed.test: NXDOMAIN (the name is refused"
            ),
            "{}",
            dns[3]
        );
        let decided = entries
            .iter()
            .filter(|(e, _)| e.action == "egress/network.resolve")
            .count();
        assert_eq!(
            decided, 4,
            "each name that reached policy was decided on the record"
        );
    }

    /// A sandbox's later connections to a name it resolved within 30 s use
    /// that address without a new lookup (so without a new
    /// `network.resolve`: nothing reaches the name's server); each is still
    /// decided and recorded as a connection, and a policy change looks the
    /// name up again.
    #[tokio::test]
    async fn a_name_resolved_lately_is_not_looked_up_again_until_policy_changes() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let lookups = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = lookups.clone();
        let resolve: Resolve = Arc::new(move |_host, _port| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Ok(vec![addr]) })
        });
        let proxy = Arc::new(Proxy::new(
            world.guard.clone(),
            resolve,
            Settings::default(),
        ));
        let count = || lookups.load(std::sync::atomic::Ordering::SeqCst);
        for _ in 0..3 {
            let (answer, _) = through(&proxy, b"GET http://allowed.test/ HTTP/1.1\r\n\r\n").await;
            assert!(answer.ends_with("hello"), "{answer}");
        }
        assert_eq!(count(), 1);
        let (entries, _) = world
            .guard
            .audit
            .entries_after(0, 0, 0, 1000)
            .await
            .unwrap();
        let actions = |name: &str| entries.iter().filter(|(e, _)| e.action == name).count();
        assert_eq!(actions("egress/network.resolve"), 1);
        assert_eq!(actions("egress/network.connect_private"), 3);
        // Another port is another lookup; so is a new policy version.
        let (answer, _) = through(&proxy, b"GET http://allowed.test:81/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(count(), 2);
        let (source, version) = world.guard.policies.engine.current();
        world
            .guard
            .policies
            .change(&source, "test", version)
            .await
            .unwrap();
        let (answer, _) = through(&proxy, b"GET http://allowed.test/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.ends_with("hello"), "{answer}");
        assert_eq!(count(), 3);
    }

    /// A name is looked up only once policy let it be resolved, and never
    /// when it looks like data: a lookup alone reaches the name's server.
    #[tokio::test]
    async fn a_name_is_not_looked_up_before_policy_lets_it_be() {
        let world = world().await;
        let lookups = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = lookups.clone();
        let resolve: Resolve = Arc::new(move |_host, _port| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Ok(vec!["127.0.0.1:9".parse().unwrap()]) })
        });
        let proxy = Arc::new(Proxy::new(
            world.guard.clone(),
            resolve,
            Settings::default(),
        ));
        let (answer, outcome) = through(&proxy, b"GET http://nope.example/ HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 403 "), "{answer}");
        assert!(answer.contains("network.resolve"), "{answer}");
        assert_eq!(outcome.decision, "deny");
        let (answer, _) = through(
            &proxy,
            b"CONNECT mzxw6ytboi4dgnzzhe2tkmbt.allowed.test:443 HTTP/1.1\r\n\r\n",
        )
        .await;
        assert!(answer.contains("looks like data"), "{answer}");
        assert_eq!(lookups.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    /// A tunnel that moves nothing is closed after the idle time.
    #[tokio::test]
    async fn an_idle_tunnel_is_closed() {
        let world = world().await;
        let (addr, _) = upstream(true).await;
        let settings = Settings {
            idle_timeout: Duration::from_millis(300),
            ..Settings::default()
        };
        let proxy = Arc::new(Proxy::new(world.guard.clone(), resolver(addr), settings));
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serving = {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.serve(&origin(), server).await })
        };
        client
            .write_all(b"CONNECT allowed.test:8443 HTTP/1.1\r\n\r\nping")
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), serving)
            .await
            .expect("an idle tunnel is closed")
            .unwrap();
        assert!(outcome.error.contains("without a byte"), "{outcome:?}");
        assert_eq!(
            (outcome.bytes_out, outcome.bytes_in),
            (4, 4),
            "ping went and came back"
        );
        drop(client);
    }

    #[tokio::test]
    async fn garbage_is_a_400() {
        let world = world().await;
        let (addr, _) = upstream(false).await;
        let proxy = proxy(&world, addr);
        let (answer, outcome) = through(&proxy, b"\x16\x03\x01\x00\x10hello there\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(!outcome.error.is_empty());
    }
}
