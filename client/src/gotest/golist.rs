//! What `go list -json` says about packages: the parsed records, running `go list` with a
//! platform's environment, and which of the named packages have tests.
use anyhow::{bail, Context};
use archfarm_proto::Platform;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One package record of `go list -json` (the fields go-test reads).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct GoPackage {
    /// Directory holding the package's sources.
    pub dir: String,
    /// Import path; test variants read `pkg [pkg.test]`, test mains `pkg.test`.
    pub import_path: String,
    /// Package name.
    pub name: String,
    /// Part of the Go distribution (covered by the Go version in cache keys).
    pub goroot: bool,
    /// Only listed as a dependency.
    pub dep_only: bool,
    /// For test variants: the package under test.
    pub for_test: String,
    /// Source files by kind.
    pub go_files: Vec<String>,
    pub cgo_files: Vec<String>,
    pub c_files: Vec<String>,
    #[serde(rename = "CXXFiles")]
    pub cxx_files: Vec<String>,
    pub m_files: Vec<String>,
    pub h_files: Vec<String>,
    pub f_files: Vec<String>,
    pub s_files: Vec<String>,
    pub swig_files: Vec<String>,
    #[serde(rename = "SwigCXXFiles")]
    pub swig_cxx_files: Vec<String>,
    pub syso_files: Vec<String>,
    pub test_go_files: Vec<String>,
    #[serde(rename = "XTestGoFiles")]
    pub xtest_go_files: Vec<String>,
    pub embed_files: Vec<String>,
    pub test_embed_files: Vec<String>,
    #[serde(rename = "XTestEmbedFiles")]
    pub xtest_embed_files: Vec<String>,
    /// Every package it imports, recursively, sorted.
    pub deps: Vec<String>,
    /// The module it belongs to (module mode only).
    pub module: Option<GoModule>,
    /// Why the package could not be loaded.
    pub error: Option<GoListError>,
    /// Errors loading its dependencies.
    pub deps_errors: Vec<GoListError>,
}

/// The module of a package.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct GoModule {
    /// Module path.
    pub path: String,
    /// Version, empty for the main module.
    pub version: String,
    /// The `go` line of its go.mod (changes the language the compiler accepts).
    pub go_version: String,
    /// The main module (the one `go` runs in), not a dependency.
    pub main: bool,
    /// Its root directory (for a vendored module: empty).
    pub dir: String,
    /// The go.mod file `go` read for it (for the main module: the one in its root; for a
    /// module from the module cache: the cache's copy; for a vendored module: empty).
    pub go_mod: String,
}

/// A load error of `go list -e`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct GoListError {
    /// Where, e.g. `x.go:3:2`.
    pub pos: String,
    /// What.
    pub err: String,
}

impl std::fmt::Display for GoListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.pos.is_empty() {
            write!(f, "{}", self.err.trim_end())
        } else {
            write!(f, "{}: {}", self.pos, self.err.trim_end())
        }
    }
}

/// Which file lists of a package go into its cache key, by name: everything the compiler, the
/// assembler, the linker or `//go:embed` reads.
pub fn source_file_lists(p: &GoPackage) -> [(&'static str, &[String]); 16] {
    [
        ("GoFiles", &p.go_files),
        ("CgoFiles", &p.cgo_files),
        ("CFiles", &p.c_files),
        ("CXXFiles", &p.cxx_files),
        ("MFiles", &p.m_files),
        ("HFiles", &p.h_files),
        ("FFiles", &p.f_files),
        ("SFiles", &p.s_files),
        ("SwigFiles", &p.swig_files),
        ("SwigCXXFiles", &p.swig_cxx_files),
        ("SysoFiles", &p.syso_files),
        ("TestGoFiles", &p.test_go_files),
        ("XTestGoFiles", &p.xtest_go_files),
        ("EmbedFiles", &p.embed_files),
        ("TestEmbedFiles", &p.test_embed_files),
        ("XTestEmbedFiles", &p.xtest_embed_files),
    ]
}

impl GoPackage {
    /// Whether `go test` would find tests to build.
    pub fn has_tests(&self) -> bool {
        !self.test_go_files.is_empty() || !self.xtest_go_files.is_empty()
    }

    /// The load error and the dependency errors, one per line.
    pub fn errors(&self) -> Option<String> {
        let lines: Vec<String> = self
            .error
            .iter()
            .chain(&self.deps_errors)
            .map(ToString::to_string)
            .collect();
        (!lines.is_empty()).then(|| lines.join("\n"))
    }
}

/// Parses the concatenated JSON objects `go list -json` prints.
pub fn parse_go_list(bytes: &[u8]) -> anyhow::Result<Vec<GoPackage>> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<GoPackage>()
        .enumerate()
        .map(|(i, p)| {
            p.with_context(|| format!("failed to parse package record {} of go list", i + 1))
        })
        .collect()
}

/// The records of one `go list -deps -test` by import path.
#[derive(Debug, Default)]
pub struct PackageIndex {
    by_path: HashMap<String, GoPackage>,
}

