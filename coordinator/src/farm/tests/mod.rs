//! Unit tests of the farm state machine, driven with fake agent sessions and injected time.
use super::*;

mod crash;
mod scopes;

const LEASE: u64 = 15_000;

struct Harness {
    farm: Farm,
    _dir: tempfile::TempDir,
    rx: HashMap<String, mpsc::UnboundedReceiver<AgentCommand>>,
    conns: HashMap<String, u64>,
    seq: u64,
    exclusive: bool,
    /// Labels of the agents joined next (trusted by default).
    labels: Labels,
    /// cache_untrusted and cache_emulated of the next submits.
    cache_untrusted: bool,
    cache_emulated: bool,
    /// network of the next submits.
    network: bool,
    /// Blobs every action of the next submits needs (its input tree).
    inputs: Vec<Digest>,
    /// Who submits the next jobs.
    submitter: Submitter,
}

/// An encoded ExecutionResult of an exit (what the cache stores and must decode).
fn result_bytes(exit_code: i32) -> Vec<u8> {
    use prost::Message;
    archfarm_proto::v1::ExecutionResult {
        exit_code,
        message: "marker".into(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An encoded StepResult of a step.
fn step_bytes(name: &str, exit_code: i32) -> Vec<u8> {
    use prost::Message;
    archfarm_proto::v1::StepResult {
        name: name.into(),
        exit_code,
        ..Default::default()
    }
    .encode_to_vec()
}

/// A process exit that names `blobs`.
fn exited(exit_code: i32, blobs: &[Digest]) -> Completion {
    Completion {
        outcome: Outcome::Exited,
        exit_code,
        message: String::new(),
        encoded: result_bytes(exit_code),
        named_blobs: blobs.to_vec(),
        output_trees: vec![],
        output_tree_blobs: Ok(vec![]),
        cacheable: true,
        steps: vec![],
        stored: Default::default(),
    }
}

fn offers(list: &[(&str, bool)]) -> AgentFacts {
    AgentFacts {
        offers: list
            .iter()
            .map(|(p, e)| Offer {
                platform: p.parse().unwrap(),
                emulated: *e,
            })
            .collect(),
        slots: 1,
        sandbox: "bwrap (test)".into(),
        ..Default::default()
    }
}

impl Harness {
    fn new() -> Self {
        Self::with_cas_budget(1 << 30)
    }

    fn with_cas_budget(budget_bytes: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let cas = Arc::new(Cas::open_with_budget(&dir.path().join("cas"), budget_bytes).unwrap());
        Self {
            farm: Farm::load(store, cas, FarmConfig::default(), 0).unwrap(),
            _dir: dir,
            rx: HashMap::new(),
            conns: HashMap::new(),
            seq: 0,
            exclusive: false,
            labels: [("trusted".to_string(), "true".to_string())].into(),
            cache_untrusted: false,
            cache_emulated: false,
            network: false,
            inputs: vec![],
            submitter: Submitter::new("ci", true),
        }
    }

    fn join(&mut self, id: &str, list: &[(&str, bool)], now: u64) {
        let record = AgentRecord {
            id: AgentId(id.into()),
            hostname: id.into(),
            labels: self.labels.clone(),
            facts: AgentFacts::default(),
            joined_unix_ms: now,
            last_seen_unix_ms: now,
            draining: false,
            revoked: false,
            quarantine: Default::default(),
        };
        if !self.farm.agents.contains_key(&record.id) {
            self.farm.add_agent(record);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = self
            .farm
            .hello(&AgentId(id.into()), offers(list), &[], tx, now)
            .unwrap();
        self.rx.insert(id.into(), rx);
        self.conns.insert(id.into(), conn);
    }

    fn submit(&mut self, platforms: &[&str], allow_emulation: bool, now: u64) -> JobId {
        self.submit_keyed(platforms, allow_emulation, "", now)
    }

    fn submit_keyed(
        &mut self,
        platforms: &[&str],
        allow_emulation: bool,
        key: &str,
        now: u64,
    ) -> JobId {
        self.seq += 1;
        let job = JobId(format!("j-{:06}", self.seq));
        let actions: Vec<ActionRecord> = platforms
            .iter()
            .map(|p| {
                let platform: Platform = p.parse().unwrap();
                let spec = ActionSpec {
                    allow_emulation,
                    exclusive: self.exclusive,
                    network: self.network,
                    cache_untrusted: self.cache_untrusted,
                    cache_emulated: self.cache_emulated,
                    submitter: self.submitter.clone(),
                    ..ActionSpec::trivial(platform.clone())
                };
                let mut a =
                    ActionRecord::queued(ActionId::new(&job, &platform), &job, self.seq, spec, now);
                a.action_digest = key.to_string();
                // As the Jobs service does before it locks the farm.
                self.farm.cache().answer(&mut a, now).unwrap();
                a
            })
            .collect();
        let record = JobRecord {
            id: job.clone(),
            seq: self.seq,
            spec: vec![],
            submitter: "test".into(),
            submitted_unix_ms: now,
            actions: actions.iter().map(|a| a.id.clone()).collect(),
            description: String::new(),
            finished: false,
        };
        let pins = actions
            .iter()
            .map(|a| (a.id.clone(), self.inputs.clone()))
            .collect();
        self.farm.submit(record, actions, &pins, now).unwrap();
        job
    }

    /// Drains the agent's commands; returns the assigns as (action, fence, emulated).
    fn assigns(&mut self, agent: &str) -> Vec<(String, u64, bool)> {
        // What the farm announced goes out at a commit.
        self.farm.commit().unwrap();
        let rx = self.rx.get_mut(agent).unwrap();
        let mut out = vec![];
        while let Ok(cmd) = rx.try_recv() {
            if let AgentCommand::Assign {
                action,
                fence,
                emulated,
            } = cmd
            {
                out.push((action.id.0.clone(), fence, emulated));
            }
        }
        out
    }

    fn acks(&mut self, agent: &str) -> Vec<(bool, String)> {
        // What the farm announced goes out at a commit.
        self.farm.commit().unwrap();
        let rx = self.rx.get_mut(agent).unwrap();
        let mut out = vec![];
        while let Ok(cmd) = rx.try_recv() {
            if let AgentCommand::Ack {
                accepted, reason, ..
            } = cmd
            {
                out.push((accepted, reason));
            }
        }
        out
    }

    fn state(&self, id: &str) -> ActionRecord {
        self.farm.action_now(&ActionId(id.into())).unwrap().unwrap()
    }

    fn heartbeat(&mut self, agent: &str, running: &[(&str, u64)], now: u64) {
        let running: Vec<(ActionId, u64)> = running
            .iter()
            .map(|(a, f)| (ActionId((*a).into()), *f))
            .collect();
        let conn = self.conns[agent];
        self.farm
            .heartbeat(
                &AgentId(agent.into()),
                conn,
                &HeartbeatReport::default(),
                &running,
                now,
            )
            .unwrap();
    }

    /// Reports a result for `action` under `fence`, as `agent`'s session would.
    fn report(&mut self, agent: &str, action: &str, fence: u64, c: Completion, now: u64) {
        let (agent, action) = (AgentId(agent.into()), ActionId(action.into()));
        self.farm
            .completed_reading_store(&agent, &action, fence, c, now)
            .unwrap();
        // What it decided to cache is written at the group commit.
        self.commit_cache_writes();
    }

    /// Writes the cache entries the farm queued (as the group commit does), leaving its
    /// announcements for `assigns` and `acks`.
    fn commit_cache_writes(&mut self) {
        for w in std::mem::take(&mut self.farm.cache_writes) {
            let store = &self.farm.store;
            store
                .put_cache_entry(&w.entry.scope, w.key(), &w.entry)
                .unwrap();
        }
    }

    fn lookup(&self, key: CacheKey<'_>, allow_emulation: bool, now: u64) -> Option<CacheEntry> {
        self.farm
            .cache()
            .lookup(&self.submitter.read_scopes(), key, allow_emulation, now)
            .unwrap()
            .map(|(_, e)| e)
    }

    fn complete_with(&mut self, agent: &str, action: &str, fence: u64, blobs: &[Digest], now: u64) {
        self.report(agent, action, fence, exited(0, blobs), now);
    }

    fn complete(&mut self, agent: &str, action: &str, fence: u64, exit_code: i32, now: u64) {
        self.report(agent, action, fence, exited(exit_code, &[]), now);
    }

    /// Reports that the agent could not run the action (an INFRA_ERROR).
    fn infra(&mut self, agent: &str, action: &str, fence: u64, now: u64) {
        let c = Completion {
            outcome: Outcome::InfraError,
            exit_code: -1,
            message: "sandbox setup failed".into(),
            ..exited(0, &[])
        };
        self.report(agent, action, fence, c, now);
    }

    fn quarantine(&self, agent: &str) -> Quarantine {
        self.farm.agents[&AgentId(agent.into())]
            .record
            .quarantine
            .clone()
    }
}

#[test]
fn an_infra_error_is_retried_on_another_agent_and_counted_apart_from_failures() {
    let mut h = Harness::new();
    h.join("a", &[("linux/s390x", false)], 0);
    h.join("b", &[("linux/s390x", false)], 0);
    let job = h.submit(&["linux/s390x"], false, 0);
    let id = format!("{job}/linux/s390x");
    assert_eq!(h.assigns("a"), vec![(id.clone(), 1, false)]);
    h.infra("a", &id, 1, 1);
    assert!(
        h.assigns("a").is_empty(),
        "not back to the agent that failed"
    );
    assert_eq!(h.assigns("b"), vec![(id.clone(), 2, false)]);
    h.complete("b", &id, 2, 1, 2);
    let done = h.state(&id);
    assert_eq!(
        (done.state, done.attempts, done.infra_failed_on.clone()),
        (ActionState::Failed, 2, vec![AgentId("a".into())])
    );
    assert_eq!(done.reason, "exit code 1");
    assert_eq!(h.quarantine("a").consecutive_infra_failures, 1);
    assert_eq!(
        h.quarantine("b"),
        Quarantine::default(),
        "a command failure is no infra failure"
    );
}

#[test]
fn a_lapsed_lease_is_retried_elsewhere_and_counts_against_the_silent_agent() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    h.join("b", &[("linux/arm64", false)], 0);
    h.farm
        .agents
        .get_mut(&AgentId("b".into()))
        .unwrap()
        .record
        .facts
        .slots = 2;
    let first = h.submit(&["linux/arm64"], false, 0);
    let second = h.submit(&["linux/arm64"], false, 0);
    let (one, two) = (
        format!("{first}/linux/arm64"),
        format!("{second}/linux/arm64"),
    );
    // The idle one of equal load wins by id: a gets the first, b the second.
    assert_eq!(h.assigns("a"), vec![(one.clone(), 1, false)]);
    assert_eq!(h.assigns("b"), vec![(two.clone(), 2, false)]);
    // a goes silent; its lease lapses; b (one slot still free) takes the retry.
    h.heartbeat("a", &[(&one, 1)], 1);
    h.heartbeat("b", &[(&two, 2)], LEASE + 2);
    h.farm.tick(LEASE + 2).unwrap();
    assert_eq!(h.assigns("b"), vec![(one.clone(), 3, false)]);
    let again = h.state(&one);
    assert_eq!(again.infra_failed_on, vec![AgentId("a".into())]);
    assert!(again.reason.contains("queued again for another agent"));
    assert_eq!(h.quarantine("a").consecutive_infra_failures, 1);
}

#[test]
fn a_run_that_broke_an_agent_limit_fails_once_uncached_and_the_agent_is_fine() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    h.farm
        .agents
        .get_mut(&AgentId("a".into()))
        .unwrap()
        .record
        .quarantine
        .consecutive_infra_failures = 2;
    let job = h.submit_keyed(&["linux/amd64"], false, "key-1", 1);
    let id = format!("{job}/linux/amd64");
    let (agent, fence) = ("a", h.assigns("a")[0].1);
    let c = Completion {
        outcome: Outcome::LimitExceeded,
        exit_code: -1,
        message: "memory limit of 2 GiB exceeded".into(),
        ..exited(0, &[])
    };
    h.report(agent, &id, fence, c, 2);
    let done = h.state(&id);
    assert_eq!(
        (done.state, done.attempts, done.infra_failed_on.len()),
        (ActionState::Failed, 1, 0),
        "failed, not retried, not an infra failure"
    );
    assert_eq!(done.reason, "memory limit of 2 GiB exceeded");
    assert_eq!(
        h.quarantine(agent),
        Quarantine::default(),
        "the agent ran it to its end: its infra count starts over"
    );
    assert!(h.assigns("a").is_empty(), "not retried");
    let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 3);
    assert_eq!(
        h.state(&format!("{again}/linux/amd64")).state,
        ActionState::Running,
        "never cached"
    );
}

#[test]
fn n_infra_failures_in_a_row_quarantine_with_doubling_backoff_and_probation() {
    let mut h = Harness::new();
    h.farm.cfg.max_attempts = 20;
    h.join("a", &[("linux/riscv64", false)], 0);
    let job = h.submit(&["linux/riscv64"], false, 0);
    let id = format!("{job}/linux/riscv64");
    // The only agent: each retry comes back to it (nobody else could take it).
    for (n, fence) in [(1, 1), (2, 2)] {
        assert_eq!(h.assigns("a"), vec![(id.clone(), fence, false)]);
        h.infra("a", &id, fence, n);
        assert_eq!(h.quarantine("a").consecutive_infra_failures, n as u32);
    }
    assert_eq!(h.assigns("a"), vec![(id.clone(), 3, false)]);
    h.infra("a", &id, 3, 10);
    let q = h.quarantine("a");
    assert_eq!((q.quarantines, q.until_unix_ms), (1, 10 + 60_000));
    assert!(
        q.reason.contains("3 infra failures in a row"),
        "{}",
        q.reason
    );
    // No new work during the backoff, even with a heartbeat just before its end.
    assert!(h.assigns("a").is_empty());
    h.heartbeat("a", &[], 60_009);
    assert!(h.assigns("a").is_empty(), "still quarantined");
    assert_eq!(h.state(&id).state, ActionState::Queued);
    h.farm.tick(60_009).unwrap();
    assert_eq!(
        h.state(&id).state,
        ActionState::Queued,
        "waits, not unschedulable"
    );
    // Backoff over: work again, on probation.
    h.heartbeat("a", &[], 60_010);
    assert_eq!(h.assigns("a"), vec![(id.clone(), 4, false)]);
    assert!(h.quarantine("a").on_probation(60_010));
    // One infra failure on probation: quarantined again, twice as long.
    h.infra("a", &id, 4, 60_020);
    let q = h.quarantine("a");
    assert_eq!((q.quarantines, q.until_unix_ms), (2, 60_020 + 120_000));
    h.heartbeat("a", &[], 180_019);
    assert!(h.assigns("a").is_empty());
    h.heartbeat("a", &[], 180_020);
    assert_eq!(h.assigns("a"), vec![(id.clone(), 5, false)]);
    // A success clears everything; the next failure is the first of a new count.
    h.complete("a", &id, 5, 0, 180_030);
    assert_eq!(h.quarantine("a"), Quarantine::default());
    assert_eq!(h.state(&id).infra_failed_on.len(), 4);
    let job2 = h.submit(&["linux/riscv64"], false, 180_040);
    let id2 = format!("{job2}/linux/riscv64");
    assert_eq!(h.assigns("a"), vec![(id2.clone(), 6, false)]);
    h.infra("a", &id2, 6, 180_050);
    let q = h.quarantine("a");
    assert_eq!((q.consecutive_infra_failures, q.until_unix_ms), (1, 0));
    assert_eq!(
        h.assigns("a"),
        vec![(id2.clone(), 7, false)],
        "not quarantined"
    );
}

#[test]
fn a_success_of_work_started_before_the_quarantine_does_not_end_it() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    h.farm
        .agents
        .get_mut(&AgentId("a".into()))
        .unwrap()
        .record
        .facts
        .slots = 4;
    let jobs: Vec<String> = (0..4)
        .map(|_| format!("{}/linux/amd64", h.submit(&["linux/amd64"], false, 0)))
        .collect();
    let fences: Vec<u64> = h.assigns("a").iter().map(|(_, f, _)| *f).collect();
    assert_eq!(fences, vec![1, 2, 3, 4]);
    for i in 0..3 {
        h.infra("a", &jobs[i], fences[i], 1);
    }
    // The only agent: the first two retries came back to it before the quarantine.
    let retried: Vec<String> = h.assigns("a").into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(retried, vec![jobs[0].clone(), jobs[1].clone()]);
    let q = h.quarantine("a");
    assert_eq!(q.until_unix_ms, 1 + 60_000);
    assert_eq!(h.state(&jobs[2]).state, ActionState::Queued, "waits");
    // The long run it took before the quarantine succeeds: still quarantined.
    h.complete("a", &jobs[3], fences[3], 0, 2);
    assert_eq!(h.quarantine("a"), q);
    assert!(h.assigns("a").is_empty());
}

