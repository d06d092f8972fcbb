//! `cargo xtask bench cas`: the content-addressed store, measured in one run.
//! (a) cold ingest of a source tree (hash + FindMissing + upload, as `farm run --input` does)
//! next to `b3sum` over the same files, (b) warm re-upload of the same tree (digest cache +
//! FindMissing, and without the cache: hash + FindMissing) next to hashing alone, (c)
//! FindMissing latency for 100k random digests, (d) Cas.Write and Cas.Read of a 1 GiB blob
//! over loopback. The digest cache is a private one that starts empty, so (a) is cold.
//! Slow figures are reported, never fatal: the exit code is non-zero only when a measurement
//! failed.
use super::private::PrivateCoordinator;
use super::spread;
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::config::{ConnectArgs, ProcessEnv};
use archfarm_client::farm::blobs::{find_missing, read_to_file, write_file, STREAM_CHUNK_BYTES};
use archfarm_client::farm::display::{format_bytes, format_duration, mib};
use archfarm_client::farm::status::farm_status;
use archfarm_client::farm::upload::{hash_dir, upload_dir_with, Progress, UploadReport};
use archfarm_client::farm::FarmClient;
use archfarm_proto::tree::{list_files, BuildOptions};
use archfarm_proto::Digest;
use comfy_table::{presets, ContentArrangement, Table};
use indicatif::ProgressBar;
use rand::{Rng, RngCore, SeedableRng};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `cargo xtask bench cas [options]`.
#[derive(clap::Args, Debug)]
pub struct CasArgs {
    #[command(flatten)]
    pub farm: ConnectArgs,
    /// Always start a private coordinator (from target/debug, empty store), even when the
    /// farm given answers; a farm that already holds the tree cannot measure a cold ingest.
    #[arg(long)]
    pub private: bool,
    /// Program to start as the private coordinator instead of building and starting
    /// target/debug/archfarm-coordinator (e.g. a release build).
    #[arg(long, value_name = "PATH")]
    pub coordinator_bin: Option<PathBuf>,
    /// The source tree to ingest.
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/go/src")]
    pub tree: PathBuf,
    /// Size of the big blob in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub blob_mib: u64,
    /// Seed of the random digests and of the big blob's bytes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Hash-only and warm re-upload runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub warm_runs: u32,
    /// Run only these parts, e.g. `ad`: (a) cold ingest and b3sum, (b) warm re-upload,
    /// (c) FindMissing, (d) big blob.
    #[arg(long, value_name = "PARTS", default_value = "abcd")]
    pub only: String,
}

/// Digests per FindMissing call measured.
pub const FIND_MISSING_DIGESTS: usize = 100_000;
/// FindMissing calls measured (the median is reported).
pub const FIND_MISSING_CALLS: usize = 5;

/// One row of the result table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Wall time, when it is a timing.
    pub time: Option<Duration>,
    /// Throughput or ratio, already in words.
    pub rate: String,
    /// Everything else worth knowing.
    pub detail: String,
}

impl Row {
    fn new(what: impl Into<String>, time: Option<Duration>, rate: String, detail: String) -> Self {
        Self {
            what: what.into(),
            time,
            rate,
            detail,
        }
    }

    fn failed(what: impl Into<String>, error: &anyhow::Error) -> Self {
        Self::new(what, None, "-".into(), format!("error: {error:#}"))
    }
}

/// `123.4 MiB/s`.
pub fn rate(bytes: u64, time: Duration) -> String {
    let secs = time.as_secs_f64();
    if secs <= 0.0 {
        return "-".to_string();
    }
    format!("{:.1} MiB/s", bytes as f64 / (1u64 << 20) as f64 / secs)
}

/// The table printed at the end.
pub fn render_rows(rows: &[Row]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec!["measurement", "time", "throughput", "detail"]);
    for r in rows {
        t.add_row(vec![
            r.what.clone(),
            r.time.map_or("-".to_string(), format_duration_precise),
            r.rate.clone(),
            r.detail.clone(),
        ]);
    }
    t
}

