//! Bounded async cleanup: at most `max_running` cleanups run at once, at most `max_queued` wait
//! behind them, and anything beyond is refused, reported and counted.
//!
//! A running slot is a worker task: once its cleanup finishes, it takes the next queued one
//! and runs it in the same task, so a flood of cancellations (HTTP/2 rapid reset) never turns
//! into a flood of tasks. Queued cleanups are not spawned yet, but each holds a token of the
//! layer's `TaskTracker`, so `tracker.wait()` waits for them too.
//!
//! At shutdown, [`Limiter::drain`] waits until nothing runs or waits, and reports every
//! cleanup still unfinished when its time is up.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::event::request_event;
use crate::loom::{Mutex, MutexGuard, lock};
use crate::record::Cancelled;
use crate::runtime::metrics::{self, Cleanup};

/// Default number of async cleanups that may run at once, per layer.
pub(crate) const DEFAULT_MAX_RUNNING: usize = 64;
/// Default number of async cleanups that may wait for a running slot, per layer.
pub(crate) const DEFAULT_MAX_QUEUED: usize = 1024;

/// A cleanup ready to run: panics already contained, span already attached.
pub(crate) type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

pub(crate) struct Limiter {
    max_running: usize,
    max_queued: usize,
    state: Mutex<State>,
    refused: AtomicU64,
    completed: AtomicU64,
    /// Notified whenever the last running cleanup ends with nothing queued.
    idle: Notify,
}

#[derive(Default)]
struct State {
    running: usize,
    queue: VecDeque<Queued>,
    /// The requests whose cleanups run now, by worker: what a drain that runs out of time
    /// reports.
    active: Vec<(u64, Cancelled)>,
    /// Numbers the workers, to find their entry in `active`.
    next_worker: u64,
}

/// A cleanup waiting for a running slot, tracked so that `tracker.wait()` covers it.
struct Queued {
    job: Job,
    cancelled: Cancelled,
    _tracked: TaskTrackerToken,
}

/// How a layer's async cleanups are doing: a snapshot for metrics and health checks.
///
/// Returned by [`CancellationLayer::cleanup_counts`](crate::CancellationLayer::cleanup_counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CleanupCounts {
    /// Cleanups running now (at most the configured limit).
    pub running: usize,
    /// Cleanups waiting for a running slot (at most the configured queue length).
    pub queued: usize,
    /// Cleanups refused since the layer was built, because the queue was full, or dropped
    /// unfinished because the runtime they ran on shut down. Each got a `warn` event.
    pub refused: u64,
    /// Cleanups that ran to their end (or panicked, which is reported) since the layer was built.
    pub completed: u64,
}

