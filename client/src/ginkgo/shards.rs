//! Sharding a ginkgo v1 suite by spec location, and the `-ginkgo.focus` that makes a suite
//! binary run exactly one shard's specs.
//!
//! Ginkgo v1 has no `--focus-file=file:line` (v2 has). What it does have: with
//! `-ginkgo.regexScansFilePath` the focus regex is matched against
//! `<suite description> [Top Level] <containers and It text> <It's file>` (internal/spec/specs.go,
//! `toMatch`). So a shard's focus is that string, anchored, for each of its specs:
//! `^<description> \[Top Level\] (?:(?:<text>|<text>) <file>|...)$`, every part quoted like Go's
//! `regexp.QuoteMeta`. It tells specs apart by text and file, not by line: specs that share a
//! file and a text (a loop that repeats an It) cannot be told apart, so they share a shard, as
//! do specs that share a location (a loop over It texts). The unit test proves the patterns
//! with Go's own regexp against real dry-run output: every spec is matched by exactly its
//! shard's pattern.
use super::output::Spec;
use anyhow::bail;
use std::collections::BTreeMap;

/// Longest focus pattern put into an argv: Linux refuses a single argument over 128 KiB.
pub const MAX_FOCUS_BYTES: usize = 120 * 1024;

/// Go's `regexp.QuoteMeta`: a backslash before each of `\.+*?()|[]{}^$`.
pub fn quote_meta(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// What ginkgo v1 matches a spec against with `-ginkgo.regexScansFilePath`.
pub fn match_string(description: &str, spec: &Spec) -> String {
    format!(
        "{description} [Top Level] {} {}",
        spec.text, spec.location.file
    )
}

/// The focus regex that selects exactly `specs` (of a suite described as `description`).
pub fn focus_pattern(description: &str, specs: &[Spec]) -> String {
    let mut by_file: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in specs {
        by_file
            .entry(s.location.file.as_str())
            .or_default()
            .push(s.text.as_str());
    }
    let alternatives: Vec<String> = by_file
        .into_iter()
        .map(|(file, mut texts)| {
            texts.sort_unstable();
            texts.dedup();
            let texts: Vec<String> = texts.into_iter().map(quote_meta).collect();
            format!("(?:{}) {}", texts.join("|"), quote_meta(file))
        })
        .collect();
    format!(
        "^{} \\[Top Level\\] (?:{})$",
        quote_meta(description),
        alternatives.join("|")
    )
}

/// Specs that must run in the same shard, in location order: those at one location and
/// those with one text in one file (see the module doc).
pub fn location_groups(specs: &[Spec]) -> Vec<Vec<Spec>> {
    let mut sorted: Vec<Spec> = specs.to_vec();
    sorted.sort_by(|a, b| a.location.cmp(&b.location).then(a.text.cmp(&b.text)));
    // Union-find over the sorted specs.
    let mut parent: Vec<usize> = (0..sorted.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_at: BTreeMap<(&str, u32), usize> = BTreeMap::new();
    let mut first_text: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, s) in sorted.iter().enumerate() {
        let file = s.location.file.as_str();
        for j in [
            *first_at.entry((file, s.location.line)).or_insert(i),
            *first_text.entry((file, s.text.as_str())).or_insert(i),
        ] {
            let (a, b) = (root(&mut parent, i), root(&mut parent, j));
            if a != b {
                parent[a.max(b)] = a.min(b);
            }
        }
    }
    let mut groups: BTreeMap<usize, Vec<Spec>> = BTreeMap::new();
    for (i, spec) in sorted.iter().enumerate() {
        let r = root(&mut parent, i);
        groups.entry(r).or_default().push(spec.clone());
    }
    // Keyed by their first spec's index in location order, so the groups come sorted.
    groups.into_values().collect()
}

/// Splits the specs into at most `shards` shards of consecutive location groups (so a shard
/// covers a few files, not a spread of all), with spec counts as even as the groups allow.
/// Deterministic; no shard is empty.
pub fn shard_specs(specs: &[Spec], shards: usize) -> Vec<Vec<Spec>> {
    let groups = location_groups(specs);
    let n = shards.max(1).min(groups.len());
    let mut out: Vec<Vec<Spec>> = Vec::with_capacity(n);
    let mut remaining_specs = specs.len();
    let mut remaining_groups = groups.len();
    let mut current: Vec<Spec> = Vec::new();
    for g in groups {
        let shards_left = n - out.len();
        // Aim for an even split of what is left over the shards left.
        let target = remaining_specs.div_ceil(shards_left);
        let must_close = !current.is_empty() && remaining_groups == shards_left - 1;
        let would_overshoot = !current.is_empty()
            && current.len() + g.len() > target
            && (current.len() + g.len()).abs_diff(target) > target.abs_diff(current.len());
        if shards_left > 1 && (must_close || would_overshoot) {
            remaining_specs -= current.len();
            out.push(std::mem::take(&mut current));
        }
        remaining_groups -= 1;
        current.extend(g);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The focus of each shard, checked against the argv limit.
pub fn shard_focuses(description: &str, shards: &[Vec<Spec>]) -> anyhow::Result<Vec<String>> {
    shards
        .iter()
        .enumerate()
        .map(|(i, specs)| {
            let p = focus_pattern(description, specs);
            if p.len() > MAX_FOCUS_BYTES {
                bail!(
                    "shard {} of {} has {} specs and a focus of {} bytes, over the {} KiB an \
                     argument may have; use more --shards",
                    i + 1,
                    shards.len(),
                    specs.len(),
                    p.len(),
                    MAX_FOCUS_BYTES / 1024
                );
            }
            Ok(p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::output::{self, Location};
    use super::*;
    use std::process::Command;

    fn spec(text: &str, file: &str, line: u32) -> Spec {
        Spec {
            text: text.into(),
            location: Location {
                file: file.into(),
                line,
            },
        }
    }

    #[test]
    fn quoting_is_go_quote_meta() {
        assert_eq!(
            quote_meta(r"[sig-node] a.b (c|d) x*y+z? ^$ {1} \ -_ /p/f.go"),
            r"\[sig-node\] a\.b \(c\|d\) x\*y\+z\? \^\$ \{1\} \\ -_ /p/f\.go"
        );
    }

    #[test]
    fn a_pattern_lists_texts_per_file() {
        let specs = [
            spec("A b", "/p/a_test.go", 3),
            spec("A c.d", "/p/a_test.go", 5),
            spec("B", "/p/b_test.go", 1),
        ];
        assert_eq!(
            focus_pattern("My Suite", &specs),
            r"^My Suite \[Top Level\] (?:(?:A b|A c\.d) /p/a_test\.go|(?:B) /p/b_test\.go)$"
        );
    }

    #[test]
    fn shards_are_consecutive_locations_of_even_size() {
        let specs: Vec<Spec> = (0..7)
            .map(|i| spec(&format!("s{i}"), if i < 4 { "/a.go" } else { "/b.go" }, i))
            .collect();
        let sizes = |n| -> Vec<usize> { shard_specs(&specs, n).iter().map(Vec::len).collect() };
        assert_eq!(sizes(1), [7]);
        assert_eq!(sizes(2), [4, 3]);
        assert_eq!(sizes(3), [3, 2, 2]);
        assert_eq!(sizes(7), [1; 7]);
        assert_eq!(sizes(20), [1; 7], "never more shards than locations");
        let two = shard_specs(&specs, 2);
        assert!(two[0].iter().all(|s| s.location.file == "/a.go"));
        assert!(two[1].iter().all(|s| s.location.file == "/b.go"));
        // Same location or same text in a file: one group.
        let tied = [
            spec("loop one", "/a.go", 9),
            spec("loop two", "/a.go", 9),
            spec("again", "/a.go", 12),
            spec("again", "/a.go", 14),
            spec("alone", "/a.go", 20),
        ];
        let groups = location_groups(&tied);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 1]);
        assert_eq!(shard_specs(&tied, 5).len(), 3);
    }

    /// Runs Go's regexp (the engine ginkgo uses) over subjects; per pattern, the indices of
    /// the subjects it matches.
    fn go_matches(patterns: &[String], subjects: &[String]) -> Vec<Vec<usize>> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("main.go"),
            r#"package main

import (
	"encoding/json"
	"os"
	"regexp"
	"strings"
)

func main() {
	var in struct{ Patterns, Subjects []string }
	b, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	if err := json.Unmarshal(b, &in); err != nil {
		panic(err)
	}
	out := [][]int{}
	for _, p := range in.Patterns {
		// As ginkgo v1 does with its -focus values.
		re := regexp.MustCompile(strings.Join([]string{p}, "|"))
		m := []int{}
		for i, s := range in.Subjects {
			if re.Match([]byte(s)) {
				m = append(m, i)
			}
		}
		out = append(out, m)
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"#,
        )
        .unwrap();
        let input = dir.path().join("in.json");
        std::fs::write(
            &input,
            serde_json::json!({"Patterns": patterns, "Subjects": subjects}).to_string(),
        )
        .unwrap();
        let out = Command::new("go")
            .arg("run")
            .arg(dir.path().join("main.go"))
            .arg(&input)
            .env("GO111MODULE", "off")
            .output()
            .expect("run go (install golang-go)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Every listed spec is matched by its own shard's focus and by no other, for every
    /// shard count, on real dry-run output: loops, repeated texts, multi-line texts, specs
    /// outside containers, and a pending spec that must not matter.
    #[test]
    fn each_focus_selects_exactly_its_shard_by_go_regexp() {
        let mut patterns = Vec::new();
        let mut subjects = Vec::new();
        let mut expected = Vec::new();
        for dry in [output::tests::E2E_DRY_RUN, output::tests::SCRATCH_DRY_RUN] {
            let out = output::parse(dry);
            let description = out.description.clone().unwrap();
            let specs: Vec<Spec> = out.specs.iter().map(|r| r.spec.clone()).collect();
            assert_eq!(specs.len() as u32, out.will_run.unwrap().0);
            let base = subjects.len();
            subjects.extend(specs.iter().map(|s| match_string(&description, s)));
            for n in 1..=specs.len() {
                let shards = shard_specs(&specs, n);
                let focuses = shard_focuses(&description, &shards).unwrap();
                for (shard, focus) in shards.iter().zip(focuses) {
                    patterns.push(focus);
                    // Indices of the listed specs in this shard (each listed once).
                    let mut want: Vec<usize> = Vec::new();
                    for s in shard {
                        let i = (0..specs.len())
                            .find(|i| specs[*i] == *s && !want.contains(&(base + i)))
                            .unwrap();
                        want.push(base + i);
                    }
                    want.sort_unstable();
                    expected.push(want);
                }
            }
        }
        let got = go_matches(&patterns, &subjects);
        for ((p, want), got) in patterns.iter().zip(&expected).zip(&got) {
            assert_eq!(got, want, "pattern {p}");
        }
        assert!(patterns.len() > 40, "{} patterns", patterns.len());
    }
}
