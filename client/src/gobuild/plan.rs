//! What a go-build job is, as pure functions: the binary name of each target, the environment
//! and the shell script that build every target for one platform, and the job spec. Everything
//! here goes into the action's cache key, so none of it may depend on the client's paths.
use crate::farm::args::CachePolicyArgs;
use crate::farm::download::output_paths;
use anyhow::bail;
use archfarm_proto::{v1, Digest, Platform};
use std::collections::BTreeMap;
use std::time::Duration;

/// Directory of the action's work dir that the binaries are written to; each is a declared
/// output `out/<name>`.
pub const OUT_DIR: &str = "out";
/// The variable carrying the client's `go env GOVERSION`; the action refuses an agent with
/// another Go, whose binaries would differ under the same cache key.
pub const GO_VERSION_VAR: &str = "ARCHFARM_GO_VERSION";
/// Exit code of an action whose agent has another Go version than the client.
pub const WRONG_GO_EXIT: i32 = 125;

/// The file name `go build` gives a command: the last element of its import path; in module
/// mode a major-version suffix (`example.com/tool/v2`) names the element before it.
pub fn binary_name(import_path: &str, module_mode: bool) -> String {
    let mut elems = import_path.rsplit('/');
    let last = elems.next().unwrap_or_default();
    if module_mode && is_version_element(last) {
        if let Some(before) = elems.next() {
            return before.to_string();
        }
    }
    last.to_string()
}

/// `v2`, `v3`, ... but not `v0`, `v1` or `v01` (as cmd/go's `isVersionElement`).
fn is_version_element(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('v') else {
        return false;
    };
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
        && digits != "1"
}

/// A target to build: its import path and the name of its binary.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    /// Import path of the main package.
    pub import_path: String,
    /// File name of the binary, unique among the targets.
    pub name: String,
}

/// Names every target; fails when two targets would write the same file.
pub fn name_targets(import_paths: &[String], module_mode: bool) -> anyhow::Result<Vec<Target>> {
    let mut by_name: BTreeMap<String, &str> = BTreeMap::new();
    let mut targets = Vec::new();
    for p in import_paths {
        let name = binary_name(p, module_mode);
        if name.is_empty() || name == "." || name == ".." || name.starts_with('_') {
            bail!("{p:?} has no usable binary name");
        }
        if let Some(other) = by_name.insert(name.clone(), p) {
            bail!("{other} and {p} would both be written as {name}; build them separately");
        }
        targets.push(Target {
            import_path: p.clone(),
            name,
        });
    }
    Ok(targets)
}

/// How the targets of one job are built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSettings {
    /// GOPATH mode (the input tree is a GOPATH) rather than module mode.
    pub gopath_mode: bool,
    /// cgo: build natively on the target platform; otherwise cross-compile with
    /// CGO_ENABLED=0.
    pub cgo: bool,
    /// Platform of the agents that cross-compile pure-Go targets.
    pub build_platform: Platform,
    /// The client's `go env GOVERSION`, e.g. `go1.19.8`.
    pub go_version: String,
    /// The user's GOFLAGS (`go env GOFLAGS`), empty when none.
    pub goflags: String,
    /// `-tags`.
    pub tags: Option<String>,
    /// `-ldflags`.
    pub ldflags: Option<String>,
    /// Build-relevant variables of the user's environment, as set.
    pub user_env: Vec<(String, String)>,
    /// Whether emulated agents may build.
    pub allow_emulation: bool,
    /// Skip the action cache lookup.
    pub no_cache: bool,
    /// Which results may be stored beyond trusted native ones.
    pub cache: CachePolicyArgs,
    /// Per-action time limit.
    pub timeout: Duration,
}

impl BuildSettings {
    /// The platform the action for `target` runs on: the build platform for pure Go, the
    /// target itself for cgo.
    pub fn action_platform(&self, target: &Platform) -> Platform {
        if self.cgo {
            target.clone()
        } else {
            self.build_platform.clone()
        }
    }

