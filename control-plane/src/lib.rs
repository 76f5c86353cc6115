//! bridle's control plane: authenticated gRPC in front of hardened Docker
//! sandboxes, each driven through its in-container agent.
//!
//! The `control-plane` binary parses [`config::Config`] and calls [`run`].
//! Everything testable lives here. Clients (the `bridle` CLI, the tests) use
//! the `bridle-client` crate instead, which links none of the server.

pub mod agents;
pub mod api;
pub mod approvals;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod clock;
pub mod config;
pub mod egress;
pub mod guard;
pub mod harness;
pub mod host;
pub mod ids;
pub mod keys;
pub mod policy;
pub mod runs;
pub mod runtime;
pub mod sandboxes;
pub mod store;
#[cfg(test)]
pub mod testing;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use bridle_proto::control::v1::{
    admin_server::AdminServer, approvals_server::ApprovalsServer, audit_server::AuditServer,
    runs_server::RunsServer, sandboxes_server::SandboxesServer,
};

use crate::config::{Config, ENDPOINT_FILE, INSTANCE_FILE};

/// Serves until `shutdown` resolves. Sandboxes (and the commands in them)
/// outlive the control plane: the next start re-adopts them.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    set_private(&data_dir)?;
    let store = store::Store::open(&data_dir.join("bridle.db"))
        .await
        .context("opening the store")?;
    let instance = store
        .instance_id(&ids::random_hex(8), clock::now_ms())
        .await
        .context("reading the instance id")?;
    std::fs::write(data_dir.join(INSTANCE_FILE), format!("{instance}\n"))?;
    let auth = auth::Auth::load(store.pool().clone()).await?;
    if let Some(path) = auth.bootstrap(&data_dir, clock::now_ms()).await? {
        tracing::info!(path = %path.display(), "wrote the bootstrap admin token (mode 0600)");
    }
    let docker = runtime::docker::Docker::connect(&config.docker, &instance).await?;
    let artifacts = artifacts::Artifacts::open(&data_dir)?;
    let store_pool = store.pool().clone();
    let run_events = runs::store::SqlEvents::new(store.pool().clone());
    // Over a damaged tail: refuse to start (naming the first bad entry), or
    // continue after it with the damage on record, as configured.
    let audit_log = audit::AuditLog::open_with(
        store.pool().clone(),
        audit::load_or_create_key(&data_dir).context("the audit signing key")?,
        if config.audit.continue_after_damage {
            audit::OnDamage::Continue
        } else {
            audit::OnDamage::Refuse
        },
    )
    .await
    .context("opening the audit log")?;
    let sealer = runs::sealed::Sealer::open_or_create(
        &config
            .secrets_key_file
            .clone()
            .unwrap_or_else(|| data_dir.join("secrets.key")),
    )?;
    let sandboxes =
        sandboxes::Sandboxes::new(config.clone(), docker, store.pool().clone(), artifacts)?;
    // Re-adopt what a previous run left, and remove orphans, before serving.
    sandboxes
        .reconcile()
        .await
        .context("reconciling sandboxes with Docker")?;

    let tls = match (&config.tls.cert, &config.tls.key) {
        (Some(cert), Some(key)) => {
            let cert = std::fs::read(cert)
                .with_context(|| format!("reading tls.cert {}", cert.display()))?;
            let key =
                std::fs::read(key).with_context(|| format!("reading tls.key {}", key.display()))?;
            Some(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key)),
            )
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let addr = listener.local_addr()?;
    // Written whole and renamed: a reader never sees half an address.
    let tmp = data_dir.join(format!(".{ENDPOINT_FILE}.tmp"));
    std::fs::write(&tmp, format!("{scheme}://{addr}\n"))?;
    std::fs::rename(&tmp, data_dir.join(ENDPOINT_FILE))?;
    tracing::info!(%addr, instance, data_dir = %data_dir.display(), "control plane serving");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let policies = policy::Policies::load(store_pool.clone())
        .await
        .context("loading the policy set in force")?;
    tracing::info!(version = policies.engine.current().1, "policy set in force");
    let approvals = approvals::Approvals::new(
        store_pool.clone(),
        audit_log.clone(),
        Duration::from_secs(config.approval_ttl_secs),
        config.approval_webhook_url.clone(),
    );
    let guard = guard::Guard {
        policies: policies.clone(),
        approvals: approvals.clone(),
        audit: audit_log.clone(),
    };
    // Pending approvals past their time expire even when nobody waits on them.
    tokio::spawn({
        let approvals = approvals.clone();
        let mut stop = stop_rx.clone();
        async move {
            loop {
                if let Err(e) = approvals.expire_due().await {
                    tracing::warn!("expiring approvals: {e}");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    });
    let runner = runs::executor::Runner::new(
        run_events,
        sandboxes.clone(),
        config.max_running_runs,
        config.max_running_runs_per_owner,
        sealer,
        guard.clone(),
        std::sync::Arc::new(
            harness::Settings::from_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        stop_rx.clone(),
    );
    runner.release_leftover_sandboxes().await;
    // Egress sandboxes' connections: each carried from the sandbox's relay
    // to the proxy, decided by policy, made from here.
    let egress_proxy = {
        let hosts: std::collections::HashMap<String, std::net::IpAddr> = config
            .egress
            .hosts
            .iter()
            .filter_map(|(name, addr)| {
                Some((
                    name.trim_end_matches('.').to_ascii_lowercase(),
                    addr.parse().ok()?,
                ))
            })
            .collect();
        let system = egress::proxy::system_resolver();
        let resolve: egress::proxy::Resolve = std::sync::Arc::new(move |host: String, port| {
            match hosts.get(host.trim_end_matches('.')) {
                Some(ip) => {
                    let found = vec![std::net::SocketAddr::new(*ip, port)];
                    Box::pin(async move { Ok(found) })
                }
                None => system(host, port),
            }
        });
        let settings = egress::proxy::Settings {
            treat_as_public: config.egress.public_networks()?,
            credentials: config.egress.credentials()?,
            ..Default::default()
        };
        std::sync::Arc::new(egress::proxy::Proxy::new(guard.clone(), resolve, settings))
    };
    tokio::spawn(egress::relay::follow_all(
        sandboxes.clone(),
        egress_proxy,
        stop_rx.clone(),
    ));
    // Every run the log says is unfinished continues where it stands, in the
    // order they were submitted.
    for id in runs::store::EventStore::unfinished(runner.store()).await? {
        match runner.view(&id).await {
            Ok(view) => {
                tracing::info!(run = %id, "resuming an unfinished run");
                runner.schedule(&view.owner, &id);
            }
            Err(e) => tracing::warn!(run = %id, "cannot resume: {e}"),
        }
    }
    let maintenance = tokio::spawn({
        let sandboxes = sandboxes.clone();
        let stop = stop_rx.clone();
        async move { sandboxes.maintain(stop).await }
    });
    tokio::spawn({
        let sandboxes = sandboxes.clone();
        let stop = stop_rx.clone();
        async move { sandboxes.watch_exits(stop).await }
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<SandboxesServer<api::sandboxes::SandboxesApi<runtime::docker::Docker>>>()
        .await;
    health
        .set_serving::<AdminServer<api::admin::AdminApi>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bridle_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let sandboxes_api = api::sandboxes::SandboxesApi {
        sandboxes: sandboxes.clone(),
        guard: guard.clone(),
        shutdown: stop_rx.clone(),
    };
    let runs_api = api::runs::RunsApi {
        runner,
        guard: guard.clone(),
    };
    let approvals_api = api::approvals::ApprovalsApi {
        guard: guard.clone(),
        shutdown: stop_rx.clone(),
    };
    if let Some(path) = config.policy_file.clone() {
        tokio::spawn(policies.clone().follow_file(path, stop_rx.clone()));
    }
    let admin_api = api::admin::AdminApi {
        auth: auth.clone(),
        policies,
        guard: guard.clone(),
    };

    let audit_at_stop = audit_log.clone();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let (signalled_tx, signalled_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = signalled_tx.send(());
    });
    let stop_for_server = stop_tx.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("tls.cert/tls.key: not a usable certificate and key")?;
    }
    let server = builder
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_concurrent_streams(1024)
        .layer(api::audit::AuditLayer {
            auth: auth.clone(),
            log: audit_log.clone(),
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            SandboxesServer::new(sandboxes_api)
                .max_decoding_message_size(16 << 20)
                .max_encoding_message_size(16 << 20),
        )
        .add_service(AdminServer::new(admin_api))
        .add_service(RunsServer::new(runs_api))
        .add_service(ApprovalsServer::new(approvals_api))
        .add_service(AuditServer::new(api::audit::AuditApi {
            log: audit_log.clone(),
            approvals: guard.approvals.clone(),
        }))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY small answers wait on delayed ACKs (40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = signalled_rx.await;
                tracing::info!("shutting down: no new calls; open streams end");
                // Open exec streams end now (their commands keep running).
                let _ = stop_for_server.send(true);
            },
        );
    tokio::pin!(server);
    let mut stop_seen = stop_tx.subscribe();
    tokio::select! {
        r = &mut server => r?,
        _ = async {
            let _ = stop_seen.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("streams still open after {} s; closing them", grace.as_secs()),
    }
    let _ = stop_tx.send(true);
    let _ = maintenance.await;
    // The log's writer is first in, first written: once this entry is
    // durable, so is every entry the calls before it queued.
    if let Err(e) = audit_at_stop
        .append(audit::Entry {
            unix_ms: clock::now_ms(),
            principal: "control-plane".into(),
            action: "control-plane.stop".into(),
            outcome: "ok".into(),
            ..Default::default()
        })
        .await
    {
        tracing::error!("audit: the last entries may not be on disk: {e:#}");
    }
    Ok(())
}

fn set_private(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", dir.display()))
}
