//! Cache scopes through the farm and job planning: what an untrusted submitter's jobs write
//! stays in its own scope, so it can never answer anyone else's job; damaged entries are
//! misses; untrusted work never reaches an agent without a sandbox.
use super::*;
use crate::planning::{plan_job, JobPlan, Plan, PlanContext};
use archfarm_proto::v1;

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A job of one Go test step on linux/s390x under the step cache key `key`.
fn step_job(key: &str) -> v1::JobSpec {
    v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: "linux/s390x".into(),
            steps: vec![v1::Step {
                name: "pkg".into(),
                argv: vec!["./pkg.test".into()],
                history_key: "example.com/pkg".into(),
                cache_key: key.into(),
                ..Default::default()
            }],
        }],
        timeout_ms: 60_000,
        ..Default::default()
    }
}

impl Harness {
    /// Plans `spec` for `who` as the Jobs service does (before the farm is locked).
    fn plan(&mut self, who: &Submitter, spec: &v1::JobSpec, now: u64) -> (JobId, Plan) {
        self.seq += 1;
        let id = JobId(format!("j-{:06}", self.seq));
        let ctx = PlanContext {
            store: &self.farm.store,
            cas: &self.farm.cas,
            cache: self.farm.cache(),
        };
        let job = JobPlan {
            id: &id,
            seq: self.seq,
            spec,
            submitter: who,
            now,
        };
        let valid = crate::planning::spec::validate_spec(spec).unwrap();
        let plan = plan_job(&ctx, &job, valid).unwrap();
        (id, plan)
    }

    /// Plans and submits a step job; returns the job and its actions' states.
    fn submit_steps(&mut self, who: &Submitter, key: &str, now: u64) -> (JobId, Vec<ActionRecord>) {
        let (id, plan) = self.plan(who, &step_job(key), now);
        let actions = plan.actions.clone();
        let record = JobRecord {
            id: id.clone(),
            seq: self.seq,
            spec: vec![],
            submitter: who.name.clone(),
            submitted_unix_ms: now,
            actions: plan.actions.iter().map(|a| a.id.clone()).collect(),
            description: plan.description,
            finished: false,
        };
        self.farm.stage_blobs(plan.blobs);
        self.farm
            .submit(record, plan.actions, &plan.pins, now)
            .unwrap();
        self.farm.commit().unwrap();
        (id, actions)
    }

    /// Runs the only step of the job's shard on agent "a" with `exit_code`.
    fn run_step(&mut self, job: &JobId, exit_code: i32, now: u64) {
        let id = format!("{job}/linux/s390x/shard-1");
        let assigned = self.assigns("a");
        let (_, fence, _) = assigned
            .iter()
            .find(|(a, _, _)| *a == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} was not assigned: {assigned:?}"));
        let out = Digest::of(b"--- test output");
        self.farm.cas.put(&out, b"--- test output").unwrap();
        let step = StepCompletion {
            name: "pkg".into(),
            exit_code,
            duration_ms: 100,
            timed_out: false,
            output: Some(out),
            encoded: step_bytes("pkg", exit_code),
        };
        let c = Completion {
            steps: vec![step],
            ..exited(exit_code, &[out])
        };
        self.report("a", &id, fence, c, now);
    }
}

/// The cached step result of a planned job, if its step came from the cache.
fn cached_step(actions: &[ActionRecord]) -> Option<v1::StepResult> {
    use prost::Message;
    let cached = actions.iter().find(|a| a.cached)?;
    let r = v1::ExecutionResult::decode(cached.result.as_ref()?.encoded.as_slice()).unwrap();
    r.step_results.into_iter().next()
}

fn s390x_harness() -> Harness {
    let mut h = Harness::new();
    h.join("a", &[("linux/s390x", false)], 0);
    h
}

#[test]
fn an_untrusted_submitters_passing_step_never_answers_a_trusted_job() {
    // The poisoning case: a pull request's job submits, under the key an honest client
    // computes for a package whose tests fail, a step that exits 0.
    let mut h = s390x_harness();
    let pr = Submitter::new("pr-bot", false);
    let ci = Submitter::new("ci", true);
    let (job, actions) = h.submit_steps(&pr, KEY, 0);
    assert!(cached_step(&actions).is_none());
    h.run_step(&job, 0, 1);
    let shard = h.state(&format!("{job}/linux/s390x/shard-1"));
    assert_eq!(shard.state, ActionState::Succeeded);
    // The honest trusted run afterwards runs the step (and fails, as it should).
    let (honest, actions) = h.submit_steps(&ci, KEY, 2);
    assert!(
        cached_step(&actions).is_none(),
        "the untrusted result answered a trusted job"
    );
    h.run_step(&honest, 1, 3);
    assert_eq!(
        h.state(&format!("{honest}/linux/s390x/shard-1")).state,
        ActionState::Failed
    );
    // The untrusted submitter's rerun is answered from its own scope.
    let (_, actions) = h.submit_steps(&pr, KEY, 4);
    let hit = cached_step(&actions).expect("the untrusted rerun is cached");
    assert_eq!(hit.exit_code, 0);
    let origin = hit.cache_origin.expect("a cached step names its origin");
    assert_eq!(origin.scope, "principal pr-bot");
    assert_eq!(origin.submitter, "pr-bot");
    assert_eq!(origin.action_id, format!("{job}/linux/s390x/shard-1"));
}