/// Milliseconds below 10 s (`842ms`, `1234ms`), else [`format_duration`].
fn format_duration_precise(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{}ms", d.as_millis())
    } else {
        format_duration(d)
    }
}

/// The farm to measure: the one given when it answers (unless `--private`), else a private
/// coordinator.
async fn connect(args: &CasArgs) -> anyhow::Result<(FarmClient, Option<PrivateCoordinator>)> {
    if !args.private {
        let options = args.farm.resolve(&ProcessEnv);
        let coordinator = options
            .as_ref()
            .map_or("the configured coordinator", |o| o.coordinator.as_str());
        let attempt = async {
            let mut client =
                FarmClient::connect(options.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?)
                    .await?;
            farm_status(&mut client, 1).await?;
            anyhow::Ok(client)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(client)) => {
                eprintln!("measuring the farm at {coordinator}");
                return Ok((client, None));
            }
            Ok(Err(e)) => eprintln!(
                "no farm answers at {coordinator} ({e:#}); starting a private coordinator"
            ),
            Err(_) => eprintln!(
                "no farm answers at {coordinator} within 5s; starting a private coordinator"
            ),
        }
    }
    let (coordinator, client) = PrivateCoordinator::start(args.coordinator_bin.as_deref()).await?;
    eprintln!(
        "measuring a private coordinator at {}",
        coordinator.options.coordinator
    );
    Ok((client, Some(coordinator)))
}

/// Runs the benchmark and prints the table.
pub async fn run(args: &CasArgs) -> anyhow::Result<u8> {
    if args.warm_runs == 0 || args.blob_mib == 0 {
        bail!("--warm-runs and --blob-mib must be at least 1");
    }
    if let Some(c) = args.only.chars().find(|c| !"abcd".contains(*c)) {
        bail!("--only takes letters of abcd, not {c:?}");
    }
    let (mut client, coordinator) = connect(args).await?;
    let target = paths::target_dir();
    std::fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let digests = tempfile::Builder::new()
        .prefix("bench-digests-")
        .tempdir_in(&target)
        .context("failed to create a directory for the digest cache")?;
    let mut rows = Vec::new();
    let mut failed = false;
    let mut record = |what: String, result: anyhow::Result<Vec<Row>>| match result {
        Ok(r) => rows.extend(r),
        Err(e) => {
            failed = true;
            rows.push(Row::failed(what, &e));
        }
    };
    let part = |c: char| args.only.contains(c);
    if part('a') {
        eprintln!("(a) cold ingest of {}", args.tree.display());
        let what = format!("ingest {} (cold)", args.tree.display());
        record(what, ingest_rows(&mut client, args, digests.path()).await);
    }
    if part('b') {
        eprintln!("(b) warm re-upload");
        let rows = warm_rows(&mut client, args, digests.path()).await;
        record("warm re-upload".into(), rows);
    }
    if part('c') {
        eprintln!("(c) FindMissing of {FIND_MISSING_DIGESTS} digests");
        let row = find_missing_row(&mut client, args.seed).await;
        record("FindMissing".into(), row.map(|r| vec![r]));
    }
    if part('d') {
        let size = format_bytes(args.blob_mib << 20);
        eprintln!("(d) a {size} blob up and down");
        record("big blob".into(), big_blob_rows(&mut client, args).await);
    }
    if let Some(c) = coordinator {
        c.stop();
    }
    println!("{}", render_rows(&rows));
    Ok(u8::from(failed))
}

/// Reads every file once so that the first timed pass does not measure the disk.
fn warm_page_cache(files: &[PathBuf]) -> anyhow::Result<()> {
    for p in files {
        std::fs::read(p).with_context(|| format!("failed to read {}", p.display()))?;
    }
    Ok(())
}

