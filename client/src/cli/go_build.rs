//! `archfarm go-build` on the command line: [`go_build`]'s progress on stderr, then the
//! report: the output of failed builds, the table, the counts line, and the `--json-report`
//! file.
use super::shell::Shell;
use super::watch::interrupt_cancel_line;
use crate::farm::display::format_duration;
use crate::farm::run::write_json_report;
use crate::farm::FarmClient;
use crate::gobuild::report::{counts_line, failed_output_lines, finished_line, results_table};
use crate::gobuild::{go_build, GoBuildArgs, GoBuildProgress, GoBuildReport};

/// `archfarm go-build`: returns 0 when every target was built (or cached) for every
/// platform, else 1.
pub async fn command(client: &mut FarmClient, args: &GoBuildArgs) -> anyhow::Result<u8> {
    let mut sh = Shell::terminal();
    let report = go_build(client, args, &mut |p| show_progress(&mut sh, &p)).await?;
    show_report(&mut sh, &report);
    if let Some(path) = &args.json_report {
        write_json_report(path, &report.to_json())?;
    }
    Ok(report.exit_code())
}

/// Shows one step of go-build's progress.
pub fn show_progress(sh: &mut Shell, p: &GoBuildProgress) {
    let s = |n: usize| if n == 1 { "" } else { "s" };
    match p {
        GoBuildProgress::SlowEmulatedCgo => sh.err(
            "note: --cgo with --allow-emulation: an emulated agent runs the whole Go and C \
             toolchain under qemu-user, which is slow (compiling is CPU-bound: 7-11x), and it \
             needs the target platform's sh, Go and C compiler",
        ),
        GoBuildProgress::NotACommand { import_path, name } => {
            sh.err(format!(
                "skipping {import_path}: package {name} is not a command"
            ));
        }
        GoBuildProgress::Planned {
            targets,
            platforms,
            mode,
            go_version,
            cgo,
            build_platform,
        } => sh.err(format!(
            "go-build: {targets} target{} for {platforms} platform{} ({mode} mode, \
             {go_version}), {}",
            s(*targets),
            s(*platforms),
            if *cgo {
                "with cgo on agents of each platform".to_string()
            } else {
                format!("cross-compiled on {build_platform} agents")
            }
        )),
        GoBuildProgress::Uploaded { upload, files } => sh.err(format!(
            "{} (up to {files} source file{} per platform)",
            upload.summary(),
            if *files == 1 { "" } else { "s" }
        )),
        GoBuildProgress::Submitted { platform, job_id } => {
            sh.err(format!("[{platform}] job {job_id}"));
        }
        GoBuildProgress::Finished { platform, job } => sh.err(finished_line(platform, job)),
        GoBuildProgress::Cancelling => {
            sh.err("cancelling the go-build jobs (Ctrl-C again to stop waiting)");
        }
        GoBuildProgress::Cancelled(c) => sh.err(interrupt_cancel_line(c)),
    }
}

/// Shows the report: failed builds' output on stderr, the table and the counts on stdout.
pub fn show_report(sh: &mut Shell, report: &GoBuildReport) {
    for output in &report.failed_outputs {
        for line in failed_output_lines(output) {
            sh.err(line);
        }
    }
    sh.out(results_table(&report.results).to_string());
    sh.out(format!(
        "{} in {}",
        counts_line(&report.results),
        format_duration(report.took)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gobuild::report::FailedOutput;

    #[test]
    fn progress_and_failed_output_lines() {
        let mut sh = Shell::memory();
        show_progress(
            &mut sh,
            &GoBuildProgress::NotACommand {
                import_path: "example.com/lib".into(),
                name: "lib".into(),
            },
        );
        show_progress(
            &mut sh,
            &GoBuildProgress::Planned {
                targets: 1,
                platforms: 7,
                mode: "module".into(),
                go_version: "go1.19.8".into(),
                cgo: false,
                build_platform: "linux/amd64".into(),
            },
        );
        show_progress(
            &mut sh,
            &GoBuildProgress::Submitted {
                platform: "linux/s390x".into(),
                job_id: "j1".into(),
            },
        );
        assert_eq!(
            sh.stderr().lines().collect::<Vec<_>>(),
            [
                "skipping example.com/lib: package lib is not a command",
                "go-build: 1 target for 7 platforms (module mode, go1.19.8), cross-compiled on \
                 linux/amd64 agents",
                "[linux/s390x] job j1",
            ]
        );
        let outputs = [
            FailedOutput {
                platform: "linux/arm64".into(),
                text: Ok("# example.com/x\nx.go:3: undefined: y\n".into()),
            },
            FailedOutput {
                platform: "linux/arm64".into(),
                text: Err("blob missing".into()),
            },
        ];
        let lines: Vec<String> = outputs.iter().flat_map(failed_output_lines).collect();
        assert_eq!(
            lines,
            [
                "[linux/arm64] # example.com/x",
                "[linux/arm64] x.go:3: undefined: y",
                "[linux/arm64] failed to read the build output: blob missing",
            ]
        );
    }
}
