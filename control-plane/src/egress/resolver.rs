//! The resolver of an `egress` sandbox: each DNS query a command sends to
//! the sandbox's resolver (`/etc/resolv.conf` names its agent's relay) is
//! answered here. Only names policy lets be resolved (`network.resolve`
//! allows them) are looked up, through the host, once the decision is on
//! the audit log; every other name gets NXDOMAIN without any lookup, so
//! its labels go no further than the control plane. Every answer is on
//! the audit log too (`egress/dns`: the name, the type, what was answered).
//!
//! Only A and AAAA are looked up; any other type of a name policy allows
//! gets an empty answer (a command has no use for MX or TXT records it
//! could not connect to, and TXT is the usual channel back in). A query
//! that is not one plain question is answered FORMERR or NOTIMP; bytes
//! that are not a DNS message at all get no answer.

use std::net::IpAddr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record as DnsRecord, RecordType};

use super::proxy::{Origin, Proxy};
use crate::guard::{Ask, Record};
use crate::policy::{Action, Decision, Facts};

/// How long an answer may be kept by the sandbox's resolver.
const TTL: u32 = 30;
/// Addresses in one answer, at most (so it fits a 512-byte datagram).
const MAX_ANSWERS: usize = 8;
/// A lookup through the host gives up after this.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of one query, for the record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Answered {
    pub name: String,
    pub query_type: String,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, …
    pub code: String,
    /// The addresses answered.
    pub addresses: Vec<IpAddr>,
    /// The policy's decision (empty: refused before policy was asked).
    pub decision: String,
    /// Why a name was refused or could not be answered.
    pub why: String,
}

impl Proxy {
    /// Answers one DNS query of `origin`'s sandbox (none: the bytes are not
    /// a DNS message), its decision and its answer on the audit log.
    pub async fn answer_dns(&self, origin: &Origin, query: &[u8]) -> Option<Vec<u8>> {
        let message = Message::from_vec(query).ok()?;
        if message.message_type() != MessageType::Query {
            return None;
        }
        let (code, answers, answered) = self.resolve_query(origin, &message).await;
        let mut reply = Message::new();
        reply
            .set_id(message.id())
            .set_message_type(MessageType::Response)
            .set_op_code(message.op_code())
            .set_recursion_desired(message.recursion_desired())
            .set_recursion_available(true)
            .set_response_code(code);
        if let Some(q) = message.queries().first() {
            reply.add_query(q.clone());
        }
        reply.add_answers(answers);
        if let Some(answered) = answered {
            self.record_dns(origin, &answered).await;
        }
        reply.to_vec().ok()
    }

