//! The coordinator's records: what the store keeps and the farm state works on.
pub use crate::cache_scope::{CacheScope, Submitter};
use archfarm_proto::{Digest, Platform};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

macro_rules! typed_id {
    ($name:ident, $what:literal) => {
        #[doc = concat!("The id of ", $what, ".")]
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl $name {
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

typed_id!(AgentId, "an agent");
typed_id!(JobId, "a job");
typed_id!(ActionId, "an action (`<job id>/<platform>`)");

impl ActionId {
    /// The action of `job` for `platform`.
    pub fn new(job: &JobId, platform: &Platform) -> Self {
        Self(format!("{job}/{platform}"))
    }
}

/// Labels, sorted by key.
pub type Labels = BTreeMap<String, String>;

/// Who may call what.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A joined agent: session and CAS only.
    Agent,
    /// CI or a person: jobs, status, CAS.
    Client,
    /// Everything a client may do, plus tokens and agent management.
    Admin,
}

impl Role {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

/// The holder of a client certificate, found by the certificate's SHA-256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Role bound to the certificate.
    pub role: Role,
    /// Agent id for agents, a name for clients and admins.
    pub name: String,
    /// Revoked certificates are refused on connect and on every open stream.
    pub revoked: bool,
    /// Issued as trusted (`credentials create --trusted`): its jobs' results go to the shared
    /// cache scope. Credentials issued before trust existed are untrusted.
    #[serde(default)]
    pub trusted: bool,
}

impl Principal {
    /// Whether its jobs write the shared cache scope: admins always, clients when issued so.
    pub fn is_trusted(&self) -> bool {
        self.role == Role::Admin || self.trusted
    }
    /// Who its jobs are submitted by.
    pub fn submitter(&self) -> Submitter {
        Submitter::new(self.name.clone(), self.is_trusted())
    }
}

/// A join token (the secret is kept only as its blake3 hash).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public half, `[a-z0-9]{6}`.
    pub id: String,
    /// blake3 hex of the secret half.
    pub secret_hash: String,
    /// Labels bound to agents that join with it.
    pub labels: Labels,
    /// Unix ms after which it is refused.
    pub expires_unix_ms: u64,
    /// Works once only.
    pub single_use: bool,
    /// Times used.
    pub uses: u32,
    /// Free text.
    pub description: String,
    /// Unix ms of creation (0 for tokens stored before it was recorded).
    #[serde(default)]
    pub created_unix_ms: u64,
}

impl TokenRecord {
    /// Whether `secret` is this token's secret half. The hashes are compared in constant time
    /// (`subtle`), so the time taken says nothing about how much of a guess was right.
    pub fn secret_matches(&self, secret: &str) -> bool {
        use subtle::ConstantTimeEq;
        let Ok(stored) = blake3::Hash::from_hex(self.secret_hash.as_bytes()) else {
            return false;
        };
        let given = blake3::hash(secret.as_bytes());
        given.as_bytes().ct_eq(stored.as_bytes()).into()
    }
}

/// The label that makes an agent trusted: its results are written to the result cache.
pub const TRUSTED_LABEL: (&str, &str) = ("trusted", "true");

/// Whether labels bound at join make an agent trusted (`trusted=true`).
pub fn is_trusted(labels: &Labels) -> bool {
    labels.get(TRUSTED_LABEL.0).map(String::as_str) == Some(TRUSTED_LABEL.1)
}

/// What an agent serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The platform.
    pub platform: Platform,
    /// Served through an emulator.
    pub emulated: bool,
}

/// What the agent said about itself in its last Hello and heartbeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentFacts {
    /// Platforms served.
    pub offers: Vec<Offer>,
    /// Logical CPUs.
    pub cores: u32,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Kernel.
    pub kernel: String,
    /// Free disk in bytes.
    pub free_disk_bytes: u64,
    /// Slots offered.
    pub slots: u32,
    /// Agent software version.
    pub version: String,
    /// One-minute load.
    pub load_1m: f64,
    /// How it isolates actions.
    #[serde(default)]
    pub sandbox: String,
    /// How it enforces per-action limits.
    #[serde(default)]
    pub limits: String,
    /// Why it takes no new work now; empty when it does.
    #[serde(default)]
    pub paused_reason: String,
    /// Actions asking for the network may run there.
    #[serde(default)]
    pub allow_network: bool,
    /// Label keys it accepts work for; `None`: every bound label.
    #[serde(default)]
    pub accept_labels: Option<Vec<String>>,
}