#[test]
fn the_backoff_doubles_per_quarantine_up_to_the_cap() {
    let cfg = FarmConfig::default();
    let b: Vec<u64> = (1..=8).map(|n| quarantine_backoff_ms(&cfg, n)).collect();
    assert_eq!(
        b,
        vec![60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000]
    );
    assert_eq!(quarantine_backoff_ms(&cfg, u32::MAX), 3_600_000);
}

#[test]
fn a_quarantine_survives_a_coordinator_restart() {
    let mut h = Harness::new();
    h.join("a", &[("linux/ppc64le", false)], 0);
    let job = h.submit(&["linux/ppc64le"], false, 0);
    let id = format!("{job}/linux/ppc64le");
    for fence in 1..=3 {
        assert_eq!(h.assigns("a"), vec![(id.clone(), fence, false)]);
        h.infra("a", &id, fence, fence);
    }
    assert_eq!(h.state(&id).state, ActionState::InfraFailed);
    let before = h.quarantine("a");
    assert_eq!(before.until_unix_ms, 3 + 60_000);
    // As the session does after every message: the commit writes the agent's record.
    h.farm.commit().unwrap();
    let store = h.farm.store.clone();
    let cas = h.farm.cas.clone();
    h.farm = Farm::load(store, cas, FarmConfig::default(), 1_000).unwrap();
    assert_eq!(h.quarantine("a"), before);
    h.join("a", &[("linux/ppc64le", false)], 1_000);
    h.submit(&["linux/ppc64le"], false, 1_000);
    assert!(
        h.assigns("a").is_empty(),
        "still quarantined after the restart"
    );
    h.heartbeat("a", &[], 60_003);
    assert_eq!(h.assigns("a").len(), 1);
}

