//! The attack matrix (issue 22), HTTP/1.1 and HTTP/2: the layers sit in front of every route,
//! so they must never make a server easier to knock over than hyper alone. Each cell starts
//! two server processes side by side, "bare" (the handler with hyper alone) and "layered"
//! (the same handler behind `CancellationLayer`, `RequestBodyLayer`, `detached()`), attacks
//! both the same way over real sockets, and compares what they hold: the RSS growth of each
//! process (VmHWM above the RSS when the attack began, from `/proc`), the crate's own
//! accounting (`read_ahead_held`/`read_ahead_peak`, `detached_counts`, `cleanup_counts`), the
//! handlers alive, and the panics (a hook counts every one, caught or not: none anywhere).
//!
//! Run with `cargo test --test attack -- --nocapture --test-threads=1` to see the table of
//! figures (the lines starting with `|`: cell, bare RSS growth, layered RSS growth, accounting,
//! panics bare / layered).
//!
//! | module | cells |
//! |---|---|
//! | `one_byte` | 1: one-byte chunks (HTTP/1.1) and DATA frames (HTTP/2, unpaced and paced) against read-ahead; one-byte chunks four times over the budget |
//! | `rapid_reset` | 2: HTTP/2 rapid reset against an attached route and a detached one with `detached_limit` |
//! | `heads` | 3, 4: request heads that never finish; a 1 MiB head, a 1 MiB header list |
//! | `bodies` | 5, 6, 7: truncated bodies, content-lengths larger and smaller than the body, empty DATA frames |
//! | `slow` | 8, 9: uploads that trickle under the idle timeout, one that stalls; 200 streams half sent, then RST |
//! | `peer` | 10: 300 HTTP/1.1 uploads half sent and unread, then FIN, with `tcp::PeerWatch` |
//!
//! The server process is `child` (with its handler and layers in `app`); `harness` starts the
//! pair and measures; `wire` holds the clients. `tests/attack/before_the_fixes.sh` runs the
//! cells against 8ef371a, before read-ahead was bounded in real memory and before
//! `detached_limit`: the cells that guard those fixes fail there.

#[path = "attack/app.rs"]
mod app;
#[path = "attack/bodies.rs"]
mod bodies;
#[path = "attack/child.rs"]
mod child;
#[path = "attack/harness.rs"]
mod harness;
#[path = "attack/heads.rs"]
mod heads;
#[path = "attack/one_byte.rs"]
mod one_byte;
#[path = "attack/peer.rs"]
mod peer;
#[path = "attack/rapid_reset.rs"]
mod rapid_reset;
#[path = "attack/slow.rs"]
mod slow;
#[path = "attack/wire.rs"]
mod wire;

/// The server process of every cell: the cells re-run this test binary with
/// `--exact server_process` and the server's configuration in the environment. In a normal
/// run (no configuration) it passes at once.
#[test]
fn server_process() {
    if std::env::var_os(child::ENV).is_some() {
        child::serve();
    }
}
