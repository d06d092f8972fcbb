//! A job spec checked field by field (no store needed) and planned into its actions, each
//! with its action cache key; and the check that an input tree is stored whole.
use super::PlanError;
use crate::cas::Cas;
use crate::model::*;
use archfarm_proto::{tree, v1, Digest, Platform};
use prost::Message;
use std::collections::BTreeMap;

/// Limits on a submitted job.
pub const MAX_PLATFORMS: usize = 16;
/// Total bytes of argv.
pub const MAX_ARGV_BYTES: usize = 128 * 1024;
/// Total bytes of env names and values.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Shortest timeout.
pub const MIN_TIMEOUT_MS: u64 = 1_000;
/// Longest timeout.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

fn invalid(m: impl Into<String>) -> PlanError {
    PlanError::Invalid(m.into())
}

/// A checked job spec.
pub struct ValidSpec {
    /// Platforms in submission order.
    pub platforms: Vec<Platform>,
    /// Sorted env.
    pub env: Vec<(String, String)>,
    /// Labels.
    pub labels: Labels,
    /// Input root.
    pub input_root: Option<Digest>,
    /// Declared outputs, sorted and unique.
    pub output_paths: Vec<String>,
}

/// Most declared outputs per job.
pub const MAX_OUTPUTS: usize = 256;

/// Checks a declared output path: relative, "/"-separated, no empty, "." or ".." parts.
pub fn check_output_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 1024 {
        return Err(format!("{p:?} must be 1 to 1024 bytes"));
    }
    if p.starts_with('/') || p.contains('\0') {
        return Err(format!("{p:?} must be relative"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("{p:?} may not have empty, \".\" or \"..\" parts"));
    }
    Ok(())
}

/// Checks every field of a job spec that needs no store; the message names the field.
pub fn validate_spec(spec: &v1::JobSpec) -> Result<ValidSpec, PlanError> {
    let steps = !spec.step_sets.is_empty();
    if spec.platforms.is_empty() && !steps {
        return Err(invalid("platforms: at least one platform is required"));
    }
    if spec.platforms.len() > MAX_PLATFORMS {
        return Err(invalid(format!("platforms: at most {MAX_PLATFORMS}")));
    }
    let mut platforms = Vec::new();
    for p in &spec.platforms {
        let platform: Platform = p.parse().map_err(|e| invalid(format!("platforms: {e}")))?;
        if platforms.contains(&platform) {
            return Err(invalid(format!("platforms: {platform} given twice")));
        }
        platforms.push(platform);
    }
    if !steps && (spec.argv.is_empty() || spec.argv[0].is_empty()) {
        return Err(invalid("argv: a command is required (argv is empty)"));
    }
    let argv_bytes: usize = spec.argv.iter().map(|a| a.len() + 1).sum();
    if argv_bytes > MAX_ARGV_BYTES {
        return Err(invalid(format!(
            "argv: {argv_bytes} bytes, more than the limit of {MAX_ARGV_BYTES}"
        )));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv: arguments may not contain NUL"));
    }
    let mut env = BTreeMap::new();
    let mut env_bytes = 0;
    for e in &spec.env {
        let name_ok = !e.name.is_empty()
            && e.name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && e.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(invalid(format!(
                "env: {:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)",
                e.name
            )));
        }
        if e.value.contains('\0') {
            return Err(invalid(format!("env: value of {} contains NUL", e.name)));
        }
        env_bytes += e.name.len() + e.value.len() + 2;
        if env.insert(e.name.clone(), e.value.clone()).is_some() {
            return Err(invalid(format!("env: {} given twice", e.name)));
        }
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(format!(
            "env: {env_bytes} bytes, more than the limit of {MAX_ENV_BYTES}"
        )));
    }
    if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&spec.timeout_ms) {
        return Err(invalid(format!(
            "timeout_ms: {} is outside {MIN_TIMEOUT_MS}..={MAX_TIMEOUT_MS} (1 s to 24 h)",
            spec.timeout_ms
        )));
    }
    let wd = &spec.working_directory;
    if wd.starts_with('/') || wd.split('/').any(|c| c == "..") || wd.contains('\0') {
        return Err(invalid(format!(
            "working_directory: {wd:?} must be relative and stay inside the input root"
        )));
    }
    if spec.description.len() > 1024 {
        return Err(invalid("description: longer than 1024 bytes"));
    }
    let labels = parse_labels(&spec.required_labels)
        .map_err(|e| invalid(format!("required_labels: {e}")))?;
    let input_root = spec
        .input_root
        .as_ref()
        .map(|d| Digest::from_proto(d).map_err(|e| invalid(format!("input_root: {e}"))))
        .transpose()?;
    if spec.output_paths.len() > MAX_OUTPUTS {
        return Err(invalid(format!("output_paths: at most {MAX_OUTPUTS}")));
    }
    let mut output_paths = Vec::new();
    for p in &spec.output_paths {
        check_output_path(p).map_err(|e| invalid(format!("output_paths: {e}")))?;
        output_paths.push(p.clone());
    }
    output_paths.sort();
    output_paths.dedup();
    Ok(ValidSpec {
        platforms,
        env: env.into_iter().collect(),
        labels,
        input_root,
        output_paths,
    })
}

