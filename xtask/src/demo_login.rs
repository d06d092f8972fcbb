//! Makes a newcomer's next `archfarm status` talk to the demo farm: the demo's admin
//! credentials and URL go where `archfarm` looks by default (the user's config directory),
//! unless that place already holds someone else's credentials, in which case the two exports
//! that select the demo farm are printed instead.
use anyhow::Context;
use archfarm_client::config::{self, Env};
use std::path::{Path, PathBuf};

/// What [`point_archfarm_at`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Login {
    /// `credentials` is now a link to the demo's admin credentials and `coordinator` holds
    /// the demo URL.
    Written {
        credentials: PathBuf,
        coordinator: PathBuf,
    },
    /// The config directory holds other credentials (kept); use these exports instead.
    Exports(String),
}

/// Whether `path` is a link made by an earlier demo: it points at a `demo-farm` admin folder.
fn is_demo_link(path: &Path) -> bool {
    std::fs::read_link(path)
        .map(|target| {
            target.ends_with(Path::new("coordinator").join("admin"))
                && target.iter().any(|c| c == "demo-farm")
        })
        .unwrap_or(false)
}

/// Points `archfarm`'s defaults at the demo farm (`admin`: its admin credentials, `url`: its
/// coordinator), or says what to export when the user's own credentials are in the way.
pub fn point_archfarm_at(env: &dyn Env, admin: &Path, url: &str) -> anyhow::Result<Login> {
    let exports = format!(
        "export {}={}\nexport {}={url}",
        config::CREDENTIALS_VAR,
        admin.display(),
        config::COORDINATOR_VAR
    );
    let Some(credentials) = config::default_credentials_dir(env) else {
        return Ok(Login::Exports(exports));
    };
    let ours = is_demo_link(&credentials);
    if !ours && credentials.symlink_metadata().is_ok() {
        return Ok(Login::Exports(exports));
    }
    let dir = credentials
        .parent()
        .context("the credentials path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    if ours {
        std::fs::remove_file(&credentials)
            .with_context(|| format!("failed to replace {}", credentials.display()))?;
    }
    std::os::unix::fs::symlink(admin, &credentials).with_context(|| {
        format!(
            "failed to link {} to {}",
            credentials.display(),
            admin.display()
        )
    })?;
    let coordinator = config::write_coordinator_file(&credentials, url)?;
    Ok(Login::Written {
        credentials,
        coordinator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    struct Home(PathBuf);

    impl Env for Home {
        fn var(&self, name: &str) -> Option<OsString> {
            (name == "HOME").then(|| self.0.clone().into_os_string())
        }
    }

    #[test]
    fn the_demo_is_written_once_and_replaced_later_but_other_credentials_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home(tmp.path().join("home"));
        let admin = tmp.path().join("repo/target/demo-farm/coordinator/admin");
        std::fs::create_dir_all(&admin).unwrap();

        let first = point_archfarm_at(&home, &admin, "https://127.0.0.1:7443").unwrap();
        let Login::Written {
            credentials,
            coordinator,
        } = first
        else {
            panic!("{first:?}");
        };
        assert_eq!(std::fs::read_link(&credentials).unwrap(), admin);
        let options = config::ConnectArgs::default().resolve(&home).unwrap();
        assert_eq!(options.coordinator, "https://127.0.0.1:7443");
        assert_eq!(options.credentials, credentials);
        assert!(coordinator.ends_with(".config/archfarm/coordinator"));

        // A second demo (another checkout) replaces its own link.
        let other = tmp.path().join("other/target/demo-farm/coordinator/admin");
        std::fs::create_dir_all(&other).unwrap();
        point_archfarm_at(&home, &other, "https://127.0.0.1:7443").unwrap();
        assert_eq!(std::fs::read_link(&credentials).unwrap(), other);

        // Real credentials of the user's are never touched.
        std::fs::remove_file(&credentials).unwrap();
        std::fs::create_dir_all(&credentials).unwrap();
        std::fs::write(credentials.join("key.pem"), "mine").unwrap();
        let kept = point_archfarm_at(&home, &admin, "https://127.0.0.1:7443").unwrap();
        let Login::Exports(text) = kept else {
            panic!("{kept:?}");
        };
        assert!(text.contains("export ARCHFARM_CREDENTIALS="), "{text}");
        assert!(text.contains("export ARCHFARM_COORDINATOR=https://127.0.0.1:7443"));
        assert_eq!(
            std::fs::read_to_string(credentials.join("key.pem")).unwrap(),
            "mine"
        );
    }
}
