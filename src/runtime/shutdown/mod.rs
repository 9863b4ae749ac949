//! The shutdown cascade: which requests are in flight, and who cancels them when the server's
//! shutdown token is cancelled.
//!
//! Making every request a child token of the shutdown token would take that token's mutex
//! twice per request, on every core: the server would be serialised on one lock. Instead the
//! in-flight scopes live in a sharded registry. A thread always uses the same shard, so on a
//! multi-threaded runtime the shards' locks are almost never contended, and each shard sits on
//! its own cache lines. One watcher task per layer waits on the shutdown token; when it fires,
//! it closes every shard and cancels the scopes it found there.
//!
//! A request that arrives after `token.cancel()` returned must start cancelled, even before the
//! watcher task had a chance to run (it may never have been spawned: the layer's first request,
//! a token cancelled before the layer was built). Asking the token on every request would take
//! its mutex, the lock this registry exists to avoid. Instead the registry parks a waker of its
//! own on the token when it is built: the token wakes its waiters inside `cancel()`, before
//! `cancel()` returns, and that waker sets a flag every registration reads (see [`signal`]).
//!
//! With a grace period, the shutdown has two phases: the token's cancellation announces a
//! drain (requests can see it, see [`Draining`], and new ones are still accepted), and when
//! the grace has passed the watcher cancels every request in flight as above.

use std::cell::Cell;
use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::loom::atomic::AtomicU64;
use crate::loom::{Mutex, MutexGuard, lock};

use self::signal::{Signal, park};
use self::watch::{Watching, watch};

mod draining;
mod signal;
mod watch;

pub use self::draining::Draining;

/// A request in flight, as the registry sees it: something to cancel when the shutdown begins.
/// The request's scope implements it; the registry holds it weakly, so a request that ended
/// without deregistering (it cannot: deregistration is part of ending) costs nothing.
pub(crate) trait InFlight: Send + Sync {
    /// The shutdown began: cancel the request with `Shutdown`, if it is still armed.
    fn shut_down(&self);
}

/// The end of the list of vacant entries.
const END: usize = usize::MAX;

/// Where a request is registered, to remove it when the request ends.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Registration {
    shard: usize,
    key: usize,
}

/// Where a request's scope keeps its [`Registration`], set once it is made: a scope registers
/// after its `Arc` exists (so that the registry can reach it at once), then stores where.
/// Packed into one atomic word (the shard index is below 256), `EMPTY` when unset.
pub(crate) struct Slot(AtomicU64);

impl Slot {
    const EMPTY: u64 = u64::MAX;
    const SHARD_BITS: u32 = 8;

    pub(crate) fn empty() -> Self {
        Self(AtomicU64::new(Self::EMPTY))
    }

    pub(crate) fn set(&self, registration: Registration) {
        let key = registration.key as u64;
        debug_assert!(registration.shard < 1 << Self::SHARD_BITS);
        debug_assert!(key < (1 << (64 - Self::SHARD_BITS)) - 1, "EMPTY stays free");
        let packed = (key << Self::SHARD_BITS) | registration.shard as u64;
        self.0.store(packed, Ordering::Release);
    }

    /// The registration, taken: a second call finds none.
    pub(crate) fn take(&self) -> Option<Registration> {
        match self.0.swap(Self::EMPTY, Ordering::AcqRel) {
            Self::EMPTY => None,
            packed => Some(Registration {
                shard: (packed & ((1 << Self::SHARD_BITS) - 1)) as usize,
                key: (packed >> Self::SHARD_BITS) as usize,
            }),
        }
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Slot")
            .field(&(self.0.load(Ordering::Relaxed) != Self::EMPTY))
            .finish()
    }
}

/// The layer's shutdown token and its registry of in-flight requests. Clones share both.
#[derive(Clone)]
pub(crate) struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    token: CancellationToken,
    /// Announced before `token.cancel()` returns; begun then too, or when the grace ends:
    /// registrations are refused from then on.
    signal: Arc<Signal>,
    /// Keeps `signal`'s waker parked on the token (dropping the future takes it off). Never
    /// polled again.
    _parked: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once a watcher task was spawned for `token`.
    watching: AtomicBool,
    /// Cancelled when the layer's configuration is dropped, so the watcher does not outlive it.
    dropped: CancellationToken,
    shards: Box<[Shard]>,
}

/// One lock and its table of entries, alone on its cache lines (128 bytes covers adjacent-line prefetch).
#[repr(align(128))]
struct Shard {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    /// Set by the watcher: scopes are no longer accepted.
    closed: bool,
    entries: Vec<Entry>,
    /// Head of the list of vacant entries.
    free: Option<usize>,
}