/// The actions of a validated job spec without steps, one per platform, queued at `now`, each
/// with its action cache key. Pure: the fuzz target for job specs runs it.
pub fn plan_actions(
    spec: &v1::JobSpec,
    valid: &ValidSpec,
    submitter: &Submitter,
    job_id: &JobId,
    seq: u64,
    now: u64,
) -> Vec<ActionRecord> {
    valid
        .platforms
        .iter()
        .map(|p| {
            let action = ActionSpec {
                argv: spec.argv.iter().map(|a| expand_arg(a, p)).collect(),
                env: valid.env.clone(),
                working_directory: spec.working_directory.clone(),
                input_root: valid.input_root,
                platform: p.clone(),
                required_labels: valid.labels.clone(),
                timeout_ms: spec.timeout_ms,
                allow_emulation: spec.allow_emulation,
                output_paths: valid.output_paths.clone(),
                no_cache: spec.no_cache,
                steps: vec![],
                exclusive: spec.exclusive,
                network: spec.network,
                cache_untrusted: spec.cache_untrusted,
                cache_emulated: spec.cache_emulated,
                submitter: submitter.clone(),
            };
            let mut a = ActionRecord::queued(ActionId::new(job_id, p), job_id, seq, action, now);
            a.action_digest = action_digest(&a.spec).hex();
            a
        })
        .collect()
}

/// Replaces `{os}`, `{arch}` and `{variant}` with the platform's parts.
pub fn expand_arg(arg: &str, p: &Platform) -> String {
    arg.replace("{os}", p.os())
        .replace("{arch}", p.arch())
        .replace("{variant}", p.variant().unwrap_or(""))
}

/// Checks that the input tree is well formed and every blob it names is stored; returns
/// every digest of the tree (directories and files). Blocking: reads every directory.
pub fn check_input_tree(cas: &Cas, root: Digest) -> Result<Vec<Digest>, PlanError> {
    let (dirs, files) =
        tree::walk_tree(root, |d| cas.get(d).ok().flatten()).map_err(|e| match e {
            tree::TreeError::MissingDirectory { .. } => {
                PlanError::Precondition(format!("input_root: {e}; upload the tree first"))
            }
            e => invalid(format!("input_root: {e}")),
        })?;
    let missing: Vec<&Digest> = files.iter().filter(|d| !cas.contains(d)).collect();
    if let Some(first) = missing.first() {
        return Err(PlanError::Precondition(format!(
            "input_root: {} file blobs are not in the store (e.g. {first}); upload them first",
            missing.len()
        )));
    }
    Ok(dirs.into_keys().chain(files).collect())
}

/// Sorted `(name, value)` pairs as wire environment variables.
pub fn env_to_proto(env: &[(String, String)]) -> Vec<v1::EnvVar> {
    env.iter()
        .map(|(n, v)| v1::EnvVar {
            name: n.clone(),
            value: v.clone(),
        })
        .collect()
}