impl Limiter {
    pub(crate) fn new(max_running: usize, max_queued: usize) -> Self {
        Self {
            max_running: max_running.max(1),
            max_queued,
            state: Mutex::new(State::default()),
            refused: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(crate) fn max_running(&self) -> usize {
        self.max_running
    }

    pub(crate) fn max_queued(&self) -> usize {
        self.max_queued
    }

    pub(crate) fn counts(&self) -> CleanupCounts {
        let (running, queued) = {
            let state = self.lock();
            (state.running, state.queue.len())
        };
        CleanupCounts {
            running,
            queued,
            refused: self.refused.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
        }
    }

    /// Runs `job` now if a slot is free, queues it if the queue has room, else refuses it.
    pub(crate) fn submit(
        self: &Arc<Self>,
        job: Job,
        tracker: &TaskTracker,
        runtime: &Handle,
        cancelled: &Cancelled,
    ) {
        let mut state = self.lock();
        if state.running < self.max_running {
            state.running += 1;
            let worker = state.next_worker;
            state.next_worker += 1;
            state.active.push((worker, cancelled.clone()));
            drop(state);
            // Made here, not in the task: a task dropped before its first poll (its runtime
            // shutting down) still gives the slot back.
            let slot = RunningSlot {
                limiter: Arc::clone(self),
                worker,
                held: true,
            };
            tracker.spawn_on(work(slot, job), runtime);
        } else if state.queue.len() < self.max_queued {
            state.queue.push_back(Queued {
                job,
                cancelled: cancelled.clone(),
                _tracked: tracker.token(),
            });
        } else {
            drop(state);
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::cleanup(Cleanup::Refused);
            drop(job);
            request_event!(
                warn,
                cancelled,
                limit = self.max_running,
                queue = self.max_queued,
                refused_total = refused,
                "async cancellation cleanup refused: the cleanup queue is full",
            );
        }
    }

    /// Waits until no cleanup runs or waits, for at most `timeout`. If time runs out, each
    /// unfinished cleanup gets a `warn` event naming its request, and the error counts them:
    /// they are not lost silently when the runtime shuts down next.
    pub(crate) async fn drain(&self, timeout: Duration) -> Result<CleanupCounts, CleanupsOverran> {
        let idle = async {
            loop {
                let mut notified = pin!(self.idle.notified());
                // Registered before looking, so an end between the look and the wait is seen.
                notified.as_mut().enable();
                {
                    let state = self.lock();
                    if state.running == 0 && state.queue.is_empty() {
                        return;
                    }
                }
                notified.await;
            }
        };
        if tokio::time::timeout(timeout, idle).await.is_ok() {
            return Ok(self.counts());
        }
        let (running, queued) = {
            let state = self.lock();
            let running: Vec<Cancelled> = state.active.iter().map(|(_, c)| c.clone()).collect();
            let queued: Vec<Cancelled> = state.queue.iter().map(|q| q.cancelled.clone()).collect();
            (running, queued)
        };
        for (cancelled, status) in running
            .iter()
            .map(|c| (c, "running"))
            .chain(queued.iter().map(|c| (c, "queued")))
        {
            metrics::cleanup(Cleanup::Overrun);
            request_event!(
                warn,
                cancelled,
                status,
                waited = ?timeout,
                "async cancellation cleanup unfinished when the drain ran out of time",
            );
        }
        Err(CleanupsOverran {
            timeout,
            counts: self.counts(),
        })
    }
}

/// One running slot: runs `job`, then whatever is queued, then gives the slot back.
async fn work(mut slot: RunningSlot, mut job: Job) {
    let limiter = Arc::clone(&slot.limiter);
    loop {
        // The finished cleanup is dropped here, before the lock is taken.
        job.await;
        limiter.completed.fetch_add(1, Ordering::Relaxed);
        metrics::cleanup(Cleanup::Run);
        let mut state = limiter.lock();
        let Some(next) = state.queue.pop_front() else {
            // Under the lock, so a submitter cannot queue behind a slot that is leaving.
            let idle = state.leave(slot.worker);
            slot.held = false;
            drop(state);
            if idle {
                limiter.idle.notify_waiters();
            }
            return;
        };
        let Queued {
            job: next_job,
            cancelled,
            _tracked: tracked,
        } = next;
        if let Some(entry) = state.active.iter_mut().find(|(w, _)| *w == slot.worker) {
            entry.1 = cancelled;
        }
        drop(state);
        // The queued cleanup's tracker token is dropped as it starts, outside the lock (it may
        // wake whoever waits on the tracker): this task is tracked and keeps the tracker open
        // until the cleanup ends.
        drop(tracked);
        job = next_job;
    }
}

impl State {
    /// A worker gives its slot back; returns whether nothing runs or waits any more.
    fn leave(&mut self, worker: u64) -> bool {
        self.running -= 1;
        self.active.retain(|(w, _)| *w != worker);
        self.running == 0 && self.queue.is_empty()
    }
}

/// Gives the running slot back if the worker task is dropped early: its runtime shut down,
/// before or while it ran.
struct RunningSlot {
    limiter: Arc<Limiter>,
    worker: u64,
    held: bool,
}

impl Drop for RunningSlot {
    fn drop(&mut self) {
        if self.held {
            self.limiter.abandoned(self.worker);
        }
    }
}

impl Limiter {
    /// A worker task was dropped before it finished. Its cleanup is lost, and if it was the
    /// last running slot, nothing would ever run the queue: those cleanups are dropped too.
    /// Each one is reported (a `warn` event naming its request) and counted as refused.
    fn abandoned(&self, worker: u64) {
        let (lost, idle) = {
            let mut state = self.lock();
            let running = state
                .active
                .iter()
                .find(|(w, _)| *w == worker)
                .map(|(_, c)| c.clone());
            state.leave(worker);
            let mut lost: Vec<Cancelled> = running.into_iter().collect();
            let mut dropped = Vec::new();
            if state.running == 0 {
                dropped.extend(state.queue.drain(..));
            }
            lost.extend(dropped.iter().map(|queued| queued.cancelled.clone()));
            (
                (lost, dropped),
                state.running == 0 && state.queue.is_empty(),
            )
        };
        let (lost, dropped) = lost;
        // The queued jobs are dropped outside the lock: they are user futures.
        drop(dropped);
        for cancelled in &lost {
            let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::cleanup(Cleanup::Refused);
            request_event!(
                warn,
                cancelled,
                refused_total = refused,
                "async cancellation cleanup dropped: its runtime shut down before it finished",
            );
        }
        if idle {
            self.idle.notify_waiters();
        }
    }
}

/// [`CancellationLayer::drain_cleanups`](crate::CancellationLayer::drain_cleanups) ran out of
/// time with async cleanups still running or queued. Each of them was reported with a `warn`
/// event (target `tower_cancel`) naming its request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CleanupsOverran {
    /// How long the drain waited.
    pub timeout: Duration,
    /// The counts when it gave up: `running` and `queued` are the unfinished cleanups.
    pub counts: CleanupCounts,
}

impl fmt::Display for CleanupsOverran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} async cancellation cleanup(s) still running and {} queued after {:?}",
            self.counts.running, self.counts.queued, self.timeout
        )
    }
}

