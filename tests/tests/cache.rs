//! The content-addressed store and the action cache end to end: incremental uploads, results
//! reused across runs without any agent executing, and corrupt blobs never served (bad trees
//! and blobs are in malformed.rs's table).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::{tree, v1, Digest};
use archfarm_tests::*;
use prost::Message;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Runs `farm run` with a JSON report; returns (exit code, report, stderr).
fn run(farm: &Farm, args: &[&str]) -> (Option<i32>, Value, String) {
    farm.run_with_report(args)
}

/// The highest `executed=N` each agent has logged, summed over agents.
fn executed(farm: &Farm) -> u64 {
    farm.agents
        .iter()
        .map(|a| {
            a.log_text()
                .lines()
                .filter_map(|l| l.split("executed=").nth(1))
                .filter_map(|r| {
                    r.split(|c: char| !c.is_ascii_digit())
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .max()
                .unwrap_or(0)
        })
        .sum()
}

fn write(dir: &Path, rel: &str, body: &str) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, body).unwrap();
}

fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = walk(dir)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().to_path_buf(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

const CMD: &str = "mkdir -p out; cat data.txt > out/copy.txt; date +%s%N > out/stamp; echo ran";

#[test]
fn the_same_job_twice_executes_nothing_the_second_time() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.add_agent("b", &[]);
    farm.wait_ready_agents(2);
    let (a, b) = (farm.dir.path().join("in-a"), farm.dir.path().join("in-b"));
    write(&a, "data.txt", "alpha\n");
    write(&b, "data.txt", "beta\n");
    let job = |farm: &Farm, input: &Path, dl: &str| {
        let dl = farm.dir.path().join(dl);
        let (input, dl_s) = (
            input.to_str().unwrap().to_string(),
            dl.to_str().unwrap().to_string(),
        );
        let r = run(
            farm,
            &[
                "--platform",
                "linux/amd64",
                "--input",
                &input,
                "--output",
                "out",
                "--download",
                &dl_s,
                "--",
                "sh",
                "-c",
                CMD,
            ],
        );
        assert_eq!(r.0, Some(0), "{}", r.2);
        (r.1, dl)
    };
    let (first, dl1) = job(&farm, &a, "dl1");
    job(&farm, &b, "dl-b1");
    assert_eq!(
        (first["ran"].as_u64(), first["cached"].as_u64()),
        (Some(1), Some(0))
    );
    let before = executed(&farm);
    assert_eq!(before, 2);

    let (second, dl2) = job(&farm, &a, "dl2");
    assert_eq!(
        (second["ran"].as_u64(), second["cached"].as_u64()),
        (Some(0), Some(1)),
        "{second:#}"
    );
    let act = &second["actions"][0];
    assert_eq!(act["cached"], Value::Bool(true));
    assert_eq!(
        act["agent_id"], first["actions"][0]["agent_id"],
        "provenance is the first run's agent"
    );
    assert_eq!(executed(&farm), before, "no agent executed anything");
    let (f1, f2) = (files_under(&dl1), files_under(&dl2));
    assert!(!f1.is_empty());
    assert_eq!(f1, f2, "identical outputs, timestamp included");

    // Change one file of input A: A runs again, B is still cached.
    write(&a, "data.txt", "alpha, changed\n");
    let (third, dl3) = job(&farm, &a, "dl3");
    let (fourth, _) = job(&farm, &b, "dl-b2");
    assert_eq!(third["ran"].as_u64(), Some(1));
    assert_eq!(fourth["cached"].as_u64(), Some(1));
    assert_eq!(executed(&farm), before + 1);
    assert_eq!(
        std::fs::read_to_string(dl3.join("linux/amd64/out/copy.txt")).unwrap(),
        "alpha, changed\n"
    );
    // --no-cache runs it anyway.
    let input = b.to_str().unwrap();
    let r = run(
        &farm,
        &[
            "--platform",
            "linux/amd64",
            "--no-cache",
            "--input",
            input,
            "--output",
            "out",
            "--",
            "sh",
            "-c",
            CMD,
        ],
    );
    assert_eq!((r.0, r.1["ran"].as_u64()), (Some(0), Some(1)));
    let status = farm.status().unwrap();
    let cas = status.cas.unwrap();
    assert!(
        cas.cache_hits_total >= 2 && cas.cache_entries >= 2,
        "{cas:?}"
    );
    farm.assert_no_unexpected_errors(&[]);
}

#[test]
fn uploads_send_only_what_is_missing() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let input = farm.dir.path().join("tree");
    for i in 0..50 {
        write(
            &input,
            &format!("dir{}/file{i}.txt", i % 5),
            &format!("content {i}\n"),
        );
    }
    write(&input, ".farmignore", "*.log\n");
    write(&input, "skip.log", "ignored\n");
    let input_s = input.to_str().unwrap().to_string();
    let up = |farm: &Farm| {
        let r = run(
            farm,
            &[
                "--platform",
                "linux/amd64",
                "--input",
                &input_s,
                "--",
                "true",
            ],
        );
        assert_eq!(r.0, Some(0), "{}", r.2);
        r.1["upload"].clone()
    };
    let cold = up(&farm);
    assert!(cold["blobs_sent"].as_u64().unwrap() >= 50, "{cold}");
    let warm = up(&farm);
    assert_eq!(
        (warm["blobs_sent"].as_u64(), warm["bytes_sent"].as_u64()),
        (Some(0), Some(0)),
        "{warm}"
    );
    // One changed file: that blob plus the Directory messages on its path (dir3 and the root).
    write(&input, "dir3/file8.txt", "changed content\n");
    let one = up(&farm);
    assert_eq!(one["blobs_sent"].as_u64(), Some(3), "{one}");
    let local = tree::build_input_tree(&input).unwrap();
    let dir3 = local
        .directories
        .iter()
        .find(|(_, b)| {
            v1::Directory::decode(b.as_slice())
                .unwrap()
                .files
                .iter()
                .any(|f| f.name == "file8.txt")
        })
        .map(|(d, _)| d.size_bytes())
        .unwrap();
    let expected = "changed content\n".len() as u64 + dir3 + local.root.size_bytes();
    assert_eq!(one["bytes_sent"].as_u64(), Some(expected), "{one}");
    assert!(
        !local.files.values().any(|p| p.ends_with("skip.log")),
        ".farmignore honoured"
    );
}

#[test]
fn a_corrupt_blob_is_never_served_and_the_action_runs_again() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let cmd = [
        "--platform",
        "linux/amd64",
        "--",
        "sh",
        "-c",
        "echo unique-output-7781",
    ];
    let first = run(&farm, &cmd);
    assert_eq!(first.0, Some(0));
    // Flip one byte of the stdout blob on the coordinator's disk.
    let stdout = Digest::of(b"unique-output-7781\n");
    let path = farm
        .dir
        .path()
        .join("coordinator/cas")
        .join(&stdout.hex()[..2])
        .join(format!("{}-{}", stdout.hex(), stdout.size_bytes()));
    let mut bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes[0] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let second = run(&farm, &cmd);
    assert_eq!(second.0, Some(0), "{}", second.2);
    assert_eq!(
        second.1["ran"].as_u64(),
        Some(1),
        "the entry naming a corrupt blob is a miss: {:#}",
        second.1
    );
    assert!(farm
        .coordinator
        .log_text()
        .contains("hashes differently on disk"));
    // The re-run stored a good copy again; the third run is a hit.
    let third = run(&farm, &cmd);
    assert_eq!(third.1["cached"].as_u64(), Some(1));
}
