//! The independent Python implementations under `interop/python/`, run as child processes by
//! the interoperability tests (`python3` with `aioquic`; `DMSC_PYTHON` overrides the
//! interpreter).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The path of `interop/python/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../interop/python")
        .join(name)
}

/// The Python interpreter: `DMSC_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("DMSC_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// A Python process with its output in files (`<tag>.stdout`, `<tag>.stderr` under a
/// directory); killed on drop.
pub struct PyProcess {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl PyProcess {
    /// Runs `script` with `args`, its output going to files under `dir` named after `tag`.
    pub fn spawn(script: &Path, dir: &Path, tag: &str, args: &[String]) -> Self {
        let stdout = dir.join(format!("{tag}.stdout"));
        let stderr = dir.join(format!("{tag}.stderr"));
        let child = Command::new(python())
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("stdout file"))
            .stderr(fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {} (python3 with aioquic needed): {e}", python())
            });
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Everything it printed so far, both streams.
    pub fn output(&self) -> String {
        format!(
            "--- stdout\n{}--- stderr\n{}",
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }

    /// What it printed on stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit, at most `timeout`; kills it and panics after that.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("python timed out after {timeout:?}\n{}", self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Asks the process to leave (SIGTERM), waits at most `timeout`.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for PyProcess {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