/// A joined agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Host name given at join.
    pub hostname: String,
    /// Labels bound by the join token.
    pub labels: Labels,
    /// Facts from the last Hello.
    pub facts: AgentFacts,
    /// Unix ms of the join.
    pub joined_unix_ms: u64,
    /// Unix ms of the last message.
    pub last_seen_unix_ms: u64,
    /// Takes no new work.
    pub draining: bool,
    /// Certificate revoked.
    pub revoked: bool,
    /// Infra failures in a row and quarantine.
    #[serde(default)]
    pub quarantine: Quarantine,
}

/// An agent's infra-failure record: failures since its last success, and its quarantine.
///
/// Quarantined while `now < until_unix_ms`; afterwards, while `quarantines > 0`, it is on
/// probation: one more infra failure quarantines it again for twice as long, a success clears
/// the record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Actions failed for infra reasons since the last success.
    pub consecutive_infra_failures: u32,
    /// Quarantines in a row (0: never, or cleared by a success).
    pub quarantines: u32,
    /// Unix ms when the current or last quarantine ends; 0 if none.
    pub until_unix_ms: u64,
    /// Why it was quarantined.
    pub reason: String,
}

impl Quarantine {
    /// Whether the agent takes no new work at `now`.
    pub fn active(&self, now: u64) -> bool {
        now < self.until_unix_ms
    }
    /// Whether a quarantine has passed and no success has cleared it yet.
    pub fn on_probation(&self, now: u64) -> bool {
        self.quarantines > 0 && !self.active(now)
    }
}

/// One step of an action made of steps (see the wire Step).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Unique name; the step's input is mounted at this directory.
    pub name: String,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory relative to the step's directory.
    pub working_directory: String,
    /// The step's input tree, if any.
    pub input_root: Option<Digest>,
    /// Watchdog in milliseconds (0: none).
    pub timeout_ms: u64,
    /// Key of the duration history.
    pub history_key: String,
    /// Client-computed cache key (hex) or empty.
    pub cache_key: String,
}

impl StepSpec {
    /// The key of this step's duration history: `history_key`, or the name.
    pub fn history_item(&self) -> &str {
        if self.history_key.is_empty() {
            &self.name
        } else {
            &self.history_key
        }
    }
}

/// What to run, after the job's spec was expanded for one platform.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Environment, sorted by name.
    pub env: Vec<(String, String)>,
    /// Working directory relative to the input root.
    pub working_directory: String,
    /// Input root, if any.
    pub input_root: Option<Digest>,
    /// Platform.
    pub platform: Platform,
    /// Labels the agent must carry.
    pub required_labels: Labels,
    /// Wall-clock limit.
    pub timeout_ms: u64,
    /// Emulated agents allowed.
    pub allow_emulation: bool,
    /// Declared outputs, sorted.
    #[serde(default)]
    pub output_paths: Vec<String>,
    /// Skip the action cache lookup.
    #[serde(default)]
    pub no_cache: bool,
    /// Steps, for actions made of steps (then argv is empty).
    #[serde(default)]
    pub steps: Vec<StepSpec>,
    /// Takes the whole agent.
    #[serde(default)]
    pub exclusive: bool,
    /// May use the network: only agents whose policy allows it run it.
    #[serde(default)]
    pub network: bool,
    /// Store the result in the result cache even when an untrusted agent produced it.
    #[serde(default)]
    pub cache_untrusted: bool,
    /// Store the result in the result cache even when it was produced under emulation.
    #[serde(default)]
    pub cache_emulated: bool,
    /// Who submitted it: decides the cache scopes it reads and writes, and whether it may
    /// run on an agent without a sandbox.
    #[serde(default)]
    pub submitter: Submitter,
}

#[cfg(test)]
impl ActionSpec {
    /// `true` on `platform`, 60 s limit, nothing else: the base of the tests' actions.
    pub fn trivial(platform: Platform) -> Self {
        Self {
            argv: vec!["true".into()],
            env: vec![],
            working_directory: String::new(),
            input_root: None,
            platform,
            required_labels: Labels::new(),
            timeout_ms: 60_000,
            allow_emulation: false,
            output_paths: vec![],
            no_cache: false,
            steps: vec![],
            exclusive: false,
            network: false,
            cache_untrusted: false,
            cache_emulated: false,
            submitter: Submitter::new("tester", true),
        }
    }
}

