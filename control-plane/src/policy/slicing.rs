//! Slicing: of an action's policies, only those the principal can satisfy
//! are evaluated. What each policy pins of the principal (its token, name,
//! role or owner) is read once from its scope and conditions; the set a
//! request is decided against is cached by action and by which of those
//! policies the principal satisfies.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cedar_policy::{EntityUid, PolicySet};

use super::vocabulary::Action;
use crate::auth::Principal;

/// An action, and a bit set on each of its policies the principal can
/// satisfy.
type SliceKey = (Action, Vec<u64>);

/// Distinct slices kept before the cache starts over (each is a handful of
/// `Arc`s per policy; a deployment has one per tenant-and-role mix).
const SLICES_KEPT: usize = 4096;

/// The policies of each action with what each needs of the principal, and
/// the slices made of them so far.
pub(super) struct Slices {
    /// Per action, the policies whose action scope can include it, each
    /// with what it requires of the principal.
    pub(super) by_action: HashMap<Action, Vec<(cedar_policy::Policy, Vec<Requirement>)>>,
    /// The sets a request is evaluated against, by action and by which of
    /// the action's policies the principal can satisfy at all.
    cache: RwLock<HashMap<SliceKey, Arc<PolicySet>>>,
}

impl Slices {
    pub(super) fn new(policies: &PolicySet) -> Self {
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
        Self {
            by_action,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The policies of `action` that `principal` can satisfy: the rest
    /// have a condition that is false for it whatever the request, so
    /// leaving them out changes no decision and saves evaluating them.
    pub(super) fn slice(&self, action: Action, principal: &Principal) -> Arc<PolicySet> {
        let policies = &self.by_action[&action];
        let mut mask = vec![0u64; policies.len().div_ceil(64)];
        for (i, (_, needs)) in policies.iter().enumerate() {
            if needs.iter().all(|r| r.holds_for(principal)) {
                mask[i / 64] |= 1 << (i % 64);
            }
        }
        let key = (action, mask);
        if let Some(slice) = self.cache.read().expect("slice lock").get(&key) {
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
        let mut slices = self.cache.write().expect("slice lock");
        if slices.len() >= SLICES_KEPT {
            slices.clear();
        }
        slices.insert(key, slice.clone());
        slice
    }
}

/// A principal attribute a policy can pin to literals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attr {
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
pub(super) struct Requirement {
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

/// Policies pinning the principal in each way `requirements` reads, and
/// in ways it leaves alone; for the tests here and the engine's.
#[cfg(test)]
pub(super) const PINNED: &str = r#"
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

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

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
}
