//! `farm run` against an in-process fake coordinator (plain HTTP/2 on loopback): the input
//! upload sends only missing blobs (big ones streamed), the watch runs to `finished`, the exit
//! code follows the actions, a broken watch stream is resumed, outputs are downloaded and the
//! JSON report says what happened.

// The fake's helpers are not #[test] functions; a panic there is a bug in the test.
#![allow(clippy::unwrap_used)]

use archfarm_client::farm::run::{run_job, RunArgs, RunProgress};
use archfarm_client::farm::upload::Progress;
use archfarm_client::farm::FarmClient;
use archfarm_proto::tree::build_local_tree;
use archfarm_proto::v1::cas_server::{Cas, CasServer};
use archfarm_proto::v1::jobs_server::{Jobs, JobsServer};
use archfarm_proto::v1::{self, job_event, ActionState, JobEvent};
use archfarm_proto::Digest;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

type Script = Vec<Result<JobEvent, Status>>;

#[derive(Default)]
struct FakeFarm {
    blobs: Mutex<HashMap<Digest, Vec<u8>>>,
    uploads: Mutex<usize>,
    /// Blobs that came in through Cas.Write, and the messages they took.
    streamed: Mutex<Vec<(Digest, usize)>>,
    submitted: Mutex<Vec<v1::JobSpec>>,
    /// One event script per Watch call, in order.
    watches: Mutex<VecDeque<Script>>,
    /// The Watch requests received.
    watch_requests: Mutex<Vec<v1::WatchRequest>>,
    /// What GetJob answers.
    job: Mutex<v1::JobStatus>,
}

#[derive(Clone, Default)]
struct Fake(Arc<FakeFarm>);

#[tonic::async_trait]
impl Cas for Fake {
    async fn find_missing(
        &self,
        request: Request<v1::FindMissingRequest>,
    ) -> Result<Response<v1::FindMissingResponse>, Status> {
        let blobs = self.0.blobs.lock().unwrap();
        let missing = request
            .into_inner()
            .digests
            .into_iter()
            .filter(|d| !blobs.contains_key(&Digest::from_proto(d).unwrap()))
            .collect();
        Ok(Response::new(v1::FindMissingResponse { missing }))
    }

    async fn batch_upload(
        &self,
        request: Request<v1::BatchUploadRequest>,
    ) -> Result<Response<v1::BatchUploadResponse>, Status> {
        let mut stored = 0;
        for blob in request.into_inner().blobs {
            let d = Digest::from_proto_required(blob.digest.as_ref())
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            if Digest::of(&blob.data) != d {
                return Err(Status::invalid_argument(format!("{d} does not match")));
            }
            stored += 1;
            *self.0.uploads.lock().unwrap() += 1;
            self.0.blobs.lock().unwrap().insert(d, blob.data);
        }
        Ok(Response::new(v1::BatchUploadResponse { stored }))
    }

    async fn batch_read(
        &self,
        request: Request<v1::BatchReadRequest>,
    ) -> Result<Response<v1::BatchReadResponse>, Status> {
        let blobs = self.0.blobs.lock().unwrap();
        let mut out = Vec::new();
        for d in request.into_inner().digests {
            let digest = Digest::from_proto(&d).unwrap();
            let data = blobs
                .get(&digest)
                .ok_or_else(|| Status::not_found(format!("{digest}")))?;
            out.push(v1::Blob {
                digest: Some(d),
                data: data.clone(),
            });
        }
        Ok(Response::new(v1::BatchReadResponse { blobs: out }))
    }

    async fn write(
        &self,
        request: Request<tonic::Streaming<v1::WriteRequest>>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut digest = None;
        let mut data = Vec::new();
        let mut messages = 0;
        while let Some(m) = stream.message().await? {
            messages += 1;
            if digest.is_none() {
                digest = Some(Digest::from_proto_required(m.digest.as_ref()).unwrap());
            }
            assert!(m.data.len() <= 1 << 20, "chunks of at most 1 MiB");
            data.extend_from_slice(&m.data);
        }
        let d = digest.ok_or_else(|| Status::invalid_argument("no digest"))?;
        if Digest::of(&data) != d {
            return Err(Status::invalid_argument(format!("{d} does not match")));
        }
        self.0.streamed.lock().unwrap().push((d, messages));
        let stored = self.0.blobs.lock().unwrap().insert(d, data).is_none();
        Ok(Response::new(v1::WriteResponse { stored }))
    }

    type ReadStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ReadResponse, Status>> + Send>>;

