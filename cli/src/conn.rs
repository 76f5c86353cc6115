//! The options every subcommand shares (where the control plane is, the
//! token, the output format), the connection made from them, and how a
//! follower makes it again when the control plane goes away.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bridle_client::connect::{self, Address, Bearer, Clients};
use bridle_client::data_dir;
use clap::Args;
use tonic::{Code, Status};

use crate::exit::code_name;
use crate::render::Output;

#[derive(Args)]
pub(crate) struct GlobalArgs {
    /// Control-plane address. Default: the `endpoint` file in the data
    /// directory, else http://127.0.0.1:7443.
    #[arg(long, global = true, env = "BRIDLE_ENDPOINT")]
    endpoint: Option<String>,
    /// PEM CA certificate to verify an https endpoint with.
    #[arg(long, global = true, env = "BRIDLE_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// API token. Default: --token-file.
    #[arg(long, global = true, env = "BRIDLE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token. Default: <data dir>/admin.token when readable.
    #[arg(long, global = true, env = "BRIDLE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The control plane's data directory (to find the endpoint and the
    /// bootstrap token on the same machine).
    #[arg(long, global = true, env = "BRIDLE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl GlobalArgs {
    pub(crate) fn json(&self) -> bool {
        self.output == Output::Json
    }

    fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(data_dir::default_data_dir)
    }
}

/// A client of every service, and how to make it again.
pub(crate) struct Conn {
    pub(crate) sandboxes: connect::Sandboxes,
    pub(crate) admin: connect::Admin,
    pub(crate) runs: connect::Runs,
    pub(crate) audit: connect::Audit,
    pub(crate) approvals: connect::Approvals,
    pub(crate) json: bool,
    /// How this connection was made, to make it again (see [`Conn::redial`]).
    dial: Dial,
}

impl Conn {
    /// Replaces every client with one on a new channel, to the endpoint as
    /// it is now. tonic's `Channel` does reconnect by itself, but only to
    /// the address it was made with, and a control plane restarted with
    /// `--listen …:0` writes another one into its `endpoint` file.
    async fn redial(&mut self) -> anyhow::Result<()> {
        *self = self.dial.connect().await?;
        Ok(())
    }
}

/// What it takes to reach the control plane: the flags, with the token read
/// once (the bootstrap token does not change when the control plane
/// restarts; its endpoint may).
#[derive(Clone)]
pub(crate) struct Dial {
    /// --endpoint; without it, the data directory's `endpoint` file is read
    /// at each dial.
    endpoint: Option<String>,
    data_dir: PathBuf,
    ca_cert: Option<PathBuf>,
    bearer: Bearer,
    json: bool,
}

impl Dial {
    pub(crate) fn new(args: &GlobalArgs) -> anyhow::Result<Self> {
        let token = match (&args.token, &args.token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading the token file {}", f.display()))?
                .trim()
                .to_string(),
            (None, None) => {
                let dir = args.data_dir();
                data_dir::read_bootstrap_token(&dir).map_err(|_| {
                    anyhow!(
                        "no token: set BRIDLE_TOKEN, --token or --token-file ({} is not readable)",
                        dir.join(data_dir::BOOTSTRAP_TOKEN_FILE).display()
                    )
                })?
            }
        };
        Ok(Self {
            endpoint: args.endpoint.clone(),
            data_dir: args.data_dir(),
            ca_cert: args.ca_cert.clone(),
            bearer: Bearer::new(&token)?,
            json: args.json(),
        })
    }

    fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(e) => e.clone(),
            None => data_dir::read_endpoint(&self.data_dir)
                .unwrap_or_else(|| connect::DEFAULT_ENDPOINT.to_string()),
        }
    }

    pub(crate) async fn connect(&self) -> anyhow::Result<Conn> {
        let endpoint = self.endpoint();
        let mut address = Address::parse(&endpoint)?;
        if address.is_https() {
            let ca = self.ca_cert.as_ref().ok_or_else(|| {
                anyhow!(
                    "{endpoint} is https: give the CA certificate with --ca-cert or BRIDLE_CA_CERT"
                )
            })?;
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            address = address.with_ca(&pem)?;
        }
        // Unreachable is a status, so that it exits 5 like the calls that
        // find the control plane gone.
        let channel = address
            .connect()
            .await
            .map_err(|e| anyhow::Error::new(Status::unavailable(e.to_string())))?;
        let Clients {
            sandboxes,
            admin,
            runs,
            audit,
            approvals,
        } = Clients::new(channel, self.bearer.clone());
        Ok(Conn {
            sandboxes,
            admin,
            runs,
            audit,
            approvals,
            json: self.json,
            dial: self.clone(),
        })
    }
}

/// A follower of a run's stored events, which can go on from where it got.
pub(crate) trait Follower {
    /// The first stored event not yet printed.
    fn next_seq(&self) -> u64;
    /// What is followed, for stderr ("run ID", "session ID").
    fn what(&self) -> String;
    /// Follows until the end it waits for, and answers its exit code; an
    /// error when the stream broke off.
    async fn attempt(&mut self, c: &mut Conn) -> anyhow::Result<u8>;
}

