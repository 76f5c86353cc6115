//! The README's quick start, end to end: a hardened sandbox from the locally
//! built image, a command and a file round trip through its agent, then
//! what the agent reports about itself. The sandbox is removed at the end.
//!
//! Run it with `scripts/quickstart`, which builds the image first.

use anyhow::{ensure, Context};
use bridle_proto::sandbox::v1 as pb;
use bridle_tests::client::{self, shell};
use bridle_tests::docker::{require_docker, Sandbox, SandboxOptions};
use bytes::Bytes;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    ensure!(
        require_docker("quickstart"),
        "the Docker daemon is unreachable (is dockerd running?)"
    );
    println!("starting a sandbox (no network, 256 MiB, 128 pids, all capabilities dropped, read-only root)...");
    let sb = Sandbox::start(SandboxOptions::default())
        .await
        .context("starting the sandbox")?;
    println!("  container {}", &sb.id[..12]);
    let mut agent = sb.client()?;

    println!("\n$ uname -a; id; echo $((6 * 7))   (through the agent)");
    let r = client::run(&mut agent, shell("uname -a; id; echo $((6 * 7))")).await?;
    print!("{}", r.stdout_str());
    let exited = r.exited.context("the command did not finish")?;
    println!("  exit code {:?} in {} ms", exited.code, exited.duration_ms);
    ensure!(
        exited.code == Some(0),
        "the command failed: {}",
        r.stderr_str()
    );

    let data = Bytes::from(
        (0..1_000_000u32)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    );
    let sent_sha = bridle_tests::sha256_hex(&data);
    println!("\nwriting a {} byte file to notes/data.bin ...", data.len());
    let w = client::write_file(
        &mut agent,
        client::write_header("notes/data.bin"),
        data.clone(),
    )
    .await?;
    println!("  agent stored {} bytes, sha256 {}", w.size, w.sha256);
    let r = client::run(&mut agent, shell("sha256sum notes/data.bin")).await?;
    print!("  inside the sandbox: {}", r.stdout_str());
    let back = client::read_file(&mut agent, "notes/data.bin").await?;
    let back_sha = bridle_tests::sha256_hex(&back);
    println!("  read back {} bytes, sha256 {back_sha}", back.len());
    ensure!(
        w.sha256 == sent_sha && back_sha == sent_sha,
        "the round trip changed the file"
    );

    println!("\nan escape attempt is refused by the kernel-side path resolution:");
    match client::read_file(&mut agent, "../../etc/passwd").await {
        Err(status) => println!("  {:?}: {}", status.code(), status.message()),
        Ok(_) => anyhow::bail!("reading ../../etc/passwd succeeded"),
    }

    let info = agent.info(pb::InfoRequest {}).await?.into_inner();
    let cg = info.cgroup.unwrap_or_default();
    println!(
        "\nagent {} as pid {} uid {} (CapEff {}, no_new_privs {})",
        info.version, info.pid, info.uid, info.cap_eff, info.no_new_privs
    );
    println!(
        "  cgroup v{}: memory {} / {:?} bytes, pids {} / {:?}, agent RSS {} KiB",
        cg.version,
        cg.memory_current_bytes,
        cg.memory_limit_bytes,
        cg.pids_current,
        cg.pids_limit,
        info.agent_rss_bytes / 1024
    );
    println!("  capabilities: {}", info.capabilities.join(", "));
    drop(sb);
    println!("\nsandbox removed. All good.");
    Ok(())
}
