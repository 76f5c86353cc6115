//! Egress end to end (first slice): an `egress` sandbox has no network but
//! its loopback relay; what it reaches through the proxy is decided by
//! policy on each connection, made from the host, and on the audit log.
//! The upstream is a test server in a container on a Docker network the
//! test makes, standing in for the internet (`egress.treat_as_public` names
//! its subnet, `egress.hosts` its names): no outside address is ever used.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use bridle_proto::control::v1 as pb;
use bridle_tests::client::shell;
use bridle_tests::control::{cli, exec, ControlPlane};
use bridle_tests::docker::require_docker;
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
when { resource.owner == principal.owner && context.host == "allowed.test" };
"#;

/// A web server (busybox httpd) in a container on a network of its own,
/// serving `/simple/` as `hello from upstream`; removed with its network
/// when dropped (and swept by label if the test dies first).
struct Upstream {
    container: String,
    network: String,
    ip: String,
    subnet: String,
}

fn docker(args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("docker");
    cmd.args(args);
    let out = bridle_tests::output_within(&mut cmd, PATIENCE).unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Upstream {
    fn start() -> Upstream {
        let image = bridle_tests::docker::ensure_image().unwrap();
        let labels = bridle_tests::sweep::label_args();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let network = format!("bridle-egress-test-{}", std::process::id());
        let mut create = vec!["network", "create"];
        create.extend(&labels);
        create.push(&network);
        docker(&create);
        let subnet = docker(&[
            "network",
            "inspect",
            "-f",
            "{{(index .IPAM.Config 0).Subnet}}",
            &network,
        ]);
        let mut run = vec![
            "run",
            "-d",
            "--network",
            &network,
            "--entrypoint",
            "/bin/busybox",
        ];
        run.extend(&labels);
        run.extend([
            image.as_str(),
            "sh",
            "-c",
            "mkdir -p /tmp/www/simple && echo hello from upstream > /tmp/www/simple/index.html \
             && exec busybox httpd -f -p 8080 -h /tmp/www",
        ]);
        let container = docker(&run);
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &container,
        ]);
        Upstream {
            container,
            network,
            ip,
            subnet,
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for args in [
            vec!["rm", "-f", self.container.as_str()],
            vec!["network", "rm", self.network.as_str()],
        ] {
            let mut cmd = std::process::Command::new("docker");
            cmd.args(&args);
            let _ = bridle_tests::output_within(&mut cmd, PATIENCE);
        }
    }
}

#[tokio::test]
async fn an_egress_sandbox_reaches_what_policy_allows_and_nothing_else() {
    needs_docker!();
    let upstream = Upstream::start();
    let port = 8080;
    let public = format!("egress.treat_as_public=[{:?}]", upstream.subnet);
    let hosts = format!(
        r#"egress.hosts={{ "allowed.test" = {ip:?}, "evil.test" = {ip:?}, "internal.test" = "10.0.0.5" }}"#,
        ip = upstream.ip
    );
    let cp = ControlPlane::start(&[&public, &hosts]).await.unwrap();
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
    let alice = cp.token(pb::Role::Submitter, "alice").await.unwrap();
    let mut sandboxes = cp.sandboxes(&alice).await.unwrap();
    let sb = bounded(
        "Sandboxes/Create",
        sandboxes.create(pb::CreateSandboxRequest {
            network: pb::NetworkMode::Egress as i32,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
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
    })
    .await;
    // The same, by sandbox.
    let log = cli(&cp, &auditor, &["sandbox", "net-log", &sb.id]).await;
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(
        log.contains("allowed.test") && log.contains("evil.test"),
        "{log}"
    );
}