/// (a): cold ingest (with the empty digest cache in `digests`, which it fills), b3sum, and
/// their ratio.
async fn ingest_rows(
    client: &mut FarmClient,
    args: &CasArgs,
    digests: &Path,
) -> anyhow::Result<Vec<Row>> {
    let options = BuildOptions {
        honour_farmignore: true,
    };
    let files = list_files(&args.tree, &options)?;
    if files.is_empty() {
        bail!("{} holds no files", args.tree.display());
    }
    let owned = files.clone();
    tokio::task::spawn_blocking(move || warm_page_cache(&owned))
        .await
        .context("failed to join the reading task")??;

    let mut bytes = 0;
    for f in &files {
        bytes += std::fs::metadata(f)
            .with_context(|| format!("failed to read {}", f.display()))?
            .len();
    }

    let started = Instant::now();
    let report = upload_dir_with(client, &args.tree, Progress::Hidden, Some(digests)).await?;
    let total = started.elapsed();
    let mut rows = vec![Row::new(
        format!("ingest {} (cold)", args.tree.display()),
        Some(total),
        rate(bytes, total),
        format!(
            "{} files, {}; hash + FindMissing + upload as `farm run` does; {}{}",
            files.len(),
            format_bytes(bytes),
            report.summary(),
            if report.blobs_sent < report.blobs_total {
                " (not cold: the farm held some; try --private)"
            } else {
                ""
            }
        ),
    )];
    match b3sum_time(&files).await {
        Ok((b3sum, runs, program)) => {
            rows.push(Row::new(
                "b3sum, same files",
                Some(b3sum),
                rate(bytes, b3sum),
                format!("{runs} runs of {}", program.display()),
            ));
            rows.push(Row::new(
                "ingest / b3sum throughput",
                None,
                format!("{:.2}x", b3sum.as_secs_f64() / total.as_secs_f64()),
                "aim: at least 0.90x".to_string(),
            ));
        }
        Err(e) => rows.push(Row::failed("b3sum, same files", &e)),
    }
    Ok(rows)
}

