//! bridle's benchmark: the sandbox agent against plain Docker, measured in
//! one run against one warm container; then the control plane and runs,
//! end to end through the real binaries.
//!
//!     cargo run --release -p bridle-tests --bin bench [-- --json PATH --quick --only agent|control|runs|harness|egress]
//!
//! Prints a table and writes JSON with every figure, the Docker baseline it
//! is compared with, the ratio and the target. The server's internals
//! (event store, audit log, policy decisions) are measured in process by
//! `cargo bench -p control-plane --bench internals`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use bridle_proto::sandbox::v1 as pb;
use bridle_tests::client::{self, start};
use bridle_tests::docker::{Sandbox, SandboxOptions};
use bytes::Bytes;
use futures::StreamExt;

const MB: f64 = 1_000_000.0;
const PAYLOAD: usize = 100 << 20;

#[derive(serde::Serialize)]
struct Row {
    name: String,
    bridle: f64,
    docker: Option<f64>,
    unit: &'static str,
    /// How many times better bridle is than the Docker baseline (>1 = better).
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Row {
    /// A latency against its Docker baseline (lower is better), in ms.
    fn latency(name: &str, bridle: Duration, docker: Duration) -> Self {
        let (b, d) = (ms(bridle), ms(docker));
        Row {
            name: name.into(),
            bridle: b,
            docker: Some(d),
            unit: "ms",
            ratio: Some(d / b),
            target: "-".into(),
            met: None,
        }
    }

    /// The median throughput of moving [`PAYLOAD`] bytes against its Docker
    /// baseline (higher is better); the target is >= 1 GB/s and >= 3x.
    fn throughput(name: &str, bridle: &[Duration], docker: &[Duration]) -> Self {
        let rate =
            |samples: &[Duration]| PAYLOAD as f64 / MB / percentile(samples, 0.5).as_secs_f64();
        let (b, d) = (rate(bridle), rate(docker));
        Row {
            name: name.into(),
            bridle: b,
            docker: Some(d),
            unit: "MB/s",
            ratio: Some(b / d),
            target: ">= 1000 MB/s and >= 3x".into(),
            met: Some(b >= 1000.0 && b / d >= 3.0),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn time_n<F, Fut>(n: usize, mut f: F) -> anyhow::Result<Vec<Duration>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

/// Like [`time_n`], with untimed `setup` before every sample.
async fn time_n_with_setup<S, SF, F, Fut>(
    n: usize,
    mut setup: S,
    mut f: F,
) -> anyhow::Result<Vec<Duration>>
where
    S: FnMut() -> SF,
    SF: std::future::Future<Output = anyhow::Result<()>>,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        setup().await?;
        let t = Instant::now();
        f().await?;
        v.push(t.elapsed());
    }
    v.sort();
    Ok(v)
}

/// Flushes dirty pages so that each upload starts from a clean page cache:
/// otherwise whichever side runs later is throttled by writeback from the
/// one before and the figure measures the disk, not the transfer.
fn sync_disks() -> anyhow::Result<()> {
    run_cmd(&mut Command::new("sync"))
}

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/bench.json"));
    let (n_fast, n_docker_api, n_docker_cli, n_bulk) = if quick {
        (200, 20, 10, 3)
    } else {
        (2000, 100, 30, 5)
    };

    if cfg!(debug_assertions) {
        eprintln!("bench: this is a debug build; run with --release for meaningful numbers");
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    build_binaries()?;
    let mut rows = Vec::new();
    if only.is_empty() || only == "agent" {
        agent_rows(&mut rows, n_fast, n_docker_api, n_docker_cli, n_bulk).await?;
    }
    if only.is_empty() || only == "control" {
        control_plane_rows(&mut rows, quick).await?;
    }
    if only.is_empty() || only == "runs" {
        job_rows(&mut rows, quick).await?;
    }
    if only.is_empty() || only == "harness" {
        harness_rows(&mut rows, quick).await?;
    }
    if only.is_empty() || only == "egress" {
        egress_rows(&mut rows, quick).await?;
    }

    println!(
        "{:<36} {:>12} {:>12} {:>9} {:>6}  target",
        "figure", "bridle", "docker", "ratio", "met"
    );
    for r in &rows {
        println!(
            "{:<36} {:>9.3} {:<2} {:>12} {:>9} {:>6}  {}",
            r.name,
            r.bridle,
            r.unit,
            r.docker
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
        std::fs::create_dir_all(parent)?;
    }
    let json = serde_json::json!({
        "benchmark": "bridle (agent, control plane) vs docker",
        "samples": { "exec_agent": n_fast, "exec_docker_api": n_docker_api, "exec_docker_cli": n_docker_cli, "bulk": n_bulk },
        "release_build": !cfg!(debug_assertions),
        "rows": rows,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    eprintln!("bench: wrote {}", json_path.display());
    Ok(())
}

/// `docker exec CONTAINER true` through the Docker API, the way a client
/// does it: create, start attached, drain, inspect the exit code.
async fn docker_exec_true(docker: &bollard::Docker, container: &str) -> anyhow::Result<()> {
    let exec = docker
        .create_exec(
            container,
            ExecConfig {
                cmd: Some(vec!["true".into()]),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await?;
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while output.next().await.is_some() {}
    }
    let code = docker.inspect_exec(&exec.id).await?.exit_code;
    anyhow::ensure!(code == Some(0), "docker exec true: {code:?}");
    Ok(())
}

/// The agent straight over its socket against `docker exec` and `docker cp`,
/// in one warm container.
async fn agent_rows(
    rows: &mut Vec<Row>,
    n_fast: usize,
    n_docker_api: usize,
    n_docker_cli: usize,
    n_bulk: usize,
) -> anyhow::Result<()> {
    eprintln!("bench: building the image and starting a warm sandbox...");
    let sb = Sandbox::start(SandboxOptions {
        memory: "1g",
        pids: 256,
        extra: vec![],
    })
    .await?;
    let mut agent = sb.client()?;
    let fresh_rss = agent
        .info(pb::InfoRequest {})
        .await?
        .into_inner()
        .agent_rss_bytes;
    let docker = bollard::Docker::connect_with_local_defaults()?;

    // ---- exec of `true`
    for _ in 0..50 {
        client::run(&mut agent, start(&["true"])).await?;
    }
    let via_agent = time_n(n_fast, || {
        let mut a = agent.clone();
        async move {
            let r = client::run(&mut a, start(&["true"])).await?;
            anyhow::ensure!(r.code() == Some(0), "true failed: {r:?}");
            Ok(())
        }
    })
    .await?;
    let id = sb.id.clone();
    let via_api = time_n(n_docker_api, || {
        let docker = docker.clone();
        let id = id.clone();
        async move { docker_exec_true(&docker, &id).await }
    })
    .await?;
    let via_cli = time_n(n_docker_cli, || {
        let id = id.clone();
        async move { run_cmd(Command::new("docker").args(["exec", &id, "true"])) }
    })
    .await?;
    let (a50, a99) = (percentile(&via_agent, 0.5), percentile(&via_agent, 0.99));
    let (d50, d99) = (percentile(&via_api, 0.5), percentile(&via_api, 0.99));
    let (c50, c99) = (percentile(&via_cli, 0.5), percentile(&via_cli, 0.99));
    let mut p50_api = Row::latency("exec `true` p50 vs Docker API", a50, d50);
    p50_api.target = "<= 1 ms and >= 40x".into();
    p50_api.met = p50_api.ratio.map(|r| p50_api.bridle <= 1.0 && r >= 40.0);
    rows.push(p50_api);
    rows.push(Row::latency("exec `true` p99 vs Docker API", a99, d99));
    rows.push(Row::latency("exec `true` p50 vs docker CLI", a50, c50));
    rows.push(Row::latency("exec `true` p99 vs docker CLI", a99, c99));

    // ---- 100 MB upload
    let dir = tempfile::tempdir()?;
    let payload: Vec<u8> = (0..PAYLOAD)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let host_file = dir.path().join("payload.bin");
    std::fs::write(&host_file, &payload)?;
    let payload = Bytes::from(payload);
    let upload = time_n_with_setup(
        n_bulk,
        || {
            let mut a = agent.clone();
            async move {
                let _ = a
                    .remove(pb::RemoveRequest {
                        path: "bench".into(),
                        recursive: true,
                    })
                    .await;
                sync_disks()
            }
        },
        || {
            let mut a = agent.clone();
            let p = payload.clone();
            async move {
                let r =
                    client::write_file(&mut a, client::write_header("bench/upload.bin"), p).await?;
                anyhow::ensure!(r.size as usize == PAYLOAD);
                Ok(())
            }
        },
    )
    .await?;
    let cp_in = time_n_with_setup(
        n_bulk.min(3),
        || {
            let id = id.clone();
            async move {
                run_cmd(Command::new("docker").args([
                    "exec",
                    &id,
                    "rm",
                    "-f",
                    "/workspace/cp-upload.bin",
                ]))?;
                sync_disks()
            }
        },
        || {
            let id = id.clone();
            let f = host_file.clone();
            async move {
                run_cmd(
                    Command::new("docker")
                        .arg("cp")
                        .arg(&f)
                        .arg(format!("{id}:/workspace/cp-upload.bin")),
                )
            }
        },
    )
    .await?;
    run_cmd(Command::new("docker").args(["exec", &id, "rm", "-f", "/workspace/cp-upload.bin"]))?;
    rows.push(Row::throughput(
        "upload 100 MB vs docker cp",
        &upload,
        &cp_in,
    ));

    // ---- snapshot of a 100 MB workspace (tar, no compression)
    client::run(
        &mut agent,
        client::shell("rm -rf /workspace/* && mkdir -p snap"),
    )
    .await?;
    for i in 0..10 {
        let part = payload.slice(i * (PAYLOAD / 10)..(i + 1) * (PAYLOAD / 10));
        client::write_file(
            &mut agent,
            client::write_header(&format!("snap/part-{i}.bin")),
            part,
        )
        .await?;
    }
    let archive_len = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let snap = time_n(n_bulk, || {
        let mut a = agent.clone();
        let len = archive_len.clone();
        async move {
            let n = client::snapshot(
                &mut a,
                pb::SnapshotRequest {
                    path: "snap".into(),
                    ..Default::default()
                },
            )
            .await?
            .len();
            len.store(n, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    let cp_out = time_n(n_bulk.min(3), || {
        let id = id.clone();
        async move {
            let out = Command::new("docker")
                .args(["cp", &format!("{id}:/workspace/snap"), "-"])
                .output()?;
            anyhow::ensure!(
                out.status.success() && out.stdout.len() >= PAYLOAD,
                "docker cp out failed"
            );
            Ok(())
        }
    })
    .await?;
    rows.push(Row::throughput(
        "snapshot 100 MB vs docker cp out",
        &snap,
        &cp_out,
    ));
    let archive_len = archive_len.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(archive_len >= PAYLOAD, "snapshot too small: {archive_len}");

    // ---- idle RSS (the agent hands freed memory back every 5 s)
    tokio::time::sleep(Duration::from_secs(6)).await;
    let info = agent.info(pb::InfoRequest {}).await?.into_inner();
    rows.push(Row {
        name: "agent RSS, idle after start".into(),
        bridle: fresh_rss as f64 / MB,
        docker: None,
        unit: "MB",
        ratio: None,
        target: "report".into(),
        met: None,
    });
    rows.push(Row {
        name: "agent RSS, idle after the runs".into(),
        bridle: info.agent_rss_bytes as f64 / MB,
        docker: None,
        unit: "MB",
        ratio: None,
        target: "report".into(),
        met: None,
    });

    drop(sb);
    Ok(())
}

/// `cargo run` sets CARGO: make sure the agent and control-plane binaries
/// next to this one are current (a no-op when they are).
fn build_binaries() -> anyhow::Result<()> {
    let Ok(cargo) = std::env::var("CARGO") else {
        return Ok(());
    };
    // One package per build: built together, cargo would unify the two
    // packages' features and link the control plane's TLS into the agent.
    for package in ["sandbox-agent", "control-plane"] {
        let mut cmd = Command::new(&cargo);
        cmd.args(["build", "-q", "-p", package, "--bins"])
            .current_dir(bridle_tests::repo_root());
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        anyhow::ensure!(cmd.status()?.success(), "building {package} failed");
    }
    Ok(())
}

fn report(name: &str, value: f64, unit: &'static str, target: &str, met: Option<bool>) -> Row {
    Row {
        name: name.into(),
        bridle: value,
        docker: None,
        unit,
        ratio: None,
        target: target.into(),
        met,
    }
}

/// The control plane: warm-pool claims, cold creates against `docker run`,
/// 50 creates at once, the overhead it adds to an exec, and the idle RSS of
/// the agent in a sandbox it made.
async fn control_plane_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use bridle_proto::control::v1 as cpb;
    use bridle_tests::control::{self, ControlPlane};

    let (pool, n_cold, n_exec, n_many) = if quick {
        (5, 3, 200, 20)
    } else {
        (10, 5, 2000, 50)
    };
    eprintln!("bench: starting a control plane with a warm pool of {pool}...");
    let cp = ControlPlane::start(&[
        &format!("pool=[{{name=\"bench\",size={pool}}}]"),
        "sweep_interval_secs=1",
        "docker.max_concurrent_creates=16",
        // 50 sandboxes of one owner at once.
        "sandbox.max_per_owner=0",
    ])
    .await?;
    let image = bridle_tests::docker::ensure_image()?;
    let mut c = cp.sandboxes(&cp.admin_token).await?;
    let filling = Instant::now();
    while cp.log().matches("warm pool sandbox ready").count() < pool {
        anyhow::ensure!(
            filling.elapsed() < Duration::from_secs(120),
            "the pool never filled: {}",
            cp.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Claims: the pool holds `pool` ready sandboxes; take them one by one.
    let mut claimed = Vec::new();
    let mut claims = Vec::new();
    for _ in 0..pool {
        let t = Instant::now();
        let sb = control::create(&mut c).await?;
        claims.push(t.elapsed());
        anyhow::ensure!(
            sb.pool_profile == "bench",
            "a claim was served cold: {sb:?}"
        );
        claimed.push(sb.id);
    }
    claims.sort();
    let claim = ms(percentile(&claims, 0.5));
    rows.push(report(
        "warm-pool claim p50",
        claim,
        "ms",
        "<= 10 ms",
        Some(claim <= 10.0),
    ));

    // Cold create-to-ready (a spec no pool serves) vs `docker run --rm IMAGE true`.
    let cold_spec = || cpb::CreateSandboxRequest {
        limits: Some(cpb::Limits {
            pids: Some(300),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut cold = Vec::new();
    for _ in 0..n_cold {
        let t = Instant::now();
        let sb = c.create(cold_spec()).await?.into_inner();
        cold.push(t.elapsed());
        c.delete(cpb::DeleteSandboxRequest { sandbox_id: sb.id })
            .await?;
    }
    cold.sort();
    let docker_run = time_n(n_cold, || {
        let image = image.clone();
        async move {
            run_cmd(Command::new("docker").args([
                "run",
                "--rm",
                "--network",
                "none",
                "--entrypoint",
                "/bin/true",
                &image,
            ]))
        }
    })
    .await?;
    let (b, d) = (ms(percentile(&cold, 0.5)), ms(percentile(&docker_run, 0.5)));
    rows.push(Row {
        name: "cold create-to-ready p50 vs docker run".into(),
        bridle: b,
        docker: Some(d),
        unit: "ms",
        ratio: Some(d / b),
        target: "not slower than docker run".into(),
        met: Some(b <= d),
    });

    // Many at once.
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n_many {
        let mut c = c.clone();
        tasks.spawn(async move { c.create(cold_spec()).await.map(|r| r.into_inner().id) });
    }
    let mut made = Vec::new();
    let mut failures = 0;
    while let Some(r) = tasks.join_next().await {
        match r? {
            Ok(id) => made.push(id),
            Err(e) => {
                failures += 1;
                eprintln!("bench: concurrent create failed: {e}");
            }
        }
    }
    let total = t.elapsed();
    rows.push(report(
        &format!("{n_many} creates at once: total"),
        total.as_secs_f64(),
        "s",
        "report",
        None,
    ));
    rows.push(report(
        &format!("{n_many} creates at once: failures"),
        failures as f64,
        "",
        "0",
        Some(failures == 0),
    ));
    for id in made {
        c.delete(cpb::DeleteSandboxRequest { sandbox_id: id })
            .await?;
    }

    // Exec of `true` through the control plane vs straight to the agent,
    // alternating so both see the same machine.
    let sb = &claimed[0];
    let mut direct = cp.agent_of(sb)?;
    for _ in 0..50 {
        control::exec(&mut c, sb, start(&["true"])).await?;
        client::run(&mut direct, start(&["true"])).await?;
    }
    let (mut via_cp, mut via_agent) = (Vec::new(), Vec::new());
    for _ in 0..n_exec {
        let t = Instant::now();
        let r = control::exec(&mut c, sb, start(&["true"])).await?;
        via_cp.push(t.elapsed());
        anyhow::ensure!(r.code() == Some(0), "{r:?}");
        let t = Instant::now();
        client::run(&mut direct, start(&["true"])).await?;
        via_agent.push(t.elapsed());
    }
    via_cp.sort();
    via_agent.sort();
    let overhead = ms(percentile(&via_cp, 0.5)) - ms(percentile(&via_agent, 0.5));
    rows.push(Row {
        name: "exec `true` p50 via control plane".into(),
        bridle: ms(percentile(&via_cp, 0.5)),
        docker: None,
        unit: "ms",
        ratio: None,
        target: format!("agent direct {:.3} ms", ms(percentile(&via_agent, 0.5))),
        met: None,
    });
    rows.push(report(
        "control-plane overhead on exec p50",
        overhead,
        "ms",
        "<= 1 ms",
        Some(overhead <= 1.0),
    ));

    // Idle RSS of the agent in a sandbox the control plane made, untouched.
    let fresh = &claimed[1];
    let mut a = cp.agent_of(fresh)?;
    let rss = a
        .info(pb::InfoRequest {})
        .await?
        .into_inner()
        .agent_rss_bytes as f64
        / MB;
    rows.push(report(
        "agent RSS, idle, fresh sandbox",
        rss,
        "MB",
        "<= 5 MB",
        Some(rss <= 5.0),
    ));
    Ok(())
}

/// A 10-step job of `true` on a warm pool, submit to finished, against the
/// same ten `docker exec` calls in a warm container.
async fn job_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use bridle_proto::control::v1 as cpb;
    use bridle_tests::control::ControlPlane;

    let reps = if quick { 3 } else { 7 };
    eprintln!("bench: a control plane with a warm pool for jobs...");
    let cp =
        ControlPlane::start(&["pool=[{name=\"jobs\",size=2}]", "sweep_interval_secs=1"]).await?;
    let ready = |n: usize| cp.log().matches("warm pool sandbox ready").count() >= n;
    let mut runs = cp.runs(&cp.admin_token).await?;
    let job = cpb::Job {
        steps: (0..10)
            .map(|i| cpb::Step {
                name: format!("true {i}"),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let mut totals = Vec::new();
    for rep in 0..reps + 1 {
        // Each run takes a warm sandbox and releases it; wait for the refill.
        let wait = Instant::now();
        while !ready(2 + rep) {
            anyhow::ensure!(
                wait.elapsed() < Duration::from_secs(120),
                "the pool never refilled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = Instant::now();
        let run = runs
            .submit(cpb::SubmitRunRequest {
                idempotency_key: format!("bench-{rep}"),
                job: Some(job.clone()),
                agent: None,
            })
            .await?
            .into_inner();
        let mut watch = runs
            .watch(cpb::WatchRunRequest {
                run_id: run.id.clone(),
                from_seq: 1,
            })
            .await?
            .into_inner();
        let mut finished = None;
        while let Some(ev) = watch.message().await? {
            if let Some(cpb::run_event::Event::Finished(f)) = ev.event {
                finished = Some(f);
                break;
            }
        }
        let elapsed = t.elapsed();
        let f = finished.context("the watch ended before the run finished")?;
        anyhow::ensure!(
            f.state == cpb::RunState::Succeeded as i32,
            "bench job: {f:?}"
        );
        if rep > 0 {
            totals.push(elapsed);
        }
    }
    drop(cp);

    let sb = Sandbox::start(SandboxOptions {
        memory: "512m",
        pids: 256,
        extra: vec![],
    })
    .await?;
    let docker = bollard::Docker::connect_with_local_defaults()?;
    let mut baseline = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..10 {
            docker_exec_true(&docker, &sb.id).await?;
        }
        baseline.push(t.elapsed());
    }
    totals.sort();
    baseline.sort();
    let mut row = Row::latency(
        "10-step job of `true`, warm pool",
        percentile(&totals, 0.5),
        percentile(&baseline, 0.5),
    );
    row.target = "faster than 10 docker exec".into();
    row.met = row.ratio.map(|r| r > 1.0);
    rows.push(row);
    Ok(())
}

/// A scripted turn calling the shell tool with `command`.
fn shell_turn(id: String, command: String) -> bridle_scripted_model::Turn {
    bridle_scripted_model::Turn {
        tool_calls: vec![bridle_scripted_model::ScriptedCall {
            id,
            name: "shell".into(),
            arguments: serde_json::json!({ "command": command }),
            raw_arguments: None,
        }],
        ..Default::default()
    }
}

/// A conversation of `turns` shell calls (`true`, each with its own
/// comment so that no two are alike) and a last answer.
fn true_calls(name: &str, goal: &str, turns: usize) -> bridle_scripted_model::Conversation {
    let mut script: Vec<_> = (0..turns)
        .map(|i| shell_turn(format!("c{i}"), format!("true # {i}")))
        .collect();
    script.push(bridle_scripted_model::Turn {
        text: "done".into(),
        ..Default::default()
    });
    bridle_scripted_model::Conversation {
        name: name.into(),
        first_user_contains: goal.into(),
        turn_by_last_call: false,
        turns: script,
    }
}

/// Submits a session of the shell tool alone, as `runs`' token.
async fn submit_session(
    runs: &mut bridle_tests::control::Runs,
    key: &str,
    goal: &str,
) -> anyhow::Result<String> {
    use bridle_proto::control::v1 as cpb;
    let run = runs
        .submit(cpb::SubmitRunRequest {
            idempotency_key: key.into(),
            job: None,
            agent: Some(cpb::AgentTask {
                message: goal.into(),
                model: "scripted".into(),
                tools: vec!["shell".into()],
                budgets: Some(cpb::Budgets {
                    max_iterations: 1000,
                    max_tool_calls: 1000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    Ok(run.id)
}

/// Waits until every session in `ids` is idle (failing on one that ended).
async fn until_idle(
    runs: &mut bridle_tests::control::Runs,
    ids: &[String],
    limit: Duration,
) -> anyhow::Result<()> {
    use bridle_proto::control::v1 as cpb;
    let start = Instant::now();
    let mut left: Vec<String> = ids.to_vec();
    while !left.is_empty() {
        anyhow::ensure!(start.elapsed() < limit, "sessions still not idle: {left:?}");
        let mut still = Vec::new();
        for id in left {
            let r = runs
                .get(cpb::GetRunRequest { run_id: id.clone() })
                .await?
                .into_inner();
            if r.state == cpb::RunState::Idle as i32 {
                continue;
            }
            anyhow::ensure!(r.finished_unix_ms == 0, "session {id} ended: {}", r.reason);
            still.push(id);
        }
        left = still;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A session's stored events.
async fn session_events(
    runs: &mut bridle_tests::control::Runs,
    id: &str,
) -> anyhow::Result<Vec<bridle_proto::control::v1::RunEvent>> {
    use bridle_proto::control::v1 as cpb;
    let last = runs
        .get(cpb::GetRunRequest { run_id: id.into() })
        .await?
        .into_inner()
        .last_seq;
    let mut watch = runs
        .watch(cpb::WatchRunRequest {
            run_id: id.into(),
            from_seq: 1,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while (events.len() as u64) < last {
        let ev = watch.message().await?.context("the watch ended early")?;
        if ev.seq != 0 {
            events.push(ev);
        }
    }
    Ok(events)
}

/// Per loop iteration of a session (from one model request to the next):
/// (the whole iteration, the harness's part of it — the iteration less the
/// model's answer and the tool's run), in ms from the events' timestamps.
fn iterations(events: &[bridle_proto::control::v1::RunEvent]) -> Vec<(f64, f64)> {
    use bridle_proto::control::v1::run_event::Event as E;
    let at = |pick: &dyn Fn(&E) -> bool| -> Vec<i64> {
        events
            .iter()
            .filter(|e| e.event.as_ref().is_some_and(pick))
            .map(|e| e.unix_ms)
            .collect()
    };
    let requested = at(&|e| matches!(e, E::ModelRequested(_)));
    let responded = at(&|e| matches!(e, E::ModelResponded(_)));
    let started = at(&|e| matches!(e, E::ToolStarted(_)));
    let results = at(&|e| matches!(e, E::ToolResult(_)));
    let mut out = Vec::new();
    for k in 0..requested.len().saturating_sub(1) {
        if k >= started.len() || k >= results.len() || k >= responded.len() {
            break;
        }
        let whole = (requested[k + 1] - requested[k]) as f64;
        let model = (responded[k] - requested[k]) as f64;
        let tool = (results[k] - started[k]) as f64;
        out.push((whole, (whole - model - tool).max(0.0)));
    }
    out
}

fn p(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// The harness: what the loop adds per iteration, 100 sessions at once, and
/// how the log grows over a 200-turn conversation, each against the
/// scripted model server answering at once.
/// What the egress proxy adds to a connection and to a download, against
/// the same requests from a `bridge` sandbox straight to the server, in one
/// run: the servers on a Docker network of the bench's own (the web server
/// on the default bridge too), and in each sandbox the same client
/// (`egress-peer time`: a new connection per request).
async fn egress_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use bridle_proto::control::v1 as cpb;
    use bridle_tests::control::{self, exec, put_file, ControlPlane};
    use bridle_tests::upstream::{Upstream, BIG_BYTES};

    let n = if quick { 50 } else { 300 };
    eprintln!("bench: egress — the upstream servers and a control plane...");
    let upstream = Upstream::start()?;
    let bridge_ip = upstream.web_on_bridge()?;
    let cp = ControlPlane::start(&[
        &format!("egress.treat_as_public=[{:?}]", upstream.subnet),
        &format!(r#"egress.hosts={{ "web.test" = {:?} }}"#, upstream.web_ip),
    ])
    .await?;
    let defaults =
        std::fs::read_to_string(bridle_tests::repo_root().join("deploy/policies/default.cedar"))?;
    let allow = r#"
@id("bench-egress")
permit (principal, action in [Bridle::Action::"network.resolve", Bridle::Action::"network.connect"], resource)
when { resource.owner == principal.owner && context.host == "web.test" };
"#;
    let mut admin = cp.admin(&cp.admin_token).await?;
    admin
        .set_policy(cpb::SetPolicyRequest {
            source: format!("{defaults}\n{allow}"),
            expected_version: 0,
        })
        .await?;
    let mut c = cp.sandboxes(&cp.admin_token).await?;
    let peer = std::fs::read(bridle_tests::workspace_binary(
        "bridle-tests",
        "egress-peer",
    )?)?;
    let mut measure =
        async |network: cpb::NetworkMode, base: &str| -> anyhow::Result<(f64, f64, f64)> {
            let sb = c
                .create(cpb::CreateSandboxRequest {
                    network: network as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            put_file(&mut c, &sb.id, "peer", 0o755, &peer).await?;
            let run = async |c: &mut control::Sandboxes, cmd: String| -> anyhow::Result<String> {
                let r = exec(c, &sb.id, bridle_tests::client::shell(&cmd)).await?;
                anyhow::ensure!(r.code() == Some(0), "{cmd}: {r:?}");
                Ok(r.stdout_str())
            };
            // Until the relay is followed (egress), and warm either way.
            let mut ready = false;
            for _ in 0..100 {
                if run(&mut c, format!("./peer fetch {base}/simple/"))
                    .await
                    .is_ok()
                {
                    ready = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::ensure!(ready, "{base} never answered from a {network:?} sandbox");
            let field = |out: &str, name: &str| -> anyhow::Result<f64> {
                out.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
                    .with_context(|| format!("no {name} in {out:?}"))
            };
            let small = run(&mut c, format!("./peer time {base}/simple/ {n}")).await?;
            let big = run(&mut c, format!("./peer time {base}/big 3")).await?;
            let _ = c
                .delete(cpb::DeleteSandboxRequest {
                    sandbox_id: sb.id.clone(),
                })
                .await;
            Ok((
                field(&small, "p50_us")? / 1000.0,
                field(&small, "p99_us")? / 1000.0,
                field(&big, "bytes_per_s")? / MB,
            ))
        };
    eprintln!(
        "bench: egress — {n} requests and a {} MiB download each way...",
        BIG_BYTES >> 20
    );
    let bridge = measure(
        cpb::NetworkMode::Bridge,
        &format!("http://{bridge_ip}:8080"),
    )
    .await?;
    let egress = measure(cpb::NetworkMode::Egress, "http://web.test:8080").await?;
    let added = egress.0 - bridge.0;
    rows.push(Row {
        name: "egress: GET p50, new connection each".into(),
        bridle: egress.0,
        docker: Some(bridge.0),
        unit: "ms",
        ratio: Some(bridge.0 / egress.0),
        target: "baseline: bridge".into(),
        met: None,
    });
    rows.push(report(
        "  added per connection p50",
        added,
        "ms",
        "<= 1 ms (policy x2 + audit before connecting)",
        Some(added <= 1.0),
    ));
    rows.push(Row {
        name: "egress: GET p99".into(),
        bridle: egress.1,
        docker: Some(bridge.1),
        unit: "ms",
        ratio: Some(bridge.1 / egress.1),
        target: "report".into(),
        met: None,
    });
    rows.push(Row {
        name: format!("egress: one {} MiB download", BIG_BYTES >> 20),
        bridle: egress.2,
        docker: Some(bridge.2),
        unit: "MB/s",
        ratio: Some(egress.2 / bridge.2),
        target: ">= 80% of bridge".into(),
        met: Some(egress.2 >= 0.8 * bridge.2),
    });
    Ok(())
}

async fn harness_rows(rows: &mut Vec<Row>, quick: bool) -> anyhow::Result<()> {
    use bridle_tests::control::ControlPlane;

    let (turns, sessions, session_turns, long) = if quick {
        (30, 20, 5, 60)
    } else {
        (100, 100, 5, 200)
    };
    let mut conversations = vec![
        true_calls("overhead", "bench overhead", turns),
        bridle_scripted_model::Conversation {
            name: "long".into(),
            first_user_contains: "bench long".into(),
            turn_by_last_call: false,
            turns: {
                let mut t: Vec<_> = (0..long)
                    .map(|i| shell_turn(format!("l{i}"), format!("echo line {i}")))
                    .collect();
                t.push(bridle_scripted_model::Turn {
                    text: "done".into(),
                    ..Default::default()
                });
                t
            },
        },
    ];
    for i in 0..sessions {
        conversations.push(true_calls(
            &format!("many{i}"),
            &format!("bench many {i} "),
            session_turns,
        ));
    }
    let server = bridle_scripted_model::Server::start(bridle_scripted_model::Script {
        conversations,
        api_key: None,
    })
    .await?;
    let model = format!(
        "model=[{{ name = \"scripted\", provider = \"openai\", base_url = \"{}/v1\", \
         context_window = 10000000, max_output_tokens = 1000 }}]",
        server.base_url()
    );
    eprintln!("bench: a control plane with the scripted model server...");
    let cp = ControlPlane::start(&[
        &model,
        &format!("max_running_runs={sessions}"),
        &format!("max_running_runs_per_owner={sessions}"),
        "sandbox.max_per_owner=0",
        "docker.max_concurrent_creates=16",
        "harness.max.max_iterations=1000",
        "harness.max.max_tool_calls=1000",
    ])
    .await?;
    let mut runs = cp.runs(&cp.admin_token).await?;

    // One session, `turns` iterations of a `true` tool.
    let id = submit_session(&mut runs, "overhead", "bench overhead").await?;
    until_idle(
        &mut runs,
        std::slice::from_ref(&id),
        Duration::from_secs(600),
    )
    .await?;
    let events = session_events(&mut runs, &id).await?;
    let mut own: Vec<f64> = iterations(&events).into_iter().map(|(_, o)| o).collect();
    let mut whole: Vec<f64> = iterations(&events).into_iter().map(|(w, _)| w).collect();
    let own_p50 = p(&mut own, 0.5);
    rows.push(report(
        "harness per iteration p50 (less model, tool)",
        own_p50,
        "ms",
        "<= 3 ms, every event durable (1 ms resolution)",
        Some(own_p50 <= 3.0),
    ));
    rows.push(report(
        "  whole iteration p50 (`true` tool)",
        p(&mut whole, 0.5),
        "ms",
        "report",
        None,
    ));

    // Many sessions at once.
    let t = Instant::now();
    let mut ids = Vec::new();
    for i in 0..sessions {
        ids.push(
            submit_session(&mut runs, &format!("many{i}"), &format!("bench many {i} ")).await?,
        );
    }
    until_idle(&mut runs, &ids, Duration::from_secs(900)).await?;
    let elapsed = t.elapsed();
    let mut all = Vec::new();
    for id in &ids {
        all.extend(
            iterations(&session_events(&mut runs, id).await?)
                .into_iter()
                .map(|(w, _)| w),
        );
    }
    let total_iterations = sessions * (session_turns + 1);
    rows.push(report(
        &format!("{sessions} sessions at once: iterations/s"),
        total_iterations as f64 / elapsed.as_secs_f64(),
        "/s",
        "report (sandbox creation included)",
        None,
    ));
    rows.push(report(
        &format!("{sessions} sessions at once: iteration p99"),
        p(&mut all, 0.99),
        "ms",
        "report",
        None,
    ));

    // The log over a long conversation: the bytes each turn adds (events
    // and the blobs they bring), turn `long` against turn 10; the baseline
    // is storing each request whole, as histories that re-send the
    // conversation do.
    let id = submit_session(&mut runs, "long", "bench long").await?;
    until_idle(
        &mut runs,
        std::slice::from_ref(&id),
        Duration::from_secs(900),
    )
    .await?;
    let per_turn = log_bytes_per_turn(&cp.data_dir().join("bridle.db"), &id).await?;
    let at = |t: usize| *per_turn.get(&t).unwrap_or(&0) as f64;
    let ratio = at(long) / at(10).max(1.0);
    let whole_request = server
        .received()
        .iter()
        .filter(|(_, body)| body.to_string().contains("bench long"))
        .map(|(_, body)| body.to_string().len())
        .max()
        .unwrap_or(0);
    rows.push(Row {
        name: format!("log bytes, turn {long} / turn 10"),
        bridle: ratio,
        docker: None,
        unit: "x",
        ratio: None,
        target: "<= 1.5 (flat)".into(),
        met: Some(ratio <= 1.5),
    });
    rows.push(Row {
        name: format!("log bytes of turn {long}"),
        bridle: at(long),
        docker: Some(whole_request as f64),
        unit: "B",
        ratio: Some(whole_request as f64 / at(long).max(1.0)),
        target: "baseline: the whole request stored".into(),
        met: None,
    });
    drop(cp);
    Ok(())
}

/// Bytes each turn of session `run_id` added to the store: its events'
/// bodies and the blobs first referred to by them, by turn (a turn starts
/// at its `model_requested`).
async fn log_bytes_per_turn(
    db: &std::path::Path,
    run_id: &str,
) -> anyhow::Result<std::collections::BTreeMap<usize, usize>> {
    use sqlx::Row as _;
    let url = format!("sqlite://{}?mode=ro", db.display());
    let pool = sqlx::SqlitePool::connect(&url).await?;
    let events = sqlx::query("SELECT body FROM run_events WHERE run_id = ? ORDER BY seq")
        .bind(run_id)
        .fetch_all(&pool)
        .await?;
    let sizes: std::collections::HashMap<String, i64> =
        sqlx::query("SELECT sha256, size FROM blobs")
            .fetch_all(&pool)
            .await?
            .into_iter()
            .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
            .collect();
    let mut seen = std::collections::HashSet::new();
    let mut per_turn = std::collections::BTreeMap::new();
    let mut turn = 0usize;
    for row in events {
        let body: String = row.get(0);
        let value: serde_json::Value = serde_json::from_str(&body)?;
        if let Some(t) = value.get("model_requested").and_then(|r| r.get("turn")) {
            turn = t.as_u64().unwrap_or(0) as usize;
        }
        let mut bytes = body.len();
        let mut shas = Vec::new();
        collect_shas(&value, &mut shas);
        for sha in shas {
            if seen.insert(sha.clone()) {
                bytes += *sizes.get(&sha).unwrap_or(&0) as usize;
            }
        }
        *per_turn.entry(turn).or_insert(0) += bytes;
    }
    pool.close().await;
    Ok(per_turn)
}

/// Every string in a field whose name ends in `sha256`.
fn collect_shas(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match v {
                    serde_json::Value::String(s) if k.ends_with("sha256") => out.push(s.clone()),
                    other => collect_shas(other, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_shas(v, out)),
        _ => {}
    }
}