impl PackageIndex {
    /// Indexes records by import path (a later duplicate replaces an earlier one).
    pub fn new(packages: Vec<GoPackage>) -> Self {
        Self {
            by_path: packages
                .into_iter()
                .map(|p| (p.import_path.clone(), p))
                .collect(),
        }
    }

    /// The record of `import_path`.
    pub fn get(&self, import_path: &str) -> Option<&GoPackage> {
        self.by_path.get(import_path)
    }

    /// The test main of `import_path` (`pkg.test`), present when the package has tests.
    pub fn test_main(&self, import_path: &str) -> Option<&GoPackage> {
        self.get(&format!("{import_path}.test"))
    }
}

/// The environment of go commands for one platform: the user's, plus GOOS, GOARCH, GOARM and
/// CGO_ENABLED (file sets differ per platform, so every platform is listed on its own).
pub fn platform_env(platform: &Platform, cgo: bool) -> Vec<(String, String)> {
    let mut env = vec![
        ("GOOS".to_string(), platform.os().to_string()),
        ("GOARCH".to_string(), platform.arch().to_string()),
        (
            "CGO_ENABLED".to_string(),
            if cgo { "1" } else { "0" }.to_string(),
        ),
    ];
    if let Some(arm) = platform.goarm() {
        env.push(("GOARM".to_string(), arm.to_string()));
    }
    env
}

/// A `go` command in `dir` with `env` added to ours.
pub fn go_command(dir: &Path, env: &[(String, String)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("go");
    cmd.current_dir(dir).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `go list -e -json [ARGS] PATTERNS` and parses what it prints. `go list -e` reports
/// broken packages in their records; a failure of the command itself (bad flags, no go.mod)
/// is an error that quotes its stderr.
pub async fn go_list(
    dir: &Path,
    env: &[(String, String)],
    args: &[&str],
    tags: Option<&str>,
    patterns: &[String],
) -> anyhow::Result<Vec<GoPackage>> {
    let mut cmd = go_command(dir, env);
    cmd.args(["list", "-e", "-json"]).args(args);
    if let Some(t) = tags {
        cmd.args(["-tags", t]);
    }
    cmd.arg("--").args(patterns);
    let shown = format!(
        "go list -e -json {}{}{}",
        args.join(" "),
        if args.is_empty() { "" } else { " " },
        patterns.join(" ")
    );
    let out = cmd
        .output()
        .await
        .with_context(|| format!("failed to run `{shown}` (is Go installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    parse_go_list(&out.stdout).with_context(|| format!("failed to read what `{shown}` printed"))
}

/// `go version`'s line, e.g. `go version go1.19.8 linux/amd64`.
pub async fn go_version(dir: &Path) -> anyhow::Result<String> {
    let out = go_command(dir, &[])
        .arg("version")
        .output()
        .await
        .context("failed to run `go version` (is Go installed?)")?;
    if !out.status.success() {
        bail!(
            "`go version` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The minor version of `go version`'s line: 19 for `go1.19.8`; None when unreadable.
pub fn go_minor_version(version_line: &str) -> Option<u32> {
    let v = version_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("go1."))?;
    let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Where a package's sources live, as a path.
pub fn package_dir(p: &GoPackage) -> PathBuf {
    PathBuf::from(&p.dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_records_parse_with_errors_kept() {
        let text = br#"{
	"Dir": "/src/a",
	"ImportPath": "example.com/a",
	"GoFiles": ["a.go"],
	"TestGoFiles": ["a_test.go"],
	"Deps": ["example.com/b", "fmt"]
}
{
	"ImportPath": "example.com/missing",
	"Error": {"ImportStack": [], "Pos": "", "Err": "cannot find package"},
	"SomethingNew": {"x": 1}
}
"#;
        let list = parse_go_list(text).unwrap();
        assert_eq!(list.len(), 2);
        assert!(list[0].has_tests());
        assert_eq!(list[0].deps, ["example.com/b", "fmt"]);
        assert!(!list[1].has_tests());
        assert_eq!(list[1].errors().unwrap(), "cannot find package");
        assert!(parse_go_list(b"{\"ImportPath\": 3}").is_err());
    }

    #[test]
    fn go_versions_have_a_minor_number() {
        assert_eq!(
            go_minor_version("go version go1.19.8 linux/amd64"),
            Some(19)
        );
        assert_eq!(
            go_minor_version("go version go1.23rc1 linux/arm64"),
            Some(23)
        );
        assert_eq!(go_minor_version("go version devel +abc"), None);
    }

    #[test]
    fn platforms_set_goarm_only_for_arm() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        let env = platform_env(&p, false);
        assert!(env.contains(&("GOARM".into(), "7".into())));
        assert!(env.contains(&("CGO_ENABLED".into(), "0".into())));
        let p: Platform = "linux/s390x".parse().unwrap();
        assert!(!platform_env(&p, true).iter().any(|(k, _)| k == "GOARM"));
    }
}