/// `b3sum` on PATH, else under target/bench-tools, else installed there with `cargo install`.
fn find_or_install_b3sum() -> anyhow::Result<PathBuf> {
    if let Some(p) = crate::demo::find_program("b3sum") {
        return Ok(p);
    }
    let root = paths::target_dir().join("bench-tools");
    let local = root.join("bin").join("b3sum");
    if local.is_file() {
        return Ok(local);
    }
    eprintln!(
        "b3sum is not on PATH; installing it with `cargo install b3sum --root {}` \
         (or install it yourself: `cargo install b3sum`)",
        root.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::demo::run_checked(
        Command::new(cargo)
            .args(["install", "--quiet", "--locked", "b3sum", "--root"])
            .arg(&root),
        "install b3sum (`cargo install b3sum`)",
    )?;
    if !local.is_file() {
        bail!("cargo install b3sum left no {}", local.display());
    }
    Ok(local)
}

/// Splits arguments into command lines of at most `max_bytes` of arguments, like xargs.
pub fn xargs_batches(args: &[PathBuf], max_bytes: usize) -> Vec<&[PathBuf]> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut bytes = 0;
    for (i, a) in args.iter().enumerate() {
        let len = a.as_os_str().len() + 1;
        if i > start && bytes + len > max_bytes {
            batches.push(&args[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += len;
    }
    if start < args.len() {
        batches.push(&args[start..]);
    }
    batches
}

/// Wall time of b3sum hashing `files` (in xargs-like batches, one after another); the number
/// of runs and the program.
async fn b3sum_time(files: &[PathBuf]) -> anyhow::Result<(Duration, usize, PathBuf)> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || {
        let program = find_or_install_b3sum()?;
        let batches = xargs_batches(&files, 128 * 1024);
        let started = Instant::now();
        for batch in &batches {
            let status = Command::new(&program)
                .args(*batch)
                .stdout(Stdio::null())
                .status()
                .with_context(|| format!("failed to run {}", program.display()))?;
            if !status.success() {
                bail!("{} ended with {status}", program.display());
            }
        }
        Ok((started.elapsed(), batches.len(), program))
    })
    .await
    .context("failed to join the b3sum task")?
}

/// (b): hashing alone against re-uploading a tree the farm holds: with the digest cache in
/// `digests` (stat + FindMissing) and without it (hash + FindMissing).
async fn warm_rows(
    client: &mut FarmClient,
    args: &CasArgs,
    digests: &Path,
) -> anyhow::Result<Vec<Row>> {
    // The farm holds the tree and the cache knows it, also when part (a) did not run.
    upload_dir_with(client, &args.tree, Progress::Hidden, Some(digests)).await?;
    let mut hash_only = Vec::new();
    let mut cached = Vec::new();
    let mut uncached = Vec::new();
    let mut last: Option<(UploadReport, UploadReport)> = None;
    let mut bytes = 0;
    for _ in 0..args.warm_runs {
        let started = Instant::now();
        let tree = hash_dir(&args.tree).await?;
        hash_only.push(started.elapsed());
        bytes = tree.stats.file_bytes;

        let started = Instant::now();
        let with = upload_dir_with(client, &args.tree, Progress::Hidden, Some(digests)).await?;
        cached.push(started.elapsed());

        let started = Instant::now();
        let without = upload_dir_with(client, &args.tree, Progress::Hidden, None).await?;
        uncached.push(started.elapsed());
        last = Some((with, without));
    }
    let (with, without) = last.context("no warm run")?;
    let (Some(h), Some(c), Some(u)) = (spread(&hash_only), spread(&cached), spread(&uncached))
    else {
        bail!("no warm run");
    };
    let sent = |r: &UploadReport| {
        format!(
            "{} blobs sent, {} sent",
            r.blobs_sent,
            format_bytes(r.bytes_sent)
        )
    };
    let ratio = |t: Duration| t.as_secs_f64() / h.median.as_secs_f64();
    Ok(vec![
        Row::new(
            "hash only (warm page cache)",
            Some(h.median),
            rate(bytes, h.median),
            format!(
                "median of {}; min {}",
                args.warm_runs,
                format_duration_precise(h.min)
            ),
        ),
        Row::new(
            "warm re-upload (digest cache + FindMissing)",
            Some(c.median),
            rate(bytes, c.median),
            format!(
                "{}; {:.2}x of hash only (aim: at most 1.00x); min {}",
                sent(&with),
                ratio(c.median),
                format_duration_precise(c.min)
            ),
        ),
        Row::new(
            "warm re-upload, no digest cache (hash + FindMissing)",
            Some(u.median),
            rate(bytes, u.median),
            format!(
                "{}; {:.2}x of hash only; min {}",
                sent(&without),
                ratio(u.median),
                format_duration_precise(u.min)
            ),
        ),
    ])
}

/// Random digests of random sizes (up to 1 MiB), from `seed`.
pub fn random_digests(seed: u64, n: usize) -> Vec<Digest> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut hash = [0u8; 32];
            rng.fill_bytes(&mut hash);
            Digest::from_parts(hash, rng.gen_range(1..=1 << 20))
        })
        .collect()
}

/// (c): FindMissing of 100k digests the store does not hold, [`FIND_MISSING_CALLS`] times.
async fn find_missing_row(client: &mut FarmClient, seed: u64) -> anyhow::Result<Row> {
    let mut times = Vec::new();
    for call in 0..FIND_MISSING_CALLS {
        let digests = random_digests(seed.wrapping_add(call as u64), FIND_MISSING_DIGESTS);
        let started = Instant::now();
        let missing = find_missing(client, &digests).await?;
        times.push(started.elapsed());
        if missing.len() != digests.len() {
            bail!(
                "FindMissing said {} of {} random digests are present",
                digests.len() - missing.len(),
                digests.len()
            );
        }
    }
    let s = spread(&times).context("no FindMissing call")?;
    Ok(Row::new(
        format!("FindMissing, {}k digests", FIND_MISSING_DIGESTS / 1000),
        Some(s.median),
        format!(
            "{:.0}k digests/s",
            FIND_MISSING_DIGESTS as f64 / 1000.0 / s.median.as_secs_f64()
        ),
        format!(
            "median of {FIND_MISSING_CALLS} calls; min {}, max {}",
            format_duration_precise(s.min),
            format_duration_precise(s.max)
        ),
    ))
}

