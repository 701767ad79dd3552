//! Keeping processes on given CPUs (`--gateway-cpu`, `--load-cpu`): a thread's CPU affinity is
//! inherited by the threads it spawns and the processes it starts, so setting it on the
//! thread that starts everything else places all of them.

use anyhow::bail;

/// The CPUs this process may run on now (before any `run_on`: the machine's, or those its
/// cgroup or `taskset` allow), by number.
pub fn allowed() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|ids| ids.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Restricts the calling thread, and every thread and process it starts from now on, to `cpu`
/// (which may lie outside the CPUs it was restricted to before).
pub fn run_on(cpu: usize) -> anyhow::Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        bail!("cannot restrict this process to CPU {cpu}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_held_on_a_cpu_runs_there_and_so_do_its_children() {
        let last = *allowed().last().unwrap();
        let allowed_before = allowed();
        std::thread::spawn(move || {
            run_on(last).unwrap();
            let ids = |v: Option<Vec<core_affinity::CoreId>>| {
                v.unwrap().into_iter().map(|c| c.id).collect::<Vec<_>>()
            };
            assert_eq!(ids(core_affinity::get_core_ids()), vec![last]);
            let child = std::thread::spawn(core_affinity::get_core_ids)
                .join()
                .unwrap();
            assert_eq!(ids(child), vec![last]);
            // A CPU outside the current set can still be chosen (the gateway child starts on
            // the loadgen's CPU and moves to its own).
            let first = allowed_before[0];
            run_on(first).unwrap();
            assert_eq!(ids(core_affinity::get_core_ids()), vec![first]);
        })
        .join()
        .unwrap();
    }
}
