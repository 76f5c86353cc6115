//! Egress end to end (first slice): an `egress` sandbox has no network but
//! its loopback relay; what it reaches through the proxy is decided by
//! policy on each connection, made from the host, and on the audit log.
//! The upstream is a test server in a container on a Docker network the
//! test makes, standing in for the internet (`egress.treat_as_public` names
//! its subnet, `egress.hosts` its names): no outside address is ever used.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use bridle_proto::control::v1 as pb;
use bridle_tests::client::shell;
use bridle_tests::control::{cli, exec, put_file, ControlPlane};
use bridle_tests::docker::require_docker;
use bridle_tests::upstream::{Upstream, TLS_NAME, UPSTREAM_AUTH};
use bridle_tests::{bounded, eventually, PATIENCE};

macro_rules! needs_docker {
    () => {
        require_docker(module_path!())
    };
}

/// What the test's policy adds to the defaults: connections to
/// `allowed.test`, nothing else.
const ALLOW: &str = r#"
@id("test-egress-resolve")
permit (principal, action == Bridle::Action::"network.resolve", resource)
when { resource.owner == principal.owner && context.host like "*.test" };

@id("test-egress-allowed")
permit (principal, action == Bridle::Action::"network.connect", resource)
when {
  resource.owner == principal.owner &&
  (context.host == "allowed.test" || context.host == "secure.test")
};

@id("test-egress-held")
@approval("a person looks at new hosts first")
permit (principal, action == Bridle::Action::"network.connect", resource)
when { resource.owner == principal.owner && context.host == "held.test" };
"#;

/// Puts the default policy and [`ALLOW`] in force.
async fn allow_test_hosts(cp: &ControlPlane) {
    let defaults =
        std::fs::read_to_string(bridle_tests::repo_root().join("deploy/policies/default.cedar"))
            .unwrap();
    let mut admin = cp.admin(&cp.admin_token).await.unwrap();
    bounded(
        "Admin/SetPolicy",
        admin.set_policy(pb::SetPolicyRequest {
            source: format!("{defaults}\n{ALLOW}"),
            expected_version: 0,
        }),
    )
    .await
    .unwrap();
}

