//! Policy: every action a principal asks for is a Cedar request checked
//! against the policy set in force. The outcome is `deny` (a `forbid`
//! matches, or no `permit` does), `require_approval` (a matching `permit`
//! carries `@approval("why")`), or `allow`. The schema and the default
//! policies live in `deploy/policies/`; the set in force is versioned, and
//! the version goes with every decision.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, RwLock};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use crate::auth::Principal;

pub const SCHEMA: &str = include_str!("../../deploy/policies/schema.cedarschema");
pub const DEFAULT_POLICIES: &str = include_str!("../../deploy/policies/default.cedar");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    SandboxCreate,
    Exec,
    FileRead,
    FileWrite,
    FileRemove,
    Snapshot,
    Network,
    RunSubmit,
    ModelCall,
    ToolCall,
    ApprovalDecide,
    PolicyChange,
}

impl Action {
    pub const ALL: [Action; 12] = [
        Action::SandboxCreate,
        Action::Exec,
        Action::FileRead,
        Action::FileWrite,
        Action::FileRemove,
        Action::Snapshot,
        Action::Network,
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
}

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
    /// Per action, the policies whose action scope can include it, each
    /// with what it requires of the principal.
    by_action: HashMap<Action, Vec<(cedar_policy::Policy, Vec<Requirement>)>>,
    /// The sets a request is evaluated against, by action and by which of
    /// the action's policies the principal can satisfy at all.
    slices: RwLock<HashMap<SliceKey, Arc<PolicySet>>>,
    source: String,
    version: u64,
}

/// How a policy is named in a verdict, and why it asks for approval.
struct Label {
    /// Its `@id`, else Cedar's id.
    name: String,
    approval: Option<String>,
}

/// An action, and a bit set on each of its policies the principal can
/// satisfy.
type SliceKey = (Action, Vec<u64>);

/// Distinct slices kept before the cache starts over (each is a handful of
/// `Arc`s per policy; a deployment has one per tenant-and-role mix).
const SLICES_KEPT: usize = 4096;

impl Loaded {
    fn new(policies: PolicySet, source: &str, version: u64) -> Self {
        let by_action = Action::ALL
            .into_iter()
            .map(|action| {
                let policies = policies
                    .policies()
                    .filter(|p| may_apply(p, action))
                    .map(|p| (p.clone(), requirements(p)))
                    .collect();
                (action, policies)
            })
            .collect();
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
            by_action,
            slices: RwLock::new(HashMap::new()),
            source: source.to_string(),
            version,
        }
    }

    /// The policies of `action` that `principal` can satisfy: the rest
    /// have a condition that is false for it whatever the request, so
    /// leaving them out changes no decision and saves evaluating them.
    fn slice(&self, action: Action, principal: &Principal) -> Arc<PolicySet> {
        let policies = &self.by_action[&action];
        let mut mask = vec![0u64; policies.len().div_ceil(64)];
        for (i, (_, needs)) in policies.iter().enumerate() {
            if needs.iter().all(|r| r.holds_for(principal)) {
                mask[i / 64] |= 1 << (i % 64);
            }
        }
        let key = (action, mask);
        if let Some(slice) = self.slices.read().expect("slice lock").get(&key) {
            return slice.clone();
        }
        let mut slice = PolicySet::new();
        for (i, (p, _)) in policies.iter().enumerate() {
            if key.1[i / 64] & (1 << (i % 64)) != 0 {
                slice
                    .add(p.clone())
                    .expect("ids are unique in the whole set");
            }
        }
        let slice = Arc::new(slice);
        let mut slices = self.slices.write().expect("slice lock");
        if slices.len() >= SLICES_KEPT {
            slices.clear();
        }
        slices.insert(key, slice.clone());
        slice
    }
}

/// A principal attribute a policy can pin to literals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attr {
    TokenId,
    Name,
    Role,
    Owner,
}

impl Attr {
    fn named(name: &str) -> Option<Self> {
        match name {
            "name" => Some(Attr::Name),
            "role" => Some(Attr::Role),
            "owner" => Some(Attr::Owner),
            _ => None,
        }
    }

