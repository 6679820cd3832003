//! Running external tools: argument vectors (never a shell), captured output, and errors that
//! name the command, its exit status and its standard error.

use std::ffi::OsStr;
use std::process::{Command, ExitStatus, Output, Stdio};

use super::error::{HostError, Result};

/// At most this much of a tool's standard error goes into an error message.
const MAX_STDERR: usize = 4096;

/// One command to run, blocking, with its output captured.
pub(crate) struct Cmd {
    cmd: Command,
    line: String,
}

impl Cmd {
    pub(crate) fn new(program: &str) -> Self {
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null());
        // Tools print in the C locale, so callers can match their messages.
        cmd.env("LC_ALL", "C");
        Cmd {
            cmd,
            line: program.to_string(),
        }
    }

    pub(crate) fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        let arg = arg.as_ref();
        self.line.push(' ');
        self.line.push_str(&arg.to_string_lossy());
        self.cmd.arg(arg);
        self
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    /// Runs it and returns its output whatever its exit status.
    pub(crate) fn output(mut self) -> Result<(Output, String)> {
        tracing::debug!(command = %self.line, "running");
        match self.cmd.output() {
            Ok(out) => Ok((out, self.line)),
            Err(source) => Err(HostError::Spawn {
                command: self.line,
                source,
            }),
        }
    }

    /// Runs it; a non-zero exit is an error. Returns standard output.
    pub(crate) fn run(self) -> Result<String> {
        let (out, line) = self.output()?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(failed(line, &out))
        }
    }
}

/// The error for a command that ran and failed.
pub(crate) fn failed(command: String, out: &Output) -> HostError {
    // Some tools (e2fsck) say why on standard output: keep both.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = match (stderr.trim(), stdout.trim()) {
        (e, "") => e.to_string(),
        ("", o) => o.to_string(),
        (e, o) => format!("{e} (stdout: {})", tail(o, MAX_STDERR / 2)),
    };
    HostError::Command {
        command,
        status: describe_status(out.status),
        stderr: tail(&text, MAX_STDERR),
    }
}

/// `exit status N` or `killed by signal N`.
pub(crate) fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// The last `max` bytes of `text` (on a character boundary), marked when cut.
pub(crate) fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// Whether `program` is found in `PATH` (or is an existing path).
pub fn have_tool(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_names_command_status_and_stderr() {
        let err = Cmd::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .run()
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`sh -c echo boom >&2; exit 3`"), "{msg}");
        assert!(msg.contains("exit status 3"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = Cmd::new("cairn-no-such-tool").run().unwrap_err();
        assert!(matches!(err, HostError::Spawn { .. }), "{err}");
        assert!(!have_tool("cairn-no-such-tool"));
        assert!(have_tool("sh"));
    }

    #[test]
    fn tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abc", 5), "abc");
        assert_eq!(tail("abcdef", 3), "...def");
        assert_eq!(tail("aé", 1), "...");
    }
}