/// The action cache key of an action: blake3 of its canonical ActionKey encoding, the
/// fields of its wire Action that decide the result.
pub fn action_digest(spec: &ActionSpec) -> Digest {
    let key = v1::ActionKey {
        digest_function: "blake3".into(),
        argv: spec.argv.clone(),
        env: env_to_proto(&spec.env),
        working_directory: spec.working_directory.clone(),
        input_root: spec.input_root.map(|d| d.to_proto()),
        platform: spec.platform.to_string(),
        output_paths: spec.output_paths.clone(),
    };
    Digest::of(&key.encode_to_vec())
}

/// Checks wire labels: keys `[a-z0-9][a-z0-9._/-]*` up to 63 bytes, printable values.
pub fn parse_labels(labels: &[v1::Label]) -> Result<Labels, String> {
    let mut out = Labels::new();
    for l in labels {
        let key_ok = !l.key.is_empty()
            && l.key.len() <= 63
            && l.key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && l.key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        if !key_ok {
            return Err(format!(
                "label key {:?} must match [a-z0-9][a-z0-9._/-]* (at most 63 bytes)",
                l.key
            ));
        }
        if l.value.len() > 255 || !l.value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(format!(
                "label {} has a value that is not printable ASCII of at most 255 bytes",
                l.key
            ));
        }
        if out.insert(l.key.clone(), l.value.clone()).is_some() {
            return Err(format!("label {} given twice", l.key));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> v1::JobSpec {
        v1::JobSpec {
            platforms: vec!["linux/amd64".into()],
            argv: vec!["true".into()],
            timeout_ms: 60_000,
            ..Default::default()
        }
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        type Mutate = Box<dyn Fn(&mut v1::JobSpec)>;
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "empty argv",
                Box::new(|s| s.argv.clear()),
                "argv: a command is required",
            ),
            (
                "empty program",
                Box::new(|s| s.argv = vec![String::new()]),
                "argv: a command is required",
            ),
            (
                "unknown platform",
                Box::new(|s| s.platforms = vec!["linux/mips".into()]),
                "unknown platform \"linux/mips\"",
            ),
            (
                "no platform",
                Box::new(|s| s.platforms.clear()),
                "platforms: at least one",
            ),
            (
                "duplicate platform",
                Box::new(|s| s.platforms.push("linux/amd64".into())),
                "linux/amd64 given twice",
            ),
            (
                "zero timeout",
                Box::new(|s| s.timeout_ms = 0),
                "timeout_ms: 0 is outside",
            ),
            (
                "absurd timeout",
                Box::new(|s| s.timeout_ms = 90 * 24 * 3600 * 1000),
                "timeout_ms",
            ),
            (
                "oversized env",
                Box::new(|s| {
                    s.env = vec![v1::EnvVar {
                        name: "BIG".into(),
                        value: "x".repeat(100_000),
                    }]
                }),
                "env: 100005 bytes",
            ),
            (
                "bad env name",
                Box::new(|s| {
                    s.env = vec![v1::EnvVar {
                        name: "A=B".into(),
                        value: String::new(),
                    }]
                }),
                "not a variable name",
            ),
            (
                "escaping workdir",
                Box::new(|s| s.working_directory = "../x".into()),
                "working_directory",
            ),
            (
                "bad digest",
                Box::new(|s| {
                    s.input_root = Some(v1::Digest {
                        hash: "zz".into(),
                        size_bytes: 1,
                    })
                }),
                "input_root",
            ),
        ];
        for (what, mutate, expect) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = validate_spec(&s)
                .err()
                .unwrap_or_else(|| panic!("{what} accepted"));
            let PlanError::Invalid(message) = e else {
                panic!("{what}: not an invalid argument: {e}");
            };
            assert!(message.contains(expect), "{what}: {message}");
        }
        assert!(validate_spec(&spec()).is_ok());
    }

    #[test]
    fn expands_platform_placeholders() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(
            expand_arg("./{os}/{arch}{variant}/hello", &p),
            "./linux/armv7/hello"
        );
        let p: Platform = "linux/mips64le".parse().unwrap();
        assert_eq!(
            expand_arg("GOARCH={arch} ./{os}/{arch}{variant}/hello", &p),
            "GOARCH=mips64le ./linux/mips64le/hello"
        );
    }
}
