//! Pure placement: which agent takes an action, and why none can. No IO, no async, no proto.
//!
//! Choosing is `min()` over [`Score`], whose fields in declaration order are the priorities:
//! native before emulated, then agents that have not failed the action for infra reasons,
//! then the least loaded, then the agent id so the choice is deterministic.
//!
//! Retry elsewhere: an action that failed on an agent for infra reasons (agent lost, lease
//! lapsed, INFRA_ERROR) goes back to that agent only when no other agent could ever take it
//! (none connected, unquarantined, with the platform and labels). If another one could but is
//! busy, the action waits for it. A single machine serving a platform still gets its retries;
//! an agent that keeps failing is stopped by quarantine, not here.
//!
//! Quarantined agents take no new work, but still count as able to serve a platform: work
//! waits for their quarantine to end rather than being declared unschedulable.
use crate::model::{AgentId, Labels};
use archfarm_proto::Platform;

/// What placement needs to know about one agent.
#[derive(Clone, Debug)]
pub struct AgentView {
    /// Its id.
    pub id: AgentId,
    /// Platforms served, with whether each is emulated.
    pub offers: Vec<(Platform, bool)>,
    /// Labels bound at join.
    pub labels: Labels,
    /// Slots offered.
    pub slots: u32,
    /// Slots in use.
    pub used: u32,
    /// A session is open and heartbeats arrive.
    pub connected: bool,
    /// Takes no new work.
    pub draining: bool,
    /// Takes no new work for now (its policy's minimum free disk, say).
    pub paused: bool,
    /// Its policy lets actions have the network.
    pub network: bool,
    /// Quarantined for infra failures: no new work until the backoff passes.
    pub quarantined: bool,
    /// Runs actions in a sandbox.
    pub sandboxed: bool,
}

/// What an action requires.
#[derive(Clone, Debug)]
pub struct Requirement<'a> {
    /// Platform.
    pub platform: &'a Platform,
    /// Labels the agent must carry with equal values.
    pub labels: &'a Labels,
    /// Emulated agents allowed.
    pub allow_emulation: bool,
    /// Needs an idle agent, and takes all of it.
    pub exclusive: bool,
    /// Needs the network.
    pub network: bool,
    /// Needs an agent with a sandbox (jobs of untrusted submitters).
    pub sandbox: bool,
    /// Agents on which the action failed for infra reasons, one entry per failure.
    pub infra_failed_on: &'a [AgentId],
}

impl Requirement<'_> {
    /// How many times the action failed on `agent` for infra reasons.
    fn infra_failures_on(&self, agent: &AgentId) -> u32 {
        self.infra_failed_on.iter().filter(|a| *a == agent).count() as u32
    }

    /// Everything in the requirement that decides which agents fit it, owned.
    pub fn fit_key(&self) -> FitKey {
        // No `..`: a field added to Requirement must be added to the key or left out here
        // on purpose, or placement would wrongly lump requirements together.
        let Requirement {
            platform,
            labels,
            allow_emulation,
            exclusive,
            network,
            sandbox,
            infra_failed_on,
        } = self;
        let mut avoid = infra_failed_on.to_vec();
        avoid.sort();
        avoid.dedup();
        FitKey {
            platform: (*platform).clone(),
            labels: (*labels).clone(),
            allow_emulation: *allow_emulation,
            exclusive: *exclusive,
            network: *network,
            sandbox: *sandbox,
            infra_failed_on: avoid,
        }
    }
}

/// What decides which agents fit a [`Requirement`]: two requirements with equal keys fit
/// the same agents, so [`choose_agent`] finds an agent for both or for neither. Placement
/// remembers the keys no free agent met, so a long queue is not asked about again and again
/// (`Farm::dispatch`); a key that left a requirement out would let one unplaceable action
/// (one that needs the network, or must avoid the agent it failed on) block every other
/// action of its platform.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FitKey {
    platform: Platform,
    labels: Labels,
    allow_emulation: bool,
    exclusive: bool,
    network: bool,
    sandbox: bool,
    /// The agents it failed on for infra reasons, sorted, each once: which agents are skipped
    /// depends on which they are; how often it failed on each only ranks.
    infra_failed_on: Vec<AgentId>,
}

