//! `--rerun-fails`: the `-test.run` pattern that selects exactly the failed top-level tests.

/// `^(TestA|TestB)$` for the given top-level test names, each escaped so that it matches only
/// itself (Go's regexp syntax; names of top-level tests never hold `/`, which `-test.run`
/// would read as a subtest level). None for no names: run the whole package.
pub fn run_pattern<S: AsRef<str>>(names: &[S]) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let alternatives: Vec<String> = names.iter().map(|n| escape_regex(n.as_ref())).collect();
    Some(format!("^({})$", alternatives.join("|")))
}

/// Escapes every character Go's regexp syntax gives a meaning (like `regexp.QuoteMeta`).
pub fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_the_failed_tests() {
        assert_eq!(run_pattern(&["TestA", "TestB"]).unwrap(), "^(TestA|TestB)$");
        assert_eq!(run_pattern::<&str>(&[]), None);
        assert_eq!(
            run_pattern(&["Test.Odd$(x)", "Example_x"]).unwrap(),
            r"^(Test\.Odd\$\(x\)|Example_x)$"
        );
        assert_eq!(escape_regex(r"a\b[c]{d}^+*?|"), r"a\\b\[c\]\{d\}\^\+\*\?\|");
    }
}
