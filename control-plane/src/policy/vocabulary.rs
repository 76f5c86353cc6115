//! The words policies are written in: the actions ([`Action`]), what they
//! are about ([`Resource`]), the facts of a request ([`Facts`]), the Cedar
//! schema naming them (`deploy/policies/`), and how one request becomes
//! Cedar's request and entities.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Request, RestrictedExpression,
};

use crate::auth::Principal;

pub const SCHEMA: &str = include_str!("../../../deploy/policies/schema.cedarschema");
pub const DEFAULT_POLICIES: &str = include_str!("../../../deploy/policies/default.cedar");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    SandboxCreate,
    Exec,
    FileRead,
    FileWrite,
    FileRemove,
    Snapshot,
    Network,
    /// One connection out of an `egress` sandbox (docs/network.md).
    NetworkConnect,
    /// A connection whose address is not public (private, loopback,
    /// link-local, metadata): asked on its own, so only a rule naming this
    /// action allows it.
    NetworkConnectPrivate,
    /// A DNS lookup of an `egress` sandbox.
    NetworkResolve,
    RunSubmit,
    ModelCall,
    ToolCall,
    ApprovalDecide,
    PolicyChange,
}

impl Action {
    pub const ALL: [Action; 15] = [
        Action::SandboxCreate,
        Action::Exec,
        Action::FileRead,
        Action::FileWrite,
        Action::FileRemove,
        Action::Snapshot,
        Action::Network,
        Action::NetworkConnect,
        Action::NetworkConnectPrivate,
        Action::NetworkResolve,
        Action::RunSubmit,
        Action::ModelCall,
        Action::ToolCall,
        Action::ApprovalDecide,
        Action::PolicyChange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::SandboxCreate => "sandbox.create",
            Action::Exec => "exec",
            Action::FileRead => "file.read",
            Action::FileWrite => "file.write",
            Action::FileRemove => "file.remove",
            Action::Snapshot => "snapshot",
            Action::Network => "network",
            Action::NetworkConnect => "network.connect",
            Action::NetworkConnectPrivate => "network.connect_private",
            Action::NetworkResolve => "network.resolve",
            Action::RunSubmit => "run.submit",
            Action::ModelCall => "model.call",
            Action::ToolCall => "tool.call",
            Action::ApprovalDecide => "approval.decide",
            Action::PolicyChange => "policy.change",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Sandbox,
    Run,
    Approval,
    PolicySet,
}

impl ResourceKind {
    fn type_name(self) -> &'static str {
        match self {
            ResourceKind::Sandbox => "Bridle::Sandbox",
            ResourceKind::Run => "Bridle::Run",
            ResourceKind::Approval => "Bridle::Approval",
            ResourceKind::PolicySet => "Bridle::PolicySet",
        }
    }
}

/// What an action is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    pub kind: ResourceKind,
    pub id: String,
    pub owner: String,
}

/// The facts of one request (Cedar's context); what does not apply stays
/// empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub image: String,
    pub argv: Vec<String>,
    /// The command as one line: the shell string, or argv joined by spaces.
    pub command: String,
    pub path: String,
    pub network: String,
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    pub pids: u64,
    pub run_id: String,
    pub labels: Vec<(String, String)>,
    /// `tool.call`: the tool's name and its arguments as JSON text.
    pub tool: String,
    pub arguments: String,
    /// `model.call`: the `[[model]]` name and its provider.
    pub model: String,
    pub provider: String,
    /// `network.connect*` and `network.resolve`: where a connection goes
    /// (the name asked for, lower case), its port (0 for a lookup), how
    /// (`http`, `connect`, `dns`), the TLS server name it then asked for,
    /// the address the name resolved to, and that address's class
    /// (`public`, `private`, `loopback`, `link_local`, `metadata`,
    /// `unroutable`).
    pub host: String,
    pub port: u64,
    pub scheme: String,
    pub sni: String,
    pub address: String,
    pub address_class: String,
}

/// The entity type names a request uses, parsed once: parsing a name runs
/// Cedar's parser, which costs more than deciding against a few policies.
pub(super) struct Names {
    token: EntityTypeName,
    action: EntityTypeName,
    sandbox: EntityTypeName,
    run: EntityTypeName,
    approval: EntityTypeName,
    policy_set: EntityTypeName,
}

impl Names {
    pub(super) fn new() -> Self {
        let name = |n: &str| EntityTypeName::from_str(n).expect("a valid entity type name");
        Self {
            token: name("Bridle::Token"),
            action: name("Bridle::Action"),
            sandbox: name(ResourceKind::Sandbox.type_name()),
            run: name(ResourceKind::Run.type_name()),
            approval: name(ResourceKind::Approval.type_name()),
            policy_set: name(ResourceKind::PolicySet.type_name()),
        }
    }

    fn of(&self, kind: ResourceKind) -> &EntityTypeName {
        match kind {
            ResourceKind::Sandbox => &self.sandbox,
            ResourceKind::Run => &self.run,
            ResourceKind::Approval => &self.approval,
            ResourceKind::PolicySet => &self.policy_set,
        }
    }

    /// Cedar's request and entities for one request.
    pub(super) fn request(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        facts: &Facts,
    ) -> anyhow::Result<(Request, Entities)> {
        let uid = |ty: &EntityTypeName, id: &str| {
            EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
        };
        let s = RestrictedExpression::new_string;
        let p = uid(&self.token, &principal.token_id);
        let r = uid(self.of(resource.kind), &resource.id);
        let a = uid(&self.action, action.name());
        let principal_entity = Entity::new(
            p.clone(),
            HashMap::from([
                ("name".to_string(), s(principal.name.clone())),
                ("role".to_string(), s(principal.role.as_str().to_string())),
                ("owner".to_string(), s(principal.owner.clone())),
            ]),
            HashSet::new(),
        )?;
        let resource_entity = Entity::new(
            r.clone(),
            HashMap::from([("owner".to_string(), s(resource.owner.clone()))]),
            HashSet::new(),
        )?;
        // Without the schema: with it, Cedar would check these two against
        // it and add an entity for every action, on each request.
        // `requests_fit_the_schema` checks what is built here against it.
        let entities = Entities::from_entities([principal_entity, resource_entity], None)?;
        let long = |n: u64| RestrictedExpression::new_long(n.min(i64::MAX as u64) as i64);
        let context = Context::from_pairs(
            [
                ("image", s(facts.image.clone())),
                (
                    "argv",
                    RestrictedExpression::new_set(facts.argv.iter().cloned().map(s)),
                ),
                ("command", s(facts.command.clone())),
                ("path", s(facts.path.clone())),
                ("network", s(facts.network.clone())),
                ("memory_bytes", long(facts.memory_bytes)),
                ("cpu_millis", long(facts.cpu_millis)),
                ("pids", long(facts.pids)),
                ("run_id", s(facts.run_id.clone())),
                ("tool", s(facts.tool.clone())),
                ("arguments", s(facts.arguments.clone())),
                ("model", s(facts.model.clone())),
                ("provider", s(facts.provider.clone())),
                ("host", s(facts.host.clone())),
                ("port", long(facts.port)),
                ("scheme", s(facts.scheme.clone())),
                ("sni", s(facts.sni.clone())),
                ("address", s(facts.address.clone())),
                ("address_class", s(facts.address_class.clone())),
                (
                    "labels",
                    RestrictedExpression::new_set(
                        facts.labels.iter().map(|(k, v)| s(format!("{k}={v}"))),
                    ),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        )?;
        let request = Request::new(p, a, r, context, None)?;
        Ok((request, entities))
    }
}
