//! Resident memory of a process, from Linux's `/proc/<pid>/status`.
//!
//! With [`crate::cpu`], the only OS-specific code of the loadgen. `VmRSS` is what the process
//! holds in RAM now: its anonymous memory (heap, stacks), the file pages it has touched (its
//! code, mostly) and shared memory. Elsewhere than Linux every reading is `None` and reports
//! show memory figures as unknown.

/// Bytes of process `pid` resident in RAM now (`VmRSS`).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// `VmRSS` from the text of a `status` file, in bytes. The kernel writes it as
/// `VmRSS:\t   12345 kB`, where "kB" means KiB.
fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let mut words = line.split_ascii_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tdmsc-loadgen\nVmPeak:\t  900000 kB\nVmHWM:\t   80000 kB\n\
                      VmRSS:\t   12345 kB\nRssAnon:\t    9000 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345 * 1024));
    }

    #[test]
    fn a_missing_or_odd_vm_rss_is_unknown() {
        assert_eq!(parse_vm_rss("Name:\tx\nVmHWM:\t 1 kB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\t12 MB\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        // A kernel thread has no VmRSS line at all.
        assert_eq!(parse_vm_rss(""), None);
    }

    #[test]
    fn this_process_is_resident_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = resident_bytes(std::process::id()).unwrap();
            assert!(rss > 1024 * 1024, "{rss}");
        }
    }
}
