//! Output streams cut into lines with `[platform] ` before each: partial lines wait per
//! action and stream for their newline (or the end, or a new attempt).
use archfarm_proto::v1::LogStream;
use std::collections::HashMap;

/// A partial line longer than this is printed as a line of its own.
pub const MAX_PARTIAL_LINE_BYTES: usize = 64 * 1024;

/// Splits each action's output streams into lines and puts `[platform] ` before each, keeping
/// partial lines per action and stream until their newline (or the end) comes.
#[derive(Default)]
pub struct LinePrefixer {
    partial: HashMap<(String, LogStream), Partial>,
}

struct Partial {
    platform: String,
    attempt: u32,
    bytes: Vec<u8>,
}

fn push_line(out: &mut Vec<u8>, platform: &str, line: &[u8]) {
    out.push(b'[');
    out.extend_from_slice(platform.as_bytes());
    out.push(b']');
    if !line.is_empty() {
        out.push(b' ');
        out.extend_from_slice(line);
    }
    out.push(b'\n');
}

impl LinePrefixer {
    /// Adds a chunk of an action's stream; returns the lines it completed, prefixed. Output of
    /// a new attempt first completes the old attempt's partial line.
    pub fn push(
        &mut self,
        action_id: &str,
        attempt: u32,
        stream: LogStream,
        platform: &str,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let p = self
            .partial
            .entry((action_id.to_string(), stream))
            .or_insert_with(|| Partial {
                platform: platform.to_string(),
                attempt,
                bytes: Vec::new(),
            });
        if p.attempt != attempt {
            if !p.bytes.is_empty() {
                push_line(&mut out, &p.platform, &p.bytes);
                p.bytes.clear();
            }
            p.attempt = attempt;
        }
        let mut rest = data;
        while let Some(newline) = rest.iter().position(|b| *b == b'\n') {
            p.bytes.extend_from_slice(&rest[..newline]);
            push_line(&mut out, &p.platform, &p.bytes);
            p.bytes.clear();
            rest = &rest[newline + 1..];
        }
        p.bytes.extend_from_slice(rest);
        if p.bytes.len() >= MAX_PARTIAL_LINE_BYTES {
            push_line(&mut out, &p.platform, &p.bytes);
            p.bytes.clear();
        }
        out
    }

    /// Completes the partial lines of one action, stdout first.
    pub fn flush_action(&mut self, action_id: &str) -> Vec<(LogStream, Vec<u8>)> {
        let mut keys: Vec<(String, LogStream)> = self
            .partial
            .keys()
            .filter(|(a, _)| a == action_id)
            .cloned()
            .collect();
        keys.sort();
        self.flush_keys(keys)
    }

    /// Completes every partial line, by action id then stream.
    pub fn flush_all(&mut self) -> Vec<(LogStream, Vec<u8>)> {
        let mut keys: Vec<(String, LogStream)> = self.partial.keys().cloned().collect();
        keys.sort();
        self.flush_keys(keys)
    }

    fn flush_keys(&mut self, keys: Vec<(String, LogStream)>) -> Vec<(LogStream, Vec<u8>)> {
        let mut out = Vec::new();
        for key in keys {
            if let Some(p) = self.partial.remove(&key) {
                if !p.bytes.is_empty() {
                    let mut line = Vec::new();
                    push_line(&mut line, &p.platform, &p.bytes);
                    out.push((key.1, line));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_prefixed_and_partial_lines_wait_for_their_end() {
        let mut lp = LinePrefixer::default();
        let out = lp.push("j/a", 1, LogStream::Stdout, "linux/arm64", b"hel");
        assert!(out.is_empty());
        let out = lp.push("j/b", 1, LogStream::Stdout, "linux/s390x", b"one\ntw");
        assert_eq!(out, b"[linux/s390x] one\n");
        let out = lp.push(
            "j/a",
            1,
            LogStream::Stdout,
            "linux/arm64",
            b"lo\n\nbye\npart",
        );
        assert_eq!(
            out,
            b"[linux/arm64] hello\n[linux/arm64]\n[linux/arm64] bye\n"
        );
        let out = lp.push("j/a", 1, LogStream::Stderr, "linux/arm64", b"warn\n");
        assert_eq!(out, b"[linux/arm64] warn\n");
        assert_eq!(
            lp.flush_action("j/a"),
            vec![(LogStream::Stdout, b"[linux/arm64] part\n".to_vec())]
        );
        assert_eq!(
            lp.flush_all(),
            vec![(LogStream::Stdout, b"[linux/s390x] tw\n".to_vec())]
        );
        assert!(lp.flush_all().is_empty());
    }

    #[test]
    fn a_new_attempt_completes_the_old_partial_line() {
        let mut lp = LinePrefixer::default();
        lp.push("j/a", 1, LogStream::Stdout, "linux/arm64", b"cut off");
        let out = lp.push("j/a", 2, LogStream::Stdout, "linux/arm64", b"again\n");
        assert_eq!(out, b"[linux/arm64] cut off\n[linux/arm64] again\n");
    }

    #[test]
    fn endless_lines_are_broken_up() {
        let mut lp = LinePrefixer::default();
        let out = lp.push(
            "j/a",
            1,
            LogStream::Stdout,
            "p",
            &vec![b'x'; MAX_PARTIAL_LINE_BYTES],
        );
        assert_eq!(out.len(), MAX_PARTIAL_LINE_BYTES + 5);
    }
}
