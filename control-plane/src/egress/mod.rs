//! Egress control (issue 15, docs/network.md): what may leave a sandbox is
//! decided on each connection and each DNS lookup, not on command text.
//!
//! This first slice holds the pure parts the proxy and the resolver are made
//! of, each reading bytes a sandbox wrote (attacker-controlled) with bounds
//! on every size and no trust in any of them:
//!
//! - [`target`]: the head of a proxied connection — `CONNECT host:port`, or
//!   a plain HTTP request in absolute form — into where it wants to go;
//! - [`sni`]: the server name of a TLS ClientHello, read without decrypting;
//! - [`address`]: what kind of address a name resolved to (public, private,
//!   loopback, link-local, the metadata address, …);
//! - [`dns`]: which names a resolver refuses outright (malformed, too long,
//!   or carrying data in long high-entropy labels: DNS exfiltration).

pub mod address;
pub mod dns;
pub mod proxy;
pub mod relay;
pub mod resolver;
pub mod sni;
pub mod target;
