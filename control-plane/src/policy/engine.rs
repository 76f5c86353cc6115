//! Deciding: the [`Engine`] holds the policy set in force, validated
//! against the schema, and answers each request with a [`Verdict`]: `deny`
//! (a `forbid` matches, or no `permit` does), `require_approval` (a matching
//! `permit` carries `@approval("why")`), or `allow`, and under which
//! version. A policy text that does not validate is refused with its
//! [`Problem`]s, each with its line and column.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Decision as CedarDecision, Entities, PolicySet, Request, Schema, ValidationMode,
    Validator,
};
use miette::Diagnostic;

use super::slicing::Slices;
use super::vocabulary::{Action, Facts, Names, Resource, SCHEMA};
use crate::auth::Principal;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    RequireApproval,
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::RequireApproval => "require_approval",
        }
    }
}

/// A decision, why, and under which version of the policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// For a person: which policy decided and (for an approval) its reason.
    pub reason: String,
    /// The policies that determined it (their `@id`, else Cedar's id).
    pub policies: Vec<String>,
    pub policy_version: u64,
}

/// Something wrong in a policy text, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

struct Loaded {
    /// Each policy's name and approval annotation, read once (reading an
    /// annotation parses its key).
    labels: HashMap<cedar_policy::PolicyId, Label>,
    /// Each action's policies, and the slices of them a request is decided
    /// against (see `slicing`).
    slices: Slices,
    source: String,
    version: u64,
}

/// How a policy is named in a verdict, and why it asks for approval.
struct Label {
    /// Its `@id`, else Cedar's id.
    name: String,
    approval: Option<String>,
}

impl Loaded {
    fn new(policies: PolicySet, source: &str, version: u64) -> Self {
        let labels = policies
            .policies()
            .map(|p| {
                let label = Label {
                    name: p
                        .annotation("id")
                        .map_or_else(|| p.id().to_string(), str::to_string),
                    approval: p.annotation("approval").map(str::to_string),
                };
                (p.id().clone(), label)
            })
            .collect();
        Self {
            labels,
            slices: Slices::new(&policies),
            source: source.to_string(),
            version,
        }
    }
}

/// The policies in force; replaced whole, atomically, by [`Engine::set`].
#[derive(Clone)]
pub struct Engine {
    schema: Arc<Schema>,
    names: Arc<Names>,
    loaded: Arc<RwLock<Arc<Loaded>>>,
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn problems(source: &str, d: &dyn Diagnostic, fallback: String) -> Vec<Problem> {
    let message = {
        let m = d.to_string();
        match d.help() {
            Some(h) => format!("{m} ({h})"),
            None => m,
        }
    };
    let mut out: Vec<Problem> = d
        .labels()
        .into_iter()
        .flatten()
        .map(|l| {
            let (line, column) = line_col(source, l.offset());
            Problem {
                line,
                column,
                message: message.clone(),
            }
        })
        .take(1)
        .collect();
    if out.is_empty() {
        out.push(Problem {
            line: 1,
            column: 1,
            message: if message.is_empty() {
                fallback
            } else {
                message
            },
        });
    }
    out
}

impl Engine {
    /// An engine with `source` in force as version `version`.
    pub fn new(source: &str, version: u64) -> Result<Self, Vec<Problem>> {
        let (schema, _warnings) = Schema::from_cedarschema_str(SCHEMA)
            .map_err(|e| problems(SCHEMA, &e, "the built-in schema does not parse".into()))?;
        let schema = Arc::new(schema);
        let policies = validate_with(&schema, source)?;
        Ok(Self {
            schema,
            names: Arc::new(Names::new()),
            loaded: Arc::new(RwLock::new(Arc::new(Loaded::new(
                policies, source, version,
            )))),
        })
    }

    /// Parses and validates `source` against the schema: every problem
    /// found, with its line and column.
    pub fn validate(&self, source: &str) -> Result<(), Vec<Problem>> {
        self.parse(source).map(drop)
    }

    pub(super) fn parse(&self, source: &str) -> Result<PolicySet, Vec<Problem>> {
        validate_with(&self.schema, source)
    }