    async fn read(
        &self,
        request: Request<v1::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let d = Digest::from_proto_required(request.into_inner().digest.as_ref()).unwrap();
        let data = self
            .0
            .blobs
            .lock()
            .unwrap()
            .get(&d)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("{d}")))?;
        let chunks: Vec<Result<v1::ReadResponse, Status>> = data
            .chunks(1 << 20)
            .map(|c| Ok(v1::ReadResponse { data: c.to_vec() }))
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

#[tonic::async_trait]
impl Jobs for Fake {
    async fn submit(
        &self,
        request: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        self.0.submitted.lock().unwrap().push(spec);
        Ok(Response::new(v1::SubmitResponse {
            job_id: "job-1".into(),
        }))
    }

    type WatchStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<JobEvent, Status>> + Send + 'static>>;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.0.watch_requests.lock().unwrap().push(req.into_inner());
        let script = self
            .0
            .watches
            .lock()
            .unwrap()
            .pop_front()
            .ok_or_else(|| Status::unavailable("no more scripted watches"))?;
        Ok(Response::new(Box::pin(tokio_stream::iter(script))))
    }

    async fn get_job(
        &self,
        _: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        Ok(Response::new(self.0.job.lock().unwrap().clone()))
    }

    async fn cancel_job(
        &self,
        _: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        Ok(Response::new(v1::CancelJobResponse { cancelled: 0 }))
    }

    async fn lookup_steps(
        &self,
        _: Request<v1::LookupStepsRequest>,
    ) -> Result<Response<v1::LookupStepsResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn farm_status(
        &self,
        _: Request<v1::FarmStatusRequest>,
    ) -> Result<Response<v1::FarmStatusResponse>, Status> {
        Ok(Response::new(v1::FarmStatusResponse::default()))
    }
}

async fn start(fake: &Fake) -> FarmClient {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobsServer::new(fake.clone()))
            .add_service(CasServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FarmClient::from_channel(&url, channel)
}