impl FitKey {
    /// The same requirement without what only narrows the agents that fit (the network, a
    /// sandbox, an idle agent, agents to avoid); `None` when it asks for none of these. Every agent
    /// [`choose_agent`] could pick for `self` it could pick for the relaxed requirement, so
    /// when that found no agent, neither does `self`.
    pub fn relaxed(&self) -> Option<FitKey> {
        if !self.network && !self.sandbox && !self.exclusive && self.infra_failed_on.is_empty() {
            return None;
        }
        Some(FitKey {
            platform: self.platform.clone(),
            labels: self.labels.clone(),
            allow_emulation: self.allow_emulation,
            exclusive: false,
            network: false,
            sandbox: false,
            infra_failed_on: Vec::new(),
        })
    }
}

/// Placement preference; smaller is better.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Score<'a> {
    /// Emulated agents only when no native one is free.
    pub emulated: bool,
    /// Times the action failed on this agent for infra reasons: fewest first.
    pub infra_failures_here: u32,
    /// Used slots per thousand offered.
    pub load_permille: u32,
    /// Tie-break (borrowed: only the winner's id is cloned).
    pub agent: &'a AgentId,
}

fn has_labels(agent: &AgentView, want: &Labels) -> bool {
    want.iter().all(|(k, v)| agent.labels.get(k) == Some(v))
}

/// Whether `agent` may ever run `req` (ignoring its current load); `Some(emulated)` if so.
pub fn can_serve(agent: &AgentView, req: &Requirement<'_>) -> Option<bool> {
    if !agent.connected
        || agent.draining
        || agent.paused
        || (req.network && !agent.network)
        || (req.sandbox && !agent.sandboxed)
        || !has_labels(agent, req.labels)
    {
        return None;
    }
    agent
        .offers
        .iter()
        .filter(|(p, emulated)| p == req.platform && (!emulated || req.allow_emulation))
        .map(|(_, emulated)| *emulated)
        .min()
}

/// The agent that should take `req` now, and whether it will emulate.
///
/// Agents that failed the action for infra reasons are skipped while any other agent could
/// take it, free now or not (see the module's doc).
pub fn choose_agent<'a>(
    agents: impl IntoIterator<Item = &'a AgentView> + Clone,
    req: &Requirement<'_>,
) -> Option<(AgentId, bool)> {
    // Only an action that failed somewhere asks whether another agent could take it.
    let another_could = !req.infra_failed_on.is_empty()
        && agents.clone().into_iter().any(|a| {
            !a.quarantined && req.infra_failures_on(&a.id) == 0 && can_serve(a, req).is_some()
        });
    agents
        .into_iter()
        .filter(|a| !a.quarantined && a.used < a.slots && (!req.exclusive || a.used == 0))
        .filter_map(|a| {
            let infra_failures_here = req.infra_failures_on(&a.id);
            if another_could && infra_failures_here > 0 {
                return None;
            }
            can_serve(a, req).map(|emulated| Score {
                emulated,
                infra_failures_here,
                load_permille: a.used.saturating_mul(1000) / a.slots.max(1),
                agent: &a.id,
            })
        })
        .min()
        .map(|s| (s.agent.clone(), s.emulated))
}

