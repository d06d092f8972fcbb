//! Cross-compiling test binaries on this machine: `go test -c` per package and platform with
//! the platform's GOOS/GOARCH/GOARM and CGO_ENABLED, a few at a time.
use super::golist::go_command;
use futures::StreamExt;
use std::path::{Path, PathBuf};

/// Builds at once: each `go test -c` runs the compiler on several cores already.
pub const PARALLEL_BUILDS: usize = 2;

/// One test binary to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    /// Import path of the package under test.
    pub import_path: String,
    /// Where the binary goes.
    pub output: PathBuf,
    /// GOOS, GOARCH, GOARM, CGO_ENABLED.
    pub env: Vec<(String, String)>,
}

/// The arguments of `go test -c` for a request.
pub fn build_args(r: &BuildRequest, race: bool, tags: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "test".to_string(),
        "-c".to_string(),
        "-o".to_string(),
        r.output.display().to_string(),
    ];
    if race {
        args.push("-race".to_string());
    }
    if let Some(t) = tags {
        args.push("-tags".to_string());
        args.push(t.to_string());
    }
    args.push(r.import_path.clone());
    args
}

/// Builds every request in `dir` (the user's directory: module or GOPATH mode as there),
/// [`PARALLEL_BUILDS`] at a time. Returns, per request in order, Ok or the compiler's output.
pub async fn build_all(
    dir: &Path,
    requests: &[BuildRequest],
    race: bool,
    tags: Option<&str>,
) -> Vec<Result<(), String>> {
    futures::stream::iter(requests)
        .map(|r| async move {
            if let Some(parent) = r.output.parent() {
                if let Err(e) = std::fs::create_dir_all(parent) {
                    return Err(format!("failed to create {}: {e}", parent.display()));
                }
            }
            let out = go_command(dir, &r.env)
                .args(build_args(r, race, tags))
                .output()
                .await;
            match out {
                Err(e) => Err(format!("failed to run `go test -c`: {e}")),
                Ok(o) if o.status.success() && r.output.is_file() => Ok(()),
                Ok(o) => {
                    let mut text = String::from_utf8_lossy(&o.stderr).into_owned();
                    text.push_str(&String::from_utf8_lossy(&o.stdout));
                    if text.trim().is_empty() {
                        text = format!("`go test -c` exited with {} and wrote no binary", o.status);
                    }
                    Err(text)
                }
            }
        })
        .buffered(PARALLEL_BUILDS)
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_arguments() {
        let r = BuildRequest {
            import_path: "example.com/fixtures/pass".into(),
            output: PathBuf::from("/stage/linux_arm64/x/pkg.test"),
            env: vec![],
        };
        assert_eq!(
            build_args(&r, true, Some("integration")),
            [
                "test",
                "-c",
                "-o",
                "/stage/linux_arm64/x/pkg.test",
                "-race",
                "-tags",
                "integration",
                "example.com/fixtures/pass"
            ]
        );
        assert_eq!(build_args(&r, false, None).len(), 5);
    }
}