#[test]
fn a_cached_result_completes_the_same_action_without_any_agent() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
    let id = format!("{first}/linux/amd64");
    let fence = h.assigns("a")[0].1;
    let out = Digest::of(b"stdout bytes");
    h.farm.cas.put(&out, b"stdout bytes").unwrap();
    h.complete_with("a", &id, fence, &[out], 1);
    let second = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
    assert!(h.assigns("a").is_empty(), "a hit runs nowhere");
    let hit = h.state(&format!("{second}/linux/amd64"));
    assert_eq!((hit.state, hit.cached), (ActionState::Succeeded, true));
    assert_eq!(hit.result.unwrap().encoded, result_bytes(0));
    assert!(
        hit.reason.contains(&format!(
            "shared scope, from {id} of ci on a (native, trusted)"
        )),
        "{}",
        hit.reason
    );
    let origin = hit.cache_origin.expect("a hit names its origin");
    assert_eq!((origin.scope, origin.action.0), (CacheScope::Shared, id));
    assert_eq!(
        h.state(&format!("{first}/linux/amd64")).cache_write,
        "shared"
    );
    assert!(h.farm.job_now(&second).unwrap().unwrap().finished);
    // Another key misses; no_cache skips the lookup.
    h.submit_keyed(&["linux/amd64"], false, "key-2", 3);
    assert_eq!(h.assigns("a").len(), 1);
    let f = h.farm.cache().figures(4).unwrap();
    assert_eq!((f.lookups_total, f.hits_total, f.entries), (3, 1, 1));
    assert_eq!((f.lookups_last_hour, f.hits_last_hour), (3, 1));
}