enum Entry {
    Occupied(Weak<dyn InFlight>),
    /// The next vacant entry, or [`END`]: a plain `usize`, so that the entry fits in the
    /// two words of the `Weak` (its non-null pointer tells the variants apart).
    Vacant(usize),
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }
}

/// The shutdown began: the request must start cancelled.
#[derive(Debug)]
pub(crate) struct Closed;

impl Shutdown {
    /// A registry whose requests are cancelled as soon as `token` is.
    #[cfg(test)]
    pub(crate) fn new(token: CancellationToken) -> Self {
        Self::with_grace(token, Duration::ZERO)
    }

    /// A registry whose requests are cancelled `grace` after `token` is.
    pub(crate) fn with_grace(token: CancellationToken, grace: Duration) -> Self {
        let threads = std::thread::available_parallelism().map_or(4, usize::from);
        let shards = (threads * 4).next_power_of_two().clamp(4, 256);
        let signal = Arc::new(Signal::new(grace));
        let parked = park(&token, &signal);
        Self {
            inner: Arc::new(Inner {
                token,
                signal,
                _parked: parked,
                watching: AtomicBool::new(false),
                dropped: CancellationToken::new(),
                shards: (0..shards)
                    .map(|_| Shard {
                        table: Mutex::new(Table::default()),
                    })
                    .collect(),
            }),
        }
    }

    /// Adds an in-flight request. Fails once the hard phase has begun: without a grace, from
    /// the moment `token.cancel()` returned, whether or not the watcher has run yet.
    pub(crate) fn register(&self, request: Weak<dyn InFlight>) -> Result<Registration, Closed> {
        // First, even for a refused request: if the watcher's runtime shut down, requests
        // still in flight need a new watcher.
        self.ensure_watcher();
        if self.inner.signal.begun() {
            return Err(Closed);
        }
        let shard = self.inner.home_shard();
        let mut table = self.inner.shards[shard].lock();
        if table.closed {
            return Err(Closed);
        }
        let key = match table.free {
            Some(key) => {
                let Entry::Vacant(next) = table.entries[key] else {
                    unreachable!("the free list only links vacant entries");
                };
                table.free = (next != END).then_some(next);
                table.entries[key] = Entry::Occupied(request);
                key
            }
            None => {
                table.entries.push(Entry::Occupied(request));
                table.entries.len() - 1
            }
        };
        Ok(Registration { shard, key })
    }

    /// Whether the hard phase has begun, without a lock.
    pub(crate) fn begun(&self) -> bool {
        self.inner.signal.begun()
    }

    /// Whether the drain was announced (`token.cancel()` was called), without a lock.
    pub(crate) fn announced(&self) -> bool {
        self.inner.signal.announced().is_some()
    }

    /// Records the announcement, for code that saw the token cancelled before the registry's
    /// waker ran (idempotent).
    pub(crate) fn announce(&self) {
        self.inner.signal.announce();
    }

    /// The token whose cancellation announces the drain.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// Removes a request that ended. Called exactly once per successful `register`.
    pub(crate) fn deregister(&self, registration: Registration) {
        let mut table = self.inner.shards[registration.shard].lock();
        if table.closed {
            // The watcher took every entry already.
            return;
        }
        debug_assert!(
            matches!(table.entries[registration.key], Entry::Occupied(_)),
            "a registration removed twice"
        );
        let free = table.free.unwrap_or(END);
        table.entries[registration.key] = Entry::Vacant(free);
        table.free = Some(registration.key);
    }

    /// Spawns the watcher on the current runtime the first time a request is seen, and again
    /// if the runtime it ran on shut down before the shutdown began (the watcher's guard then
    /// clears `watching`).
    fn ensure_watcher(&self) {
        let inner = &self.inner;
        if inner.watching.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = Handle::try_current() else {
            // Outside a runtime: try again with the next request.
            return;
        };
        if inner
            .watching
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        runtime.spawn(watch(
            Arc::downgrade(inner),
            Arc::clone(&inner.signal),
            inner.token.clone(),
            inner.dropped.clone(),
            Watching(Some(Arc::downgrade(inner))),
        ));
    }

    /// Cancels every registered request as the watcher does (for tests without a runtime).
    #[cfg(test)]
    pub(crate) fn close(&self) -> usize {
        self.inner.cancel_all()
    }

    /// Number of in-flight requests registered, for tests. Once closed, the registry is
    /// empty by construction, so tests check it before closing.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }
}

