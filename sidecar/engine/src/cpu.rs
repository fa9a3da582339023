//! The worker thread's CPU scheduling policy while requests wait for sessions
//! (`--queued-cpu-policy`, the twin of `cpupolicy.py`).
//!
//! A request waits (or asks) only when every session of its key is busy: the services
//! are the bottleneck, and when the worker's CPUs have no idle time besides
//! (`cpuload.py` samples them and calls `set_contended`), what limits them is the CPU.
//! The worker usually shares CPUs with them, and a normal (`SCHED_OTHER`) thread woken
//! by a socket preempts whatever runs there, so each response the service writes wakes
//! the worker in the middle of the service's own loop turn, and the two ping-pong on the
//! CPU. Under `SCHED_BATCH` the kernel does not preempt on wake-up: the service finishes
//! its turn, the worker then finds all its responses ready at once. Batch starts at the
//! end of a turn in which requests wait (`settle_cpu`, once per turn and per call from
//! Python that delivers hooks) and ends only at a sample (`sample_cpu`): one that finds
//! room on the CPUs, or one after a whole window in which nothing waited. A switch is
//! one `sched_setscheduler` call on a change only, never per request.

use crate::core::Core;

/// Whether the calling thread should run `SCHED_BATCH` now: the worker's CPUs were
/// saturated in the last sample (`cpuload.py`, told by Python) and requests waited or
/// asked in this sampling window or the one before. A queue that empties for a moment
/// (the clients' next requests still on their way) does not end it, or the worker would
/// flap between policies many times a second; one full window without waiting does.
pub fn wanted(enabled: bool, contended: bool, waited: bool, held: bool) -> bool {
    enabled && contended && (waited || held)
}

/// Set the calling thread's policy: `SCHED_BATCH` or `SCHED_OTHER` (nice unchanged;
/// allowed without privileges).
pub fn apply(batch: bool) -> std::io::Result<()> {
    let policy = if batch { libc::SCHED_BATCH } else { libc::SCHED_OTHER };
    let param = libc::sched_param { sched_priority: 0 };
    crate::sys::cvt(unsafe { libc::sched_setscheduler(0, policy, &param) }).map(|_| ())
}

impl Core {
    /// A sample of the worker's CPUs (every `cpuload.WINDOW`): a new window begins.
    pub fn sample_cpu(&mut self, contended: bool) {
        self.contended = contended;
        self.held = self.waited;
        self.waited = self.book.waiting + self.book.asking > 0;
        self.settle_cpu();
    }

    /// Switch the policy when the wanted one changed; a refused switch (a seccomp
    /// profile, say) turns the feature off for this engine instead of retrying per turn.
    pub fn settle_cpu(&mut self) {
        if self.book.waiting + self.book.asking > 0 {
            self.waited = true;
        }
        let want = wanted(self.settings.queued_batch, self.contended, self.waited, self.held);
        if want == self.batch {
            return;
        }
        match apply(want) {
            Ok(()) => {
                self.batch = want;
                self.stats.cpu_policy_switches += 1;
            }
            Err(_) => {
                self.settings.queued_batch = false;
                if self.batch && apply(false).is_ok() {
                    self.batch = false;
                }
                self.stats.cpu_policy_refused += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn batch_only_while_requests_wait_on_busy_cpus_and_enabled() {
        assert!(!wanted(true, true, false, false));
        assert!(wanted(true, true, true, false));
        assert!(wanted(true, true, false, true)); // waited in the window before
        assert!(!wanted(true, false, true, true));
        assert!(!wanted(false, true, true, true));
    }
}
