//! bridle's client library: what a Rust program needs to use bridle without
//! linking the server (no database, container runtime or policy engine).
//!
//! - [`connect`]: a channel to the control plane (endpoint, optional TLS),
//!   the bearer-token interceptor and the service clients with the message
//!   limits bridle's own clients use;
//! - [`data_dir`]: the files a control plane writes into its data directory
//!   for clients on the same machine (its endpoint, the bootstrap token);
//! - [`agent`]: the connector to a sandbox agent's socket, which makes the
//!   agent prove its identity;
//! - [`job`]: YAML job files, read into the `Job` message `Runs.Submit`
//!   takes, with the [`units`] they are written in;
//! - [`audit`]: the audit log's hash chain and signed checkpoints, verified
//!   offline with only the public key;
//! - the generated stubs: [`control`] (`bridle.control.v1`) and [`sandbox`]
//!   (`bridle.sandbox.v1`).

pub mod agent;
pub mod audit;
pub mod connect;
pub mod data_dir;
pub mod job;
pub mod units;

pub use bridle_proto;
pub use bridle_proto::{control::v1 as control, sandbox::v1 as sandbox};