    pub(super) fn install(&self, policies: PolicySet, source: &str, version: u64) {
        *self.loaded.write().expect("policy lock") =
            Arc::new(Loaded::new(policies, source, version));
    }

    /// Puts `source` in force as `version`; the old set stays when it does
    /// not validate.
    pub fn set(&self, source: &str, version: u64) -> Result<(), Vec<Problem>> {
        let policies = self.parse(source)?;
        self.install(policies, source, version);
        Ok(())
    }

    /// The version in force.
    pub fn version(&self) -> u64 {
        self.loaded.read().expect("policy lock").version
    }

    /// The text and version in force.
    pub fn current(&self) -> (String, u64) {
        let l = self.loaded.read().expect("policy lock").clone();
        (l.source.clone(), l.version)
    }

    pub fn decide(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> Verdict {
        let loaded = self.loaded.read().expect("policy lock").clone();
        let deny = |reason: String| Verdict {
            decision: Decision::Deny,
            reason,
            policies: Vec::new(),
            policy_version: loaded.version,
        };
        let request = match self.request(principal, action, resource, facts) {
            Ok(r) => r,
            Err(e) => return deny(format!("the request does not fit the policy schema: {e}")),
        };
        let (request, entities) = request;
        let slice = loaded.slices.slice(action, principal);
        let response = Authorizer::new().is_authorized(&request, &slice, &entities);
        let determining: Vec<&Label> = response
            .diagnostics()
            .reason()
            .filter_map(|id| loaded.labels.get(id))
            .collect();
        let policies: Vec<String> = determining.iter().map(|l| l.name.clone()).collect();
        match response.decision() {
            CedarDecision::Deny if policies.is_empty() => Verdict {
                decision: Decision::Deny,
                reason: format!("no policy permits {}", action.name()),
                policies,
                policy_version: loaded.version,
            },
            CedarDecision::Deny => Verdict {
                decision: Decision::Deny,
                reason: format!("forbidden by {}", policies.join(", ")),
                policies,
                policy_version: loaded.version,
            },
            CedarDecision::Allow => {
                match determining
                    .iter()
                    .find_map(|l| l.approval.as_deref().map(|why| (&l.name, why)))
                {
                    Some((policy, why)) => Verdict {
                        decision: Decision::RequireApproval,
                        reason: format!("{why} (policy {policy})"),
                        policies,
                        policy_version: loaded.version,
                    },
                    None => Verdict {
                        decision: Decision::Allow,
                        reason: format!("permitted by {}", policies.join(", ")),
                        policies,
                        policy_version: loaded.version,
                    },
                }
            }
        }
    }

    /// Cedar's request and entities for one request (built by `Names`).
    fn request(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> anyhow::Result<(Request, Entities)> {
        self.names.request(principal, action, resource, facts)
    }
}

fn validate_with(schema: &Schema, source: &str) -> Result<PolicySet, Vec<Problem>> {
    let policies = PolicySet::from_str(source).map_err(|errs| {
        errs.iter()
            .flat_map(|e| problems(source, e, "the policies do not parse".into()))
            .collect::<Vec<_>>()
    })?;
    let result = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    let errors: Vec<Problem> = result
        .validation_errors()
        .flat_map(|e| problems(source, e, "the policy does not fit the schema".into()))
        .collect();
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;
    use crate::policy::slicing::PINNED;
    use crate::policy::vocabulary::{ResourceKind, DEFAULT_POLICIES};

    /// The example egress allowlist validates with the default set, and
    /// allows exactly what it says: a lookup and an HTTPS connection to a
    /// listed index, for the sandbox's own owner; nothing else, never a
    /// private address, and nothing at all under the default set alone.
    #[test]
    fn the_egress_example_allows_package_indexes_and_nothing_else() {
        const EXAMPLE: &str = include_str!("../../../deploy/policies/egress-package-indexes.cedar");
        let alice = who(Role::Submitter, "alice");
        let connect = |host: &str, port: u64, sni: &str| Facts {
            host: host.into(),
            port,
            scheme: "connect".into(),
            sni: sni.into(),
            address: "151.101.0.223".into(),
            address_class: "public".into(),
            ..Facts::default()
        };
        let resolve = |host: &str| Facts {
            host: host.into(),
            scheme: "dns".into(),
            ..Facts::default()
        };
        let bare = Engine::new(DEFAULT_POLICIES, 1).unwrap();
        let with = Engine::new(&format!("{DEFAULT_POLICIES}\n{EXAMPLE}"), 2).unwrap();
        let decide = |engine: &Engine, action: Action, facts: &Facts, owner: &str| {
            engine
                .decide(&alice, action, &sandbox(owner), facts)
                .decision
        };
        let pypi = connect("pypi.org", 443, "pypi.org");
        assert_eq!(
            decide(&bare, Action::NetworkConnect, &pypi, "alice"),
            Decision::Deny
        );
        assert_eq!(
            decide(&bare, Action::NetworkResolve, &resolve("pypi.org"), "alice"),
            Decision::Deny
        );
        assert_eq!(
            decide(&with, Action::NetworkConnect, &pypi, "alice"),
            Decision::Allow
        );
        assert_eq!(
            decide(&with, Action::NetworkResolve, &resolve("pypi.org"), "alice"),
            Decision::Allow
        );
        for (what, facts, owner) in [
            (
                "another host",
                connect("evil.org", 443, "evil.org"),
                "alice",
            ),
            ("another port", connect("pypi.org", 22, ""), "alice"),
            (
                "another server name",
                connect("pypi.org", 443, "evil.org"),
                "alice",
            ),
            ("another owner's sandbox", pypi.clone(), "bob"),
        ] {
            assert_eq!(
                decide(&with, Action::NetworkConnect, &facts, owner),
                Decision::Deny,
                "{what}"
            );
        }
        assert_eq!(
            decide(&with, Action::NetworkConnectPrivate, &pypi, "alice"),
            Decision::Deny
        );
        assert_eq!(
            decide(&with, Action::NetworkResolve, &resolve("evil.org"), "alice"),
            Decision::Deny
        );
    }

    fn who(role: Role, owner: &str) -> Principal {
        Principal {
            token_id: format!("t-{owner}-{}", role.as_str()),
            name: format!("{owner} {}", role.as_str()),
            role,
            owner: owner.into(),
        }
    }

    fn sandbox(owner: &str) -> Resource {
        Resource {
            kind: ResourceKind::Sandbox,
            id: "sb-1".into(),
            owner: owner.into(),
        }
    }

    fn exec(command: &str) -> Facts {
        Facts {
            argv: command.split(' ').map(str::to_string).collect(),
            command: command.into(),
            ..Facts::default()
        }
    }

    fn path(p: &str) -> Facts {
        Facts {
            path: p.into(),
            ..Facts::default()
        }
    }

    /// The default policies, principal × action × resource attributes.
    #[test]
    fn the_default_policy_matrix() {
        use Decision::*;
        let engine = Engine::new(DEFAULT_POLICIES, 1).unwrap();
        let alice = who(Role::Submitter, "alice");
        let admin = who(Role::Admin, "admin");
        let auditor = who(Role::Auditor, "audit");
        let operator = who(Role::Operator, "ops");
        let approval = Resource {
            kind: ResourceKind::Approval,
            id: "ap-1".into(),
            owner: "alice".into(),
        };
        let cases: Vec<(&str, &Principal, Action, Resource, Facts, Decision)> = vec![
            (
                "own exec",
                &alice,
                Action::Exec,
                sandbox("alice"),
                exec("make test"),
                Allow,
            ),
            (
                "another owner's exec",
                &alice,
                Action::Exec,
                sandbox("bob"),
                exec("ls"),
                Deny,
            ),
            (
                "git push",
                &alice,
                Action::Exec,
                sandbox("alice"),
                exec("git push origin main"),
                RequireApproval,
            ),
            (
                "git push by admin",
                &admin,
                Action::Exec,
                sandbox("alice"),
                exec("git push"),
                Allow,
            ),
            (
                "network",
                &alice,
                Action::Network,
                sandbox("alice"),
                Facts {
                    network: "bridge".into(),
                    ..Facts::default()
                },
                RequireApproval,
            ),
            (
                "network, another owner",
                &alice,
                Action::Network,
                sandbox("bob"),
                Facts::default(),
                Deny,
            ),
            (
                "write a file",
                &alice,
                Action::FileWrite,
                sandbox("alice"),
                path("src/main.rs"),
                Allow,
            ),
            (
                "write a key",
                &alice,
                Action::FileWrite,
                sandbox("alice"),
                path("certs/server.pem"),
                Deny,
            ),
            (
                "write .env",
                &alice,
                Action::FileWrite,
                sandbox("alice"),
                path("app/.env"),
                Deny,
            ),
            (
                "write ssh key",
                &alice,
                Action::FileWrite,
                sandbox("alice"),
                path(".ssh/id_ed25519"),
                Deny,
            ),
            (
                "admin writes a key",
                &admin,
                Action::FileWrite,
                sandbox("alice"),
                path("a.pem"),
                Deny,
            ),
            (
                "read a key",
                &alice,
                Action::FileRead,
                sandbox("alice"),
                path("a.pem"),
                Allow,
            ),
            (
                "auditor execs",
                &auditor,
                Action::Exec,
                sandbox("audit"),
                exec("ls"),
                Deny,
            ),
            (
                "auditor creates",
                &auditor,
                Action::SandboxCreate,
                sandbox("audit"),
                Facts::default(),
                Deny,
            ),
            (
                "submit a run",
                &alice,
                Action::RunSubmit,
                Resource {
                    kind: ResourceKind::Run,
                    id: "run-1".into(),
                    owner: "alice".into(),
                },
                Facts::default(),
                Allow,
            ),
            (
                "operator decides",
                &operator,
                Action::ApprovalDecide,
                approval.clone(),
                Facts::default(),
                Allow,
            ),
            (
                "submitter decides",
                &alice,
                Action::ApprovalDecide,
                approval.clone(),
                Facts::default(),
                Deny,
            ),
            (
                "change policy, submitter",
                &alice,
                Action::PolicyChange,
                Resource {
                    kind: ResourceKind::PolicySet,
                    id: "default".into(),
                    owner: "admin".into(),
                },
                Facts::default(),
                Deny,
            ),
            (
                "change policy, admin",
                &admin,
                Action::PolicyChange,
                Resource {
                    kind: ResourceKind::PolicySet,
                    id: "default".into(),
                    owner: "admin".into(),
                },
                Facts::default(),
                Allow,
            ),
        ];
        for (what, p, action, resource, facts, expected) in cases {
            let v = engine.decide(p, action, &resource, &facts);
            assert_eq!(v.decision, expected, "{what}: {v:?}");
            assert_eq!(v.policy_version, 1);
        }
        let v = engine.decide(&alice, Action::Exec, &sandbox("alice"), &exec("git push"));
        assert!(v.reason.contains("git push publishes code"), "{v:?}");
        assert_eq!(v.policies.len(), 2, "{v:?}");
        let v = engine.decide(&alice, Action::FileWrite, &sandbox("alice"), &path("x.pem"));
        assert!(
            v.reason.contains("no-writes-to-secret-looking-paths"),
            "{v:?}"
        );
    }

    /// Requests are built without the schema at run time (it is costly);
    /// here they are checked against it, for every action and resource kind.
    #[test]
    fn requests_fit_the_schema() {
        let engine = Engine::new(DEFAULT_POLICIES, 1).unwrap();
        let alice = who(Role::Submitter, "alice");
        let facts = Facts {
            labels: vec![("team".into(), "a".into())],
            argv: vec!["ls".into()],
            ..exec("ls")
        };
        let on = |kind| Resource {
            kind,
            id: "x".into(),
            owner: "alice".into(),
        };
        use Action::*;
        for (action, kind) in [
            (SandboxCreate, ResourceKind::Sandbox),
            (Exec, ResourceKind::Sandbox),
            (FileRead, ResourceKind::Sandbox),
            (FileWrite, ResourceKind::Sandbox),
            (FileRemove, ResourceKind::Sandbox),
            (Snapshot, ResourceKind::Sandbox),
            (Network, ResourceKind::Sandbox),
            (RunSubmit, ResourceKind::Run),
            (Exec, ResourceKind::Run),
            (ModelCall, ResourceKind::Run),
            (ToolCall, ResourceKind::Run),
            (ApprovalDecide, ResourceKind::Approval),
            (PolicyChange, ResourceKind::PolicySet),
        ] {
            let (request, entities) = engine.request(&alice, action, &on(kind), &facts).unwrap();
            let (p, a, r) = (
                request.principal().unwrap().clone(),
                request.action().unwrap().clone(),
                request.resource().unwrap().clone(),
            );
            let context = request.context().unwrap().clone();
            Request::new(p, a, r, context, Some(&engine.schema))
                .unwrap_or_else(|e| panic!("{action:?} on {kind:?}: {e}"));
            Entities::from_entities(entities, Some(&engine.schema))
                .unwrap_or_else(|e| panic!("{action:?} on {kind:?}: {e}"));
        }
    }

    /// Leaving out the policies a principal cannot satisfy changes no
    /// decision and no reason: every principal × action × facts of a grid
    /// decided against its slice and against all the policies.
    #[test]
    fn slicing_by_principal_changes_no_decision() {
        let source = format!("{DEFAULT_POLICIES}\n{PINNED}");
        let engine = Engine::new(&source, 1).unwrap();
        let loaded = engine.loaded.read().unwrap().clone();
        let everything = PolicySet::from_str(&source).unwrap();
        let mut principals = Vec::new();
        for owner in ["alice", "bob", "carol", "dave", "erin", "admin"] {
            for role in [Role::Admin, Role::Operator, Role::Submitter, Role::Auditor] {
                principals.push(who(role, owner));
            }
        }
        let facts = [
            exec("make test"),
            exec("git push origin main"),
            exec("rm -rf /"),
            path("certs/server.pem"),
            path("src/main.rs"),
        ];
        let mut sliced_out = 0;
        for p in &principals {
            for action in Action::ALL {
                for resource_owner in ["alice", "bob"] {
                    for f in &facts {
                        let resource = sandbox(resource_owner);
                        let v = engine.decide(p, action, &resource, f);
                        let (request, entities) = engine.request(p, action, &resource, f).unwrap();
                        let all = Authorizer::new().is_authorized(&request, &everything, &entities);
                        let mut reasons: Vec<String> = all
                            .diagnostics()
                            .reason()
                            .map(|id| {
                                let p = everything.policy(id).unwrap();
                                p.annotation("id").unwrap().to_string()
                            })
                            .collect();
                        let mut got = v.policies.clone();
                        reasons.sort();
                        got.sort();
                        let allowed = v.decision != Decision::Deny;
                        assert_eq!(
                            (allowed, got),
                            (all.decision() == CedarDecision::Allow, reasons),
                            "{p:?} {action:?} on {resource_owner}'s sandbox with {f:?}"
                        );
                        sliced_out += loaded.slices.by_action[&action].len()
                            - loaded.slices.slice(action, p).policies().count();
                    }
                }
            }
        }
        assert!(sliced_out > 0, "some policies were left out of some slices");
    }

    #[test]
    fn invalid_policies_are_refused_with_their_line_and_nothing_changes() {
        let engine = Engine::new(DEFAULT_POLICIES, 1).unwrap();
        // A syntax error on line 3.
        let e = engine
            .set(
                "permit (principal, action, resource);\n\npermit (principal action, resource);\n",
                2,
            )
            .unwrap_err();
        assert_eq!(e[0].line, 3, "{e:?}");
        // An attribute the schema does not have, on line 2.
        let e = engine
            .set(
                "permit (principal, action, resource)\nwhen { principal.department == \"x\" };\n",
                2,
            )
            .unwrap_err();
        assert_eq!(e[0].line, 2, "{e:?}");
        assert!(e[0].to_string().starts_with("2:"), "{}", e[0]);
        assert_eq!(engine.current().1, 1, "the set in force did not change");
        // A valid set becomes version 2, and takes effect.
        engine
            .set("forbid (principal, action, resource);\n", 2)
            .unwrap();
        assert_eq!(engine.current().1, 2);
        let d = engine.decide(
            &who(Role::Admin, "admin"),
            Action::Exec,
            &sandbox("admin"),
            &exec("ls"),
        );
        assert_eq!((d.decision, d.policy_version), (Decision::Deny, 2));
    }
}