#[test]
fn a_cache_entry_naming_an_evicted_blob_is_a_miss() {
    let mut h = Harness::with_cas_budget(64);
    h.join("a", &[("linux/amd64", false)], 0);
    let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
    let fence = h.assigns("a")[0].1;
    let out = Digest::of(&[7u8; 40]);
    h.farm.cas.put(&out, &[7u8; 40]).unwrap();
    h.complete_with("a", &format!("{first}/linux/amd64"), fence, &[out], 1);
    // Another 40-byte blob pushes the store over its 64-byte budget: `out` goes.
    h.farm.cas.put(&Digest::of(&[8u8; 40]), &[8u8; 40]).unwrap();
    assert!(!h.farm.cas.contains(&out));
    let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
    let a = h.state(&format!("{again}/linux/amd64"));
    assert_eq!(
        (a.state, a.cached),
        (ActionState::Running, false),
        "a miss, run again"
    );
}

#[test]
fn passing_steps_are_cached_and_every_step_duration_is_recorded() {
    let mut h = Harness::new();
    h.join("a", &[("linux/s390x", false)], 0);
    let job = h.submit(&["linux/s390x"], false, 0);
    let id = format!("{job}/linux/s390x");
    let step = |name: &str, key: &str| StepSpec {
        name: name.into(),
        argv: vec!["./pkg.test".into()],
        working_directory: String::new(),
        input_root: None,
        timeout_ms: 0,
        history_key: format!("example.com/{name}"),
        cache_key: key.into(),
    };
    let mut a = h.farm.active[&ActionId(id.clone())].clone();
    a.spec.steps = vec![step("ok", &"a".repeat(64)), step("bad", &"b".repeat(64))];
    h.farm.put_active(a);
    let fence = h.assigns("a")[0].1;
    let out = Digest::of(b"PASS\n");
    h.farm.cas.put(&out, b"PASS\n").unwrap();
    let done = |name: &str, exit_code: i32, ms: u64| StepCompletion {
        name: name.into(),
        exit_code,
        duration_ms: ms,
        timed_out: false,
        output: Some(out),
        encoded: step_bytes(name, exit_code),
    };
    let c = Completion {
        steps: vec![done("ok", 0, 1_500), done("bad", 1, 700)],
        ..exited(1, &[])
    };
    h.report("a", &id, fence, c, 5);
    let hit = h.lookup(CacheKey::Step(&"a".repeat(64)), false, 6).unwrap();
    assert_eq!(
        (hit.encoded, hit.platform.to_string()),
        (step_bytes("ok", 0), "linux/s390x".to_string())
    );
    assert!(
        h.lookup(CacheKey::Step(&"b".repeat(64)), false, 6)
            .is_none(),
        "failures are not cached"
    );
    // Run times are written by the group commit, with the result.
    h.farm.commit().unwrap();
    let d = |item: &str| h.farm.store.duration("linux/s390x", item).unwrap();
    assert_eq!(
        (d("example.com/ok"), d("example.com/bad")),
        (Some(1_500), Some(700))
    );
}

