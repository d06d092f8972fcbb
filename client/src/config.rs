//! Which coordinator a command talks to and as whom, found the same way by every command from
//! flags, then `ARCHFARM_*` variables, then the user's config directory, so that the installed
//! `archfarm` needs no checkout and names no path of the machine it was built on.
use anyhow::Context;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The variable that names the credentials directory.
pub const CREDENTIALS_VAR: &str = "ARCHFARM_CREDENTIALS";
/// The variable that names the coordinator URL.
pub const COORDINATOR_VAR: &str = "ARCHFARM_COORDINATOR";
/// The file beside (or inside) a credentials directory that holds the coordinator URL.
pub const COORDINATOR_FILE: &str = "coordinator";

/// The environment a lookup reads: a function from variable name to value, so that tests
/// inject one instead of changing the process's.
pub trait Env {
    /// The variable's value; None when unset.
    fn var(&self, name: &str) -> Option<OsString>;
}

/// The process's own environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<OsString> {
        std::env::var_os(name).filter(|v| !v.is_empty())
    }
}

/// `$XDG_CONFIG_HOME/archfarm` (an absolute XDG_CONFIG_HOME only, as the spec says), else
/// `$HOME/.config/archfarm`; None when neither is known.
pub fn config_dir(env: &dyn Env) -> Option<PathBuf> {
    if let Some(xdg) = env.var("XDG_CONFIG_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Some(xdg.join("archfarm"));
        }
    }
    env.var("HOME")
        .map(PathBuf::from)
        .filter(|h| h.is_absolute())
        .map(|h| h.join(".config").join("archfarm"))
}

/// The default credentials directory: `<config dir>/credentials`.
pub fn default_credentials_dir(env: &dyn Env) -> Option<PathBuf> {
    config_dir(env).map(|d| d.join("credentials"))
}

/// Where the coordinator URL may be written for a credentials directory, in the order they are
/// read: a `coordinator` file inside the directory (`archfarm credentials create` writes one),
/// then one beside it (the config directory's layout).
pub fn coordinator_files(credentials: &Path) -> Vec<PathBuf> {
    let mut files = vec![credentials.join(COORDINATOR_FILE)];
    if let Some(parent) = credentials.parent().filter(|p| !p.as_os_str().is_empty()) {
        files.push(parent.join(COORDINATOR_FILE));
    }
    files
}

/// Where a command connects and with which identity, as given on the command line (both
/// optional: [`ConnectArgs::resolve`] fills them in).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConnectArgs {
    /// Coordinator URL [default: $ARCHFARM_COORDINATOR, else the file `coordinator` inside or
    /// beside the credentials directory].
    #[arg(long, global = true, value_name = "URL")]
    pub coordinator: Option<String>,
    /// Directory holding cert.pem, key.pem and ca.pem of a client or admin identity
    /// [default: $ARCHFARM_CREDENTIALS, else $XDG_CONFIG_HOME/archfarm/credentials, else
    /// ~/.config/archfarm/credentials].
    #[arg(long, global = true, value_name = "DIR")]
    pub credentials: Option<PathBuf>,
}

impl ConnectArgs {
    /// The coordinator and credentials to use: flags, then the environment, then the config
    /// directory. The error says every place that was looked at.
    pub fn resolve(&self, env: &dyn Env) -> anyhow::Result<FarmOptions> {
        let credentials = match (&self.credentials, env.var(CREDENTIALS_VAR)) {
            (Some(dir), _) => dir.clone(),
            (None, Some(dir)) => PathBuf::from(dir),
            (None, None) => default_credentials_dir(env).with_context(|| {
                format!(
                    "no credentials: pass --credentials DIR or set {CREDENTIALS_VAR} (neither \
                     XDG_CONFIG_HOME nor HOME is set, so there is no default)"
                )
            })?,
        };
        let coordinator = match (&self.coordinator, env.var(COORDINATOR_VAR)) {
            (Some(url), _) => url.clone(),
            (None, Some(url)) => url.to_string_lossy().into_owned(),
            (None, None) => read_coordinator_file(&credentials)?,
        };
        Ok(FarmOptions {
            coordinator,
            credentials,
        })
    }
}