    /// The action's environment for one target platform, sorted by name.
    pub fn env(&self, target: &Platform) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &self.user_env {
            env.insert(k.clone(), v.clone());
        }
        let mut set = |k: &str, v: &str| {
            env.insert(k.to_string(), v.to_string());
        };
        if !self.cgo {
            set("GOOS", target.os());
            set("GOARCH", target.arch());
        }
        if let Some(arm) = target.goarm() {
            set("GOARM", arm);
        }
        set("CGO_ENABLED", if self.cgo { "1" } else { "0" });
        set("GO111MODULE", if self.gopath_mode { "off" } else { "on" });
        // Agents build offline from the uploaded tree, with the Go they have.
        set("GOPROXY", "off");
        set("GOTOOLCHAIN", "local");
        if !self.goflags.is_empty() {
            set("GOFLAGS", &self.goflags);
        }
        set(GO_VERSION_VAR, &self.go_version);
        env.into_iter().collect()
    }

    /// `go build` with its flags, before `-o` and the package.
    pub fn go_build_args(&self) -> Vec<String> {
        let mut args = vec![
            "go".to_string(),
            "build".to_string(),
            "-trimpath".to_string(),
        ];
        if let Some(t) = &self.tags {
            args.push(format!("-tags={t}"));
        }
        if let Some(l) = &self.ldflags {
            args.push(format!("-ldflags={l}"));
        }
        args
    }

    /// The action's argv: `sh -c SCRIPT go-build NAME IMPORT_PATH ...`. The script points
    /// GOCACHE (and in GOPATH mode GOPATH) into the work dir, which Go wants absolute, checks
    /// the agent's Go version, then builds every target into `out/`, going on after a failure
    /// so that each target gets its own verdict, and exits 1 when any failed.
    pub fn argv(&self, targets: &[Target]) -> Vec<String> {
        let gopath = if self.gopath_mode {
            "export GOPATH=\"$PWD\"\n"
        } else {
            ""
        };
        let build: Vec<String> = self
            .go_build_args()
            .iter()
            .map(|a| shell_quote(a))
            .collect();
        let script = format!(
            "export GOCACHE=\"$PWD/.gocache\"\n\
             {gopath}\
             have=$(go env GOVERSION) || exit {WRONG_GO_EXIT}\n\
             if [ \"$have\" != \"${GO_VERSION_VAR}\" ]; then\n\
             \x20 echo \"go-build: this agent has $have, the client built the cache key for \
             ${GO_VERSION_VAR}; install that Go here or build on another agent\" >&2\n\
             \x20 exit {WRONG_GO_EXIT}\n\
             fi\n\
             mkdir -p {OUT_DIR}\n\
             failed=0\n\
             while [ $# -ge 2 ]; do\n\
             \x20 {} -o \"{OUT_DIR}/$1\" \"$2\" || {{ echo \"go-build: $2 failed\" >&2; failed=1; }}\n\
             \x20 shift 2\n\
             done\n\
             exit $failed\n",
            build.join(" ")
        );
        let mut argv = vec![
            "sh".to_string(),
            "-c".to_string(),
            script,
            "go-build".to_string(),
        ];
        for t in targets {
            argv.push(t.name.clone());
            argv.push(t.import_path.clone());
        }
        argv
    }

    /// The job that builds `targets` for `target` from the uploaded `input_root`.
    pub fn job_spec(
        &self,
        target: &Platform,
        targets: &[Target],
        input_root: Digest,
    ) -> anyhow::Result<v1::JobSpec> {
        let outputs: Vec<String> = targets
            .iter()
            .map(|t| format!("{OUT_DIR}/{}", t.name))
            .collect();
        let on = self.action_platform(target);
        let how = if self.cgo {
            "with cgo".to_string()
        } else {
            format!("cross-compiled on {on}")
        };
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        Ok(v1::JobSpec {
            platforms: vec![on.to_string()],
            argv: self.argv(targets),
            env: self
                .env(target)
                .into_iter()
                .map(|(name, value)| v1::EnvVar { name, value })
                .collect(),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            input_root: Some(input_root.to_proto()),
            allow_emulation: self.allow_emulation,
            required_labels: Vec::new(),
            working_directory: String::new(),
            description: format!("go-build {} for {target} ({how})", names.join(" ")),
            output_paths: output_paths(&outputs)?,
            no_cache: self.no_cache,
            step_sets: Vec::new(),
            shards: 0,
            shard_target_ms: 0,
            exclusive: false,
            network: false,
            cache_untrusted: self.cache.cache_untrusted,
            cache_emulated: self.cache.cache_emulated,
        })
    }
}