#[test]
fn a_network_job_no_agent_allows_does_not_hold_up_plain_work_of_its_platform() {
    let mut h = Harness::new();
    // The agent's policy does not allow the network (the harness's offers leave it off).
    h.join("a", &[("linux/amd64", false)], 0);
    h.network = true;
    let net = h.submit(&["linux/amd64"], false, 0);
    h.network = false;
    assert!(h.assigns("a").is_empty(), "no agent allows the network");
    let plain = h.submit(&["linux/amd64"], false, 1);
    assert_eq!(
        h.assigns("a"),
        vec![(format!("{plain}/linux/amd64"), 1, false)],
        "the idle agent takes the plain job at the submit's dispatch"
    );
    assert_eq!(
        h.state(&format!("{net}/linux/amd64")).state,
        ActionState::Queued
    );
}

#[test]
fn a_retry_waiting_for_another_agent_does_not_hold_up_plain_work_of_its_platform() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    h.join("b", &[("linux/arm64", false)], 0);
    let retried = h.submit(&["linux/arm64"], false, 0);
    let retried = format!("{retried}/linux/arm64");
    assert_eq!(h.assigns("a"), vec![(retried.clone(), 1, false)]);
    let busy = h.submit(&["linux/arm64"], false, 0);
    let busy = format!("{busy}/linux/arm64");
    assert_eq!(h.assigns("b"), vec![(busy.clone(), 2, false)]);
    h.infra("a", &retried, 1, 1);
    assert!(
        h.assigns("a").is_empty(),
        "the retry avoids a and waits for the busy b"
    );
    let plain = h.submit(&["linux/arm64"], false, 2);
    assert_eq!(
        h.assigns("a"),
        vec![(format!("{plain}/linux/arm64"), 3, false)],
        "the idle a takes the plain job at the submit's dispatch"
    );
    h.complete("b", &busy, 2, 0, 3);
    assert_eq!(
        h.assigns("b"),
        vec![(retried, 4, false)],
        "the retry goes to b once it is free"
    );
}

#[test]
fn an_exclusive_action_has_the_agent_to_itself() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    h.farm
        .agents
        .get_mut(&AgentId("a".into()))
        .unwrap()
        .record
        .facts
        .slots = 2;
    let plain = h.submit(&["linux/amd64"], false, 0);
    assert_eq!(h.assigns("a").len(), 1);
    h.exclusive = true;
    h.submit(&["linux/amd64"], false, 1);
    h.exclusive = false;
    assert!(h.assigns("a").is_empty(), "waits for the agent to be idle");
    let fence = 1;
    h.complete("a", &format!("{plain}/linux/amd64"), fence, 0, 3);
    assert_eq!(h.assigns("a").len(), 1, "now it starts");
    assert_eq!(
        h.farm.slot_usage()[&AgentId("a".into())].0,
        2,
        "and takes every slot"
    );
    h.submit(&["linux/amd64"], false, 4);
    assert!(h.assigns("a").is_empty(), "nothing runs beside it");
}

#[test]
fn eviction_spares_the_inputs_of_queued_and_running_actions_until_they_finish() {
    let mut h = Harness::with_cas_budget(100);
    let input = Digest::of(&[1u8; 60]);
    h.farm.cas.put(&input, &[1u8; 60]).unwrap();
    h.inputs = vec![input];
    let job = h.submit(&["linux/s390x"], false, 0);
    // Queued (no agent yet): a second 60-byte blob overflows the budget; the input stays.
    h.farm.cas.put(&Digest::of(&[2u8; 60]), &[2u8; 60]).unwrap();
    assert!(
        h.farm.cas.contains(&input),
        "a queued action's input is never evicted"
    );
    h.join("a", &[("linux/s390x", false)], 1);
    let fence = h.assigns("a")[0].1;
    h.farm.cas.put(&Digest::of(&[3u8; 60]), &[3u8; 60]).unwrap();
    assert!(h.farm.cas.contains(&input), "nor a running one's");
    h.complete("a", &format!("{job}/linux/s390x"), fence, 0, 2);
    h.farm.cas.put(&Digest::of(&[4u8; 60]), &[4u8; 60]).unwrap();
    assert!(
        !h.farm.cas.contains(&input),
        "once finished it is an ordinary blob"
    );
}

#[test]
fn a_result_naming_a_missing_blob_is_not_cached() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
    let fence = h.assigns("a")[0].1;
    h.complete_with(
        "a",
        &format!("{first}/linux/amd64"),
        fence,
        &[Digest::of(b"never uploaded")],
        1,
    );
    let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
    assert_eq!(
        h.state(&format!("{again}/linux/amd64")).state,
        ActionState::Running
    );
}

#[test]
fn only_trusted_native_results_are_cached_unless_the_job_asks() {
    let out = Digest::of(b"stdout bytes");
    // (agent trusted, runs emulated, cache_untrusted, cache_emulated) -> stored?
    let cases = [
        (true, false, false, false, true),
        (false, false, false, false, false),
        (false, false, true, false, true),
        (true, true, false, false, false),
        (true, true, false, true, true),
        (false, true, false, true, false),
        (false, true, true, true, true),
    ];
    for (trusted, emulated, cache_untrusted, cache_emulated, stored) in cases {
        let what = format!(
            "trusted={trusted} emulated={emulated} cache_untrusted={cache_untrusted} \
             cache_emulated={cache_emulated}"
        );
        let mut h = Harness::new();
        h.farm.cas.put(&out, b"stdout bytes").unwrap();
        if !trusted {
            h.labels = Labels::new();
        }
        h.join("a", &[("linux/arm64", emulated)], 0);
        (h.cache_untrusted, h.cache_emulated) = (cache_untrusted, cache_emulated);
        let first = h.submit_keyed(&["linux/arm64"], true, "key-1", 0);
        let (_, fence, ran_emulated) = h.assigns("a")[0].clone();
        assert_eq!(ran_emulated, emulated, "{what}");
        h.complete_with("a", &format!("{first}/linux/arm64"), fence, &[out], 1);
        let entry = h.lookup(CacheKey::Action("key-1"), true, 2);
        assert_eq!(entry.is_some(), stored, "{what}");
        if let Some(e) = entry {
            assert_eq!((e.trusted, e.emulated), (trusted, emulated), "{what}");
        }
        // The job itself succeeded either way.
        let done = h.state(&format!("{first}/linux/arm64"));
        assert_eq!(done.state, ActionState::Succeeded, "{what}");
    }
}