/// A new `egress` sandbox.
async fn egress_sandbox(sandboxes: &mut bridle_tests::control::Sandboxes) -> pb::Sandbox {
    bounded(
        "Sandboxes/Create",
        sandboxes.create(pb::CreateSandboxRequest {
            network: pb::NetworkMode::Egress as i32,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

/// The peer that runs in the sandbox (an HTTPS client, a flood, a
/// slowloris).
fn peer() -> Vec<u8> {
    std::fs::read(bridle_tests::workspace_binary("bridle-tests", "egress-peer").unwrap()).unwrap()
}

#[tokio::test]
async fn an_egress_sandbox_reaches_what_policy_allows_and_nothing_else() {
    needs_docker!();
    let upstream = Upstream::start().unwrap();
    let port = 8080;
    let public = format!("egress.treat_as_public=[{:?}]", upstream.subnet);
    let hosts = format!(
        r#"egress.hosts={{ "allowed.test" = {ip:?}, "evil.test" = {ip:?}, "held.test" = {ip:?}, "internal.test" = "10.0.0.5", {TLS_NAME:?} = {tls:?} }}"#,
        ip = upstream.web_ip,
        tls = upstream.tls_ip,
    );
    let secrets = tempfile::tempdir().unwrap();
    let auth_file = secrets.path().join("upstream-auth");
    std::fs::write(&auth_file, format!("{UPSTREAM_AUTH}\n")).unwrap();
    let credentials = format!(
        r#"egress.credentials=[{{ host = "allowed.test", port = 8080, header = "Authorization", value_file = {:?} }}]"#,
        auth_file.display().to_string()
    );
    let cp = ControlPlane::start(&[&public, &hosts, &credentials])
        .await
        .unwrap();
    allow_test_hosts(&cp).await;
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let mut sandboxes = cp.sandboxes(&alice).await.unwrap();
    let sb = egress_sandbox(&mut sandboxes).await;
    assert_eq!(sb.network, pb::NetworkMode::Egress as i32);

    // An allowed host, through the proxy the environment names. The
    // relay is followed within a second of the sandbox being up.
    let url = format!("http://allowed.test:{port}/simple/");
    let mut fetched = None;
    eventually("the allowed host through the proxy", PATIENCE, async || {
        let r = exec(&mut sandboxes, &sb.id, shell(&format!("wget -q -O- {url}")))
            .await
            .unwrap();
        let ok = r.code() == Some(0);
        fetched = Some(r);
        ok
    })
    .await;
    assert_eq!(fetched.unwrap().stdout_str(), "hello from upstream\n");

    // HTTPS as a package manager does it: an ordinary client taking the
    // proxy from the environment, a CONNECT, the TLS server name read by
    // the proxy and matching the host, the server's certificate checked
    // end to end (the proxy never sees inside).
    put_file(&mut sandboxes, &sb.id, "peer", 0o755, &peer())
        .await
        .unwrap();
    put_file(
        &mut sandboxes,
        &sb.id,
        "upstream-ca.crt",
        0o644,
        upstream.ca_pem.as_bytes(),
    )
    .await
    .unwrap();
    let https = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!(
            "./peer fetch https://{TLS_NAME}/simple/ upstream-ca.crt"
        )),
    )
    .await
    .unwrap();
    assert_eq!(https.stdout_str(), "hello over tls\n", "{https:?}");
    // Without the CA the client refuses the server: nothing in between
    // could have answered for it.
    let untrusted = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!("./peer fetch https://{TLS_NAME}/simple/")),
    )
    .await
    .unwrap();
    assert_ne!(untrusted.code(), Some(0), "{untrusted:?}");

    // The private page needs the upstream's credential, which the proxy
    // adds: the sandbox uses it without ever holding it.
    let private = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!("wget -q -O- http://allowed.test:{port}/private/")),
    )
    .await
    .unwrap();
    assert_eq!(private.stdout_str(), "the private page\n", "{private:?}");
    let looked = exec(
        &mut sandboxes,
        &sb.id,
        shell("env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline; ls -la /workspace /tmp /run/bridle; true"),
    )
    .await
    .unwrap();
    let seen = format!("{}{}", looked.stdout_str(), looked.stderr_str());
    assert!(
        !seen.contains("YWxpY2U6") && !seen.contains("s3cret"),
        "{seen}"
    );

    // The sandbox's resolver: names policy lets be resolved are answered
    // (what the host resolves), others are NXDOMAIN, data-shaped labels
    // are refused, and an outside resolver is unreachable.
    let found = exec(&mut sandboxes, &sb.id, shell("nslookup allowed.test"))
        .await
        .unwrap();
    assert_eq!(found.code(), Some(0), "{found:?}");
    assert!(found.stdout_str().contains(&upstream.web_ip), "{found:?}");
    for name in [
        "nope.example",
        "mzxw6ytboi4dgnzzhe2tkmbtgq4dsmrzgiztcnzr.allowed.test",
    ] {
        let refused = exec(
            &mut sandboxes,
            &sb.id,
            shell(&format!("nslookup {name} 2>&1")),
        )
        .await
        .unwrap();
        let out = refused.stdout_str();
        assert!(
            out.contains("NXDOMAIN") && !out.contains(&upstream.web_ip),
            "{name}: {out}"
        );
    }
    let outside = exec(
        &mut sandboxes,
        &sb.id,
        shell("timeout 5 nslookup allowed.test 8.8.8.8 2>&1; echo exit=$?"),
    )
    .await
    .unwrap();
    assert!(!outside.stdout_str().contains("exit=0"), "{outside:?}");
    assert!(
        !outside.stdout_str().contains(&upstream.web_ip),
        "{outside:?}"
    );

    // A host held for approval waits for an operator (never the sandbox's
    // owner), who lets it through and remembers it: the next connection
    // to that host goes ahead without asking again.
    let ops = cp.token(pb::Role::Operator, "ops").await.unwrap();
    let mut approvals = cp.approvals(&ops).await.unwrap();
    let held_url = format!("http://held.test:{port}/simple/");
    let waiting = {
        let mut sandboxes = cp.sandboxes(&alice).await.unwrap();
        let (id, url) = (sb.id.clone(), held_url.clone());
        tokio::spawn(async move {
            exec(&mut sandboxes, &id, shell(&format!("wget -q -O- {url}")))
                .await
                .unwrap()
        })
    };
    let pending = bridle_tests::until(
        "the held connection's approval",
        async || {
            bounded(
                "Approvals/List",
                approvals.list(pb::ListApprovalsRequest {
                    states: vec![pb::ApprovalState::Pending as i32],
                    ..Default::default()
                }),
            )
            .await
            .unwrap()
            .into_inner()
            .approvals
        },
        |pending| !pending.is_empty(),
    )
    .await;
    let held = &pending[0];
    assert_eq!(held.scope, format!("network.connect http held.test:{port}"));
    let mut own = cp.approvals(&alice).await.unwrap();
    let refused = bounded(
        "Approvals/Decide",
        own.decide(pb::DecideApprovalRequest {
            approval_id: held.id.clone(),
            approve: true,
            reason: "my own sandbox".into(),
            remember: false,
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let out = cli(
        &cp,
        &ops,
        &[
            "approvals",
            "approve",
            &held.id,
            "--reason",
            "our mirror",
            "--remember",
        ],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let waited = waiting.await.unwrap();
    assert_eq!(waited.stdout_str(), "hello from upstream\n", "{waited:?}");
    let again = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!("wget -q -O- {held_url}")),
    )
    .await
    .unwrap();
    assert_eq!(again.stdout_str(), "hello from upstream\n", "{again:?}");
    let all = bounded(
        "Approvals/List",
        approvals.list(pb::ListApprovalsRequest::default()),
    )
    .await
    .unwrap()
    .into_inner()
    .approvals;
    assert_eq!(
        all.len(),
        1,
        "the remembered approval covered the second: {all:?}"
    );

    // A host policy does not allow: refused with a 403 naming the policy.
    let denied = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!("wget -O- http://evil.test:{port}/ 2>&1")),
    )
    .await
    .unwrap();
    assert_ne!(denied.code(), Some(0));
    assert!(
        denied.stdout_str().contains("403"),
        "{}",
        denied.stdout_str()
    );

    // Private addresses are their own action, which no rule here allows:
    // the metadata service, and a name that resolves into a private range.
    for url in [
        "http://169.254.169.254/latest/meta-data/",
        "http://internal.test/",
    ] {
        let refused = exec(
            &mut sandboxes,
            &sb.id,
            shell(&format!("wget -O- {url} 2>&1")),
        )
        .await
        .unwrap();
        assert_ne!(refused.code(), Some(0), "{url}");
        assert!(
            refused.stdout_str().contains("403"),
            "{url}: {}",
            refused.stdout_str()
        );
    }

    // Around the proxy there is nothing: no interface but loopback.
    let direct = exec(
        &mut sandboxes,
        &sb.id,
        shell("nc -w 2 1.1.1.1 53 </dev/null; echo exit=$?; cat /proc/net/dev"),
    )
    .await
    .unwrap();
    let out = direct.stdout_str();
    assert!(!out.contains("exit=0"), "{out}");
    assert!(!out.contains("eth0"), "{out}");
    // The proxy's settings are in the environment, the control plane's
    // address and key are not.
    let env = exec(&mut sandboxes, &sb.id, shell("env")).await.unwrap();
    let env = env.stdout_str();
    assert!(env.contains("HTTPS_PROXY=http://127.0.0.1:3128"), "{env}");
    assert!(!env.contains("BRIDLE_AGENT"), "{env}");

    // Each decision, and each connection's end, is on the audit log.
    let auditor = cp.token(pb::Role::Auditor, "audit").await.unwrap();
    eventually("the egress audit entries", PATIENCE, async || {
        let out = cli(
            &cp,
            &auditor,
            &["audit", "query", "--action", "egress/", "-o", "json"],
        )
        .await;
        let entries: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        let has = |action: &str, decision: &str, text: &str| {
            entries.iter().any(|e| {
                e["action"] == action
                    && e["decision"] == decision
                    && e["outcome"].as_str().unwrap_or_default().contains(text)
            })
        };
        has("egress/network.connect", "allow", "allowed.test")
            && has("egress/network.connect", "deny", "evil.test")
            && has("egress/network.connect_private", "deny", "169.254.169.254")
            && has("egress/network.connect_private", "deny", "internal.test")
            && has("egress/connection", "allow", "bytes out")
            && has("egress/connection", "allow", "connect secure.test:443")
            && has(
                "egress/connection",
                "allow",
                "credential Authorization added",
            )
            && has("egress/connection", "require_approval", "(remembered)")
            && has(
                "egress/dns",
                "allow",
                &format!("A allowed.test: NOERROR {}", upstream.web_ip),
            )
            && has("egress/dns", "deny", "nope.example: NXDOMAIN")
            && has("egress/dns", "", "NXDOMAIN (the name is refused")
    })
    .await;
    // The credential's value is never on the record.
    let everything = cli(&cp, &auditor, &["audit", "query", "-o", "json"]).await;
    assert!(everything.status.success());
    let everything = String::from_utf8_lossy(&everything.stdout);
    assert!(
        !everything.contains("YWxpY2U6"),
        "the credential is on the record"
    );
    // The same, by sandbox.
    let log = cli(&cp, &auditor, &["sandbox", "net-log", &sb.id]).await;
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("allowed.test") && log.contains("evil.test"),
        "{log}"
    );
}