/// `s` quoted for sh when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=./,:@+%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_are_named_like_go_build_names_them() {
        assert_eq!(binary_name("example.com/fixtures/hello", false), "hello");
        assert_eq!(
            binary_name("k8s.io/kubernetes/cmd/kubelet", true),
            "kubelet"
        );
        assert_eq!(binary_name("example.com/tool/v2", true), "tool");
        assert_eq!(binary_name("example.com/tool/v2", false), "v2");
        assert_eq!(binary_name("example.com/tool/v1", true), "v1");
        assert_eq!(binary_name("example.com/tool/v0", true), "v0");
        assert_eq!(binary_name("example.com/tool/v02", true), "v02");
        assert_eq!(binary_name("example.com/tool/v10", true), "tool");
        assert_eq!(binary_name("hello", true), "hello");
    }

    #[test]
    fn two_targets_may_not_share_a_binary_name() {
        let paths = vec!["a/cmd/x".to_string(), "b/cmd/y".to_string()];
        let t = name_targets(&paths, false).unwrap();
        assert_eq!(t[1].name, "y");
        let clash = vec!["a/cmd/x".to_string(), "b/cmd/x".to_string()];
        let e = name_targets(&clash, false).unwrap_err().to_string();
        assert!(
            e.contains("a/cmd/x and b/cmd/x would both be written as x"),
            "{e}"
        );
    }

    fn settings(cgo: bool) -> BuildSettings {
        BuildSettings {
            gopath_mode: true,
            cgo,
            build_platform: "linux/amd64".parse().unwrap(),
            go_version: "go1.19.8".into(),
            goflags: String::new(),
            tags: None,
            ldflags: Some("-s -w".into()),
            user_env: vec![("GOAMD64".into(), "v2".into())],
            allow_emulation: false,
            no_cache: false,
            cache: CachePolicyArgs::default(),
            timeout: Duration::from_secs(1800),
        }
    }

    #[test]
    fn pure_go_cross_compiles_on_the_build_platform() {
        let s = settings(false);
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        let targets = name_targets(&["example.com/fixtures/hello".to_string()], false).unwrap();
        let spec = s.job_spec(&arm, &targets, Digest::of(b"root")).unwrap();
        assert_eq!(spec.platforms, ["linux/amd64"]);
        let env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "env is sorted");
        for want in [
            ("GOOS", "linux"),
            ("GOARCH", "arm"),
            ("GOARM", "7"),
            ("CGO_ENABLED", "0"),
            ("GO111MODULE", "off"),
            ("GOPROXY", "off"),
            ("GOAMD64", "v2"),
            (GO_VERSION_VAR, "go1.19.8"),
        ] {
            assert!(
                env.contains(&(want.0.to_string(), want.1.to_string())),
                "{want:?} in {env:?}"
            );
        }
        assert_eq!(spec.output_paths, ["out/hello"]);
        assert_eq!(spec.timeout_ms, 1_800_000);
        assert!(spec.description.contains("cross-compiled on linux/amd64"));
        assert_eq!(&spec.argv[..2], ["sh", "-c"]);
        assert_eq!(
            &spec.argv[3..],
            ["go-build", "hello", "example.com/fixtures/hello"]
        );
        let script = &spec.argv[2];
        assert!(script.contains("export GOPATH=\"$PWD\""), "{script}");
        assert!(
            script.contains("go build -trimpath '-ldflags=-s -w' -o \"out/$1\" \"$2\""),
            "{script}"
        );
        for placeholder in ["{os}", "{arch}", "{variant}"] {
            assert!(
                !spec.argv.iter().any(|a| a.contains(placeholder)),
                "the coordinator would replace {placeholder}"
            );
        }
    }

    #[test]
    fn cgo_builds_on_the_target_without_goos_or_goarch() {
        let mut s = settings(true);
        s.gopath_mode = false;
        let target: Platform = "linux/s390x".parse().unwrap();
        let spec = s.job_spec(&target, &[], Digest::of(b"root")).unwrap();
        assert_eq!(spec.platforms, ["linux/s390x"]);
        assert!(!spec
            .env
            .iter()
            .any(|e| e.name == "GOOS" || e.name == "GOARCH"));
        assert!(spec
            .env
            .iter()
            .any(|e| e.name == "CGO_ENABLED" && e.value == "1"));
        assert!(spec
            .env
            .iter()
            .any(|e| e.name == "GO111MODULE" && e.value == "on"));
        assert!(!spec.argv[2].contains("GOPATH"));
    }

    #[test]
    fn the_script_builds_each_target_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // A fake `go`: `go env GOVERSION` answers, `go build -o OUT PKG` fails for "bad".
        let fake = "#!/bin/sh\nif [ \"$1\" = env ]; then echo go1.19.8; exit 0; fi\n\
                    out=\"\"; while [ $# -gt 0 ]; do case \"$1\" in -o) out=\"$2\"; shift;; esac; last=\"$1\"; shift; done\n\
                    [ \"$last\" = bad ] && exit 1\necho built > \"$out\"\n";
        let go = bin.join("go");
        std::fs::write(&go, fake).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&go, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let s = settings(false);
        let targets = vec![
            Target {
                import_path: "good".into(),
                name: "one".into(),
            },
            Target {
                import_path: "bad".into(),
                name: "two".into(),
            },
        ];
        let argv = s.argv(&targets);
        let run = |version: &str| {
            std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .current_dir(dir.path())
                .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
                .env(GO_VERSION_VAR, version)
                .output()
                .unwrap()
        };
        let out = run("go1.19.8");
        assert_eq!(out.status.code(), Some(1));
        assert!(dir.path().join("out/one").is_file());
        assert!(!dir.path().join("out/two").exists());
        assert!(String::from_utf8_lossy(&out.stderr).contains("go-build: bad failed"));
        let out = run("go1.23.0");
        assert_eq!(out.status.code(), Some(WRONG_GO_EXIT));
        assert!(String::from_utf8_lossy(&out.stderr).contains("this agent has go1.19.8"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("-trimpath"), "-trimpath");
        assert_eq!(shell_quote("-ldflags=-s -w"), "'-ldflags=-s -w'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