#[test]
fn a_result_with_the_network_is_neither_stored_nor_served() {
    let out = Digest::of(b"stdout bytes");
    let mut h = Harness::new();
    h.farm.cas.put(&out, b"stdout bytes").unwrap();
    h.join("a", &[("linux/arm64", false)], 0);
    let agent = h.farm.agents.get_mut(&AgentId("a".into())).unwrap();
    agent.record.facts.allow_network = true;
    (h.cache_untrusted, h.cache_emulated, h.network) = (true, true, true);
    let first = h.submit_keyed(&["linux/arm64"], false, "key-1", 0);
    let (_, fence, _) = h.assigns("a")[0].clone();
    h.complete_with("a", &format!("{first}/linux/arm64"), fence, &[out], 1);
    let lookup = |h: &Harness| h.lookup(CacheKey::Action("key-1"), false, 2);
    assert!(lookup(&h).is_none(), "a network result was stored");
    // A stored result of the same key does not answer an action with the network.
    h.network = false;
    let second = h.submit_keyed(&["linux/arm64"], false, "key-1", 2);
    let (_, fence, _) = h.assigns("a")[0].clone();
    h.complete_with("a", &format!("{second}/linux/arm64"), fence, &[out], 3);
    assert!(lookup(&h).is_some());
    h.network = true;
    let third = h.submit_keyed(&["linux/arm64"], false, "key-1", 4);
    let third = h.state(&format!("{third}/linux/arm64"));
    assert!(!third.cached, "{third:?}");
    assert_eq!(third.state, ActionState::Running);
}

#[test]
fn places_by_platform_and_prefers_native_agents() {
    let mut h = Harness::new();
    h.join("emu", &[("linux/amd64", false), ("linux/arm64", true)], 0);
    h.join("arm", &[("linux/arm64", false)], 0);
    let job = h.submit(&["linux/arm64", "linux/amd64"], true, 1);
    // Placed in action-id order: amd64 first (fence 1), then arm64 (fence 2).
    assert_eq!(
        h.assigns("emu"),
        vec![(format!("{job}/linux/amd64"), 1, false)]
    );
    assert_eq!(
        h.assigns("arm"),
        vec![(format!("{job}/linux/arm64"), 2, false)]
    );
    // Both busy (one slot each): the next arm64 action waits rather than emulate.
    let job2 = h.submit(&["linux/arm64"], true, 2);
    assert!(h.assigns("emu").is_empty() && h.assigns("arm").is_empty());
    h.complete("emu", &format!("{job}/linux/amd64"), 1, 0, 3);
    // Now the emulated agent is free and emulation is allowed.
    assert_eq!(
        h.assigns("emu"),
        vec![(format!("{job2}/linux/arm64"), 3, true)]
    );
    assert_eq!(
        h.state(&format!("{job}/linux/amd64")).state,
        ActionState::Succeeded
    );
}

#[test]
fn lapsed_lease_requeues_and_refuses_the_late_result() {
    let mut h = Harness::new();
    h.join("a", &[("linux/s390x", false)], 0);
    h.join("b", &[("linux/s390x", false)], 0);
    let job = h.submit(&["linux/s390x"], false, 0);
    let id = format!("{job}/linux/s390x");
    assert_eq!(h.assigns("a"), vec![(id.clone(), 1, false)]);
    // b keeps heartbeating; a goes silent. Heartbeats renew a's lease until 10 s.
    h.heartbeat("a", &[(&id, 1)], 10_000);
    h.heartbeat("b", &[], 20_000);
    h.farm.tick(24_000).unwrap();
    assert_eq!(
        h.state(&id).state,
        ActionState::Running,
        "lease still valid at 24 s"
    );
    h.heartbeat("b", &[], 25_001);
    h.farm.tick(25_001).unwrap();
    let again = h.assigns("b");
    assert_eq!(again, vec![(id.clone(), 2, false)]);
    assert_eq!(h.state(&id).attempts, 2);
    // a comes back and reports with fence 1: refused, counted, nothing recorded.
    h.complete("a", &id, 1, 0, 26_000);
    let acks = h.acks("a");
    assert_eq!(acks.len(), 1);
    assert!(
        !acks[0].0 && acks[0].1.contains("stale fence 1"),
        "{acks:?}"
    );
    assert_eq!(h.farm.stale_results_refused(), 1);
    assert_eq!(h.state(&id).state, ActionState::Running);
    h.complete("b", &id, 2, 0, 27_000);
    assert_eq!(h.acks("b"), vec![(true, String::new())]);
    let done = h.state(&id);
    assert_eq!(
        (done.state, done.result.unwrap().fence),
        (ActionState::Succeeded, 2)
    );
    // The same result sent again (lost ack) is accepted without change.
    h.complete("b", &id, 2, 0, 28_000);
    assert_eq!(h.acks("b"), vec![(true, String::new())]);
}

#[test]
fn a_result_no_lease_could_have_produced_is_refused_and_changes_nothing() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    let running = h.submit(&["linux/amd64"], false, 0);
    let running = format!("{running}/linux/amd64");
    let fence = h.assigns("a")[0].1;
    let queued = h.submit(&["linux/s390x"], false, 1);
    let queued = format!("{queued}/linux/s390x");
    let cases = [
        (queued.as_str(), fence, "was never leased"),
        ("j-999999/linux/amd64", fence, "does not exist"),
        (running.as_str(), fence + 1000, "was never issued"),
        (running.as_str(), 0, "was never issued"),
    ];
    for (action, f, why) in cases {
        let e = h
            .farm
            .completed_reading_store(
                &AgentId("a".into()),
                &ActionId(action.into()),
                f,
                exited(0, &[]),
                2,
            )
            .unwrap_err();
        assert!(
            matches!(&e, FarmError::Refused(m) if m.contains(why)),
            "{action} {f}: {e:?}"
        );
    }
    assert!(h.acks("a").is_empty(), "nothing acknowledged");
    assert_eq!(h.state(&running).state, ActionState::Running);
    assert_eq!(h.state(&queued).state, ActionState::Queued);
    assert_eq!(h.farm.stale_results_refused(), 0);
}