/// A thousand connections at once from one sandbox are all served (at most
/// 64 carried at a time, the rest waiting in its agent), a client that
/// trickles its request head is dropped, and meanwhile the proxy serves
/// the sandbox's other requests.
#[tokio::test]
async fn the_proxy_serves_a_thousand_connections_at_once_and_drops_a_slowloris() {
    needs_docker!();
    let upstream = Upstream::start().unwrap();
    let public = format!("egress.treat_as_public=[{:?}]", upstream.subnet);
    let hosts = format!(
        r#"egress.hosts={{ "allowed.test" = {:?} }}"#,
        upstream.web_ip
    );
    let cp = ControlPlane::start(&[&public, &hosts]).await.unwrap();
    allow_test_hosts(&cp).await;
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let mut sandboxes = cp.sandboxes(&alice).await.unwrap();
    let sb = egress_sandbox(&mut sandboxes).await;
    put_file(&mut sandboxes, &sb.id, "peer", 0o755, &peer())
        .await
        .unwrap();
    let url = "http://allowed.test:8080/simple/";
    eventually("the relay is followed", PATIENCE, async || {
        let r = exec(&mut sandboxes, &sb.id, shell(&format!("wget -q -O- {url}")))
            .await
            .unwrap();
        r.code() == Some(0)
    })
    .await;

    // The slowloris first, in the background; then the flood.
    let slow = {
        let mut sandboxes = cp.sandboxes(&alice).await.unwrap();
        let id = sb.id.clone();
        tokio::spawn(async move {
            exec(
                &mut sandboxes,
                &id,
                shell("./peer slowloris 127.0.0.1:3128"),
            )
            .await
            .unwrap()
        })
    };
    let flood = exec(
        &mut sandboxes,
        &sb.id,
        shell(&format!("./peer flood 127.0.0.1:3128 1000 {url}")),
    )
    .await
    .unwrap();
    assert_eq!(
        flood.stdout_str(),
        "ok=1000 other=0 nothing=0\n",
        "{flood:?}"
    );
    let slow = slow.await.unwrap();
    let out = slow.stdout_str();
    assert!(out.starts_with("closed_after_s="), "{slow:?}");
    // Still serving.
    let after = exec(&mut sandboxes, &sb.id, shell(&format!("wget -q -O- {url}")))
        .await
        .unwrap();
    assert_eq!(after.stdout_str(), "hello from upstream\n", "{after:?}");
}
