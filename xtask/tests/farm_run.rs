//! `farm run` against an in-process fake coordinator (plain HTTP/2 on loopback): the input
//! upload sends only missing blobs, the watch runs to `finished`, the exit code follows the
//! actions, and a broken watch stream is resumed.

// The fake's helpers are not #[test] functions; a panic there is a bug in the test.
#![allow(clippy::unwrap_used)]

use archfarm_proto::tree::build_local_tree;
use archfarm_proto::v1::cas_server::{Cas, CasServer};
use archfarm_proto::v1::jobs_server::{Jobs, JobsServer};
use archfarm_proto::v1::{self, job_event, ActionState, JobEvent};
use archfarm_proto::Digest;
use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};
use xtask::farm::run::{run_job, RunArgs, RunOutput};
use xtask::farm::FarmClient;

type Script = Vec<Result<JobEvent, Status>>;

#[derive(Default)]
struct FakeFarm {
    blobs: Mutex<HashMap<Digest, Vec<u8>>>,
    uploads: Mutex<usize>,
    submitted: Mutex<Vec<v1::JobSpec>>,
    /// One event script per Watch call, in order.
    watches: Mutex<VecDeque<Script>>,
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
        _: Request<v1::BatchReadRequest>,
    ) -> Result<Response<v1::BatchReadResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
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
        _: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
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
    let outcome = run_job(&mut client, &args, RunOutput::Quiet).await.unwrap();
    std::fs::remove_dir_all(&input).unwrap();

    assert_eq!(outcome.exit_code, 0);
    let upload = outcome.upload.unwrap();
    // Three directories (root, linux, linux/arm64) and two files; the README was there.
    assert_eq!((upload.total_blobs, upload.uploaded_blobs), (5, 4));
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
    let outcome = run_job(&mut client, &args, RunOutput::Quiet).await.unwrap();
    assert_eq!(outcome.exit_code, 3);
    assert!(outcome.timings.first_line.is_none());
}

#[tokio::test]
async fn a_broken_watch_is_resumed() {
    let (a, b) = ("linux/amd64", "linux/riscv64");
    let fake = Fake::default();
    *fake.0.job.lock().unwrap() = job(&[a, b], Vec::new(), false);
    fake.0.watches.lock().unwrap().extend([
        vec![
            action(status(a, ActionState::Running, None)),
            action(status(b, ActionState::Running, None)),
            action(status(a, ActionState::Succeeded, Some(0))),
            log(b, "partial"),
            Err(Status::unavailable("coordinator restarting")),
        ],
        vec![
            // A re-watch starts with every action's status again.
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
    let outcome = run_job(&mut client, &args, RunOutput::Print).await.unwrap();
    assert_eq!(outcome.exit_code, 0);
    assert!(fake.0.watches.lock().unwrap().is_empty());
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
        RunOutput::Quiet,
    )
    .await
    .unwrap();
    assert_eq!(outcome.exit_code, 42);
}