impl Inner {
    /// Number of in-flight requests registered (a lock per shard).
    fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .entries
                    .iter()
                    .filter(|e| matches!(e, Entry::Occupied(_)))
                    .count()
            })
            .sum()
    }

    /// The shard of the current thread: threads are spread round robin over the shards.
    fn home_shard(&self) -> usize {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        let home = HOME.with(|home| {
            if home.get() == usize::MAX {
                home.set(NEXT.fetch_add(1, Ordering::Relaxed));
            }
            home.get()
        });
        home & (self.shards.len() - 1)
    }

    /// Closes every shard and cancels the scopes that were in flight, outside the locks.
    fn cancel_all(&self) -> usize {
        let mut cancelled = 0;
        for shard in &self.shards {
            let entries = {
                let mut table = shard.lock();
                table.closed = true;
                table.free = None;
                std::mem::take(&mut table.entries)
            };
            for entry in entries {
                if let Entry::Occupied(request) = entry {
                    if let Some(request) = request.upgrade() {
                        request.shut_down();
                        cancelled += 1;
                    }
                }
            }
        }
        cancelled
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

impl fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shutdown")
            .field("token", &self.inner.token)
            .field("grace", &self.inner.signal.grace())
            .field("shards", &self.inner.shards.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Gone;

    impl InFlight for Gone {
        fn shut_down(&self) {
            unreachable!("never upgraded");
        }
    }

    fn gone() -> Weak<dyn InFlight> {
        Weak::<Gone>::new()
    }

    /// One entry per request in flight: two words, as small as the weak pointer it holds.
    #[test]
    fn an_entry_is_two_words() {
        assert_eq!(
            std::mem::size_of::<Entry>(),
            2 * std::mem::size_of::<usize>()
        );
    }

    #[test]
    fn slots_are_reused_and_closing_refuses_new_ones() {
        let shutdown = Shutdown::new(CancellationToken::new());
        let a = shutdown.register(gone()).unwrap();
        let b = shutdown.register(gone()).unwrap();
        assert_eq!(shutdown.in_flight(), 2);
        shutdown.deregister(a);
        let c = shutdown.register(gone()).unwrap();
        assert_eq!((c.shard, c.key), (a.shard, a.key), "vacant entry reused");
        shutdown.deregister(b);
        shutdown.deregister(c);
        assert_eq!(shutdown.in_flight(), 0);

        let d = shutdown.register(gone()).unwrap();
        assert_eq!(shutdown.inner.cancel_all(), 0, "dead scopes are skipped");
        assert!(shutdown.register(gone()).is_err());
        shutdown.deregister(d);
    }

    /// Counts the times the registry shut it down.
    #[derive(Default)]
    struct Counted(AtomicUsize);

    impl InFlight for Counted {
        fn shut_down(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counted() -> (Arc<Counted>, Weak<dyn InFlight>) {
        let request = Arc::new(Counted::default());
        let weak: Weak<dyn InFlight> = Arc::downgrade(&(request.clone() as Arc<dyn InFlight>));
        (request, weak)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_grace_announces_then_cancels_when_it_is_over() {
        let grace = Duration::from_secs(10);
        let token = CancellationToken::new();
        let shutdown = Shutdown::with_grace(token.clone(), grace);
        let (before, weak) = counted();
        let _a = shutdown.register(weak).unwrap();
        settle().await;

        token.cancel();
        assert!(shutdown.announced() && !shutdown.begun());
        // Requests that arrive during the drain are accepted, and cancelled with the others.
        let (during, weak) = counted();
        let _b = shutdown.register(weak).unwrap();
        tokio::time::sleep(grace - Duration::from_millis(1)).await;
        settle().await;
        assert_eq!(
            before.0.load(Ordering::SeqCst),
            0,
            "cancelled during the grace"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
        settle().await;
        assert!(shutdown.begun());
        assert_eq!(before.0.load(Ordering::SeqCst), 1);
        assert_eq!(during.0.load(Ordering::SeqCst), 1);
        assert!(
            shutdown.register(counted().1).is_err(),
            "after the grace: refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_grace_counts_from_the_announcement_not_from_a_late_watcher() {
        let grace = Duration::from_secs(10);
        let token = CancellationToken::new();
        let shutdown = Shutdown::with_grace(token.clone(), grace);
        token.cancel();
        // No request yet, so no watcher: the first one comes 8 s into the drain.
        tokio::time::sleep(Duration::from_secs(8)).await;
        let (request, weak) = counted();
        let _a = shutdown.register(weak).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert_eq!(
            request.0.load(Ordering::SeqCst),
            1,
            "cancelled 10 s after the announcement"
        );
    }

    #[test]
    fn without_a_grace_the_announcement_is_the_hard_phase() {
        let token = CancellationToken::new();
        let shutdown = Shutdown::new(token.clone());
        token.cancel();
        assert!(shutdown.announced() && shutdown.begun());
        assert!(shutdown.register(gone()).is_err());
    }
}
