//! Connecting to the control plane: its address (plain or TLS-verified
//! against a CA certificate), a bearer token on every call, and a client
//! per service with the message limits bridle's own clients use.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use bridle_client::connect::{self, Bearer};
//! let channel = connect::channel("http://127.0.0.1:7443", None).await?;
//! let clients = connect::Clients::new(channel, Bearer::new("bridle_…")?);
//! # let _ = clients; Ok(()) }
//! ```

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::control as pb;

/// Where a control plane listens when nothing says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:7443";

/// Largest message the clients of the streams that carry files (sandbox
/// files, run logs) take and send.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest message a runs client sends: a job carries its inputs inline.
pub const MAX_JOB_MESSAGE_BYTES: usize = 64 << 20;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bad endpoint {uri:?}")]
    BadEndpoint {
        uri: String,
        source: tonic::transport::Error,
    },
    #[error("{uri} is https: a CA certificate is needed to verify it")]
    NeedsCa { uri: String },
    #[error("configuring TLS")]
    Tls(#[source] tonic::transport::Error),
    /// Nothing answers there, or the TLS handshake failed.
    #[error("cannot reach the control plane at {uri}: {error}")]
    Unreachable {
        uri: String,
        error: tonic::transport::Error,
    },
    #[error("the token contains characters a header cannot carry")]
    TokenNotAscii,
}

/// A control plane's address, checked, with the transport settings bridle's
/// clients use: windows large enough for bulk transfers (HTTP/2's default
/// 64 KiB would make every 1 MiB message wait on window updates) and a
/// connect timeout.
#[derive(Clone, Debug)]
pub struct Address {
    uri: String,
    endpoint: Endpoint,
}

impl Address {
    /// `uri` is `http://host:port` or `https://host:port`.
    pub fn parse(uri: &str) -> Result<Self, Error> {
        let endpoint =
            Endpoint::from_shared(uri.to_string()).map_err(|source| Error::BadEndpoint {
                uri: uri.to_string(),
                source,
            })?;
        Ok(Self {
            uri: uri.to_string(),
            endpoint: endpoint
                .connect_timeout(CONNECT_TIMEOUT)
                .initial_stream_window_size(8 << 20)
                .initial_connection_window_size(16 << 20),
        })
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Whether the control plane there serves TLS (and so needs a CA
    /// certificate to be verified against: [`Address::with_ca`]).
    pub fn is_https(&self) -> bool {
        self.uri.starts_with("https://")
    }

    /// This address verified with TLS against the CA certificate `ca_pem`.
    pub fn with_ca(self, ca_pem: &[u8]) -> Result<Self, Error> {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        Ok(Self {
            endpoint: self.endpoint.tls_config(tls).map_err(Error::Tls)?,
            uri: self.uri,
        })
    }

    /// Connects (and, for TLS, completes the handshake).
    pub async fn connect(&self) -> Result<Channel, Error> {
        self.endpoint
            .connect()
            .await
            .map_err(|error| Error::Unreachable {
                uri: self.uri.clone(),
                error,
            })
    }
}

/// A channel to the control plane at `uri`; an `https://` one is verified
/// against the CA certificate `ca_pem` (PEM), which it then needs.
pub async fn channel(uri: &str, ca_pem: Option<&[u8]>) -> Result<Channel, Error> {
    let address = Address::parse(uri)?;
    let address = match (address.is_https(), ca_pem) {
        (true, Some(pem)) => address.with_ca(pem)?,
        (true, None) => {
            return Err(Error::NeedsCa {
                uri: uri.to_string(),
            })
        }
        (false, _) => address,
    };
    address.connect().await
}

/// Adds `authorization: Bearer <token>` to every call (or nothing, for
/// calls made on purpose without a token: [`Bearer::none`]).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    pub fn new(token: &str) -> Result<Self, Error> {
        format!("Bearer {token}")
            .parse()
            .map(|value| Self(Some(value)))
            .map_err(|_| Error::TokenNotAscii)
    }

    /// No `authorization` header at all.
    pub fn none() -> Self {
        Self(None)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry a bearer token.
pub type Authed = InterceptedService<Channel, Bearer>;
pub type Sandboxes = pb::sandboxes_client::SandboxesClient<Authed>;
pub type Admin = pb::admin_client::AdminClient<Authed>;
pub type Runs = pb::runs_client::RunsClient<Authed>;
pub type Audit = pb::audit_client::AuditClient<Authed>;
pub type Approvals = pb::approvals_client::ApprovalsClient<Authed>;

/// A `Sandboxes` client: files move in messages of up to
/// [`MAX_MESSAGE_BYTES`] both ways.
pub fn sandboxes(channel: Channel, bearer: Bearer) -> Sandboxes {
    pb::sandboxes_client::SandboxesClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

pub fn admin(channel: Channel, bearer: Bearer) -> Admin {
    pb::admin_client::AdminClient::with_interceptor(channel, bearer)
}

/// A `Runs` client: logs come in messages of up to [`MAX_MESSAGE_BYTES`],
/// and a job may go out in one of up to [`MAX_JOB_MESSAGE_BYTES`].
pub fn runs(channel: Channel, bearer: Bearer) -> Runs {
    pb::runs_client::RunsClient::with_interceptor(channel, bearer)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_JOB_MESSAGE_BYTES)
}

pub fn audit(channel: Channel, bearer: Bearer) -> Audit {
    pb::audit_client::AuditClient::with_interceptor(channel, bearer)
}

pub fn approvals(channel: Channel, bearer: Bearer) -> Approvals {
    pb::approvals_client::ApprovalsClient::with_interceptor(channel, bearer)
}

/// A client for every service of the control plane, over one channel.
#[derive(Clone)]
pub struct Clients {
    pub sandboxes: Sandboxes,
    pub admin: Admin,
    pub runs: Runs,
    pub audit: Audit,
    pub approvals: Approvals,
}

impl Clients {
    pub fn new(channel: Channel, bearer: Bearer) -> Self {
        Self {
            sandboxes: sandboxes(channel.clone(), bearer.clone()),
            admin: admin(channel.clone(), bearer.clone()),
            audit: audit(channel.clone(), bearer.clone()),
            approvals: approvals(channel.clone(), bearer.clone()),
            runs: runs(channel, bearer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_and_tls_is_told_apart() {
        let plain = Address::parse("http://127.0.0.1:7443").unwrap();
        assert!(!plain.is_https());
        assert_eq!(plain.uri(), "http://127.0.0.1:7443");
        assert!(Address::parse("https://localhost:7443").unwrap().is_https());
        let e = Address::parse("not a uri").unwrap_err();
        assert_eq!(e.to_string(), "bad endpoint \"not a uri\"");
    }

    #[tokio::test]
    async fn https_without_a_ca_is_refused_before_dialling() {
        let e = channel("https://127.0.0.1:9", None).await.unwrap_err();
        assert!(matches!(e, Error::NeedsCa { .. }), "{e}");
    }

    #[test]
    fn the_token_goes_in_the_authorization_header() {
        use tonic::service::Interceptor;
        let mut bearer = Bearer::new("bridle_t_s").unwrap();
        let req = bearer.call(tonic::Request::new(())).unwrap();
        let sent = req.metadata().get("authorization").unwrap();
        assert_eq!(sent.to_str().unwrap(), "Bearer bridle_t_s");
        let req = Bearer::none().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
        assert!(matches!(Bearer::new("a\nb"), Err(Error::TokenNotAscii)));
    }
}
