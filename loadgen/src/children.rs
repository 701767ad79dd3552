//! The gateway and agents processes of a self-contained run: the loadgen executable started
//! again with a hidden subcommand.
//!
//! A child's stdin is a pipe the parent never writes to: the child exits when it reads end of
//! file, which happens when the parent drops its [`ChildProcess`] and also, by the kernel
//! closing the pipe, when the parent dies in any way (Ctrl-C, a panic, `kill -9`). Dropping a
//! `ChildProcess` closes the pipe, gives the child a moment to exit, then kills it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// How long a child may take to print what it was started for.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// A running child process, killed when dropped.
#[derive(Debug)]
pub struct ChildProcess {
    role: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ChildProcess {
    /// Starts this executable with `args`; the child's stderr is ours, its stdout is read line
    /// by line with [`ChildProcess::expect`].
    pub fn spawn(role: &'static str, args: &[OsString]) -> anyhow::Result<ChildProcess> {
        let exe = std::env::current_exe().context("locating the loadgen executable")?;
        let mut command = Command::new(&exe);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Children log warnings and errors only, unless the user asked for more.
        if std::env::var_os("DMSC_LOG").is_none() {
            command.env("DMSC_LOG", "warn");
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting the {role} process ({})", exe.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{role}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .context("starting a reader thread")?;
        Ok(ChildProcess {
            role,
            child,
            stdin,
            lines,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line starting with `prefix` (then a space or the end of the line)
    /// and returns the rest of it; other lines are passed through to our stdout.
    pub fn expect(&mut self, prefix: &str, deadline: Instant) -> anyhow::Result<String> {
        loop {
            let line = self.next_line(prefix, deadline)?;
            match line.strip_prefix(prefix) {
                Some(rest) if rest.is_empty() || rest.starts_with(' ') => {
                    return Ok(rest.trim().to_owned())
                }
                _ => println!("{}: {line}", self.role),
            }
        }
    }

    /// The next line the child prints. Fails if the child exits or `deadline` passes first;
    /// `awaiting` says what for, in the error.
    pub fn next_line(&mut self, awaiting: &str, deadline: Instant) -> anyhow::Result<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(line) => Ok(line),
            Err(RecvTimeoutError::Timeout) => {
                bail!(
                    "the {} process did not report {awaiting:?} in time",
                    self.role
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self
                    .child
                    .wait()
                    .map_or_else(|e| e.to_string(), |s| s.to_string());
                Err(anyhow!(
                    "the {} process exited before reporting {awaiting:?} ({status}; its error, \
                     if any, is above)",
                    self.role
                ))
            }
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The role, for messages.
    pub fn role(&self) -> &'static str {
        self.role
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        // End of file on its stdin tells the child to exit.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a child: blocks until stdin reaches end of file (the parent closed it or died).
pub fn wait_for_parent() {
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut sink);
}