#[test]
fn announcements_wait_for_the_flush_and_a_later_hub_gets_none_of_the_old_ones() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    let job = h.submit(&["linux/arm64"], false, 0);
    let id = format!("{job}/linux/arm64");
    let fence = h.assigns("a")[0].1;
    let watch = h.farm.hubs().subscribe(&job);
    let mut live = watch.live;
    h.farm
        .completed_reading_store(
            &AgentId("a".into()),
            &ActionId(id.clone()),
            fence,
            exited(0, &[]),
            1,
        )
        .unwrap();
    // Recorded (the store holds it) but not yet announced to the agent or the watchers.
    assert_eq!(h.state(&id).state, ActionState::Succeeded);
    assert!(
        h.rx.get_mut("a").unwrap().try_recv().is_err(),
        "no ack before the flush"
    );
    assert!(live.try_recv().is_err(), "no event before the flush");
    let outbox = h.farm.take_outbox();
    assert!(outbox.needs_flush);
    h.farm.store.flush().unwrap();
    h.farm.release(outbox);
    assert_eq!(h.acks("a"), vec![(true, String::new())]);
    let mut events = Vec::new();
    while let Ok((_, u)) = live.try_recv() {
        events.push(match u {
            JobUpdate::Action(a) => a.state.name().to_string(),
            JobUpdate::Finished(_) => "finished".into(),
            JobUpdate::Log { .. } => "log".into(),
        });
    }
    assert_eq!(events, ["succeeded", "finished"]);
    assert!(h.farm.take_outbox().is_empty());

    // A job whose hub is not open (a restarted coordinator): its events are not held
    // for a hub opened later, which starts from the stored state instead.
    let other = h.submit(&["linux/arm64"], false, 2);
    let other_id = format!("{other}/linux/arm64");
    let fence = h.assigns("a")[0].1;
    h.farm.commit().unwrap();
    h.farm.hubs.forget(&other);
    h.farm
        .completed_reading_store(
            &AgentId("a".into()),
            &ActionId(other_id),
            fence,
            exited(0, &[]),
            3,
        )
        .unwrap();
    h.farm.hubs().open(&other);
    let later = h.farm.hubs().subscribe(&other);
    h.farm.commit().unwrap();
    assert!(
        later.history.is_empty(),
        "nothing from before the hub opened"
    );
}

#[test]
fn agent_changes_reach_the_store_only_through_the_committer() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    h.farm.commit().unwrap();
    let a = AgentId("a".into());
    let stored = |h: &Harness| h.farm.store.agent(&a).unwrap().unwrap();
    assert!(!stored(&h).draining);
    h.farm.drain(&a).unwrap();
    // The farm changed memory only; the record and the command wait for the committer.
    assert!(!stored(&h).draining, "the farm wrote the store itself");
    assert!(h.rx.get_mut("a").unwrap().try_recv().is_err());
    let outbox = h.farm.take_outbox();
    assert!(
        outbox.needs_flush,
        "a drain is durable before it is answered"
    );
    assert_eq!(outbox.agents.len(), 1);
    assert!(outbox.agents[0].draining);
    outbox.write(&h.farm.store, &h.farm.cas).unwrap();
    assert!(stored(&h).draining);
    h.farm.release(outbox);
    assert!(matches!(
        h.rx.get_mut("a").unwrap().try_recv(),
        Ok(AgentCommand::Drain)
    ));
    // Nothing changed since: the next commit writes nothing.
    assert!(h.farm.take_outbox().is_empty());
}

#[test]
fn placement_follows_the_queue_index_in_job_order() {
    let mut h = Harness::new();
    let first = h.submit(&["linux/arm64"], false, 0);
    let second = h.submit(&["linux/arm64"], false, 0);
    assert_eq!(h.farm.queued.len(), 2);
    h.join("a", &[("linux/arm64", false)], 1);
    // One slot: the older job's action goes first; the other stays queued.
    let placed = h.assigns("a");
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].0, format!("{first}/linux/arm64"));
    assert_eq!(h.farm.queued.len(), 1);
    assert_eq!(h.farm.leased[&AgentId("a".into())].len(), 1);
    h.complete("a", &placed[0].0, placed[0].1, 0, 2);
    let next = h.assigns("a");
    assert_eq!(next[0].0, format!("{second}/linux/arm64"));
    assert!(h.farm.queued.is_empty());
    h.complete("a", &next[0].0, next[0].1, 0, 3);
    h.farm.commit().unwrap();
    assert!(h.farm.leased.is_empty() && h.farm.active.is_empty());
}

#[test]
fn gives_up_after_the_attempt_limit() {
    let mut h = Harness::new();
    h.join("a", &[("linux/ppc64le", false)], 0);
    let job = h.submit(&["linux/ppc64le"], false, 0);
    let id = format!("{job}/linux/ppc64le");
    let mut now = 0;
    for attempt in 1..=3 {
        assert_eq!(h.assigns("a").len(), 1, "attempt {attempt}");
        now += LEASE + 1;
        // The agent is alive (heartbeats) but never reports the action as running.
        h.heartbeat("a", &[], now - 1);
        h.farm.tick(now).unwrap();
    }
    let done = h.state(&id);
    assert_eq!((done.state, done.attempts), (ActionState::InfraFailed, 3));
    assert!(
        done.reason.contains("gave up after 3 attempts"),
        "{}",
        done.reason
    );
    assert!(h.farm.job_now(&job).unwrap().unwrap().finished);
}