/// Lifecycle of an action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    /// Waiting for an agent.
    Queued,
    /// Leased to an agent.
    Running,
    /// Exit 0.
    Succeeded,
    /// Non-zero exit or timeout.
    Failed,
    /// The farm could not run it.
    InfraFailed,
    /// No allowed agent.
    Unschedulable,
    /// Cancelled by a client.
    Cancelled,
}

impl ActionState {
    /// Whether the action will not change any more.
    pub fn is_final(self) -> bool {
        !matches!(self, ActionState::Queued | ActionState::Running)
    }
    /// Lower-case name, as in status counters.
    pub fn name(self) -> &'static str {
        match self {
            ActionState::Queued => "queued",
            ActionState::Running => "running",
            ActionState::Succeeded => "succeeded",
            ActionState::Failed => "failed",
            ActionState::InfraFailed => "infra_failed",
            ActionState::Unschedulable => "unschedulable",
            ActionState::Cancelled => "cancelled",
        }
    }
}

/// An action handed to one agent until `expiry_unix_ms`, fenced by `fence`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The agent.
    pub agent: AgentId,
    /// Fencing number; results carrying another one are refused.
    pub fence: u64,
    /// Unix ms when it lapses unless renewed.
    pub expiry_unix_ms: u64,
    /// Runs under emulation.
    pub emulated: bool,
}

/// An execution result as recorded (the wire ExecutionResult, encoded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// Protobuf encoding of the agent's ExecutionResult.
    #[serde(with = "hex_bytes")]
    pub encoded: Vec<u8>,
    /// Fence it came with.
    pub fence: u64,
}

/// What an entry of the result cache answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheKey<'a> {
    /// An action: hex blake3 of its canonical ActionKey; the entry holds an ExecutionResult.
    Action(&'a str),
    /// A step: the client-computed key (hex); the entry holds a StepResult.
    Step(&'a str),
}

/// Where a result answered from the result cache came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheOrigin {
    /// The scope it was read from.
    pub scope: CacheScope,
    /// The principal whose job produced it.
    pub submitter: String,
    /// The action that produced it.
    pub action: ActionId,
    /// The agent that ran it.
    pub agent: AgentId,
    /// Whether it ran under emulation.
    pub emulated: bool,
    /// Whether that agent was trusted.
    pub trusted_agent: bool,
    /// Unix ms it was recorded.
    pub recorded_unix_ms: u64,
}

impl fmt::Display for CacheOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} scope, from {} of {} on {} ({}{})",
            self.scope,
            self.action,
            self.submitter,
            self.agent,
            if self.emulated { "emulated" } else { "native" },
            if self.trusted_agent { ", trusted" } else { "" }
        )
    }
}

/// A result to be written to the result cache at the next group commit.
#[derive(Clone, Debug)]
pub struct CacheWrite {
    /// A step key (else an action key).
    pub step: bool,
    /// The key (hex).
    pub key: String,
    /// The entry (it names the scope it goes to).
    pub entry: CacheEntry,
}

impl CacheWrite {
    /// Its key.
    pub fn key(&self) -> CacheKey<'_> {
        if self.step {
            CacheKey::Step(&self.key)
        } else {
            CacheKey::Action(&self.key)
        }
    }
}

/// A stored result in the result cache, with who produced it. Only results an agent reported
/// under a valid lease are ever stored.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The result: an encoded ExecutionResult (action keys) or StepResult (step keys).
    #[serde(with = "hex_bytes")]
    pub encoded: Vec<u8>,
    /// Agent that produced it.
    pub agent: AgentId,
    /// Platform it ran as.
    pub platform: Platform,
    /// Whether it ran under emulation.
    pub emulated: bool,
    /// Whether the producing agent was trusted (joined with `trusted=true`).
    #[serde(default)]
    pub trusted: bool,
    /// The scope it was written to.
    pub scope: CacheScope,
    /// The principal whose job produced it.
    pub submitter: String,
    /// The action that produced it.
    pub action: ActionId,
    /// Unix ms it was recorded.
    pub recorded_unix_ms: u64,
    /// Every blob the result names (outputs with their whole trees, stdout, stderr): a hit is
    /// only a hit while all of them are stored intact.
    pub blobs: Vec<Digest>,
}

impl CacheEntry {
    /// Where it came from, read from `scope`.
    pub fn origin(&self, scope: &CacheScope) -> CacheOrigin {
        CacheOrigin {
            scope: scope.clone(),
            submitter: self.submitter.clone(),
            action: self.action.clone(),
            agent: self.agent.clone(),
            emulated: self.emulated,
            trusted_agent: self.trusted,
            recorded_unix_ms: self.recorded_unix_ms,
        }
    }
}

