//! One table of malformed requests across every service (Cas, Join, AgentSession, Jobs,
//! Admin), each with the gRPC status code and part of the message it must get from a real
//! coordinator; afterwards the coordinator is still up, nothing was stored or registered, and
//! it logged no ERROR. The command line turns such refusals into readable messages.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1::{self, agent_message::Kind as AgentKind};
use archfarm_proto::Digest;
use archfarm_tests::*;
use prost::Message;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Call<'a> = Box<dyn Fn() -> Result<(), Status> + 'a>;

/// One malformed request: the service, what is wrong, the call, and what it must get.
struct Row<'a> {
    service: &'static str,
    what: &'static str,
    call: Call<'a>,
    code: Code,
    text: String,
}

fn row<'a>(
    rows: &mut Vec<Row<'a>>,
    service: &'static str,
    what: &'static str,
    code: Code,
    text: &str,
    call: Call<'a>,
) {
    rows.push(Row {
        service,
        what,
        call,
        code,
        text: text.to_string(),
    });
}

fn jobs(ch: &Channel) -> v1::jobs_client::JobsClient<Channel> {
    v1::jobs_client::JobsClient::new(ch.clone())
}
fn cas(ch: &Channel) -> v1::cas_client::CasClient<Channel> {
    v1::cas_client::CasClient::new(ch.clone())
}
fn admin(ch: &Channel) -> v1::admin_client::AdminClient<Channel> {
    v1::admin_client::AdminClient::new(ch.clone())
}
fn join(ch: &Channel) -> v1::join_client::JoinClient<Channel> {
    v1::join_client::JoinClient::new(ch.clone())
}

fn base_spec() -> v1::JobSpec {
    v1::JobSpec {
        platforms: vec!["linux/amd64".into()],
        argv: vec!["true".into()],
        timeout_ms: 60_000,
        ..Default::default()
    }
}

fn blob(data: &[u8]) -> v1::Blob {
    v1::Blob {
        digest: Some(Digest::of(data).to_proto()),
        data: data.to_vec(),
    }
}

fn agent_message(kind: AgentKind) -> v1::AgentMessage {
    v1::AgentMessage { kind: Some(kind) }
}

/// Opens a session sending `messages` and reads until the coordinator refuses (the call or
/// the stream); Ok when it does not within 10 s or ends the stream without a status.
fn session_refusal(
    farm: &Farm,
    creds: &std::path::Path,
    messages: Vec<v1::AgentMessage>,
) -> Result<(), Status> {
    let mut messages = messages.into_iter();
    let mut s = farm.open_session(creds, messages.next().unwrap())?;
    for m in messages {
        farm.send(&s, m);
    }
    loop {
        match farm.next_message(&mut s, Duration::from_secs(10)) {
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            Err(e) if e.code() == Code::DeadlineExceeded && e.message().starts_with("test:") => {
                return Ok(())
            }
            Err(e) => return Err(e),
        }
    }
}

/// A Directory uploaded to the CAS (which stores any bytes), for a job to name as its input.
fn upload_dir(farm: &Farm, ch: &Channel, dir: &v1::Directory) -> v1::Digest {
    let bytes = dir.encode_to_vec();
    let d = Digest::of(&bytes).to_proto();
    farm.block_on(cas(ch).batch_upload(v1::BatchUploadRequest {
        blobs: vec![blob(&bytes)],
    }))
    .unwrap();
    d
}