#[test]
fn a_trusted_result_is_shared_and_read_after_the_submitters_own_scope() {
    let mut h = s390x_harness();
    let pr = Submitter::new("pr-bot", false);
    let ci = Submitter::new("ci", true);
    let (job, _) = h.submit_steps(&ci, KEY, 0);
    h.run_step(&job, 0, 1);
    // Everyone reads the shared scope: the trusted rerun and the untrusted submitter.
    for who in [&ci, &pr] {
        let (_, actions) = h.submit_steps(who, KEY, 2);
        let hit = cached_step(&actions).unwrap_or_else(|| panic!("{} missed", who.name));
        assert_eq!(hit.cache_origin.unwrap().scope, "shared", "{}", who.name);
    }
    // Another untrusted submitter's own entry is never read by a third one.
    let other = Submitter::new("pr-other", false);
    let key2 = "f".repeat(64);
    let (job, _) = h.submit_steps(&pr, &key2, 3);
    h.run_step(&job, 0, 4);
    let (_, actions) = h.submit_steps(&other, &key2, 5);
    assert!(
        cached_step(&actions).is_none(),
        "read another principal's scope"
    );
}

#[test]
fn a_stored_step_result_that_does_not_decode_is_a_miss_and_the_step_runs() {
    let mut h = s390x_harness();
    let ci = Submitter::new("ci", true);
    let (job, _) = h.submit_steps(&ci, KEY, 0);
    h.run_step(&job, 0, 1);
    let (_, actions) = h.submit_steps(&ci, KEY, 2);
    assert!(
        cached_step(&actions).is_some(),
        "stored and hit before the damage"
    );
    // The record itself damaged: not even JSON.
    h.farm
        .store
        .put_raw_cache_entry(&CacheScope::Shared, CacheKey::Step(KEY), b"{garbage");
    let (job, actions) = h.submit_steps(&ci, KEY, 3);
    assert!(
        cached_step(&actions).is_none(),
        "a damaged record was a hit"
    );
    h.run_step(&job, 0, 4);
    // A record that decodes, holding a result that does not.
    let mut e = h
        .lookup(CacheKey::Step(KEY), false, 5)
        .expect("stored again by the run");
    e.encoded = vec![0xff, 0xff, 0xff];
    h.farm
        .store
        .put_cache_entry(&CacheScope::Shared, CacheKey::Step(KEY), &e)
        .unwrap();
    let (job, actions) = h.submit_steps(&ci, KEY, 6);
    assert!(
        cached_step(&actions).is_none(),
        "an undecodable result was a hit (it would read as exit 0)"
    );
    let shard = actions
        .iter()
        .find(|a| a.id.0.ends_with("shard-1"))
        .expect("the step is planned to run");
    assert_eq!(shard.state, ActionState::Queued);
    h.run_step(&job, 0, 7);
}

#[test]
fn the_action_cache_is_scoped_like_the_step_cache() {
    let mut h = Harness::new();
    h.join("a", &[("linux/amd64", false)], 0);
    h.submitter = Submitter::new("pr-bot", false);
    let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
    let fence = h.assigns("a")[0].1;
    h.complete_with("a", &format!("{first}/linux/amd64"), fence, &[], 1);
    assert_eq!(
        h.state(&format!("{first}/linux/amd64")).cache_write,
        "principal pr-bot"
    );
    // A trusted job of the same key runs.
    h.submitter = Submitter::new("ci", true);
    let second = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
    assert!(!h.state(&format!("{second}/linux/amd64")).cached);
    // The untrusted submitter's own rerun hits its own scope.
    h.submitter = Submitter::new("pr-bot", false);
    let third = h.submit_keyed(&["linux/amd64"], false, "key-1", 3);
    let hit = h.state(&format!("{third}/linux/amd64"));
    assert!(hit.cached);
    assert_eq!(
        hit.cache_origin.unwrap().scope,
        CacheScope::Principal("pr-bot".into())
    );
}

#[test]
fn untrusted_work_never_reaches_an_agent_without_a_sandbox() {
    let mut h = Harness::new();
    h.join("bare", &[("linux/amd64", false)], 0);
    let agent = h.farm.agents.get_mut(&AgentId("bare".into())).unwrap();
    agent.record.facts.sandbox = "none: bwrap (bubblewrap) is not installed".into();
    h.submitter = Submitter::new("pr-bot", false);
    let job = h.submit(&["linux/amd64"], false, 0);
    assert!(
        h.assigns("bare").is_empty(),
        "untrusted work ran unsandboxed"
    );
    let grace = h.farm.cfg.unschedulable_grace_ms;
    h.farm.tick(1).unwrap();
    h.heartbeat("bare", &[], grace + 1);
    h.farm.tick(grace + 1).unwrap();
    let a = h.state(&format!("{job}/linux/amd64"));
    assert_eq!(a.state, ActionState::Unschedulable);
    assert!(a.reason.contains("1 without a sandbox"), "{}", a.reason);
    // A trusted submitter's work runs there.
    h.submitter = Submitter::new("ci", true);
    h.submit(&["linux/amd64"], false, grace + 2);
    assert_eq!(h.assigns("bare").len(), 1);
}