/// Runs `follower` to its end. When the control plane goes away (a
/// restart, a broken connection), dials again ([`Reconnects`]) and follows
/// on from the first event not yet printed, so nothing shows twice or is
/// lost.
pub(crate) async fn follow_resuming(
    c: &mut Conn,
    follower: &mut impl Follower,
) -> anyhow::Result<u8> {
    let mut reconnects = Reconnects::new();
    loop {
        let from = follower.next_seq();
        let failure = match follower.attempt(c).await {
            Ok(code) => return Ok(code),
            Err(e) => e,
        };
        if follower.next_seq() > from {
            reconnects.progressed();
        }
        let again = format!(
            "following {} again from event {}",
            follower.what(),
            follower.next_seq()
        );
        reconnects.redial(c, failure, &again).await?;
    }
}

/// How a follower tries again after losing the control plane: waits that
/// double from 200 ms to 5 s, until 5 minutes pass without an event.
///
/// An explicit loop rather than a retry crate (`backon`): what is retried
/// is not one call but a stream resumed from where it stopped, whose
/// backoff starts over with every event received, and whose every retry
/// says on stderr where it resumes.
pub(crate) struct Reconnects {
    delay: Duration,
    /// When the failures since the last event began.
    failing_since: Option<tokio::time::Instant>,
}

impl Reconnects {
    const FIRST_DELAY: Duration = Duration::from_millis(200);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    const GIVE_UP_AFTER: Duration = Duration::from_secs(5 * 60);

    pub(crate) fn new() -> Self {
        Self {
            delay: Self::FIRST_DELAY,
            failing_since: None,
        }
    }

    /// Events came: the control plane is back, and the next failure starts
    /// the count again.
    pub(crate) fn progressed(&mut self) {
        *self = Self::new();
    }

    /// After `failure` ended a follower's attempt: if it means the control
    /// plane went away, says so on stderr (`resuming`: how the follower goes
    /// on), waits, and dials again until a dial succeeds. Any other failure,
    /// or one still there after [`Self::GIVE_UP_AFTER`], is answered.
    pub(crate) async fn redial(
        &mut self,
        c: &mut Conn,
        mut failure: anyhow::Error,
        resuming: &str,
    ) -> anyhow::Result<()> {
        loop {
            let (code, message) = match failure.downcast_ref::<Status>() {
                Some(s) if lost_the_control_plane(s) => (s.code(), s.message().replace('\n', " ")),
                _ => return Err(failure),
            };
            let since = *self
                .failing_since
                .get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= Self::GIVE_UP_AFTER {
                // Unavailable whatever the last code: the exit code says
                // the control plane could not be reached.
                let secs = Self::GIVE_UP_AFTER.as_secs();
                return Err(Status::unavailable(format!(
                    "no control plane for {secs} s; last: {}: {message}",
                    code_name(code)
                ))
                .into());
            }
            eprintln!(
                "bridle: lost the control plane ({}: {message}); {resuming}",
                code_name(code)
            );
            tokio::time::sleep(self.delay).await;
            self.delay = (self.delay * 2).min(Self::MAX_DELAY);
            match c.redial().await {
                Ok(()) => return Ok(()),
                Err(e) => failure = e,
            }
        }
    }
}

/// Whether a failed call means the control plane went away (it restarts,
/// or the connection to it broke) rather than that it refused.
fn lost_the_control_plane(s: &Status) -> bool {
    match s.code() {
        // Unreachable, or a call on a connection that then closed
        // (hyper's "operation was canceled").
        Code::Unavailable | Code::Cancelled => true,
        // A connection reset mid-stream comes as an h2 error, which tonic
        // turns into Unknown or Internal here with that error as the
        // status's source; the same codes sent by the server have no source
        // and are real failures. A channel that failed as a whole comes
        // without a source, in the generated client's words.
        Code::Unknown | Code::Internal => {
            std::error::Error::source(s).is_some()
                || s.message().starts_with("Service was not ready")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_told_from_a_refusal() {
        assert!(lost_the_control_plane(&Status::unavailable("restarting")));
        assert!(lost_the_control_plane(&Status::cancelled(
            "operation was canceled"
        )));
        // Made here from a transport error: it has that error as its source.
        let reset = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(reset.code(), Code::Unknown);
        assert!(lost_the_control_plane(&reset));
        assert!(lost_the_control_plane(&Status::unknown(
            "Service was not ready: transport error"
        )));
        // Sent by the server.
        assert!(!lost_the_control_plane(&Status::internal("a bug")));
        assert!(!lost_the_control_plane(&Status::unknown("a bug")));
        assert!(!lost_the_control_plane(&Status::not_found("no run")));
        assert!(!lost_the_control_plane(&Status::permission_denied("no")));
    }
}