/// One action of a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionRecord {
    /// Its id.
    pub id: ActionId,
    /// Its job.
    pub job: JobId,
    /// Job sequence number, for queue order.
    pub job_seq: u64,
    /// What to run.
    pub spec: ActionSpec,
    /// Where it stands.
    pub state: ActionState,
    /// Attempts started.
    pub attempts: u32,
    /// Unix ms it was (last) queued.
    pub queued_unix_ms: u64,
    /// Current lease, while running.
    pub lease: Option<Lease>,
    /// Last agent that had it, and whether emulated.
    pub last_agent: Option<(AgentId, bool)>,
    /// Why it is in its state (requeue, unschedulable, infra, cancel).
    pub reason: String,
    /// The final result, when there is one.
    pub result: Option<ResultRecord>,
    /// Unix ms since when no agent could serve it.
    pub unservable_since_unix_ms: Option<u64>,
    /// Hex blake3 of its ActionKey (the action cache key).
    #[serde(default)]
    pub action_digest: String,
    /// The result came from the action cache.
    #[serde(default)]
    pub cached: bool,
    /// Unix ms the current or last lease started.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Expected run time from recorded durations (actions made of steps).
    #[serde(default)]
    pub predicted_ms: u64,
    /// One entry per attempt lost for infra reasons (agent lost, lease lapsed, revoked,
    /// INFRA_ERROR): the agent it was on. Placement avoids these agents.
    #[serde(default)]
    pub infra_failed_on: Vec<AgentId>,
    /// Where its result came from, when answered from the action cache.
    #[serde(default)]
    pub cache_origin: Option<CacheOrigin>,
    /// Where its result was written in the result cache (`shared`, `principal NAME`) or why
    /// it was not (`not cached: ...`); empty until it finishes.
    #[serde(default)]
    pub cache_write: String,
    /// Fences of the attempts whose INFRA_ERROR result was recorded, so that result sent
    /// again (its acknowledgement lost, or the coordinator restarted before sending it) is
    /// acknowledged without change instead of refused and counted as stale.
    #[serde(default)]
    pub infra_result_fences: Vec<u64>,
}

impl ActionRecord {
    /// A new action, queued at `now`.
    pub fn queued(id: ActionId, job: &JobId, job_seq: u64, spec: ActionSpec, now: u64) -> Self {
        Self {
            id,
            job: job.clone(),
            job_seq,
            spec,
            state: ActionState::Queued,
            attempts: 0,
            queued_unix_ms: now,
            lease: None,
            last_agent: None,
            reason: String::new(),
            result: None,
            unservable_since_unix_ms: None,
            action_digest: String::new(),
            cached: false,
            started_unix_ms: 0,
            predicted_ms: 0,
            infra_failed_on: Vec::new(),
            cache_origin: None,
            cache_write: String::new(),
            infra_result_fences: Vec::new(),
        }
    }
}

/// A submitted job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Sequence number (also inside the id).
    pub seq: u64,
    /// The submitted spec (protobuf encoding of JobSpec).
    #[serde(with = "hex_bytes")]
    pub spec: Vec<u8>,
    /// Who submitted it.
    pub submitter: String,
    /// Unix ms of submission.
    pub submitted_unix_ms: u64,
    /// Its actions, in the order of the spec's platforms.
    pub actions: Vec<ActionId>,
    /// Free text for listings.
    pub description: String,
    /// Whether every action is final.
    pub finished: bool,
}

mod hex_bytes {
    //! Bytes as hex in JSON records.
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// Current wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str) -> TokenRecord {
        TokenRecord {
            id: "abc123".into(),
            secret_hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            labels: Labels::new(),
            expires_unix_ms: u64::MAX,
            single_use: false,
            uses: 0,
            description: String::new(),
            created_unix_ms: 0,
        }
    }

    #[test]
    fn a_token_secret_matches_only_itself() {
        let t = token("0123456789abcdef");
        assert!(t.secret_matches("0123456789abcdef"));
        assert!(!t.secret_matches("0123456789abcdee"));
        assert!(!t.secret_matches(""));
        assert!(!t.secret_matches("0123456789abcdef0"));
    }

    #[test]
    fn a_token_whose_stored_hash_is_damaged_matches_nothing() {
        let mut t = token("0123456789abcdef");
        t.secret_hash = "not hex".into();
        assert!(!t.secret_matches("0123456789abcdef"));
        t.secret_hash.clear();
        assert!(!t.secret_matches(""));
    }
}
