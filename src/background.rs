//! Threads for the daemon's background analysis (dataset statistics:
//! sha256s, value ranges, exactness facts), below serving in CPU priority.
//!
//! Why: the daemon answers health as soon as the dataset is resident and
//! starts hashing and scanning all of it at that moment, on every core
//! (hundreds of milliseconds for MNIST, seconds for larger sets). At equal
//! priority that work competes with the first requests, health checks
//! included, for the same cores, while nothing urgent waits on it (the
//! uint8 wire dtype and GetInfo's fingerprint come when it is done). Work
//! that makes serving itself cheaper (per-row CRCs, uint8 mirrors) keeps
//! normal priority: starving it would prolong the slower path.
use std::thread::JoinHandle;

/// Nice value of background threads (0 normal, 19 lowest).
const NICE: libc::c_int = 10;

/// Spawns a named thread that runs `f` at background priority.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority();
            f()
        })
}

/// Runs `f` on a background thread (see [`spawn`]) and waits for it
/// without blocking the async runtime.
pub async fn run<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn(name, move || {
        let _ = tx.send(f());
    })
    .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
    rx.await.map_err(|_| format!("the {name} thread panicked"))
}

/// Lowers the calling thread's CPU priority. On Linux a nice value is per
/// thread, and threads this one starts inherit it (the statistics' worker
/// threads do). Failure only means the work runs at normal priority.
fn lower_priority() {
    // SAFETY: plain syscall wrapper; `who` 0 is the calling thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn background_threads_run_at_lower_priority() {
        let nice = super::spawn("test-bg", || {
            // SAFETY: plain syscall wrapper. -1 is a valid nice value, so
            // errno would tell errors apart; 10 is what we expect.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .unwrap()
        .join()
        .unwrap();
        assert!(nice >= super::NICE, "nice {nice}");
    }
}
