//! `bridle sandbox cp`: one file into or out of a sandbox, streamed, with
//! a progress bar on a terminal; a copy cut short leaves nothing behind.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use bridle_client::control as pb;
use bridle_client::sandbox as agent_pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::conn::Conn;
use crate::render::{print_json, DownloadedView, UploadedView};

/// `ID:path` names a file in a sandbox.
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (id, path) = spec.split_once(':')?;
    (id.starts_with("sb-") && !id.contains('/')).then_some((id, path))
}

fn progress(total: Option<u64>, label: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(t) if t >= 8 << 20 => indicatif::ProgressBar::new(t),
        Some(_) => return indicatif::ProgressBar::hidden(),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(label.to_string());
    bar
}

pub(crate) async fn run(c: &mut Conn, src: &str, dst: &str) -> anyhow::Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((id, path))) => upload(c, src, id, path).await,
        (Some((id, path)), None) => download(c, id, path, dst).await,
        (Some(_), Some(_)) => {
            bail!("copying between two sandboxes is not supported; go through a local file")
        }
        (None, None) => {
            bail!("one side of cp must be a sandbox path, like sb-1234:path/in/workspace")
        }
    }
}

async fn upload(c: &mut Conn, src: &str, id: &str, path: &str) -> anyhow::Result<()> {
    let (mut reader, size, mode): (
        Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Option<u64>,
        u32,
    ) = if src == "-" {
        (Box::new(tokio::io::stdin()), None, 0o644)
    } else {
        use std::os::unix::fs::PermissionsExt;
        let f = tokio::fs::File::open(src)
            .await
            .with_context(|| format!("opening {src}"))?;
        let meta = f.metadata().await?;
        if !meta.is_file() {
            bail!("{src} is not a regular file");
        }
        (
            Box::new(f),
            Some(meta.len()),
            meta.permissions().mode() & 0o777,
        )
    };
    let path = if path.is_empty() || path.ends_with('/') {
        let name = Path::new(src)
            .file_name()
            .ok_or_else(|| anyhow!("name the destination file: {id}:path/name"))?;
        format!("{path}{}", name.to_string_lossy())
    } else {
        path.to_string()
    };
    let bar = progress(size, &format!("{src} → {id}:{path}"));
    let (tx, rx) = mpsc::channel(4);
    tx.send(pb::WriteFileRequest {
        request: Some(pb::write_file_request::Request::Header(
            pb::WriteFileHeader {
                sandbox_id: id.to_string(),
                file: Some(agent_pb::WriteFileHeader {
                    path: path.clone(),
                    mode,
                    create_parents: true,
                    // Announced, so that a copy cut short is never committed.
                    size,
                    ..Default::default()
                }),
            },
        )),
    })
    .await?;
    let feeder_bar = bar.clone();
    let feeder = tokio::spawn(async move {
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let n = match reader.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    // Ending the stream here would commit what was sent so
                    // far; the call is dropped instead (see below), with the
                    // stream still open, which the server takes as a failure.
                    std::mem::forget(tx);
                    return Err(e);
                }
            };
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(n);
            feeder_bar.inc(n as u64);
            let msg = pb::WriteFileRequest {
                request: Some(pb::write_file_request::Request::Data(buf.into())),
            };
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
        }
    });
    let call = c.sandboxes.write_file(ReceiverStream::new(rx));
    tokio::pin!(feeder);
    // A read error wins over the answer: the call is dropped unfinished.
    let answer = tokio::select! {
        answer = call => answer,
        Ok(Err(e)) = &mut feeder => return Err(e).with_context(|| format!("reading {src}")),
    };
    let r = answer?.into_inner();
    bar.finish_and_clear();
    if c.json {
        print_json(&UploadedView {
            path: &path,
            size: r.size,
            sha256: &r.sha256,
        });
    }
    Ok(())
}

async fn download(c: &mut Conn, id: &str, path: &str, dst: &str) -> anyhow::Result<()> {
    let mut chunks = c
        .sandboxes
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.to_string(),
            path: path.to_string(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    // Written to a temp file next to the destination and renamed when all
    // of it arrived, so a failed copy leaves no partial file.
    let (mut out, tmp, dst_path): (
        Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
        Option<PathBuf>,
        PathBuf,
    ) = if dst == "-" {
        (Box::new(tokio::io::stdout()), None, PathBuf::new())
    } else {
        let mut d = PathBuf::from(dst);
        if d.is_dir() {
            d.push(
                Path::new(path)
                    .file_name()
                    .ok_or_else(|| anyhow!("{path} has no file name"))?,
            );
        }
        let tmp = d.with_file_name(format!(
            ".{}.bridle-part",
            d.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        let f = tokio::fs::File::create(&tmp)
            .await
            .with_context(|| format!("creating {}", tmp.display()))?;
        (Box::new(f), Some(tmp), d)
    };
    let bar = progress(None, &format!("{id}:{path} → {dst}"));
    let result = async {
        let mut total = 0u64;
        while let Some(chunk) = chunks.message().await? {
            total += chunk.data.len() as u64;
            bar.inc(chunk.data.len() as u64);
            out.write_all(&chunk.data).await?;
        }
        out.flush().await?;
        Ok::<u64, anyhow::Error>(total)
    }
    .await;
    bar.finish_and_clear();
    match (result, tmp) {
        (Ok(total), Some(tmp)) => {
            drop(out);
            std::fs::rename(&tmp, &dst_path)?;
            if c.json {
                print_json(&DownloadedView {
                    path: dst_path.to_string_lossy().into_owned(),
                    size: total,
                });
            }
            Ok(())
        }
        (Ok(_), None) => Ok(()),
        (Err(e), tmp) => {
            if let Some(tmp) = tmp {
                let _ = std::fs::remove_file(tmp);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(remote("sb-12ab:dir/f"), Some(("sb-12ab", "dir/f")));
        assert_eq!(remote("./sb-1:x"), None);
        assert_eq!(remote("C:/x"), None);
        assert_eq!(remote("file"), None);
    }
}