    fn of(self, p: &Principal) -> &str {
        match self {
            Attr::TokenId => &p.token_id,
            Attr::Name => &p.name,
            Attr::Role => p.role.as_str(),
            Attr::Owner => &p.owner,
        }
    }
}

/// Something a policy's condition needs of the principal: the attribute is
/// one of `values` (`equal`), or none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    attr: Attr,
    values: Vec<String>,
    equal: bool,
}

impl Requirement {
    fn holds_for(&self, p: &Principal) -> bool {
        let v = self.attr.of(p);
        self.values.iter().any(|x| x == v) == self.equal
    }
}

/// What `p` needs of the principal for its condition to be true: a
/// `principal == Bridle::Token::"…"` scope, and each conjunct at the top of
/// a `when` clause of the form `principal.a == "v"`, `principal.a != "v"`,
/// or `principal.a == "v" || principal.a == "w" …`. Anything else needs
/// nothing (the policy is always evaluated).
fn requirements(p: &cedar_policy::Policy) -> Vec<Requirement> {
    let Ok(json) = p.to_json() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let scope = &json["principal"];
    if scope["op"] == "==" && scope["entity"]["type"] == "Bridle::Token" {
        if let Some(id) = scope["entity"]["id"].as_str() {
            out.push(Requirement {
                attr: Attr::TokenId,
                values: vec![id.to_string()],
                equal: true,
            });
        }
    }
    for clause in json["conditions"].as_array().into_iter().flatten() {
        if clause["kind"] == "when" {
            conjuncts(&clause["body"], &mut out);
        }
    }
    out
}

fn conjuncts(e: &serde_json::Value, out: &mut Vec<Requirement>) {
    if let Some(and) = e.get("&&") {
        conjuncts(&and["left"], out);
        conjuncts(&and["right"], out);
    } else if let Some(r) = comparison(e) {
        out.push(r);
    }
}

fn comparison(e: &serde_json::Value) -> Option<Requirement> {
    if let Some(or) = e.get("||") {
        let (mut l, r) = (comparison(&or["left"])?, comparison(&or["right"])?);
        if l.attr != r.attr || !l.equal || !r.equal {
            return None;
        }
        l.values.extend(r.values);
        return Some(l);
    }
    let (cmp, equal) = match (e.get("=="), e.get("!=")) {
        (Some(cmp), _) => (cmp, true),
        (_, Some(cmp)) => (cmp, false),
        _ => return None,
    };
    let pinned = |attr: &serde_json::Value, literal: &serde_json::Value| {
        let dot = attr.get(".")?;
        if dot["left"]["Var"] != "principal" {
            return None;
        }
        Some(Requirement {
            attr: Attr::named(dot["attr"].as_str()?)?,
            values: vec![literal.get("Value")?.as_str()?.to_string()],
            equal,
        })
    };
    pinned(&cmp["left"], &cmp["right"]).or_else(|| pinned(&cmp["right"], &cmp["left"]))
}

/// Whether `p`'s action scope can match `action`. A scope naming something
/// that is not one of our actions (an action group, should the schema grow
/// some) is kept for every action.
fn may_apply(p: &cedar_policy::Policy, action: Action) -> bool {
    let names = |uid: &EntityUid| {
        let id: &str = uid.id().as_ref();
        id == action.name() || !Action::ALL.iter().any(|a| a.name() == id)
    };
    match p.action_constraint() {
        cedar_policy::ActionConstraint::Any => true,
        cedar_policy::ActionConstraint::Eq(uid) => names(&uid),
        cedar_policy::ActionConstraint::In(uids) => uids.iter().any(names),
    }
}

/// The policies in force; replaced whole, atomically, by [`Engine::set`].
#[derive(Clone)]
pub struct Engine {
    schema: Arc<Schema>,
    names: Arc<Names>,
    loaded: Arc<RwLock<Arc<Loaded>>>,
}

/// The entity type names a request uses, parsed once: parsing a name runs
/// Cedar's parser, which costs more than deciding against a few policies.
struct Names {
    token: EntityTypeName,
    action: EntityTypeName,
    sandbox: EntityTypeName,
    run: EntityTypeName,
    approval: EntityTypeName,
    policy_set: EntityTypeName,
}

