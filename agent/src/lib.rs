//! The archfarm agent: joins the farm once, then keeps a session with the coordinator and runs
//! the actions it is assigned. `run` is the whole agent; main.rs only parses flags around it.
mod abi_check;
pub mod backoff;
pub mod blob_cache;
pub mod cas;
pub mod config;
pub mod connection;
pub mod executor;
pub mod host;
pub mod isolation;
pub mod join;
pub mod limits;
pub mod outputs;
pub mod policy;
pub mod sandbox;
pub mod steps;
pub mod workspace;

pub use config::{AgentArgs, AgentConfig, Emulator};

use anyhow::Context;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long, after the last execution ended at shutdown, results may take to be acknowledged.
const FINAL_ACK_WAIT: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` fires (then cancels running actions and returns), or until
/// it cannot go on (bad config, refused join token, data directory in use).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate()?;
    archfarm_proto::tls::install_crypto_provider();
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create the data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    if nix::unistd::geteuid().is_root() {
        keep_private(&data_dir)?;
    }

    // Work directories of a previous run are leftovers: nothing of ours runs in them.
    let work_root = data_dir.join("work");
    workspace::remove_dir_forcibly(&work_root)?;
    std::fs::create_dir_all(&work_root)
        .with_context(|| format!("failed to create {}", work_root.display()))?;
    let cache_root = data_dir.join("cache").join("blobs");
    let budget = config.cache_budget_bytes;
    let cache =
        tokio::task::spawn_blocking(move || blob_cache::BlobCache::open(&cache_root, budget))
            .await
            .context("failed to open the blob cache")??;
    tracing::info!(
        "blob cache: {} files, {} bytes, budget {} bytes",
        cache.file_count(),
        cache.bytes(),
        cache.budget_bytes()
    );

    let host = host::HostFacts::detect();
    let platforms = config.offered_platforms();
    tracing::info!(
        "archfarm-agent {} on {} ({} cores, kernel {}): offering {} with {} slots",
        env!("CARGO_PKG_VERSION"),
        host.hostname,
        host.cores,
        host.kernel,
        platforms
            .iter()
            .map(|(p, emulated)| if *emulated {
                format!("{p} (emulated)")
            } else {
                p.to_string()
            })
            .collect::<Vec<_>>()
            .join(", "),
        config.slots
    );

    let isolation = {
        let (choice, data_dir, work_root) = (config.sandbox, data_dir.clone(), work_root.clone());
        let uid = config.sandbox_uid;
        let (limits, watchdog, allow_network) =
            (config.limits, config.watchdog, config.allow_network);
        tokio::task::spawn_blocking(move || -> anyhow::Result<isolation::Isolation> {
            let sandbox = sandbox::Sandbox::detect(choice, &data_dir, &work_root, uid)?;
            let enforcer = limits::Enforcer::detect(&format!("archfarm-{}", std::process::id()));
            Ok(isolation::Isolation::new(
                sandbox,
                enforcer,
                limits,
                watchdog,
                allow_network,
            ))
        })
        .await
        .context("failed to set up the sandbox")??
    };
    let Some(joined) = join::ensure_joined(&config, &host.hostname, &shutdown).await? else {
        return Ok(());
    };

    let policy = connection::PolicyFacts {
        sandbox: isolation.sandbox.describe(config.allow_network),
        limits: isolation.describe_limits(),
        accept_labels: config.accept_labels.clone(),
        allow_network: config.allow_network,
        min_free_disk_bytes: config.min_free_disk_bytes,
    };
    tracing::info!("sandbox: {}; limits: {}", policy.sandbox, policy.limits);

    // Actions running as the agent's own user could write through a hard link into the blob
    // cache; as root the sandbox runs them as another user, who cannot.
    let cache = match &isolation.sandbox {
        sandbox::Sandbox::Bwrap(b) if b.user.is_none() => cache.copying_inputs(),
        _ => cache,
    };
    let settings = executor::ExecutorSettings {
        work_root,
        cache,
        kill_grace: config.kill_grace,
        native: platforms
            .iter()
            .find(|(_, emulated)| !emulated)
            .map(|(p, _)| p.clone()),
        emulators: config
            .emulators
            .iter()
            .map(|e| (e.platform.clone(), e.wrapper.clone()))
            .collect(),
        hostname: host.hostname.clone(),
        executed: Default::default(),
        isolation: std::sync::Arc::new(isolation),
    };
    let state = connection::AgentState::new(connection::StateParts {
        coordinator_url: config.coordinator_url.clone(),
        data_dir,
        host,
        platforms,
        slots: config.slots,
        settings,
        policy,
        agent_id: joined.agent_id.clone(),
        shutdown: shutdown.clone(),
    });

    // At shutdown the session stays up while running actions are cancelled and report back.
    let sessions_stop = CancellationToken::new();
    let stopper = {
        let state = state.clone();
        let sessions_stop = sessions_stop.clone();
        let kill_grace = config.kill_grace;
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let running = state.running_count();
            tracing::info!("stopping: cancelling {running} running actions");
            state.abandon_all("the agent shut down while it ran");
            state.tracker().close();
            let limit = kill_grace + Duration::from_secs(15);
            if tokio::time::timeout(limit, state.tracker().wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    "failed to finish every action within {} s of shutdown",
                    limit.as_secs()
                );
            }
            let deadline = tokio::time::Instant::now() + FINAL_ACK_WAIT;
            while state.pending_count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sessions_stop.cancel();
        })
    };
    connection::run_sessions(state, joined.credentials, sessions_stop).await;
    stopper.await.context("failed to stop cleanly")?;
    tracing::info!("stopped");
    Ok(())
}

/// Takes group and other permissions off `data_dir`: it holds the agent's credentials and
/// blob cache, and a root agent's actions run as another user (who reaches only its own work
/// dir, through the sandbox's mount namespace).
fn keep_private(data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data_dir)
        .with_context(|| format!("failed to read {}", data_dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(mode & 0o700))
            .with_context(|| format!("failed to make {} private", data_dir.display()))?;
        tracing::info!(
            "data directory {} made private (mode {:o}, was {:o})",
            data_dir.display(),
            mode & 0o700,
            mode & 0o777
        );
    }
    Ok(())
}

/// Holds an exclusive lock on `data_dir/agent.lock` so two agents never share a data dir.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let path = data_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "failed to lock {}: {e} (is another agent using this data directory?)",
            path.display()
        )
    })
}