#[test]
fn unschedulable_after_grace_with_a_reason() {
    let mut h = Harness::new();
    h.join("emu", &[("linux/amd64", false), ("linux/riscv64", true)], 0);
    let job = h.submit(&["linux/riscv64"], false, 0);
    let id = format!("{job}/linux/riscv64");
    h.farm.tick(1).unwrap();
    h.heartbeat("emu", &[], 30_000);
    h.farm.tick(30_000).unwrap();
    assert_eq!(
        h.state(&id).state,
        ActionState::Queued,
        "still within the grace"
    );
    h.heartbeat("emu", &[], 30_001);
    h.farm.tick(30_001).unwrap();
    let done = h.state(&id);
    assert_eq!(done.state, ActionState::Unschedulable);
    assert!(
        done.reason.contains("does not allow emulation"),
        "{}",
        done.reason
    );
}

#[test]
fn restart_keeps_queued_and_running_and_honours_leases() {
    let dir = tempfile::tempdir().unwrap();
    let (job, id);
    {
        let mut h = Harness::new();
        h._dir = dir;
        h.farm = Farm::load(
            Store::open(&h._dir.path().join("state")).unwrap(),
            Arc::new(Cas::open(&h._dir.path().join("cas")).unwrap()),
            FarmConfig::default(),
            0,
        )
        .unwrap();
        h.join("a", &[("linux/arm64", false)], 0);
        job = h.submit(&["linux/arm64", "linux/s390x"], false, 0);
        id = format!("{job}/linux/arm64");
        assert_eq!(h.assigns("a").len(), 1);
        let store_dir = h._dir;
        drop(h.farm);
        // Reload at 100 s: the lease is honoured for a full period from now.
        let mut farm = Farm::load(
            Store::open(&store_dir.path().join("state")).unwrap(),
            Arc::new(Cas::open(&store_dir.path().join("cas")).unwrap()),
            FarmConfig::default(),
            100_000,
        )
        .unwrap();
        assert_eq!(farm.active.len(), 2);
        farm.tick(100_000 + LEASE).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        farm.hello(
            &AgentId("a".into()),
            offers(&[("linux/arm64", false)]),
            &[(ActionId(id.clone()), 1)],
            tx,
            100_000 + LEASE,
        )
        .unwrap();
        farm.commit().unwrap();
        assert!(
            rx.try_recv().is_err(),
            "re-claimed lease: no cancel, no new assign"
        );
        let running = farm.action_now(&ActionId(id.clone())).unwrap().unwrap();
        assert_eq!((running.state, running.attempts), (ActionState::Running, 1));
        drop(store_dir);
    }
}

#[test]
fn the_farm_writes_no_record_under_its_lock_and_asks_for_a_finished_actions_stored_record() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    let job = h.submit(&["linux/arm64"], false, 0);
    let id = ActionId(format!("{job}/linux/arm64"));
    let fence = h.assigns("a")[0].1;
    let agent = AgentId("a".into());
    h.farm
        .completed(&agent, &id, fence, exited(0, &[]), 1)
        .unwrap();
    // Changed in memory only: the store says running until the committer writes the record.
    let stored = |h: &Harness| h.farm.store.action(&id).unwrap().unwrap().state;
    assert_eq!(stored(&h), ActionState::Running);
    assert!(!h.farm.store.job(&job).unwrap().unwrap().finished);
    assert_eq!(h.state(&id.0).state, ActionState::Succeeded);
    // A resend is answered from memory before the commit, and while the committer writes.
    h.farm
        .completed(&agent, &id, fence, exited(0, &[]), 1)
        .unwrap();
    let outbox = h.farm.take_outbox();
    h.farm
        .completed(&agent, &id, fence, exited(0, &[]), 1)
        .unwrap();
    outbox.write(&h.farm.store, &h.farm.cas).unwrap();
    h.farm.release(outbox);
    assert_eq!(stored(&h), ActionState::Succeeded);
    assert!(h.farm.store.job(&job).unwrap().unwrap().finished);
    // Written and gone from memory: the farm asks for the stored record (read by the caller
    // without the lock) instead of reading the store itself.
    let e = h
        .farm
        .completed(&agent, &id, fence, exited(0, &[]), 2)
        .unwrap_err();
    let FarmError::NeedsStored(mut c) = e else {
        panic!("expected a request for the stored record, got {e:?}");
    };
    c.stored = StoredRecord::Read(h.farm.store.action(&id).unwrap().map(Box::new));
    h.farm.completed(&agent, &id, fence, *c, 2).unwrap();
    // Every resend was acknowledged as recorded, without a change.
    h.farm.commit().unwrap();
    assert_eq!(h.acks("a"), vec![(true, String::new()); 4]);
    assert_eq!(h.farm.stale_results_refused(), 0);
}

#[test]
fn placement_sees_an_agent_lapse_with_time_alone() {
    // Views are refreshed only for agents that changed, and all of them once time passes a
    // moment that flips one by itself: here a's heartbeat lease running out.
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    h.join("b", &[("linux/arm64", false)], 0);
    let first = h.submit(&["linux/arm64"], false, 1);
    let id = format!("{first}/linux/arm64");
    let fence = h.assigns("a")[0].1;
    h.report("a", &id, fence, exited(0, &[]), 2);
    // A job nobody serves keeps the queue busy: the placement at 3 refreshes a's view.
    h.submit(&["linux/s390x"], false, 3);
    let lease = h.farm.config().lease_ms;
    h.heartbeat("b", &[], lease);
    // Nothing about a changed since it was last seen, but its lease ran out: not a, idle and
    // first by id, but b.
    let second = h.submit(&["linux/arm64"], false, lease + 2);
    assert!(h.assigns("a").is_empty());
    assert_eq!(h.assigns("b")[0].0, format!("{second}/linux/arm64"));
}