#[test]
fn malformed_requests_to_every_service_get_precise_statuses() {
    let mut farm = Farm::start(&["--unschedulable-grace-s", "3600"]);
    // An agent that joined and then went away: the table speaks with its certificate.
    let i = farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let agent_creds = farm.agent_credentials(i);
    // One action leased and finished, so that a fence was issued.
    let done = farm
        .submit_as(Some(&farm.admin_dir()), base_spec())
        .unwrap();
    farm.wait_for("the first job to finish", Duration::from_secs(30), |f| {
        f.job(&done).is_ok_and(|j| j.finished)
    });
    let done_action = format!("{done}/linux/amd64");
    farm.agents[i].kill();
    farm.wait_for("the agent's session to end", Duration::from_secs(30), |f| {
        f.status()
            .is_ok_and(|s| s.agents[0].state == v1::AgentState::Lost as i32)
    });
    let client_creds = farm.client_credentials("ci");
    let admin_ch = farm.channel(Some(&farm.admin_dir())).unwrap();
    let client_ch = farm.channel(Some(&client_creds)).unwrap();
    let anonymous = farm.channel(None).unwrap();
    let (expired, _) = farm.token(&["--ttl", "1s"]);
    let (good_token, _) = farm.token(&[]);
    let wrong_secret = format!("{}.{}", &good_token[..6], "0".repeat(16));
    std::thread::sleep(Duration::from_millis(1500));
    let queued = farm
        .submit_as(Some(&client_creds), {
            let mut s = base_spec();
            s.platforms = vec!["linux/s390x".into()];
            s
        })
        .unwrap();
    let hello_ok = || hello("linux/amd64");

    // Trees: each bad Directory is stored and refused when a job names it.
    let file = v1::FileNode {
        name: "f".into(),
        digest: Some(Digest::of(b"hello").to_proto()),
        executable: false,
    };
    farm.block_on(cas(&admin_ch).batch_upload(v1::BatchUploadRequest {
        blobs: vec![blob(b"hello")],
    }))
    .unwrap();
    let named = |n: &str| v1::FileNode {
        name: n.into(),
        ..file.clone()
    };
    let trees: Vec<(&'static str, v1::Directory, &'static str)> = vec![
        (
            "tree: path traversal",
            v1::Directory {
                files: vec![named("..")],
                ..Default::default()
            },
            "is . or ..",
        ),
        (
            "tree: slash in a name",
            v1::Directory {
                files: vec![named("a/b")],
                ..Default::default()
            },
            "contains /",
        ),
        (
            "tree: empty name",
            v1::Directory {
                files: vec![named("")],
                ..Default::default()
            },
            "empty",
        ),
        (
            "tree: symlink escape",
            v1::Directory {
                symlinks: vec![v1::SymlinkNode {
                    name: "l".into(),
                    target: "../../etc/passwd".into(),
                }],
                ..Default::default()
            },
            "leaves the input root",
        ),
        (
            "tree: unsorted",
            v1::Directory {
                files: vec![named("b"), named("a")],
                ..Default::default()
            },
            "not sorted",
        ),
        (
            "tree: duplicate",
            v1::Directory {
                files: vec![named("a"), named("a")],
                ..Default::default()
            },
            "not sorted",
        ),
    ];

    let queued_action = format!("{queued}/linux/s390x");
    let mut rows: Vec<Row> = Vec::new();
    // ---- Jobs
    let submit = |spec: Option<v1::JobSpec>| {
        farm.block_on(jobs(&client_ch).submit(v1::SubmitRequest { spec }))
            .map(drop)
    };
    let with = |f: fn(&mut v1::JobSpec)| {
        let mut s = base_spec();
        f(&mut s);
        Some(s)
    };
    row(
        &mut rows,
        "Jobs",
        "no spec",
        Code::InvalidArgument,
        "spec: missing",
        Box::new(|| submit(None)),
    );
    row(
        &mut rows,
        "Jobs",
        "empty argv",
        Code::InvalidArgument,
        "argv: a command is required",
        Box::new(|| submit(with(|s| s.argv.clear()))),
    );
    row(
        &mut rows,
        "Jobs",
        "unknown platform",
        Code::InvalidArgument,
        "unknown platform \"linux/mips\"",
        Box::new(|| submit(with(|s| s.platforms = vec!["linux/mips".into()]))),
    );
    row(
        &mut rows,
        "Jobs",
        "no platform",
        Code::InvalidArgument,
        "platforms: at least one",
        Box::new(|| submit(with(|s| s.platforms.clear()))),
    );
    row(
        &mut rows,
        "Jobs",
        "duplicate platform",
        Code::InvalidArgument,
        "linux/amd64 given twice",
        Box::new(|| submit(with(|s| s.platforms.push("linux/amd64".into())))),
    );
    row(
        &mut rows,
        "Jobs",
        "zero timeout",
        Code::InvalidArgument,
        "timeout_ms: 0 is outside",
        Box::new(|| submit(with(|s| s.timeout_ms = 0))),
    );
    row(
        &mut rows,
        "Jobs",
        "absurd timeout",
        Code::InvalidArgument,
        "timeout_ms",
        Box::new(|| submit(with(|s| s.timeout_ms = u64::MAX))),
    );
    row(
        &mut rows,
        "Jobs",
        "oversized env",
        Code::InvalidArgument,
        "env: 200006 bytes",
        Box::new(|| {
            submit(with(|s| {
                s.env = vec![v1::EnvVar {
                    name: "HUGE".into(),
                    value: "x".repeat(200_000),
                }]
            }))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "bad env name",
        Code::InvalidArgument,
        "not a variable name",
        Box::new(|| {
            submit(with(|s| {
                s.env = vec![v1::EnvVar {
                    name: "A=B".into(),
                    value: String::new(),
                }]
            }))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "escaping workdir",
        Code::InvalidArgument,
        "working_directory",
        Box::new(|| submit(with(|s| s.working_directory = "../x".into()))),
    );
    row(
        &mut rows,
        "Jobs",
        "bad input root digest",
        Code::InvalidArgument,
        "input_root",
        Box::new(|| {
            submit(with(|s| {
                s.input_root = Some(v1::Digest {
                    hash: "zz".into(),
                    size_bytes: 1,
                })
            }))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "input root not uploaded",
        Code::FailedPrecondition,
        "upload",
        Box::new(|| {
            submit(with(|s| {
                s.input_root = Some(Digest::of(b"nothing uploaded").to_proto())
            }))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "output path escapes",
        Code::InvalidArgument,
        "output_paths",
        Box::new(|| submit(with(|s| s.output_paths = vec!["../x".into()]))),
    );
    row(
        &mut rows,
        "Jobs",
        "bad required label",
        Code::InvalidArgument,
        "required_labels",
        Box::new(|| {
            submit(with(|s| {
                s.required_labels = vec![v1::Label {
                    key: "Bad Key".into(),
                    value: String::new(),
                }]
            }))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "step sets with argv",
        Code::InvalidArgument,
        "platforms and argv must be empty",
        Box::new(|| {
            submit(with(|s| {
                s.step_sets = vec![v1::PlatformSteps {
                    platform: "linux/amd64".into(),
                    steps: vec![],
                }]
            }))
        }),
    );
    for (what, dir, text) in &trees {
        let root = upload_dir(&farm, &admin_ch, dir);
        let spec = v1::JobSpec {
            input_root: Some(root),
            ..base_spec()
        };
        row(
            &mut rows,
            "Jobs",
            what,
            Code::InvalidArgument,
            text,
            Box::new(move || submit(Some(spec.clone()))),
        );
    }
    row(
        &mut rows,
        "Jobs",
        "step watchdog over 24 h",
        Code::InvalidArgument,
        "timeout_ms 18446744073709551615 is more than 24 h",
        Box::new(|| {
            let step = v1::Step {
                name: "s".into(),
                argv: vec!["true".into()],
                timeout_ms: u64::MAX,
                ..Default::default()
            };
            let spec = v1::JobSpec {
                platforms: vec![],
                argv: vec![],
                step_sets: vec![v1::PlatformSteps {
                    platform: "linux/amd64".into(),
                    steps: vec![
                        step.clone(),
                        v1::Step {
                            name: "t".into(),
                            ..step
                        },
                    ],
                }],
                ..base_spec()
            };
            submit(Some(spec))
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "get an unknown job",
        Code::NotFound,
        "does not exist",
        Box::new(|| {
            farm.block_on(jobs(&client_ch).get_job(v1::GetJobRequest {
                job_id: "j-999999".into(),
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "cancel an unknown job",
        Code::NotFound,
        "does not exist",
        Box::new(|| {
            farm.block_on(jobs(&client_ch).cancel_job(v1::CancelJobRequest {
                job_id: "j-999999".into(),
                reason: String::new(),
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "watch an unknown job",
        Code::NotFound,
        "does not exist",
        Box::new(|| {
            farm.block_on(jobs(&client_ch).watch(v1::WatchRequest {
                job_id: "nope".into(),
                ..Default::default()
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "step cache key not hex",
        Code::InvalidArgument,
        "is not 64 hex digits",
        Box::new(|| {
            farm.block_on(jobs(&client_ch).lookup_steps(v1::LookupStepsRequest {
                cache_keys: vec!["xyz".into()],
                allow_emulation: false,
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "submit without a certificate",
        Code::Unauthenticated,
        "needs a client certificate",
        Box::new(|| {
            farm.block_on(jobs(&anonymous).submit(v1::SubmitRequest {
                spec: Some(base_spec()),
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Jobs",
        "submit as an agent",
        Code::PermissionDenied,
        "has role agent",
        Box::new(|| farm.submit_as(Some(&agent_creds), base_spec()).map(drop)),
    );
    // ---- Cas
    let upload = |blobs: Vec<v1::Blob>| {
        farm.block_on(cas(&client_ch).batch_upload(v1::BatchUploadRequest { blobs }))
            .map(drop)
    };
    row(
        &mut rows,
        "Cas",
        "upload: bytes do not match the digest",
        Code::InvalidArgument,
        "declared",
        Box::new(|| {
            upload(vec![v1::Blob {
                digest: Some(Digest::of(b"hello").to_proto()),
                data: b"jello".to_vec(),
            }])
        }),
    );
    row(
        &mut rows,
        "Cas",
        "upload: size that lies",
        Code::InvalidArgument,
        "does not match its digest",
        Box::new(|| {
            let mut lie = Digest::of(b"hello").to_proto();
            lie.size_bytes = 4;
            upload(vec![v1::Blob {
                digest: Some(lie),
                data: b"hello".to_vec(),
            }])
        }),
    );
    row(
        &mut rows,
        "Cas",
        "upload: no digest",
        Code::InvalidArgument,
        "blob #0 has no digest",
        Box::new(|| {
            upload(vec![v1::Blob {
                digest: None,
                data: b"x".to_vec(),
            }])
        }),
    );
    row(
        &mut rows,
        "Cas",
        "find missing: bad hex",
        Code::InvalidArgument,
        "digest #0",
        Box::new(|| {
            farm.block_on(cas(&client_ch).find_missing(v1::FindMissingRequest {
                digests: vec![v1::Digest {
                    hash: "abc".into(),
                    size_bytes: 1,
                }],
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Cas",
        "batch read: a blob not stored",
        Code::NotFound,
        "is not in the store",
        Box::new(|| {
            farm.block_on(cas(&client_ch).batch_read(v1::BatchReadRequest {
                digests: vec![Digest::of(b"never stored").to_proto()],
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Cas",
        "batch read: more than a message holds",
        Code::InvalidArgument,
        "exceeds the message limit",
        Box::new(|| {
            let mut huge = Digest::of(b"x").to_proto();
            huge.size_bytes = 1 << 40;
            farm.block_on(cas(&client_ch).batch_read(v1::BatchReadRequest {
                digests: vec![huge],
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Cas",
        "batch read: sizes that add up past 2^64",
        Code::InvalidArgument,
        "exceeds the message limit",
        Box::new(|| {
            let mut huge = Digest::of(b"x").to_proto();
            huge.size_bytes = u64::MAX;
            farm.block_on(cas(&client_ch).batch_read(v1::BatchReadRequest {
                digests: vec![huge.clone(), huge],
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Cas",
        "read: no digest",
        Code::InvalidArgument,
        "read:",
        Box::new(|| {
            farm.block_on(cas(&client_ch).read(v1::ReadRequest { digest: None }))
                .map(drop)
        }),
    );
    row(
        &mut rows,
        "Cas",
        "read: a blob not stored",
        Code::NotFound,
        "is not in the store",
        Box::new(|| {
            farm.block_on(async {
                let mut s = cas(&client_ch)
                    .read(v1::ReadRequest {
                        digest: Some(Digest::of(b"never stored").to_proto()),
                    })
                    .await?
                    .into_inner();
                while s.message().await?.is_some() {}
                Ok(())
            })
        }),
    );
    let write = |msgs: Vec<v1::WriteRequest>| {
        farm.block_on(cas(&client_ch).write(tokio_stream::iter(msgs)))
            .map(drop)
    };
    row(
        &mut rows,
        "Cas",
        "write: empty stream",
        Code::InvalidArgument,
        "the first message must carry the digest",
        Box::new(|| write(vec![])),
    );
    row(
        &mut rows,
        "Cas",
        "write: bytes do not match the digest",
        Code::InvalidArgument,
        "nothing was stored",
        Box::new(|| {
            write(vec![v1::WriteRequest {
                digest: Some(Digest::of(b"hello").to_proto()),
                data: b"jello".to_vec(),
            }])
        }),
    );
    row(
        &mut rows,
        "Cas",
        "write: more bytes than declared",
        Code::InvalidArgument,
        "declares 2 bytes but at least 5 arrived",
        Box::new(|| {
            let mut short = Digest::of(b"hello").to_proto();
            short.size_bytes = 2;
            write(vec![v1::WriteRequest {
                digest: Some(short),
                data: b"hello".to_vec(),
            }])
        }),
    );
    row(
        &mut rows,
        "Cas",
        "find missing without a certificate",
        Code::Unauthenticated,
        "needs a client certificate",
        Box::new(|| {
            farm.block_on(cas(&anonymous).find_missing(v1::FindMissingRequest::default()))
                .map(drop)
        }),
    );
    // ---- Join
    let join_with = |token: &str, csr: &str, hostname: &str| {
        farm.block_on(join(&anonymous).join(v1::JoinRequest {
            token: token.into(),
            csr_pem: csr.into(),
            hostname: hostname.into(),
        }))
        .map(drop)
    };
    row(
        &mut rows,
        "Join",
        "malformed token",
        Code::Unauthenticated,
        "malformed join token",
        Box::new(|| join_with("nonsense", "", "h")),
    );
    row(
        &mut rows,
        "Join",
        "unknown token",
        Code::Unauthenticated,
        "not known to this farm",
        Box::new(|| join_with("abcdef.0123456789abcdef", "", "h")),
    );
    row(
        &mut rows,
        "Join",
        "wrong secret",
        Code::Unauthenticated,
        "wrong secret",
        Box::new(|| join_with(&wrong_secret, "", "h")),
    );
    row(
        &mut rows,
        "Join",
        "expired token",
        Code::Unauthenticated,
        "expired",
        Box::new(|| join_with(&expired, "", "h")),
    );
    row(
        &mut rows,
        "Join",
        "not a CSR",
        Code::InvalidArgument,
        "bad certificate signing request",
        Box::new(|| join_with(&good_token, "not a csr", "h")),
    );
    row(
        &mut rows,
        "Join",
        "hostname too long",
        Code::InvalidArgument,
        "hostname is longer than 253 bytes",
        Box::new(|| join_with(&good_token, "", &"h".repeat(300))),
    );
    row(
        &mut rows,
        "Join",
        "CSR too large",
        Code::InvalidArgument,
        "CSR is larger than 64 KiB",
        Box::new(|| join_with(&good_token, &"x".repeat(70_000), "h")),
    );
    // ---- AgentSession
    let heartbeat = || agent_message(AgentKind::Heartbeat(v1::Heartbeat::default()));
    let session = |msgs: Vec<v1::AgentMessage>| session_refusal(&farm, &agent_creds, msgs);
    row(
        &mut rows,
        "AgentSession",
        "first message is not a hello",
        Code::InvalidArgument,
        "the first session message must be a hello",
        Box::new(|| session(vec![heartbeat()])),
    );
    row(
        &mut rows,
        "AgentSession",
        "hello offers no platform",
        Code::InvalidArgument,
        "hello offers no platform",
        Box::new(|| {
            session(vec![hello_message(v1::Hello {
                slots: 1,
                ..Default::default()
            })])
        }),
    );
    row(
        &mut rows,
        "AgentSession",
        "hello offers an unknown platform",
        Code::InvalidArgument,
        "hello:",
        Box::new(|| session(vec![hello("linux/mips")])),
    );
    row(
        &mut rows,
        "AgentSession",
        "hello offers a platform twice",
        Code::InvalidArgument,
        "twice",
        Box::new(|| {
            let offer = v1::PlatformOffer {
                platform: "linux/amd64".into(),
                emulated: false,
            };
            session(vec![hello_message(v1::Hello {
                platforms: vec![offer.clone(), offer],
                slots: 1,
                ..Default::default()
            })])
        }),
    );
    row(
        &mut rows,
        "AgentSession",
        "hello with zero slots",
        Code::InvalidArgument,
        "slots must be 1..=1024",
        Box::new(|| {
            session(vec![hello_message(v1::Hello {
                platforms: vec![v1::PlatformOffer {
                    platform: "linux/amd64".into(),
                    emulated: false,
                }],
                slots: 0,
                ..Default::default()
            })])
        }),
    );
    row(
        &mut rows,
        "AgentSession",
        "hello sent twice",
        Code::InvalidArgument,
        "hello sent twice",
        Box::new(|| session(vec![hello_ok(), hello_ok()])),
    );
    row(
        &mut rows,
        "AgentSession",
        "empty message",
        Code::InvalidArgument,
        "empty agent message",
        Box::new(|| session(vec![hello_ok(), v1::AgentMessage { kind: None }])),
    );
    row(
        &mut rows,
        "AgentSession",
        "completion without a result",
        Code::InvalidArgument,
        "has no result",
        Box::new(|| {
            session(vec![
                hello_ok(),
                agent_message(AgentKind::Completed(v1::ActionCompleted {
                    action_id: "x".into(),
                    fence: 1,
                    result: None,
                })),
            ])
        }),
    );
    row(
        &mut rows,
        "AgentSession",
        "result for an action that does not exist",
        Code::PermissionDenied,
        "does not exist",
        Box::new(|| session(vec![hello_ok(), completed("j-999999/linux/amd64", 1)])),
    );
    row(
        &mut rows,
        "AgentSession",
        "result for an action never leased",
        Code::PermissionDenied,
        "was never leased",
        Box::new(|| session(vec![hello_ok(), completed(&queued_action, 1)])),
    );
    row(
        &mut rows,
        "AgentSession",
        "result under a fence never issued",
        Code::PermissionDenied,
        "was never issued",
        Box::new(|| session(vec![hello_ok(), completed(&done_action, 1 << 60)])),
    );
    row(
        &mut rows,
        "AgentSession",
        "session as a client",
        Code::PermissionDenied,
        "this call needs role agent",
        Box::new(|| session_refusal(&farm, &client_creds, vec![hello_ok()])),
    );
    // ---- Admin
    let create =
        |r: v1::CreateTokenRequest| farm.block_on(admin(&admin_ch).create_token(r)).map(drop);
    row(
        &mut rows,
        "Admin",
        "token lifetime over a year",
        Code::InvalidArgument,
        "longer than a year",
        Box::new(|| {
            create(v1::CreateTokenRequest {
                ttl_s: 400 * 24 * 3600,
                ..Default::default()
            })
        }),
    );
    row(
        &mut rows,
        "Admin",
        "token label key with capitals",
        Code::InvalidArgument,
        "label key",
        Box::new(|| {
            create(v1::CreateTokenRequest {
                labels: vec![v1::Label {
                    key: "Lab".into(),
                    value: "x".into(),
                }],
                ..Default::default()
            })
        }),
    );
    row(
        &mut rows,
        "Admin",
        "token label given twice",
        Code::InvalidArgument,
        "label lab given twice",
        Box::new(|| {
            let l = v1::Label {
                key: "lab".into(),
                value: "x".into(),
            };
            create(v1::CreateTokenRequest {
                labels: vec![l.clone(), l],
                ..Default::default()
            })
        }),
    );
    row(
        &mut rows,
        "Admin",
        "drain an unknown agent",
        Code::NotFound,
        "does not exist",
        Box::new(|| {
            farm.block_on(admin(&admin_ch).drain_agent(v1::AgentRequest {
                agent_id: "nobody".into(),
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Admin",
        "revoke an unknown agent",
        Code::NotFound,
        "does not exist",
        Box::new(|| {
            farm.block_on(admin(&admin_ch).revoke_agent(v1::AgentRequest {
                agent_id: "nobody".into(),
            }))
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Admin",
        "delete an unknown token",
        Code::NotFound,
        "not known to this farm",
        Box::new(|| {
            farm.block_on(admin(&admin_ch).delete_token(v1::DeleteTokenRequest {
                token_id: "zzzzzz".into(),
            }))
            .map(drop)
        }),
    );
    let issue_as = |ch: &Channel, role: &str, name: &str, csr: &str, trusted: bool| {
        farm.block_on(admin(ch).issue_credentials(v1::IssueCredentialsRequest {
            role: role.into(),
            name: name.into(),
            csr_pem: csr.into(),
            days: 0,
            trusted,
        }))
        .map(drop)
    };
    let issue = |role: &str, name: &str, csr: &str| issue_as(&admin_ch, role, name, csr, false);
    row(
        &mut rows,
        "Admin",
        "issue trusted admin credentials",
        Code::InvalidArgument,
        "only client credentials",
        Box::new(|| issue_as(&admin_ch, "admin", "root", "", true)),
    );
    row(
        &mut rows,
        "Admin",
        "issue trusted credentials as a client",
        Code::PermissionDenied,
        "this call needs role admin",
        Box::new(|| issue_as(&client_ch, "client", "sneaky", "", true)),
    );
    row(
        &mut rows,
        "Admin",
        "issue trusted credentials under an untrusted client's name",
        Code::FailedPrecondition,
        "were issued untrusted",
        Box::new(|| issue_as(&admin_ch, "client", "ci", "", true)),
    );
    row(
        &mut rows,
        "Admin",
        "issue admin credentials",
        Code::InvalidArgument,
        "only client credentials",
        Box::new(|| issue("admin", "root", "")),
    );
    row(
        &mut rows,
        "Admin",
        "issue credentials with a bad name",
        Code::InvalidArgument,
        "must match [a-z0-9]",
        Box::new(|| issue("client", "CI Bot", "")),
    );
    row(
        &mut rows,
        "Admin",
        "issue credentials for a bad CSR",
        Code::InvalidArgument,
        "bad certificate signing request",
        Box::new(|| issue("client", "ci2", "not a csr")),
    );
    row(
        &mut rows,
        "Admin",
        "revoke credentials never issued",
        Code::NotFound,
        "no valid client credentials",
        Box::new(|| {
            farm.block_on(
                admin(&admin_ch).revoke_credentials(v1::RevokeCredentialsRequest {
                    name: "nobody".into(),
                }),
            )
            .map(drop)
        }),
    );
    row(
        &mut rows,
        "Admin",
        "create a token as a client",
        Code::PermissionDenied,
        "this call needs role admin",
        Box::new(|| {
            farm.block_on(admin(&client_ch).create_token(v1::CreateTokenRequest::default()))
                .map(drop)
        }),
    );
    row(
        &mut rows,
        "Admin",
        "list tokens without a certificate",
        Code::Unauthenticated,
        "needs a client certificate",
        Box::new(|| {
            farm.block_on(admin(&anonymous).list_tokens(v1::ListTokensRequest {}))
                .map(drop)
        }),
    );

    let services: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.service).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["Admin", "AgentSession", "Cas", "Jobs", "Join"]
    );
    assert!(rows.len() >= 30, "{} rows", rows.len());
    let before = farm.status().unwrap();
    let mut wrong = Vec::new();
    for r in &rows {
        match (r.call)() {
            Ok(()) => wrong.push(format!("{} / {}: accepted", r.service, r.what)),
            Err(e) if e.code() != r.code || !e.message().contains(&r.text) => wrong.push(format!(
                "{} / {}: got {:?} {:?}, want {:?} containing {:?}",
                r.service,
                r.what,
                e.code(),
                e.message(),
                r.code,
                r.text
            )),
            Err(_) => {}
        }
    }
    let count = rows.len();
    // The rows borrow the helpers above, so they go first.
    drop(rows);
    assert!(
        wrong.is_empty(),
        "{} of {count} rows wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Nothing was registered, submitted or stored by them, and the coordinator is still up.
    let after = farm.status().unwrap();
    assert_eq!(after.agents.len(), before.agents.len(), "no agent joined");
    assert_eq!(
        after.recent_jobs.len(),
        before.recent_jobs.len(),
        "no job was submitted"
    );
    assert_eq!(after.stale_results_refused, 0);
    assert_eq!(
        farm.job(&queued).unwrap().actions[0].state,
        v1::ActionState::Queued as i32
    );
    let stored = farm
        .block_on(cas(&admin_ch).find_missing(v1::FindMissingRequest {
            digests: vec![Digest::of(b"jello").to_proto()],
        }))
        .unwrap()
        .into_inner();
    assert_eq!(stored.missing.len(), 1, "a refused upload stored nothing");
    farm.assert_no_unexpected_errors(&["agent-a"]);
}

#[test]
fn the_command_line_turns_refusals_into_readable_messages() {
    let farm = Farm::start(&[]);
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    for (args, text) in [
        (
            vec!["run", "--platform", "linux/mips", "--", "true"],
            "unknown platform \"linux/mips\"",
        ),
        (
            vec![
                "run",
                "--platform",
                "linux/amd64",
                "--platform",
                "linux/amd64",
                "--",
                "true",
            ],
            "given twice",
        ),
        (vec!["tokens", "delete", "zzzzzz"], "not found"),
        (vec!["agents", "revoke", "nobody"], "not found"),
    ] {
        let out = farm.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(text), "{args:?}: {}", stderr(&out));
    }
    assert!(farm.status().is_ok(), "the server is still up");
}