/// Why no agent can serve `req`, naming the platform, the labels, and how many agents of
/// that platform exist and why they don't fit.
pub fn unservable_reason<'a>(
    agents: impl IntoIterator<Item = &'a AgentView>,
    req: &Requirement<'_>,
) -> String {
    let mut of_platform = 0;
    let (mut emulated_only, mut lost, mut draining, mut wrong_labels) = (0, 0, 0, 0);
    let (mut paused, mut no_network, mut unsandboxed) = (0, 0, 0);
    for a in agents {
        let offers: Vec<bool> = a
            .offers
            .iter()
            .filter(|(p, _)| p == req.platform)
            .map(|(_, e)| *e)
            .collect();
        if offers.is_empty() {
            continue;
        }
        of_platform += 1;
        if !a.connected {
            lost += 1;
        } else if a.draining {
            draining += 1;
        } else if a.paused {
            paused += 1;
        } else if req.network && !a.network {
            no_network += 1;
        } else if req.sandbox && !a.sandboxed {
            unsandboxed += 1;
        } else if !has_labels(a, req.labels) {
            wrong_labels += 1;
        } else if !req.allow_emulation && offers.iter().all(|e| *e) {
            emulated_only += 1;
        }
    }
    let labels = if req.labels.is_empty() {
        String::new()
    } else {
        let l: Vec<String> = req.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(" with labels {}", l.join(","))
    };
    let mut why = Vec::new();
    if emulated_only > 0 {
        why.push(format!(
            "{emulated_only} emulated only and the job does not allow emulation (--allow-emulation)"
        ));
    }
    if wrong_labels > 0 {
        why.push(format!("{wrong_labels} lacking the labels"));
    }
    if draining > 0 {
        why.push(format!("{draining} draining"));
    }
    if paused > 0 {
        why.push(format!("{paused} paused by their policy (e.g. low disk)"));
    }
    if no_network > 0 {
        why.push(format!(
            "{no_network} whose policy does not allow the network the job asks for"
        ));
    }
    if unsandboxed > 0 {
        why.push(format!(
            "{unsandboxed} without a sandbox, and jobs of untrusted submitters run only in one"
        ));
    }
    if lost > 0 {
        why.push(format!("{lost} lost"));
    }
    let detail = match of_platform {
        0 => format!("no agent serves {}", req.platform),
        n => format!(
            "{n} agent{} of {}: {}",
            if n == 1 { "" } else { "s" },
            req.platform,
            why.join(", ")
        ),
    };
    format!("no agent can run {}{labels}: {detail}", req.platform)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn agent(id: &str, offers: &[(&str, bool)], used: u32) -> AgentView {
        AgentView {
            id: AgentId(id.into()),
            offers: offers.iter().map(|(s, e)| (p(s), *e)).collect(),
            labels: Labels::new(),
            slots: 2,
            used,
            connected: true,
            draining: false,
            paused: false,
            network: false,
            quarantined: false,
            sandboxed: true,
        }
    }

    fn req<'a>(platform: &'a Platform, labels: &'a Labels, allow: bool) -> Requirement<'a> {
        Requirement {
            platform,
            labels,
            allow_emulation: allow,
            exclusive: false,
            network: false,
            sandbox: false,
            infra_failed_on: &[],
        }
    }

    #[test]
    fn matches_platform_and_prefers_native_then_least_loaded_then_id() {
        let arm = p("linux/arm64");
        let none = Labels::new();
        let agents = vec![
            agent("emu", &[("linux/amd64", false), ("linux/arm64", true)], 0),
            agent("native-b", &[("linux/arm64", false)], 1),
            agent("native-a", &[("linux/arm64", false)], 1),
            agent("x86", &[("linux/amd64", false)], 0),
        ];
        assert_eq!(
            choose_agent(&agents, &req(&arm, &none, true)),
            Some((AgentId("native-a".into()), false))
        );
        let mut busy = agents.clone();
        busy[1].used = 2;
        busy[2].used = 2;
        assert_eq!(
            choose_agent(&busy, &req(&arm, &none, true)),
            Some((AgentId("emu".into()), true))
        );
        assert_eq!(choose_agent(&busy, &req(&arm, &none, false)), None);
    }

    #[test]
    fn paused_agents_wait_and_network_goes_only_where_policy_allows() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let mut a = agent("a", &[("linux/amd64", false)], 0);
        a.paused = true;
        assert_eq!(choose_agent([&a], &req(&amd, &none, false)), None);
        let why = unservable_reason([&a], &req(&amd, &none, false));
        assert!(why.contains("1 paused by their policy"), "{why}");
        a.paused = false;
        let mut net = req(&amd, &none, false);
        net.network = true;
        assert_eq!(choose_agent([&a], &net), None);
        let why = unservable_reason([&a], &net);
        assert!(why.contains("does not allow the network"), "{why}");
        a.network = true;
        assert!(choose_agent([&a], &net).is_some());
        assert!(choose_agent([&a], &req(&amd, &none, false)).is_some());
    }

    #[test]
    fn requires_labels_and_skips_lost_and_draining() {
        let amd = p("linux/amd64");
        let want: Labels = [("node-e2e".to_string(), String::new())].into();
        let mut a = agent("a", &[("linux/amd64", false)], 0);
        assert_eq!(choose_agent([&a], &req(&amd, &want, false)), None);
        a.labels = want.clone();
        assert!(choose_agent([&a], &req(&amd, &want, false)).is_some());
        a.draining = true;
        assert_eq!(choose_agent([&a], &req(&amd, &want, false)), None);
        a.draining = false;
        a.connected = false;
        assert_eq!(choose_agent([&a], &req(&amd, &want, false)), None);
    }

    #[test]
    fn untrusted_work_runs_only_on_a_sandboxed_agent_and_says_why_not() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let mut r = req(&amd, &none, false);
        r.sandbox = true;
        let mut bare = agent("bare", &[("linux/amd64", false)], 0);
        bare.sandboxed = false;
        assert_eq!(choose_agent([&bare], &r), None);
        assert!(
            choose_agent([&bare], &req(&amd, &none, false)).is_some(),
            "trusted work may run there"
        );
        let why = unservable_reason([&bare], &r);
        assert!(why.contains("1 without a sandbox"), "{why}");
        let boxed = agent("boxed", &[("linux/amd64", false)], 1);
        assert_eq!(
            choose_agent([&bare, &boxed], &r),
            Some((AgentId("boxed".into()), false)),
            "the busier sandboxed agent, not the idle bare one"
        );
        let fit = r.fit_key();
        assert_eq!(fit.relaxed(), Some(req(&amd, &none, false).fit_key()));
    }

    #[test]
    fn exclusive_work_waits_for_an_idle_agent() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let mut r = req(&amd, &none, false);
        r.exclusive = true;
        let busy = agent("busy", &[("linux/amd64", false)], 1);
        let idle = agent("idle", &[("linux/amd64", false)], 0);
        assert_eq!(
            choose_agent([&busy], &r),
            None,
            "one slot of two used is not idle"
        );
        assert_eq!(
            choose_agent([&busy, &idle], &r),
            Some((AgentId("idle".into()), false))
        );
    }

    #[test]
    fn an_infra_failure_sends_the_retry_to_another_agent_even_a_busier_one() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let failed = [AgentId("a".into())];
        let mut r = req(&amd, &none, false);
        r.infra_failed_on = &failed;
        let a = agent("a", &[("linux/amd64", false)], 0);
        let mut b = agent("b", &[("linux/amd64", false)], 1);
        assert_eq!(
            choose_agent([&a, &b], &req(&amd, &none, false)),
            Some((AgentId("a".into()), false)),
            "without the failure the idle a wins"
        );
        assert_eq!(
            choose_agent([&a, &b], &r),
            Some((AgentId("b".into()), false))
        );
        b.used = 2;
        assert_eq!(
            choose_agent([&a, &b], &r),
            None,
            "b could take it once free: wait for b rather than go back to a"
        );
        b.connected = false;
        assert_eq!(
            choose_agent([&a, &b], &r),
            Some((AgentId("a".into()), false)),
            "nobody else can ever take it: back to a"
        );
        b.connected = true;
        b.used = 0;
        b.quarantined = true;
        assert_eq!(
            choose_agent([&a, &b], &r),
            Some((AgentId("a".into()), false)),
            "a quarantined agent is no alternative"
        );
    }

    #[test]
    fn the_fit_key_holds_every_requirement_that_narrows_the_agents() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let (a, b) = (AgentId("a".into()), AgentId("b".into()));
        let plain = req(&amd, &none, false);
        let twice = [a.clone(), b.clone(), a.clone()];
        let once = [b.clone(), a.clone()];
        let mut failed_twice = plain.clone();
        failed_twice.infra_failed_on = &twice;
        let mut failed_once = plain.clone();
        failed_once.infra_failed_on = &once;
        assert_eq!(
            failed_twice.fit_key(),
            failed_once.fit_key(),
            "how often it failed on an agent only ranks"
        );
        let mut net = plain.clone();
        net.network = true;
        let mut exclusive = plain.clone();
        exclusive.exclusive = true;
        let keys = [&plain, &failed_once, &net, &exclusive].map(Requirement::fit_key);
        for (i, k) in keys.iter().enumerate() {
            assert!(keys[i + 1..].iter().all(|other| other != k), "{k:?}");
        }
        assert_eq!(plain.fit_key().relaxed(), None);
        for r in [&failed_once, &net, &exclusive] {
            assert_eq!(r.fit_key().relaxed(), Some(plain.fit_key()), "{r:?}");
        }
    }

    #[test]
    fn when_the_relaxed_requirement_finds_no_agent_neither_does_the_narrower_one() {
        // Every state of two agents (load, network, quarantine, emulation) against every
        // narrowing of one requirement.
        let amd = p("linux/amd64");
        let none = Labels::new();
        let (a, b) = (AgentId("a".into()), AgentId("b".into()));
        let both = [a.clone(), b.clone()];
        let avoid: [&[AgentId]; 4] = [&[], &both[..1], &both[1..], &both];
        let states: Vec<AgentView> = (0..24)
            .map(|n| {
                let mut v = agent("x", &[("linux/amd64", n % 2 == 1)], (n / 2) % 3);
                v.network = (n / 6) % 2 == 1;
                v.quarantined = n / 12 == 1;
                v
            })
            .collect();
        let mut narrower_found_none = 0;
        for sa in &states {
            for sb in &states {
                let (mut va, mut vb) = (sa.clone(), sb.clone());
                (va.id, vb.id) = (a.clone(), b.clone());
                for n in 0..32 {
                    let mut r = req(&amd, &none, n % 2 == 1);
                    r.network = (n / 2) % 2 == 1;
                    r.exclusive = (n / 4) % 2 == 1;
                    r.infra_failed_on = avoid[n / 8];
                    let relaxed = req(&amd, &none, r.allow_emulation);
                    let key = r.fit_key();
                    assert_eq!(key.relaxed().unwrap_or(key), relaxed.fit_key());
                    if choose_agent([&va, &vb], &relaxed).is_none() {
                        assert_eq!(choose_agent([&va, &vb], &r), None, "{va:?} {vb:?} {r:?}");
                        narrower_found_none += 1;
                    }
                }
            }
        }
        assert!(narrower_found_none > 1000, "{narrower_found_none}");
    }

    #[test]
    fn quarantined_agents_get_no_work_but_still_serve_their_platform() {
        let amd = p("linux/amd64");
        let none = Labels::new();
        let mut a = agent("a", &[("linux/amd64", false)], 0);
        a.quarantined = true;
        assert_eq!(choose_agent([&a], &req(&amd, &none, false)), None);
        assert_eq!(
            can_serve(&a, &req(&amd, &none, false)),
            Some(false),
            "work waits for the quarantine to end instead of becoming unschedulable"
        );
    }

    #[test]
    fn explains_why_nothing_fits() {
        let s390 = p("linux/s390x");
        let none = Labels::new();
        let mut lost = agent("l", &[("linux/s390x", true)], 0);
        lost.connected = false;
        let agents = vec![agent("e", &[("linux/s390x", true)], 0), lost];
        let why = unservable_reason(&agents, &req(&s390, &none, false));
        assert_eq!(
            why,
            "no agent can run linux/s390x: 2 agents of linux/s390x: 1 emulated only and the job \
             does not allow emulation (--allow-emulation), 1 lost"
        );
        let riscv = p("linux/riscv64");
        let lab: Labels = [("lab".to_string(), "osu".to_string())].into();
        assert_eq!(
            unservable_reason(&agents, &req(&riscv, &lab, true)),
            "no agent can run linux/riscv64 with labels lab=osu: no agent serves linux/riscv64"
        );
    }
}
