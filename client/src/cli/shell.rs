//! Where the command line writes: the terminal's stdout and stderr, or memory (tests render a
//! recipe's progress and report into a [`Shell::memory`] and compare the text). The only
//! place in the recipes' command line that touches the process's output streams.
use crate::farm::job_watch::Emit;
use std::io::Write;

/// One of the two streams a command writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Results: what scripts read (tables, verdicts, a command's own stdout).
    Stdout,
    /// Progress, notes and a command's own stderr.
    Stderr,
}

/// The command line's two output streams (cargo's `Shell`, in miniature).
pub struct Shell {
    /// None for the terminal; Some for memory: every write in order, with its stream.
    memory: Option<Vec<(Stream, Vec<u8>)>>,
}

impl Shell {
    /// The process's stdout and stderr.
    pub fn terminal() -> Self {
        Self { memory: None }
    }

    /// Writes kept in memory, for tests.
    pub fn memory() -> Self {
        Self {
            memory: Some(Vec::new()),
        }
    }

    /// Writes `bytes` as they are. Write errors (a closed pipe) are ignored: a job must still
    /// be followed to its verdict when nobody reads the output any more. Stdout is flushed
    /// at once so that a command's output and our stderr lines keep their order.
    pub fn write(&mut self, stream: Stream, bytes: &[u8]) {
        if let Some(memory) = &mut self.memory {
            memory.push((stream, bytes.to_vec()));
            return;
        }
        let _ = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes).and_then(|()| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
    }

    /// Writes `text` and a newline to stdout.
    pub fn out(&mut self, text: impl AsRef<str>) {
        self.line(Stream::Stdout, text.as_ref());
    }

    /// Writes `text` and a newline to stderr.
    pub fn err(&mut self, text: impl AsRef<str>) {
        self.line(Stream::Stderr, text.as_ref());
    }

    fn line(&mut self, stream: Stream, text: &str) {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        self.write(stream, &bytes);
    }

    /// Writes what a job watch computed: an action's output to the stream it came from,
    /// state changes to stderr.
    pub fn emit(&mut self, emit: &Emit) {
        match emit {
            Emit::Stdout(b) => self.write(Stream::Stdout, b),
            Emit::Stderr(b) => self.write(Stream::Stderr, b),
            Emit::Progress(line) => self.err(line),
        }
    }

    /// Everything written to `stream` so far (memory only; empty for the terminal).
    pub fn text(&self, stream: Stream) -> String {
        let bytes: Vec<u8> = self
            .memory
            .iter()
            .flatten()
            .filter(|(s, _)| *s == stream)
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Stdout so far (memory only).
    pub fn stdout(&self) -> String {
        self.text(Stream::Stdout)
    }

    /// Stderr so far (memory only).
    pub fn stderr(&self) -> String {
        self.text(Stream::Stderr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_keeps_the_streams_apart() {
        let mut sh = Shell::memory();
        sh.out("table");
        sh.err("progress");
        sh.emit(&Emit::Stdout(b"[linux/arm64] hi\n".to_vec()));
        sh.emit(&Emit::Progress("[linux/arm64] queued".into()));
        assert_eq!(sh.stdout(), "table\n[linux/arm64] hi\n");
        assert_eq!(sh.stderr(), "progress\n[linux/arm64] queued\n");
    }
}