impl std::error::Error for CleanupsOverran {}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("max_running", &self.max_running)
            .field("max_queued", &self.max_queued)
            .field("counts", &self.counts())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http::{Method, Uri};
    use tokio::sync::Notify;

    use super::*;
    use crate::record::{CancelReason, Phase};

    fn cancelled() -> Cancelled {
        Cancelled {
            reason: CancelReason::Disconnected,
            phase: Phase::Handler,
            method: Method::GET,
            uri: Uri::from_static("/"),
            elapsed: std::time::Duration::ZERO,
            recorded: None,
        }
    }

    #[tokio::test]
    async fn runs_up_to_the_limit_queues_then_refuses() {
        let limiter = Arc::new(Limiter::new(2, 3));
        let tracker = TaskTracker::new();
        let gate = Arc::new(Notify::new());
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let (gate, ran) = (gate.clone(), ran.clone());
            let job: Job = Box::pin(async move {
                gate.notified().await;
                ran.fetch_add(1, Ordering::SeqCst);
            });
            limiter.submit(job, &tracker, &Handle::current(), &cancelled());
        }
        let counts = limiter.counts();
        assert_eq!((counts.running, counts.queued, counts.refused), (2, 3, 5));
        assert_eq!(tracker.len(), 5, "queued cleanups are tracked too");

        tracker.close();
        while !tracker.is_empty() {
            gate.notify_waiters();
            tokio::task::yield_now().await;
        }
        tracker.wait().await;
        assert_eq!(ran.load(Ordering::SeqCst), 5);
        let counts = limiter.counts();
        assert_eq!(
            counts,
            CleanupCounts {
                running: 0,
                queued: 0,
                refused: 5,
                completed: 5
            }
        );
    }

    #[test]
    fn a_runtime_shutting_down_drops_and_reports_its_cleanups() {
        let limiter = Arc::new(Limiter::new(1, 4));
        let tracker = TaskTracker::new();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for _ in 0..3 {
            let job: Job = Box::pin(std::future::pending());
            limiter.submit(job, &tracker, runtime.handle(), &cancelled());
        }
        let counts = limiter.counts();
        assert_eq!((counts.running, counts.queued), (1, 2));
        // The worker task was spawned but never polled: the runtime never ran.
        drop(runtime);
        let counts = limiter.counts();
        assert_eq!(
            (
                counts.running,
                counts.queued,
                counts.refused,
                counts.completed
            ),
            (0, 0, 3, 0),
            "the slot came back, and all three cleanups were reported as lost"
        );
        assert!(tracker.is_empty(), "nothing left on the tracker");
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let drained = other.block_on(limiter.drain(Duration::from_millis(10)));
        assert!(drained.is_ok(), "nothing to wait for: {drained:?}");
    }

    /// Refused for a full queue or lost with the runtime: both count as `refused`.
    #[cfg(feature = "metrics")]
    #[test]
    fn refusals_and_losses_are_counted_under_one_outcome() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};

        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, || {
            let limiter = Arc::new(Limiter::new(1, 1));
            let tracker = TaskTracker::new();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            for _ in 0..3 {
                let job: Job = Box::pin(std::future::pending());
                limiter.submit(job, &tracker, runtime.handle(), &cancelled());
            }
            // One running, one queued, one refused; then the runtime takes both others along.
            drop(runtime);
            assert_eq!(limiter.counts().refused, 3);
        });
        let counted: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let labels: Vec<_> = key.key().labels().map(|l| l.value().to_owned()).collect();
                (key.key().name().to_owned(), labels, value)
            })
            .collect();
        assert_eq!(
            counted,
            [(
                "tower_cancel_cleanups_total".to_owned(),
                vec!["refused".to_owned()],
                DebugValue::Counter(3)
            )]
        );
    }
}
