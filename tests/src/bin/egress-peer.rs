//! Both ends of the egress tests and benchmark, one static binary:
//!
//! - `serve DIR` — the far side, in a container on the test's own Docker
//!   network (standing in for the internet): HTTPS on port 443 with the
//!   certificate and key in `DIR` (`cert.pem`, `key.pem`). `/simple/`
//!   answers `hello over tls`, `/bytes/N` answers N bytes; every answer
//!   closes its connection.
//! - `fetch URL [CA]` — the near side, run in a sandbox as a package
//!   manager would be: an ordinary HTTP client (reqwest) that takes its
//!   proxy from `HTTPS_PROXY`/`HTTP_PROXY`, trusts `CA` (a PEM file) as
//!   well, and prints the body; exit 1 on anything but a 2xx.
//! - `time URL N [CA]` — N requests, each on a new connection, one after
//!   another; prints the p50 and the p99 in microseconds and the bytes/s of
//!   the largest (for the benchmark).
//! - `flood PROXY N URL` — N connections to the proxy at once, all open
//!   before any sends its request; prints how many got a 200, another
//!   answer, or nothing.
//! - `slowloris PROXY` — a request head trickled one byte a second; prints
//!   after how many seconds the proxy closed it (or `held` after 120 s).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let done = match args.as_slice() {
        ["serve", dir] => serve(dir).await,
        ["fetch", url] => fetch(url, None).await,
        ["fetch", url, ca] => fetch(url, Some(ca)).await,
        ["time", url, n] => time(url, n.parse().unwrap_or(10), None).await,
        ["time", url, n, ca] => time(url, n.parse().unwrap_or(10), Some(ca)).await,
        ["flood", proxy, n, url] => flood(proxy, n.parse().unwrap_or(1000), url).await,
        ["slowloris", proxy] => slowloris(proxy).await,
        _ => Err(anyhow::anyhow!(
            "usage: egress-peer serve DIR | fetch URL [CA] | time URL N [CA] | flood PROXY N URL | slowloris PROXY"
        )),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("egress-peer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(dir: &str) -> anyhow::Result<()> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let dir = std::path::Path::new(dir);
    let certs =
        CertificateDer::pem_file_iter(dir.join("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("key.pem"))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("0.0.0.0:443").await?;
    loop {
        let (conn, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(mut tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(conn)).await
            else {
                return;
            };
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&head);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let _ = answer(&mut tls, path).await;
            let _ = tls.shutdown().await;
        });
    }
}

async fn answer<W: AsyncWriteExt + Unpin>(w: &mut W, path: &str) -> std::io::Result<()> {
    if path == "/simple/" {
        let body = b"hello over tls\n";
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        w.write_all(head.as_bytes()).await?;
        return w.write_all(body).await;
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        w.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            w.write_all(&chunk[..k]).await?;
            left -= k as u64;
        }
        return Ok(());
    }
    w.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await
}

/// A client as a package manager's: proxies from the environment, the
/// system's roots and `ca`, no connection reused.
fn client(ca: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(60));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).with_context(|| format!("reading {ca}"))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

async fn fetch(url: &str, ca: Option<&str>) -> anyhow::Result<()> {
    let response = client(ca)?.get(url).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    use std::io::Write;
    std::io::stdout().write_all(&body)?;
    Ok(())
}

async fn time(url: &str, n: usize, ca: Option<&str>) -> anyhow::Result<()> {
    let client = client(ca)?;
    let mut took = Vec::with_capacity(n);
    let mut best_rate = 0.0f64;
    for _ in 0..n.max(1) {
        let start = Instant::now();
        let response = client.get(url).send().await?;
        if !response.status().is_success() {
            bail!("{}", response.status());
        }
        let body = response.bytes().await?;
        let elapsed = start.elapsed();
        took.push(elapsed.as_micros() as u64);
        best_rate = best_rate.max(body.len() as f64 / elapsed.as_secs_f64());
    }
    took.sort_unstable();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    println!(
        "p50_us={} p99_us={} bytes_per_s={:.0}",
        at(0.5),
        at(0.99),
        best_rate
    );
    Ok(())
}

async fn flood(proxy: &str, n: usize, url: &str) -> anyhow::Result<()> {
    raise_open_files();
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .context("flood takes an http:// URL")?
        .to_string();
    let request = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        open.push(tokio::net::TcpStream::connect(proxy).await?);
    }
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut each = Vec::with_capacity(n);
    for mut conn in open {
        let (start, request) = (start.clone(), request.clone());
        each.push(tokio::spawn(async move {
            start.wait().await;
            if conn.write_all(request.as_bytes()).await.is_err() {
                return None;
            }
            let mut got = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(120), conn.read_to_end(&mut got));
            match read.await {
                Ok(Ok(_)) if !got.is_empty() => {
                    Some(got.starts_with(b"HTTP/1.1 200 ") || got.starts_with(b"HTTP/1.0 200 "))
                }
                _ => None,
            }
        }));
    }
    let (mut ok, mut other, mut nothing) = (0, 0, 0);
    for e in each {
        match e.await? {
            Some(true) => ok += 1,
            Some(false) => other += 1,
            None => nothing += 1,
        }
    }
    println!("ok={ok} other={other} nothing={nothing}");
    Ok(())
}

async fn slowloris(proxy: &str) -> anyhow::Result<()> {
    let mut conn = tokio::net::TcpStream::connect(proxy).await?;
    let head = b"GET http://allowed.test/ HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    for byte in head.iter().cycle() {
        if start.elapsed() > Duration::from_secs(120) {
            println!("held");
            return Ok(());
        }
        if conn.write_all(&[*byte]).await.is_err() {
            break;
        }
        // A closed connection reads as its end (or the 400 it was told).
        match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    println!("closed_after_s={}", start.elapsed().as_secs());
    Ok(())
}

/// As many open files as the hard limit allows (a thousand connections).
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
