//! CPU time of processes and threads, from Linux's `/proc`.
//!
//! With [`crate::memory`], the only OS-specific code: `utime + stime` of `/proc/<pid>/stat` (a
//! whole process, all its threads) or `/proc/thread-self/stat` (the calling thread). The kernel
//! reports these in `USER_HZ` ticks, which is 100 per second on every Linux architecture in use
//! (it is fixed by the kernel ABI, whatever the kernel's internal `HZ`), so the resolution is
//! 10 ms: fine over measured windows of seconds, useless below that. Elsewhere than Linux every reading is
//! `None` and reports show CPU figures as unknown.

use std::time::Duration;

/// `USER_HZ`: ticks per second in `/proc/*/stat`.
const TICKS_PER_SECOND: u64 = 100;

/// CPU time consumed (user + system), as read from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct CpuTime(Duration);

impl CpuTime {
    /// The time.
    pub fn as_duration(self) -> Duration {
        self.0
    }

    /// The sum of two processes' times.
    pub fn plus(self, other: CpuTime) -> CpuTime {
        CpuTime(self.0 + other.0)
    }

    /// Time spent since `earlier` (zero if the clock went backwards, which it does not).
    pub fn since(self, earlier: CpuTime) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

/// CPU time of process `pid` so far (all its threads).
pub fn process(pid: u32) -> Option<CpuTime> {
    read(&format!("/proc/{pid}/stat"))
}

/// CPU time of this process so far.
pub fn this_process() -> Option<CpuTime> {
    read("/proc/self/stat")
}

/// CPU time of the calling thread so far.
pub fn this_thread() -> Option<CpuTime> {
    read("/proc/thread-self/stat")
}

fn read(path: &str) -> Option<CpuTime> {
    parse_stat(&std::fs::read_to_string(path).ok()?)
}

/// `utime + stime` from the text of a `stat` file.
///
/// The second field, the command name, is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted from the last `)`: after it come field 3 (state) onwards,
/// and utime and stime are fields 14 and 15.
fn parse_stat(text: &str) -> Option<CpuTime> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    Some(CpuTime(Duration::from_millis(
        ticks * 1000 / TICKS_PER_SECOND,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_are_summed_even_with_odd_command_names() {
        let line = "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 \
                    12345 1000000 200 18446744073709551615";
        assert_eq!(parse_stat(line), Some(CpuTime(Duration::from_millis(3250))));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_is_readable_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(this_process().is_some());
            assert!(this_thread().is_some());
            assert!(process(std::process::id()).is_some());
        }
    }
}