impl Names {
    fn new() -> Self {
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

    fn parse(&self, source: &str) -> Result<PolicySet, Vec<Problem>> {
        validate_with(&self.schema, source)
    }

    fn install(&self, policies: PolicySet, source: &str, version: u64) {
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
        let slice = loaded.slice(action, principal);
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

    fn request(
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
        let p = uid(&self.names.token, &principal.token_id);
        let r = uid(self.names.of(resource.kind), &resource.id);
        let a = uid(&self.names.action, action.name());
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

/// One stored version of the policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub version: u64,
    pub source: String,
    pub set_by: String,
    pub set_unix_ms: i64,
}

/// The policy versions in the store: every set ever in force, the highest
/// version in force.
#[derive(Clone)]
pub struct PolicyStore {
    pool: sqlx::SqlitePool,
}

impl PolicyStore {
    pub fn new(pool: sqlx::SqlitePool) -> Self {
        Self { pool }
    }

    /// Stores the built-in default as version 1 when nothing is stored yet
    /// (the first start).
    pub async fn seed_default(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO policies (version, source, set_by, set_unix_ms) \
             SELECT 1, $1, 'default', $2 WHERE NOT EXISTS (SELECT 1 FROM policies)",
        )
        .bind(DEFAULT_POLICIES)
        .bind(crate::clock::now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The set in force.
    pub async fn current(&self) -> Result<Stored, sqlx::Error> {
        let (version, source, set_by, set_unix_ms): (i64, String, String, i64) = sqlx::query_as(
            "SELECT version, source, set_by, set_unix_ms FROM policies ORDER BY version DESC LIMIT 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Stored {
            version: version as u64,
            source,
            set_by,
            set_unix_ms,
        })
    }

    /// Stores `version`; false when that version exists already (another
    /// change got there first).
    pub async fn put(&self, s: &Stored) -> Result<bool, sqlx::Error> {
        let r = sqlx::query(
            "INSERT INTO policies (version, source, set_by, set_unix_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (version) DO NOTHING",
        )
        .bind(s.version as i64)
        .bind(&s.source)
        .bind(&s.set_by)
        .bind(s.set_unix_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected() == 1)
    }
}

/// Why a policy change was not made.
#[derive(Debug)]
pub enum Refusal {
    Invalid(Vec<Problem>),
    /// `expected_version` is not the version in force.
    Changed {
        in_force: u64,
        expected: u64,
    },
    /// Another change was stored at the same time.
    Race,
    Store(sqlx::Error),
}

/// The engine and the stored versions, changed together.
#[derive(Clone)]
pub struct Policies {
    pub engine: Engine,
    pub store: PolicyStore,
    change: Arc<tokio::sync::Mutex<()>>,
}

impl Policies {
    /// Loads the version in force from the store (the default set on first
    /// start).
    pub async fn load(pool: sqlx::SqlitePool) -> anyhow::Result<Self> {
        let store = PolicyStore::new(pool);
        store.seed_default().await?;
        let in_force = store.current().await?;
        let engine = Engine::new(&in_force.source, in_force.version).map_err(|problems| {
            anyhow::anyhow!(
                "the stored policy set (version {}) does not load: {}",
                in_force.version,
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
        Ok(Self {
            engine,
            store,
            change: Arc::default(),
        })
    }

    /// Validates `source`, stores it as the next version and puts it in
    /// force. `expected_version` 0 accepts whatever is in force.
    pub async fn change(
        &self,
        source: &str,
        set_by: &str,
        expected_version: u64,
    ) -> Result<Stored, Refusal> {
        let policies = self.engine.parse(source).map_err(Refusal::Invalid)?;
        let _one_at_a_time = self.change.lock().await;
        let current = self.store.current().await.map_err(Refusal::Store)?;
        if expected_version != 0 && expected_version != current.version {
            return Err(Refusal::Changed {
                in_force: current.version,
                expected: expected_version,
            });
        }
        let next = Stored {
            version: current.version + 1,
            source: source.to_string(),
            set_by: set_by.to_string(),
            set_unix_ms: crate::clock::now_ms(),
        };
        if !self.store.put(&next).await.map_err(Refusal::Store)? {
            return Err(Refusal::Race);
        }
        self.engine.install(policies, &next.source, next.version);
        tracing::info!(version = next.version, by = %set_by, "policy set changed");
        Ok(next)
    }

    /// Keeps `path` in force: at once, then whenever its content changes.
    pub async fn follow_file(
        self,
        path: std::path::PathBuf,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let by = format!("file:{}", path.display());
        let mut seen: Option<String> = None;
        loop {
            match std::fs::read_to_string(&path) {
                Ok(text) if seen.as_deref() != Some(text.as_str()) => {
                    let (in_force, _) = self.engine.current();
                    if in_force != text {
                        match self.change(&text, &by, 0).await {
                            Ok(_) => {}
                            Err(Refusal::Invalid(problems)) => {
                                for p in problems {
                                    tracing::error!(
                                        "{}:{p}: policy file not put in force",
                                        path.display()
                                    );
                                }
                            }
                            Err(e) => tracing::error!(
                                "{}: policy file not put in force: {e:?}",
                                path.display()
                            ),
                        }
                    }
                    seen = Some(text);
                }
                Ok(_) => {}
                Err(e) => {
                    if seen.is_some() {
                        tracing::warn!("{}: {e}; the policy set in force stays", path.display());
                    }
                    seen = None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

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

    const PINNED: &str = r#"
@id("by-token")
permit (principal == Bridle::Token::"t-bob-submitter", action, resource);
@id("by-role-either-order")
permit (principal, action == Bridle::Action::"exec", resource)
when { "operator" == principal.role && resource.owner == principal.owner };
@id("by-roles")
permit (principal, action, resource)
when { (principal.role == "submitter" || principal.role == "auditor") && principal.owner == "alice" };
@id("not-admin")
forbid (principal, action == Bridle::Action::"file.write", resource)
when { principal.role != "admin" && context.path like "*.pem" };
@id("unless-is-not-read")
permit (principal, action == Bridle::Action::"snapshot", resource)
unless { principal.owner == "carol" };
@id("negated-is-not-read")
permit (principal, action == Bridle::Action::"network", resource)
when { !(principal.owner == "carol") };
@id("mixed-or-is-not-read")
forbid (principal, action == Bridle::Action::"exec", resource)
when { principal.owner == "dave" || context.command like "*rm -rf*" };
@id("by-name")
permit (principal, action == Bridle::Action::"file.read", resource)
when { principal.name == "erin submitter" };
"#;

    #[test]
    fn what_policies_pin_of_the_principal_is_read_from_their_conditions() {
        let set = PolicySet::from_str(PINNED).unwrap();
        let needs = |id: &str| {
            let p = set
                .policies()
                .find(|p| p.annotation("id") == Some(id))
                .unwrap();
            requirements(p)
        };
        let r = |attr, values: &[&str], equal| Requirement {
            attr,
            values: values.iter().map(|v| v.to_string()).collect(),
            equal,
        };
        assert_eq!(
            needs("by-token"),
            [r(Attr::TokenId, &["t-bob-submitter"], true)]
        );
        assert_eq!(
            needs("by-role-either-order"),
            [r(Attr::Role, &["operator"], true)]
        );
        assert_eq!(
            needs("by-roles"),
            [
                r(Attr::Role, &["submitter", "auditor"], true),
                r(Attr::Owner, &["alice"], true)
            ]
        );
        assert_eq!(needs("not-admin"), [r(Attr::Role, &["admin"], false)]);
        assert_eq!(needs("unless-is-not-read"), []);
        assert_eq!(needs("negated-is-not-read"), []);
        assert_eq!(needs("mixed-or-is-not-read"), []);
        assert_eq!(needs("by-name"), [r(Attr::Name, &["erin submitter"], true)]);
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
                        sliced_out += loaded.by_action[&action].len()
                            - loaded.slice(action, p).policies().count();
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
