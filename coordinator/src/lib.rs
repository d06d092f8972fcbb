//! The archfarm coordinator: agents join it over mutual TLS, clients submit jobs to it; it
//! places each action on an agent of the right platform under a lease, and keeps its state in
//! sled so that a restart loses nothing.
pub mod cache_scope;
pub mod cas;
pub mod config;
pub mod farm;
pub mod grpc;
pub mod hubs;
pub mod model;
pub mod pending_blobs;
pub mod pki;
pub mod planning;
pub mod result_cache;
pub mod revocations;
pub mod scheduler;
pub mod sharding;
pub mod store;

use anyhow::Context;
use archfarm_proto::v1;
use archfarm_proto::MAX_MESSAGE_BYTES;
use config::Config;
use grpc::{Shared, SharedRef};
use model::{now_unix_ms, Principal, Role};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

/// Opens the data dir: CA (created on first start with admin credentials), store, blobs.
pub fn open(config: &Config) -> anyhow::Result<SharedRef> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let farm_config = config.farm_config()?;
    let cas_budget_bytes = config.cas_budget_bytes()?;
    let (pki, _) = pki::Pki::load_or_create(dir, &config.advertise)?;
    let store = store::Store::open(&dir.join("state"))?;
    let admin = pki::admin_dir(dir);
    if !admin.join("cert.pem").exists() {
        let (creds, fp) = pki.issue_client("admin", 3650)?;
        store.put_principal(
            &fp,
            &Principal {
                role: Role::Admin,
                name: "admin".into(),
                revoked: false,
                trusted: true,
            },
        )?;
        store.flush()?;
        creds.store(&admin)?;
        tracing::info!(dir = %admin.display(), "created admin credentials");
    }
    let cas = Arc::new(cas::Cas::open_with_budget(
        &dir.join("cas"),
        cas_budget_bytes,
    )?);
    let farm = farm::Farm::load(store.clone(), cas.clone(), farm_config, now_unix_ms())?;
    let revoked = revocations::Revoked::from_records(
        store
            .principals()?
            .into_iter()
            .filter(|(_, p)| p.revoked)
            .map(|(fp, _)| fp),
        farm.agents()
            .filter(|a| a.record.revoked)
            .map(|a| a.record.id.0.clone()),
    );
    Ok(Arc::new(Shared {
        cache: farm.cache().clone(),
        farm: Mutex::new(farm),
        store,
        cas,
        pki,
        clock: now_unix_ms,
        revocations: revocations::Revocations::new(revoked),
        committing: tokio::sync::Mutex::new(()),
        committed: std::sync::atomic::AtomicU64::new(0),
        store_written: Default::default(),
    }))
}

/// Serves the farm on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    archfarm_proto::tls::install_crypto_provider();
    let shared = open(&config)?;
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &shared.pki.server_chain_pem,
            &shared.pki.server_key_pem,
        ))
        .client_ca_root(Certificate::from_pem(shared.pki.ca_pem()))
        .client_auth_optional(true);
    let ticker = {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = every.tick() => {
                        let now = shared.now();
                        let pruned = match shared.farm() {
                            Ok(mut farm) => {
                                if let Err(e) = farm.tick(now) {
                                    tracing::error!("failed to advance the farm: {e:#}");
                                }
                                farm.hubs().take_pruned()
                            }
                            Err(e) => {
                                tracing::error!("failed to lock the farm: {}", e.message());
                                Vec::new()
                            }
                        };
                        // Finished jobs' histories are freed here, not under the lock.
                        drop(pruned);
                        // Errors are logged where they happen (`internal`).
                        let _ = shared.commit().await;
                    }
                }
            }
        })
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), ca_hash = %shared.pki.ca_hash()?, "coordinator listening");
    let m = MAX_MESSAGE_BYTES;
    Server::builder()
        .tls_config(tls)
        .context("failed to configure TLS")?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(v1::join_server::JoinServer::new(grpc::join::JoinService(
            shared.clone(),
        )))
        .add_service(
            v1::agent_session_server::AgentSessionServer::new(grpc::session::SessionService(
                shared.clone(),
            ))
            .max_decoding_message_size(m)
            .max_encoding_message_size(m),
        )
        .add_service(
            v1::jobs_server::JobsServer::new(grpc::jobs::JobsService(shared.clone()))
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
        .add_service(v1::admin_server::AdminServer::new(
            grpc::admin::AdminService(shared.clone()),
        ))
        .add_service(
            v1::cas_server::CasServer::new(grpc::cas::CasService(shared.clone()))
                .max_decoding_message_size(m)
                .max_encoding_message_size(m),
        )
        .serve_with_incoming_shutdown(
            // tonic's own nodelay setting does not reach sockets from an incoming stream;
            // without it large CAS transfers crawl (Nagle plus delayed ACKs).
            tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                },
            ),
            shutdown.cancelled(),
        )
        .await
        .context("failed to serve")?;
    ticker.abort();
    if let Ok(mut farm) = shared.farm() {
        farm.commit()?;
    }
    Ok(())
}