/// The URL in the first `coordinator` file found for `credentials`.
fn read_coordinator_file(credentials: &Path) -> anyhow::Result<String> {
    let files = coordinator_files(credentials);
    for file in &files {
        if file.is_dir() {
            // e.g. a coordinator's data directory that happens to sit beside the credentials
            continue;
        }
        match std::fs::read_to_string(file) {
            Ok(text) => {
                let url = text.trim();
                anyhow::ensure!(
                    !url.is_empty(),
                    "{} is empty; it should hold the coordinator URL",
                    file.display()
                );
                return Ok(url.to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", file.display())),
        }
    }
    let tried: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    anyhow::bail!(
        "no coordinator: pass --coordinator URL, set {COORDINATOR_VAR}, or write the URL into {}",
        tried.join(" or ")
    )
}

/// Writes a credentials directory's coordinator URL beside it (`<parent>/coordinator`).
pub fn write_coordinator_file(credentials: &Path, url: &str) -> anyhow::Result<PathBuf> {
    let file = credentials
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.join(COORDINATOR_FILE))
        .context("the credentials directory has no parent to write the coordinator URL into")?;
    std::fs::write(&file, format!("{url}\n"))
        .with_context(|| format!("failed to write {}", file.display()))?;
    Ok(file)
}

/// A coordinator and an identity, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmOptions {
    /// Coordinator URL.
    pub coordinator: String,
    /// Directory holding cert.pem, key.pem and ca.pem.
    pub credentials: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<OsString> {
            self.0.get(name).map(OsString::from)
        }
    }

    fn env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
        MapEnv(pairs.iter().copied().collect())
    }

    #[test]
    fn flags_win_over_the_environment() {
        let args = ConnectArgs {
            coordinator: Some("https://flag:1".into()),
            credentials: Some("/flag/creds".into()),
        };
        let e = env(&[
            (COORDINATOR_VAR, "https://env:2"),
            (CREDENTIALS_VAR, "/env/creds"),
            ("HOME", "/home/u"),
        ]);
        let o = args.resolve(&e).unwrap();
        assert_eq!(o.coordinator, "https://flag:1");
        assert_eq!(o.credentials, PathBuf::from("/flag/creds"));
    }

    #[test]
    fn the_environment_wins_over_the_config_directory() {
        let e = env(&[
            (COORDINATOR_VAR, "https://env:2"),
            (CREDENTIALS_VAR, "/env/creds"),
            ("HOME", "/home/u"),
        ]);
        let o = ConnectArgs::default().resolve(&e).unwrap();
        assert_eq!(o.coordinator, "https://env:2");
        assert_eq!(o.credentials, PathBuf::from("/env/creds"));
    }

    #[test]
    fn the_config_directory_follows_xdg_then_home() {
        let e = env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/home/u")]);
        assert_eq!(
            default_credentials_dir(&e),
            Some(PathBuf::from("/xdg/archfarm/credentials"))
        );
        let e = env(&[("XDG_CONFIG_HOME", "relative"), ("HOME", "/home/u")]);
        assert_eq!(
            default_credentials_dir(&e),
            Some(PathBuf::from("/home/u/.config/archfarm/credentials"))
        );
        assert_eq!(default_credentials_dir(&env(&[])), None);
        let err = ConnectArgs::default().resolve(&env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("--credentials"), "{err:#}");
    }

    #[test]
    fn the_coordinator_file_is_read_inside_then_beside_the_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("archfarm").join("credentials");
        std::fs::create_dir_all(&creds).unwrap();
        let xdg: &'static str = Box::leak(dir.path().to_str().unwrap().to_string().into());
        let e = env(&[("XDG_CONFIG_HOME", xdg)]);

        let err = ConnectArgs::default().resolve(&e).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("no coordinator"), "{text}");
        assert!(text.contains(&creds.join("coordinator").display().to_string()));

        let written = write_coordinator_file(&creds, "https://beside:4").unwrap();
        assert_eq!(written, dir.path().join("archfarm").join("coordinator"));
        let o = ConnectArgs::default().resolve(&e).unwrap();
        assert_eq!(o.coordinator, "https://beside:4");
        assert_eq!(o.credentials, creds);
        std::fs::write(creds.join("coordinator"), "https://inside:3\n").unwrap();
        assert_eq!(
            ConnectArgs::default().resolve(&e).unwrap().coordinator,
            "https://inside:3"
        );

        // A directory named `coordinator` (a coordinator's data dir) is not the file.
        std::fs::remove_file(creds.join("coordinator")).unwrap();
        std::fs::remove_file(&written).unwrap();
        std::fs::create_dir(&written).unwrap();
        let err = ConnectArgs::default().resolve(&e).unwrap_err();
        assert!(format!("{err:#}").contains("no coordinator"), "{err:#}");
        std::fs::remove_dir(&written).unwrap();

        std::fs::write(&written, "  \n").unwrap();
        let err = ConnectArgs::default().resolve(&e).unwrap_err();
        assert!(format!("{err:#}").contains("is empty"), "{err:#}");
    }
}
