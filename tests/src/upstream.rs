//! The internet, as the egress tests and benchmark stand it in: servers in
//! containers on a Docker network of the test's own (never an outside
//! address), removed with the network when dropped (and swept by label if
//! the process dies first).
//!
//! - `web`: busybox httpd on port 8080 — `/simple/` (`hello from
//!   upstream`), `/private/` behind basic auth ([`UPSTREAM_USER`]), and
//!   `/big` ([`BIG_BYTES`] bytes);
//! - `tls`: `egress-peer serve` on port 443, its certificate for
//!   [`TLS_NAME`] signed by a CA made here ([`Upstream::ca_pem`]).

use crate::PATIENCE;

/// What the web server wants for `/private/`, and the header that carries
/// it (what the proxy adds when configured to).
pub const UPSTREAM_USER: &str = "alice:s3cret-upstream";
pub const UPSTREAM_AUTH: &str = "Basic YWxpY2U6czNjcmV0LXVwc3RyZWFt";
/// The TLS server's name.
pub const TLS_NAME: &str = "secure.test";
/// Numbers the networks of one process.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The size of the web server's `/big`.
pub const BIG_BYTES: u64 = 64 << 20;

pub struct Upstream {
    containers: Vec<String>,
    network: String,
    /// The web server's and the TLS server's addresses on the network.
    pub web_ip: String,
    pub tls_ip: String,
    /// The network's subnet (`egress.treat_as_public` names it).
    pub subnet: String,
    /// The CA the TLS server's certificate is signed by.
    pub ca_pem: String,
    _dir: tempfile::TempDir,
}

/// Runs docker with `args`, within [`PATIENCE`]; its stdout.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = std::process::Command::new("docker");
    cmd.args(args);
    let out = crate::output_within(&mut cmd, PATIENCE)?;
    if !out.status.success() {
        anyhow::bail!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Upstream {
    pub fn start() -> anyhow::Result<Upstream> {
        let image = crate::docker::ensure_image()?;
        let labels = crate::sweep::label_args();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        let network = format!(
            "bridle-egress-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let mut create = vec!["network", "create"];
        create.extend(&labels);
        create.push(&network);
        docker(&create)?;
        let mut up = Upstream {
            containers: Vec::new(),
            subnet: docker(&[
                "network",
                "inspect",
                "-f",
                "{{(index .IPAM.Config 0).Subnet}}",
                &network,
            ])?,
            network,
            web_ip: String::new(),
            tls_ip: String::new(),
            ca_pem: String::new(),
            _dir: crate::sweep::temp_dir("bridle-upstream-")?,
        };
        let serve = format!(
            "mkdir -p /tmp/www/simple /tmp/www/private \
             && echo hello from upstream > /tmp/www/simple/index.html \
             && echo the private page > /tmp/www/private/index.html \
             && dd if=/dev/zero of=/tmp/www/big bs=1048576 count={} 2>/dev/null \
             && echo /private:{UPSTREAM_USER} > /tmp/httpd.conf \
             && exec busybox httpd -f -p 8080 -h /tmp/www -c /tmp/httpd.conf",
            BIG_BYTES >> 20
        );
        let web = up.run(&["--entrypoint", "/bin/busybox", &image, "sh", "-c", &serve])?;
        up.web_ip = up.ip(&web)?;

        // The TLS server: a CA, and a certificate for its name.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "bridle test upstream CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec![TLS_NAME.to_string()])?.signed_by(&key, &issuer)?;
        let dir = up._dir.path().join("tls");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("cert.pem"), cert.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("key.pem"), std::fs::Permissions::from_mode(0o644))?;
        std::fs::set_permissions(up._dir.path(), std::fs::Permissions::from_mode(0o755))?;
        up.ca_pem = ca_cert.pem();
        let peer = crate::workspace_binary("bridle-tests", "egress-peer")?;
        let mount_peer = format!("{}:/peer:ro", peer.display());
        let mount_tls = format!("{}:/tls:ro", dir.display());
        let tls = up.run(&[
            "-v",
            &mount_peer,
            "-v",
            &mount_tls,
            "--entrypoint",
            "/peer",
            &image,
            "serve",
            "/tls",
        ])?;
        up.tls_ip = up.ip(&tls)?;
        Ok(up)
    }

    /// Starts a container on the network (as root, so the TLS server may
    /// bind 443).
    fn run(&mut self, args: &[&str]) -> anyhow::Result<String> {
        let labels = crate::sweep::label_args();
        let mut run = vec!["run", "-d", "--user", "0", "--network", &self.network];
        run.extend(labels.iter().map(String::as_str));
        run.extend(args);
        let id = docker(&run)?;
        self.containers.push(id.clone());
        Ok(id)
    }

    fn ip(&self, container: &str) -> anyhow::Result<String> {
        docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            container,
        ])
    }

    /// Puts the web server on Docker's default bridge too (where `bridge`
    /// sandboxes are) and answers its address there.
    pub fn web_on_bridge(&self) -> anyhow::Result<String> {
        let web = &self.containers[0];
        docker(&["network", "connect", "bridge", web])?;
        let ip = docker(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.bridge.IPAddress}}",
            web,
        ])?;
        Ok(ip)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}
