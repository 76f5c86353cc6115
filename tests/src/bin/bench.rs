//! bridle's benchmark: the sandbox agent against plain Docker, measured in
//! one run against one warm container.
//!
//!     cargo run --release -p bridle-tests --bin bench [-- --json PATH --quick]
//!
//! Prints a table and writes JSON with every figure, the Docker baseline it
//! is compared with, the ratio and the target.

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
        .unwrap_or_else(|| PathBuf::from("target/bench/agent.json"));
    let (n_fast, n_docker_api, n_docker_cli, n_bulk) = if quick {
        (200, 20, 10, 3)
    } else {
        (2000, 100, 30, 5)
    };

    if cfg!(debug_assertions) {
        eprintln!("bench: this is a debug build; run with --release for meaningful numbers");
    }
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
    let mut rows = Vec::new();

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
        async move {
            let exec = docker
                .create_exec(
                    &id,
                    ExecConfig {
                        cmd: Some(vec!["true".into()]),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await?;
            if let StartExecResults::Attached { mut output, .. } =
                docker.start_exec(&exec.id, None).await?
            {
                while output.next().await.is_some() {}
            }
            let code = docker.inspect_exec(&exec.id).await?.exit_code;
            anyhow::ensure!(code == Some(0), "docker exec true: {code:?}");
            Ok(())
        }
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
        "benchmark": "sandbox-agent vs docker",
        "samples": { "exec_agent": n_fast, "exec_docker_api": n_docker_api, "exec_docker_cli": n_docker_cli, "bulk": n_bulk },
        "release_build": !cfg!(debug_assertions),
        "rows": rows,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)?)?;
    eprintln!("bench: wrote {}", json_path.display());
    drop(sb);
    Ok(())
}