fn status(platform: &str, state: ActionState, exit_code: Option<i32>) -> v1::ActionStatus {
    v1::ActionStatus {
        action_id: format!("job-1/{platform}"),
        platform: platform.into(),
        state: state as i32,
        attempts: u32::from(state != ActionState::Queued),
        agent_id: "agent-1".into(),
        emulated: platform != "linux/amd64",
        result: exit_code.map(|c| v1::ExecutionResult {
            outcome: v1::ExecutionOutcome::Exited as i32,
            exit_code: c,
            duration_ms: 1200,
            emulated: platform != "linux/amd64",
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn action(s: v1::ActionStatus) -> Result<JobEvent, Status> {
    Ok(JobEvent {
        kind: Some(job_event::Kind::Action(s)),
        ..Default::default()
    })
}

fn log(platform: &str, data: &str) -> Result<JobEvent, Status> {
    Ok(JobEvent {
        kind: Some(job_event::Kind::Log(v1::ActionLog {
            action_id: format!("job-1/{platform}"),
            platform: platform.into(),
            stream: v1::LogStream::Stdout as i32,
            data: data.as_bytes().to_vec(),
            attempt: 1,
        })),
        ..Default::default()
    })
}

fn job(platforms: &[&str], actions: Vec<v1::ActionStatus>, finished: bool) -> v1::JobStatus {
    v1::JobStatus {
        job_id: "job-1".into(),
        spec: Some(v1::JobSpec {
            platforms: platforms.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        }),
        actions,
        finished,
        ..Default::default()
    }
}

fn finished(platforms: &[&str], actions: Vec<v1::ActionStatus>) -> Result<JobEvent, Status> {
    Ok(JobEvent {
        kind: Some(job_event::Kind::Finished(job(platforms, actions, true))),
        ..Default::default()
    })
}

#[tokio::test]
async fn uploads_only_missing_blobs_and_follows_the_job_to_success() {
    let input = std::env::temp_dir().join(format!("xtask-farm-run-{}", std::process::id()));
    std::fs::create_dir_all(input.join("linux/arm64")).unwrap();
    std::fs::write(input.join("linux/arm64/hello"), "binary").unwrap();
    std::fs::write(input.join("README"), "readme").unwrap();
    let tree = build_local_tree(&input).unwrap();

    let fake = Fake::default();
    // The CAS already holds the README.
    fake.0
        .blobs
        .lock()
        .unwrap()
        .insert(Digest::of(b"readme"), b"readme".to_vec());
    let p = "linux/arm64";
    fake.0.watches.lock().unwrap().push_back(vec![
        action(status(p, ActionState::Queued, None)),
        action(status(p, ActionState::Running, None)),
        log(p, "hel"),
        log(p, "lo\n"),
        action(status(p, ActionState::Succeeded, Some(0))),
        finished(&[p], vec![status(p, ActionState::Succeeded, Some(0))]),
    ]);
    let mut client = start(&fake).await;
    let mut args = RunArgs::new([p], ["./{os}/{arch}/hello"]);
    args.input = Some(input.clone());
    args.allow_emulation = true;
    let outcome = run_job(&mut client, &args, Progress::Hidden, &mut |_| {})
        .await
        .unwrap();
    std::fs::remove_dir_all(&input).unwrap();

    assert_eq!(outcome.exit_code, 0);
    let upload = outcome.upload.unwrap();
    // Three directories (root, linux, linux/arm64) and two files; the README was there.
    assert_eq!((upload.blobs_total, upload.blobs_sent), (5, 4));
    assert_eq!(upload.bytes_deduplicated, 6);
    assert_eq!(*fake.0.uploads.lock().unwrap(), 4);
    let spec = fake.0.submitted.lock().unwrap()[0].clone();
    assert_eq!(spec.input_root, Some(tree.root.to_proto()));
    assert!(spec.allow_emulation);
    assert_eq!(spec.argv, ["./{os}/{arch}/hello"]);
    assert!(outcome.timings.first_line.is_some());
    assert!(outcome.job.unwrap().finished);
}

#[tokio::test]
async fn the_exit_code_is_the_first_failure_in_platform_order() {
    let (a, b) = ("linux/arm64", "linux/s390x");
    let fake = Fake::default();
    let end = vec![
        status(b, ActionState::Failed, Some(5)),
        status(a, ActionState::Failed, Some(3)),
    ];
    fake.0.watches.lock().unwrap().push_back(vec![
        action(status(a, ActionState::Running, None)),
        action(status(b, ActionState::Running, None)),
        finished(&[a, b], end),
    ]);
    let mut client = start(&fake).await;
    let args = RunArgs::new([a, b], ["false"]);
    let outcome = run_job(&mut client, &args, Progress::Hidden, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, 3);
    assert!(outcome.timings.first_line.is_none());
}

/// `e` as event `seq` of the coordinator process started at `epoch`.
fn numbered(e: Result<JobEvent, Status>, epoch: u64, seq: u64) -> Result<JobEvent, Status> {
    e.map(|mut e| {
        (e.epoch, e.seq) = (epoch, seq);
        e
    })
}

#[tokio::test]
async fn a_broken_watch_is_resumed_after_the_last_event() {
    let (a, b) = ("linux/amd64", "linux/riscv64");
    let fake = Fake::default();
    *fake.0.job.lock().unwrap() = job(&[a, b], Vec::new(), false);
    fake.0.watches.lock().unwrap().extend([
        vec![
            numbered(action(status(a, ActionState::Running, None)), 5, 1),
            numbered(action(status(b, ActionState::Running, None)), 5, 2),
            numbered(action(status(a, ActionState::Succeeded, Some(0))), 5, 3),
            numbered(log(b, "partial"), 5, 4),
            Err(Status::unavailable("coordinator restarting")),
        ],
        vec![
            // A restarted coordinator starts with every action's status again.
            action(status(a, ActionState::Succeeded, Some(0))),
            action(status(b, ActionState::Running, None)),
            log(b, " line\n"),
            action(status(b, ActionState::Succeeded, Some(0))),
            finished(
                &[a, b],
                vec![
                    status(a, ActionState::Succeeded, Some(0)),
                    status(b, ActionState::Succeeded, Some(0)),
                ],
            ),
        ],
    ]);
    let mut client = start(&fake).await;
    let args = RunArgs::new([a, b], ["true"]);
    let mut seen = Vec::new();
    let outcome = run_job(&mut client, &args, Progress::Hidden, &mut |p| seen.push(p))
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, 0);
    let breaks: Vec<&RunProgress> = seen
        .iter()
        .filter(|p| matches!(p, RunProgress::Lost { .. } | RunProgress::Resumed { .. }))
        .collect();
    assert!(
        matches!(
            breaks[..],
            [
                RunProgress::Lost { again: false, .. },
                RunProgress::Resumed { .. }
            ]
        ),
        "{breaks:?}"
    );
    assert!(matches!(seen.last(), Some(RunProgress::Finished { .. })));
    assert!(fake.0.watches.lock().unwrap().is_empty());
    let points: Vec<(u64, u64)> = fake
        .0
        .watch_requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.epoch, r.after_seq))
        .collect();
    assert_eq!(
        points,
        [(0, 0), (5, 4)],
        "the re-watch resumes after the last event"
    );
}

#[tokio::test]
async fn a_job_that_finished_while_the_watch_was_down_is_reported() {
    let a = "linux/ppc64le";
    let fake = Fake::default();
    *fake.0.job.lock().unwrap() = job(&[a], vec![status(a, ActionState::Failed, Some(42))], true);
    fake.0.watches.lock().unwrap().push_back(vec![
        action(status(a, ActionState::Running, None)),
        Err(Status::unavailable("gone")),
    ]);
    let mut client = start(&fake).await;
    let outcome = run_job(
        &mut client,
        &RunArgs::new([a], ["exit-42"]),
        Progress::Hidden,
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(outcome.exit_code, 42);
}

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn big_files_are_streamed_and_a_second_upload_sends_nothing() {
    use archfarm_client::farm::upload::upload_dir_with;
    let input = TempDir::new("upload-twice");
    let digests = TempDir::new("upload-twice-digest-cache");
    let big: Vec<u8> = (0..(5u32 << 20) + 3).map(|i| (i % 251) as u8).collect();
    std::fs::write(input.0.join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(input.0.join("src")).unwrap();
    std::fs::write(input.0.join("src/a.go"), "package a").unwrap();
    std::fs::write(input.0.join("src/b.go"), "package b").unwrap();
    std::fs::write(input.0.join("scratch.tmp"), "never uploaded").unwrap();
    std::fs::write(input.0.join(".farmignore"), "*.tmp\n").unwrap();
    let fake = Fake::default();
    let mut client = start(&fake).await;

    let first = upload_dir_with(&mut client, &input.0, Progress::Hidden, Some(&digests.0))
        .await
        .unwrap();
    // Root and src directories; big.bin, a.go, b.go and .farmignore.
    assert_eq!((first.blobs_total, first.blobs_sent), (6, 6));
    assert_eq!(first.bytes_deduplicated, 0);
    assert!(first.bytes_sent > big.len() as u64);
    let streamed = fake.0.streamed.lock().unwrap().clone();
    assert_eq!(streamed.len(), 1, "only the big file is streamed");
    assert_eq!(streamed[0].0, Digest::of(&big));
    assert_eq!(
        streamed[0].1,
        1 + 6,
        "a header and six chunks of at most 1 MiB"
    );
    assert!(!fake
        .0
        .blobs
        .lock()
        .unwrap()
        .contains_key(&Digest::of(b"never uploaded")));

    let second = upload_dir_with(&mut client, &input.0, Progress::Hidden, Some(&digests.0))
        .await
        .unwrap();
    assert_eq!(second.root, first.root);
    assert_eq!((second.blobs_sent, second.bytes_sent), (0, 0));
    assert_eq!(second.bytes_deduplicated, first.bytes_total);

    // One changed file: that blob and the two Directory messages above it.
    std::fs::write(input.0.join("src/b.go"), "package b // changed").unwrap();
    let third = upload_dir_with(&mut client, &input.0, Progress::Hidden, Some(&digests.0))
        .await
        .unwrap();
    assert_eq!(third.blobs_sent, 3);
    assert_ne!(third.root, first.root);
    assert_eq!(fake.0.streamed.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn outputs_are_downloaded_under_os_and_arch_and_reported_as_json() {
    use archfarm_client::farm::blobs::MAX_BATCH_BLOB_BYTES;
    use archfarm_proto::tree::build_local_tree;
    // What the agents produced: a file on arm/v7 (cached) and a directory on amd64.
    let produced = TempDir::new("outputs-produced");
    let out = produced.0.join("out");
    std::fs::create_dir_all(out.join("bin")).unwrap();
    std::fs::write(out.join("bin/tool"), "#!/bin/sh\necho hi\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(out.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    }
    let big: Vec<u8> = (0..MAX_BATCH_BLOB_BYTES as u32 + 10)
        .map(|i| (i * 13 % 256) as u8)
        .collect();
    std::fs::write(out.join("big.tar"), &big).unwrap();
    std::fs::write(out.join("copy.tar"), &big).unwrap();
    std::fs::create_dir_all(out.join("empty")).unwrap();
    std::os::unix::fs::symlink("bin/tool", out.join("link")).unwrap();
    let tree = build_local_tree(&out).unwrap();

    let fake = Fake::default();
    {
        let mut blobs = fake.0.blobs.lock().unwrap();
        for (d, bytes) in &tree.directories {
            blobs.insert(*d, bytes.clone());
        }
        for (d, path) in &tree.files {
            blobs.insert(*d, std::fs::read(path).unwrap());
        }
        blobs.insert(Digest::of(b"report"), b"report".to_vec());
    }
    let (arm, amd) = ("linux/arm/v7", "linux/amd64");
    let mut on_arm = status(arm, ActionState::Succeeded, Some(0));
    on_arm.cached = true;
    on_arm.action_digest = "cd".repeat(32);
    if let Some(r) = on_arm.result.as_mut() {
        r.output_files.push(v1::OutputFile {
            path: "report.txt".into(),
            digest: Some(Digest::of(b"report").to_proto()),
            executable: false,
        });
    }
    let mut on_amd = status(amd, ActionState::Succeeded, Some(0));
    if let Some(r) = on_amd.result.as_mut() {
        r.output_directories.push(v1::OutputDirectory {
            path: "out".into(),
            root: Some(tree.root.to_proto()),
        });
    }
    fake.0
        .watches
        .lock()
        .unwrap()
        .push_back(vec![finished(&[arm, amd], vec![on_amd, on_arm])]);
    let mut client = start(&fake).await;
    let dl = TempDir::new("outputs-downloaded");
    let report_path = dl.0.join("report.json");
    let mut args = RunArgs::new([arm, amd], ["make"]);
    args.outputs = vec!["report.txt".into(), "out/".into(), "out".into()];
    args.download = Some(dl.0.clone());
    args.json_report = Some(report_path.clone());
    args.no_cache = true;
    let outcome = run_job(&mut client, &args, Progress::Hidden, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(outcome.exit_code, 0);

    let spec = fake.0.submitted.lock().unwrap()[0].clone();
    assert_eq!(spec.output_paths, ["out", "report.txt"]);
    assert!(spec.no_cache);

    assert_eq!(
        std::fs::read(dl.0.join("linux/arm/v7/report.txt")).unwrap(),
        b"report"
    );
    let got = dl.0.join("linux/amd64/out");
    assert_eq!(std::fs::read(got.join("big.tar")).unwrap(), big);
    assert_eq!(std::fs::read(got.join("copy.tar")).unwrap(), big);
    assert!(got.join("empty").is_dir());
    assert_eq!(
        std::fs::read_link(got.join("link")).unwrap(),
        std::path::Path::new("bin/tool")
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(got.join("bin/tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
    }
    // The downloaded tree is the tree that was produced.
    assert_eq!(build_local_tree(&got).unwrap().root, tree.root);

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["job_id"], "job-1");
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["upload"], serde_json::Value::Null);
    assert_eq!(
        (report["ran"].as_u64(), report["cached"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(report["actions"][0]["platform"], arm);
    assert_eq!(report["actions"][0]["cached"], true);
    assert_eq!(report["actions"][0]["exit_code"], 0);
    assert_eq!(report["actions"][1]["cached"], false);
    assert_eq!(report["actions"][1]["output_directories"][0]["path"], "out");
    assert_eq!(report["downloads"].as_array().unwrap().len(), 2);
    assert_eq!(report["downloads"][1]["kind"], "directory");
    assert_eq!(report["downloads"][1]["files"], 3);

    // A second download replaces the first.
    std::fs::write(got.join("stale"), "left from before").unwrap();
    fake.0.watches.lock().unwrap().push_back(vec![finished(
        &[arm, amd],
        vec![
            outcome.job.as_ref().unwrap().actions[0].clone(),
            outcome.job.as_ref().unwrap().actions[1].clone(),
        ],
    )]);
    run_job(&mut client, &args, Progress::Hidden, &mut |_| {})
        .await
        .unwrap();
    assert!(!got.join("stale").exists());
}

#[tokio::test]
async fn a_corrupt_output_is_refused() {
    let fake = Fake::default();
    let claimed = Digest::of(b"the real thing");
    fake.0
        .blobs
        .lock()
        .unwrap()
        .insert(claimed, b"something else".to_vec());
    let p = "linux/s390x";
    let mut done = status(p, ActionState::Succeeded, Some(0));
    if let Some(r) = done.result.as_mut() {
        r.output_files.push(v1::OutputFile {
            path: "x".into(),
            digest: Some(claimed.to_proto()),
            executable: false,
        });
    }
    fake.0
        .watches
        .lock()
        .unwrap()
        .push_back(vec![finished(&[p], vec![done])]);
    let mut client = start(&fake).await;
    let dl = TempDir::new("corrupt-output");
    let mut args = RunArgs::new([p], ["true"]);
    args.download = Some(dl.0.clone());
    let e = run_job(&mut client, &args, Progress::Hidden, &mut |_| {})
        .await
        .unwrap_err();
    assert!(format!("{e:#}").contains("corrupt"), "{e:#}");
    assert!(!dl.0.join("linux/s390x/x").exists());
}
