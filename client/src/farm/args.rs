//! Command-line values of the farm commands that the wire contract constrains: `NAME=VALUE`
//! environment variables and `key=value` labels, checked here so that a typo fails before any
//! upload with a message that says what is wrong.
use archfarm_proto::v1;
use std::collections::HashSet;

/// An environment variable given as `--env NAME=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVarArg {
    /// `[A-Za-z_][A-Za-z0-9_]*`.
    pub name: String,
    /// Anything, possibly empty or containing `=`.
    pub value: String,
}

impl EnvVarArg {
    /// The wire form.
    pub fn to_proto(&self) -> v1::EnvVar {
        v1::EnvVar {
            name: self.name.clone(),
            value: self.value.clone(),
        }
    }
}

/// A label given as `key=value`, or `key` alone for a flag-like label with an empty value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelArg {
    /// `[a-z0-9][a-z0-9._/-]*`.
    pub key: String,
    /// Printable ASCII, possibly empty.
    pub value: String,
}

impl LabelArg {
    /// The wire form.
    pub fn to_proto(&self) -> v1::Label {
        v1::Label {
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }
}

/// Which results of a job the farm may store in its caches beyond the default (results of
/// trusted agents running natively). Lookups do not change.
#[derive(clap::Args, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CachePolicyArgs {
    /// Store results from untrusted agents (joined with a token without the label
    /// trusted=true) in the farm's cache too, so later runs anywhere may reuse them. By
    /// default only trusted agents' results are cached; others are returned but not stored.
    #[arg(long)]
    pub cache_untrusted: bool,
    /// Store results produced under emulation (qemu-user) in the farm's cache too. By default
    /// they are returned but not stored, even with --allow-emulation: an emulated run is a
    /// weaker verdict than a native one. Stored emulated results only ever answer jobs that
    /// allow emulation.
    #[arg(long)]
    pub cache_emulated: bool,
}

/// Parses `NAME=VALUE` (clap value parser for `--env`).
pub fn parse_env_var(s: &str) -> Result<EnvVarArg, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=VALUE (no '=')"))?;
    let mut chars = name.chars();
    let valid = match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        }
        _ => false,
    };
    if !valid {
        return Err(format!(
            "{name:?} is not a valid variable name (letters, digits and _, not starting with a digit)"
        ));
    }
    Ok(EnvVarArg {
        name: name.to_string(),
        value: value.to_string(),
    })
}

/// Parses `key=value` or `key` (clap value parser for `--label` and `--labels`).
pub fn parse_label(s: &str) -> Result<LabelArg, String> {
    let (key, value) = s.split_once('=').unwrap_or((s, ""));
    let mut chars = key.chars();
    let valid = match chars.next() {
        Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => chars.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
        }),
        _ => false,
    };
    if !valid {
        return Err(format!(
            "{key:?} is not a valid label key (lower-case letters, digits and . _ / -, starting \
             with a letter or digit)"
        ));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        return Err(format!(
            "label {key:?} has a value with {c:?}; values must be printable ASCII"
        ));
    }
    Ok(LabelArg {
        key: key.to_string(),
        value: value.to_string(),
    })
}

/// Fails when a name occurs twice, e.g. `--env A=1 --env A=2`.
pub fn ensure_unique<'a>(
    what: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> anyhow::Result<()> {
    let mut seen = HashSet::new();
    for n in names {
        if !seen.insert(n) {
            anyhow::bail!("{what} {n:?} is given more than once");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_vars_split_at_the_first_equals_sign() {
        let e = parse_env_var("GOFLAGS=-count=1").unwrap();
        assert_eq!((e.name.as_str(), e.value.as_str()), ("GOFLAGS", "-count=1"));
        let e = parse_env_var("_EMPTY=").unwrap();
        assert_eq!((e.name.as_str(), e.value.as_str()), ("_EMPTY", ""));
    }

    #[test]
    fn bad_env_vars_say_what_is_wrong() {
        assert!(parse_env_var("NOEQUALS").unwrap_err().contains("no '='"));
        for bad in ["=x", "1A=x", "A-B=x", "A B=x", "Ä=x"] {
            let e = parse_env_var(bad).unwrap_err();
            assert!(e.contains("not a valid variable name"), "{bad}: {e}");
        }
    }

    #[test]
    fn labels_may_be_flags() {
        let l = parse_label("node-e2e").unwrap();
        assert_eq!((l.key.as_str(), l.value.as_str()), ("node-e2e", ""));
        let l = parse_label("lab=osu/rack 3").unwrap();
        assert_eq!((l.key.as_str(), l.value.as_str()), ("lab", "osu/rack 3"));
        let l = parse_label("k8s.io/arch=a=b").unwrap();
        assert_eq!((l.key.as_str(), l.value.as_str()), ("k8s.io/arch", "a=b"));
    }

    #[test]
    fn bad_labels_say_what_is_wrong() {
        for bad in ["", "=v", "Lab=x", "-lab=x", "la b=x", "lab!=x"] {
            let e = parse_label(bad).unwrap_err();
            assert!(e.contains("not a valid label key"), "{bad}: {e}");
        }
        let e = parse_label("lab=tab\there").unwrap_err();
        assert!(e.contains("printable ASCII"), "{e}");
    }

    #[test]
    fn duplicates_are_refused_by_name() {
        assert!(ensure_unique("--env", ["A", "B"]).is_ok());
        let e = ensure_unique("--env", ["A", "B", "A"]).unwrap_err();
        assert_eq!(e.to_string(), "--env \"A\" is given more than once");
    }
}
