//! Micro-benchmarks of the control plane's internals, in this process with
//! no Docker and no binaries: the run event store (durable appends with
//! group commit, rebuilding a run from a million events), the audit log
//! (durable appends; policy and audit on an exec's request path) and policy
//! decisions with 100 policies.
//!
//!     cargo bench -p control-plane --bench internals [-- --json PATH --quick --only events|audit|policy]
//!
//! Prints a table and writes JSON with every figure, its baseline where it
//! has one, the ratio and the target, as `bridle-tests`' `bench` does for
//! the end-to-end figures.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(serde::Serialize)]
struct Row {
    name: String,
    bridle: f64,
    baseline: Option<f64>,
    unit: &'static str,
    /// How many times better bridle is than the baseline (>1 = better).
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

fn report(name: &str, value: f64, unit: &'static str, target: &str, met: Option<bool>) -> Row {
    Row {
        name: name.into(),
        bridle: value,
        baseline: None,
        unit,
        ratio: None,
        target: target.into(),
        met,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

/// Where the stores are made: `$BRIDLE_BENCH_DIR`, else /var/tmp (a disk,
/// not a tmpfs: the appends are measured durable).
fn bench_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(std::env::var_os("BRIDLE_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into()))?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` adds `--bench`; it and anything else unknown is ignored.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/internals.json")
        });
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    if cfg!(debug_assertions) {
        eprintln!(
            "internals: this is a debug build; run with `cargo bench` for meaningful numbers"
        );
    }

    let mut rows = Vec::new();
    if only.is_empty() || only == "events" {
        event_store_rows(&mut rows, quick).await?;
    }
    if only.is_empty() || only == "audit" {
        audit_rows(&mut rows, quick).await?;
    }
    if only.is_empty() || only == "policy" {
        policy_rows(&mut rows, quick)?;
    }

    println!(
        "{:<36} {:>12} {:>12} {:>9} {:>6}  target",
        "figure", "bridle", "baseline", "ratio", "met"
    );
    for r in &rows {
        println!(
            "{:<36} {:>9.3} {:<2} {:>12} {:>9} {:>6}  {}",
            r.name,
            r.bridle,
            r.unit,
            r.baseline
                .map(|d| format!("{d:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.ratio
                .map(|x| format!("{x:.1}x"))
                .unwrap_or_else(|| "-".into()),
            r.met.map(|m| if m { "yes" } else { "NO" }).unwrap_or("-"),
            r.target
        );
    }
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let json = serde_json::json!({
        "benchmark": "bridle control-plane internals",
        "quick": quick,
        "release_build": !cfg!(debug_assertions),
        "rows": rows,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    eprintln!("internals: wrote {}", json_path.display());
    Ok(())
}

/// A job's `Submitted` event, for filling a store.
fn submitted_event(owner: &str, key: &str) -> anyhow::Result<control_plane::runs::events::Event> {
    use bridle_proto::control::v1 as cpb;
    let job = control_plane::runs::job::Submitted::try_from(cpb::Job {
        steps: vec![cpb::Step {
            name: "out".into(),
            shell: "yes".into(),
            ..Default::default()
        }],
        ..Default::default()
    })
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(control_plane::runs::events::Event::Submitted {
        owner: owner.into(),
        idempotency_key: key.into(),
        job: Box::new(job.job),
        by: Default::default(),
    })
}

/// The run event store on its own: durable appends from many runs at once
/// (group commit, and a commit per event as the baseline), and rebuilding a
/// run's state from a million events.
async fn event_store_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use control_plane::runs::events::{Event, RunState, RunView, Stream};
    use control_plane::runs::store::{EventStore, NewRun, SqlEvents, DEFAULT_GROUP};
    use std::collections::BTreeMap;

    let dir = bench_dir("bridle-bench-events-")?;
    let none = BTreeMap::new();
    let output = |seq: u64| Event::StepOutput {
        step: 0,
        stream: Stream::Stdout,
        offset: seq * 64,
        length: 64,
        blob_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        agent_end: seq * 64 + 64,
        agent_other_end: seq * 64 + 64,
    };

    // ---- appends, durable (synchronous=FULL), from 64 runs at once
    let writers = 64u64;
    let mut rates = Vec::new();
    for (group, per_writer) in [
        (DEFAULT_GROUP, if quick { 100 } else { 400 }),
        (1, if quick { 5 } else { 20 }),
    ] {
        let store =
            control_plane::store::Store::open(&dir.path().join(format!("append-{group}.db")))
                .await?;
        let events = SqlEvents::with_group(store.pool().clone(), group);
        let first = submitted_event("bench", "k")?;
        for w in 0..writers {
            let (id, key) = (format!("run-{w}"), format!("key-{w}"));
            events
                .submit(NewRun {
                    run_id: &id,
                    owner: "bench",
                    idempotency_key: &key,
                    first: &first,
                    labels: &none,
                    sealed_secrets: None,
                    now: 0,
                })
                .await?;
        }
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..writers {
            let events = events.clone();
            tasks.spawn(async move {
                let id = format!("run-{w}");
                for seq in 2..2 + per_writer {
                    events
                        .append(&id, seq, &output(seq), RunState::Running, 0)
                        .await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let rate = (writers * per_writer) as f64 / t.elapsed().as_secs_f64();
        rates.push(rate);
    }
    rows.push(Row {
        name: "event appends/s, durable, group commit".into(),
        bridle: rates[0],
        baseline: Some(rates[1]),
        unit: "/s",
        ratio: Some(rates[0] / rates[1]),
        target: ">= 20000/s (baseline: a commit per event)".into(),
        met: Some(rates[0] >= 20_000.0),
    });

    // ---- rebuild one run's state from a million events
    let n: u64 = if quick { 200_000 } else { 1_000_000 };
    let store = control_plane::store::Store::open(&dir.path().join("rebuild.db")).await?;
    let events = SqlEvents::new(store.pool().clone());
    let first = submitted_event("bench", "big")?;
    events
        .submit(NewRun {
            run_id: "big",
            owner: "bench",
            idempotency_key: "big",
            first: &first,
            labels: &none,
            sealed_secrets: None,
            now: 0,
        })
        .await?;
    let head = [
        (Event::Provisioning, RunState::Provisioning),
        (
            Event::SandboxAssigned {
                sandbox_id: "sb-bench".into(),
                agent_boot_id: "b".into(),
            },
            RunState::Running,
        ),
        (
            Event::StepStarted {
                step: 0,
                attempt: 1,
                exec_id: "big-s0-a1".into(),
                agent_boot_id: String::new(),
            },
            RunState::Running,
        ),
    ];
    for (i, (e, state)) in head.iter().enumerate() {
        events.append("big", 2 + i as u64, e, *state, 0).await?;
    }
    // The bulk is written by SQLite itself, in the encoding the store uses.
    let template = serde_json::to_string(&output(0))?;
    let (before, after) = template
        .split_once("\"offset\":0")
        .context("the event encoding changed")?;
    let body = format!(
        "{}\"offset\":' || ((i - 5) * 64) || '{}",
        before.replace('\'', "''"),
        after.replace('\'', "''")
    );
    eprintln!("internals: writing {n} events for the rebuild...");
    sqlx::query(&format!(
        "WITH RECURSIVE s(i) AS (SELECT 5 UNION ALL SELECT i + 1 FROM s WHERE i < {last}) \
         INSERT INTO run_events (run_id, seq, unix_ms, body) SELECT 'big', i, 0, '{body}' FROM s",
        last = n + 4
    ))
    .execute(store.pool())
    .await?;
    sqlx::query("UPDATE runs SET last_seq = $1 WHERE id = 'big'")
        .bind((n + 4) as i64)
        .execute(store.pool())
        .await?;
    let mut samples = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let all = events.events("big", 1).await?;
        let view = RunView::fold(all.iter().map(|e| (e.seq, &e.event)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(t.elapsed());
        anyhow::ensure!(view.last_seq == n + 4 && view.steps[0].stdout_bytes == n * 64);
    }
    samples.sort();
    let secs = samples[0].as_secs_f64();
    rows.push(report(
        &format!("rebuild a run from {} events", n + 4),
        secs,
        "s",
        "< 2 s (1,000,000 events)",
        Some(secs < 2.0 && n >= 1_000_000),
    ));
    Ok(())
}

/// The audit log: durable appends (each awaited until its group commit) from
/// 64 writers at once, and what policy and audit add to one exec on the
/// control plane's request path: deciding the exec with the default
/// policies and queueing its audit entry.
async fn audit_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use control_plane::audit::{AuditLog, Entry};
    use control_plane::policy::{Action, Engine, Facts, DEFAULT_POLICIES};

    let dir = bench_dir("bridle-bench-audit-")?;
    let store = control_plane::store::Store::open(&dir.path().join("audit.db")).await?;
    let key = control_plane::audit::load_or_create_key(dir.path())?;
    let log = AuditLog::open(store.pool().clone(), key).await?;
    let entry = |i: u64| Entry {
        unix_ms: 0,
        request_id: format!("req-{i}"),
        token_id: "tok".into(),
        principal: "alice".into(),
        role: "submitter".into(),
        owner: "alice".into(),
        action: "Sandboxes/Exec".into(),
        resource: "sb-1".into(),
        decision: "allow".into(),
        policy_version: 1,
        outcome: "ok".into(),
        ..Entry::default()
    };
    let (writers, per_writer) = (64u64, if quick { 100 } else { 500 });
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                log.append(entry(w * 1_000_000 + i)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (writers * per_writer) as f64 / t.elapsed().as_secs_f64();
    rows.push(report(
        "audit appends, durable, 64 writers",
        rate,
        "entries/s",
        "report",
        None,
    ));
    anyhow::ensure!(
        log.verify().await?.ok(),
        "the benchmark's audit log does not verify"
    );

    // On the request path of an exec: decide + queue the entry.
    let engine = Engine::new(DEFAULT_POLICIES, 1).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (principal, sandbox) = tenant_and_sandbox();
    let n = if quick { 5_000 } else { 20_000 };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        let facts = Facts {
            argv: vec!["true".into()],
            command: "true".into(),
            image: "bridle-sandbox:latest".into(),
            network: "none".into(),
            ..Facts::default()
        };
        let v = engine.decide(&principal, Action::Exec, &sandbox, &facts);
        log.record(Entry {
            decision: v.decision.as_str().into(),
            policy_version: v.policy_version,
            ..entry(i)
        });
        samples.push(t.elapsed());
        // Let the writer keep up, as it does between real calls.
        if i % 64 == 63 {
            tokio::task::yield_now().await;
        }
    }
    samples.sort();
    let added = percentile(&samples, 0.5).as_secs_f64() * 1e3;
    rows.push(report(
        "policy + audit added to an exec p50",
        added,
        "ms",
        "<= 0.5 ms",
        Some(added <= 0.5),
    ));
    Ok(())
}

/// The caller and the resource of the policy benchmarks: a submitter
/// acting on its own sandbox.
fn tenant_and_sandbox() -> (
    control_plane::auth::Principal,
    control_plane::policy::Resource,
) {
    use control_plane::auth::{Principal, Role};
    use control_plane::policy::{Resource, ResourceKind};
    let principal = Principal {
        token_id: "tok".into(),
        name: "alice".into(),
        role: Role::Submitter,
        owner: "alice".into(),
    };
    let sandbox = Resource {
        kind: ResourceKind::Sandbox,
        id: "sb-1".into(),
        owner: "alice".into(),
    };
    (principal, sandbox)
}

/// Policy evaluation with the default policies plus generated ones, 100 in
/// all, over a mix of requests.
fn policy_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    // 100 policies: the default set and generated `permit`s for other
    // teams, each scoped to its team as tenant policies are (so a request
    // is evaluated against the few that can apply to its principal) ...
    let scoped = decide_samples(quick, |i| {
        format!("principal.owner == \"team-{i}\" && context.command like \"*tool-{i} *\" && resource.owner == principal.owner")
    })?;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    rows.push(report(
        "policy decision p50, 100 policies",
        us(percentile(&scoped, 0.5)),
        "us",
        "report",
        None,
    ));
    let p99 = us(percentile(&scoped, 0.99));
    rows.push(report(
        "policy decision p99, 100 policies",
        p99,
        "us",
        "< 100 us",
        Some(p99 < 100.0),
    ));
    // ... and the worst case: 100 policies that all apply to everyone, so
    // every one of them is evaluated.
    let unscoped = decide_samples(quick, |i| {
        format!("context.command like \"*tool-{i} *\" && resource.owner == principal.owner")
    })?;
    rows.push(report(
        "policy decision p99, 100 policies all applying to the principal",
        us(percentile(&unscoped, 0.99)),
        "us",
        "report",
        None,
    ));
    Ok(())
}

/// Decision times, sorted, over a mix of exec, `git push`, a key write and
/// network requests, against the default set plus generated `permit`s on
/// exec (up to 100 policies) whose condition `when(i)` writes.
fn decide_samples(quick: bool, when: impl Fn(usize) -> String) -> anyhow::Result<Vec<Duration>> {
    use control_plane::policy::{Action, Engine, Facts, DEFAULT_POLICIES};

    let mut source = DEFAULT_POLICIES.to_string();
    let defaults = source.matches("@id(").count();
    for i in defaults..100 {
        source.push_str(&format!(
            "@id(\"generated-{i}\")\npermit (principal, action == Bridle::Action::\"exec\", resource)\nwhen {{ {} }};\n",
            when(i)
        ));
    }
    let engine = Engine::new(&source, 1).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (principal, sandbox) = tenant_and_sandbox();
    let requests = [
        (Action::Exec, "make test"),
        (Action::Exec, "git push origin main"),
        (Action::FileWrite, "certs/server.pem"),
        (Action::Network, "bridge"),
    ];
    let n = if quick { 20_000 } else { 100_000 };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 1000 {
        let (action, text) = requests[i % requests.len()];
        let facts = Facts {
            argv: text.split(' ').map(str::to_string).collect(),
            command: text.into(),
            path: text.into(),
            ..Facts::default()
        };
        let t = Instant::now();
        let v = engine.decide(&principal, action, &sandbox, &facts);
        let took = t.elapsed();
        std::hint::black_box(v);
        if i >= 1000 {
            samples.push(took);
        }
    }
    samples.sort();
    Ok(samples)
}