    /// The response code, the answer's records and, when the query named
    /// something, what to record.
    async fn resolve_query(
        &self,
        origin: &Origin,
        message: &Message,
    ) -> (ResponseCode, Vec<DnsRecord>, Option<Answered>) {
        if message.op_code() != OpCode::Query {
            return (ResponseCode::NotImp, Vec::new(), None);
        }
        let [query] = message.queries() else {
            return (ResponseCode::FormErr, Vec::new(), None);
        };
        let raw = query.name().to_ascii();
        let mut answered = Answered {
            name: raw.trim_end_matches('.').to_ascii_lowercase(),
            query_type: query.query_type().to_string(),
            ..Answered::default()
        };
        let nx = |mut answered: Answered, why: String| {
            answered.code = "NXDOMAIN".into();
            answered.why = why;
            (ResponseCode::NXDomain, Vec::new(), Some(answered))
        };
        if query.query_class() != DNSClass::IN {
            answered.code = "NOTIMP".into();
            answered.why = "only class IN is answered".into();
            return (ResponseCode::NotImp, Vec::new(), Some(answered));
        }
        let name = match super::dns::check(&answered.name) {
            Ok(name) => name,
            Err(e) => {
                let why = format!("the name is refused: {e}");
                return nx(answered, why);
            }
        };
        answered.name = name.clone();
        match self.resolvable(origin, &name).await {
            Ok(decision) => answered.decision = decision,
            Err((decision, why)) => {
                answered.decision = decision;
                return nx(answered, why);
            }
        }
        let want = query.query_type();
        if want != RecordType::A && want != RecordType::AAAA {
            answered.code = "NOERROR".into();
            answered.why = format!("{want} records are not looked up");
            return (ResponseCode::NoError, Vec::new(), Some(answered));
        }
        // Fully qualified: no search domain is tried.
        let found = tokio::time::timeout(LOOKUP_TIMEOUT, (self.resolve)(format!("{name}."), 0))
            .await
            .map_err(|_| "the lookup timed out".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let found = match found {
            Ok(found) => found,
            Err(e) if e.contains("timed out") => {
                answered.code = "SERVFAIL".into();
                answered.why = e;
                return (ResponseCode::ServFail, Vec::new(), Some(answered));
            }
            // What the host's resolver could not find does not exist.
            Err(e) => return nx(answered, e),
        };
        let mut records = Vec::new();
        for addr in found {
            let rdata = match (want, addr.ip()) {
                (RecordType::A, IpAddr::V4(ip)) => RData::A(A(ip)),
                (RecordType::AAAA, IpAddr::V6(ip)) => RData::AAAA(AAAA(ip)),
                _ => continue,
            };
            if answered.addresses.contains(&addr.ip()) {
                continue;
            }
            answered.addresses.push(addr.ip());
            records.push(DnsRecord::from_rdata(query.name().clone(), TTL, rdata));
            if records.len() == MAX_ANSWERS {
                break;
            }
        }
        answered.code = "NOERROR".into();
        (ResponseCode::NoError, records, Some(answered))
    }

    /// Whether policy lets `name` be looked up now: Ok with the decision
    /// (on the audit log already) when it is `allow`; else the decision and
    /// why. A name held for approval is not looked up here: a resolver
    /// cannot wait for a person, and the lookup would reach the name's
    /// server before anyone approved. The proxy asks for the approval when
    /// a connection names it.
    async fn resolvable(&self, origin: &Origin, name: &str) -> Result<String, (String, String)> {
        let (principal, resource) = (origin.principal(), origin.resource());
        let facts = Facts {
            host: name.to_string(),
            scheme: "dns".into(),
            run_id: origin.run_id.clone(),
            ..Facts::default()
        };
        let ask = Ask {
            principal: &principal,
            action: Action::NetworkResolve,
            resource: &resource,
            facts: &facts,
        };
        let what = format!("resolve {name} (the sandbox's resolver)");
        let record = Record::Egress {
            sandbox_id: &origin.sandbox_id,
            request_id: format!("{}:d{}", origin.sandbox_id, origin.connection),
            what: &what,
            scope: "",
        };
        match self.guard.screen(&record, ask).await {
            Ok(verdict) if verdict.decision == Decision::Allow => Ok("allow".into()),
            Ok(verdict) => Err((
                verdict.decision.as_str().to_string(),
                format!(
                    "network.resolve of {name} needs an approval ({}); the proxy asks for it when a connection names the host",
                    verdict.reason
                ),
            )),
            Err(r @ crate::guard::Refused::Denied { .. }) => Err(("deny".into(), r.to_string())),
            Err(r) => Err((String::new(), r.to_string())),
        }
    }

    /// Puts a query's answer on the audit log.
    async fn record_dns(&self, origin: &Origin, answered: &Answered) {
        let addresses: Vec<String> = answered.addresses.iter().map(|a| a.to_string()).collect();
        let mut outcome = format!(
            "{} {}: {}",
            answered.query_type, answered.name, answered.code
        );
        if !addresses.is_empty() {
            outcome.push_str(&format!(" {}", addresses.join(", ")));
        }
        if !answered.why.is_empty() {
            outcome.push_str(&format!(" ({})", answered.why));
        }
        let entry = origin.entry(
            format!("{}:d{}", origin.sandbox_id, origin.connection),
            "egress/dns",
            &answered.decision,
            outcome,
        );
        if let Err(e) = self.guard.audit.append(entry).await {
            tracing::error!(sandbox = %origin.sandbox_id, "audit: {e:#}");
        }
    }
}