/// Writes `size` bytes from a seeded fast RNG to `path`; returns their digest.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<Digest> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::with_capacity(
        STREAM_CHUNK_BYTES,
        std::fs::File::create(path)
            .with_context(|| format!("failed to create {}", path.display()))?,
    );
    let mut hasher = blake3::Hasher::new();
    let mut chunk = vec![0u8; STREAM_CHUNK_BYTES];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        file.write_all(&chunk[..n])
            .with_context(|| format!("failed to write {}", path.display()))?;
        left -= n as u64;
    }
    file.flush()
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(Digest::from_hasher(&hasher, size))
}

/// (d): one big blob through Cas.Write and back through Cas.Read.
async fn big_blob_rows(client: &mut FarmClient, args: &CasArgs) -> anyhow::Result<Vec<Row>> {
    let target = paths::target_dir();
    std::fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("bench-blob-")
        .tempdir_in(&target)
        .context("failed to create a directory for the big blob")?;
    let size = args.blob_mib << 20;
    let source = dir.path().join("blob");
    let (path, seed) = (source.clone(), args.seed);
    let digest = tokio::task::spawn_blocking(move || write_random_file(&path, size, seed))
        .await
        .context("failed to join the writing task")??;

    let started = Instant::now();
    let stored = write_file(client, digest, &source, &ProgressBar::hidden()).await?;
    let up = started.elapsed();
    let back = dir.path().join("back");
    let started = Instant::now();
    read_to_file(client, digest, &back, false, &ProgressBar::hidden()).await?;
    let down = started.elapsed();
    let name = format!("{} MiB", mib(size).trim_end_matches(".0"));
    Ok(vec![
        Row::new(
            format!("Cas.Write, {name} blob"),
            Some(up),
            rate(size, up),
            format!(
                "from a file in 1 MiB chunks; {}",
                if stored {
                    "new to the store"
                } else {
                    "the store held it already (bytes still sent and checked)"
                }
            ),
        ),
        Row::new(
            format!("Cas.Read, {name} blob"),
            Some(down),
            rate(size, down),
            "into a file, hashed and checked on the way".to_string(),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_under_the_argument_limit() {
        let args: Vec<PathBuf> = (0..10).map(|i| PathBuf::from(format!("f{i}"))).collect();
        let batches = xargs_batches(&args, 9);
        assert_eq!(
            batches.iter().map(|b| b.len()).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        let long = vec![PathBuf::from("x".repeat(50))];
        assert_eq!(xargs_batches(&long, 9).len(), 1, "a long one goes alone");
        assert!(xargs_batches(&[], 9).is_empty());
    }

    #[test]
    fn random_inputs_follow_the_seed() {
        assert_eq!(random_digests(7, 3), random_digests(7, 3));
        assert_ne!(random_digests(7, 3), random_digests(8, 3));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        let d = write_random_file(&p, (1 << 20) + 5, 3).unwrap();
        assert_eq!(d, Digest::of(&std::fs::read(&p).unwrap()));
        assert_eq!(d, write_random_file(&p, (1 << 20) + 5, 3).unwrap());
    }

    #[test]
    fn the_table_reads_with_rates_and_errors() {
        let rows = vec![
            Row::new(
                "Cas.Write, 1024 MiB blob",
                Some(Duration::from_millis(2500)),
                rate(1 << 30, Duration::from_millis(2500)),
                "new".into(),
            ),
            Row::failed("FindMissing", &anyhow::anyhow!("unavailable")),
        ];
        let text = render_rows(&rows).to_string();
        assert!(
            text.contains("2500ms") && text.contains("409.6 MiB/s"),
            "{text}"
        );
        assert!(text.contains("error: unavailable"), "{text}");
    }
}
