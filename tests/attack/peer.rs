//! Cell 10: 300 HTTP/1.1 uploads, 32 KiB of 64 KiB sent and none of it read, held open, then
//! every client closes (FIN). The layered server watches each connection with
//! `tcp::PeerWatch` (no read-ahead): it holds what bare hyper holds while the uploads wait
//! (the bytes stay in the kernel's buffers), and once the clients close every request is
//! cancelled `Disconnected` and every handler stops, where bare hyper's handlers wait on.

use tokio::net::TcpStream;

use crate::child::Config;
use crate::harness::{MIB, Pair, Server, proc_available};
use crate::wire;

const UPLOADS: u64 = 300;
const SENT: usize = 32 * 1024;

async fn open(server: &Server) -> Vec<TcpStream> {
    let mut streams = Vec::new();
    for _ in 0..UPLOADS {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let mut request = format!(
            "POST /wait HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\n\r\n",
            2 * SENT
        )
        .into_bytes();
        request.extend(std::iter::repeat_n(b'x', SENT));
        wire::write(&mut stream, &request).await;
        streams.push(stream);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_unread_uploads_then_fin_with_peer_watch() {
    if !proc_available("h1_unread_uploads_then_fin_with_peer_watch") {
        return;
    }
    let pair = Pair::start(Config {
        peer_watch: true,
        ..Config::default()
    })
    .await;
    let (bare, layered) = tokio::join!(open(&pair.bare), open(&pair.layered));
    let waiting = |s: &crate::harness::Stats| s.get("live") == UPLOADS;
    pair.bare.until("every handler waiting", waiting).await;
    let before = pair.layered.until("every handler waiting", waiting).await;
    // Both hold what they hold with every upload waiting, unread: the RSS marks.
    let (bare_growth, layered_growth) = (pair.bare.growth(), pair.layered.growth());
    drop(bare);
    drop(layered);
    let over = |s: &crate::harness::Stats| {
        let cleanups = s.get("cl_running") + s.get("cl_queued");
        s.get("live") == 0 && cleanups == 0 && s.get("conns") == 0
    };
    let after = pair.layered.until("every request over", over).await;
    // Bare hyper never reads: its handlers wait on (up to their 60 s).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let bare_after = pair.bare.stats().await;
    let accounting = format!(
        "{UPLOADS} uploads, {SENT} B of {} B sent and unread, then FIN: RSS growth while \
         waiting {:.2} MiB bare / {:.2} MiB layered, read_ahead held {}; cancelled {} ({} \
         disconnected); handlers alive after: {} / {}",
        2 * SENT,
        bare_growth as f64 / MIB as f64,
        layered_growth as f64 / MIB as f64,
        before.get("held"),
        after.get("cancelled"),
        after.get("disconnected"),
        bare_after.get("live"),
        after.get("live"),
    );
    let cell = "10 h1 300 unread uploads, then FIN (PeerWatch)";
    let mut checks = pair.report(cell, &accounting).await;
    checks.equal(before.get("held"), 0, "read ahead");
    checks.equal(after.get("disconnected"), UPLOADS, "cancelled Disconnected");
    checks.equal(after.get("live"), 0, "layered handlers alive after the FIN");
    checks.equal(
        bare_after.get("live"),
        UPLOADS,
        "bare handlers alive after the FIN",
    );
    // Per waiting request, the layers (its scope, their futures) and the watch (a task, a
    // reactor registration, a descriptor) together: measured 5.6 KiB here, bounded at 8 KiB,
    // where reading the 32 KiB ahead would add 32 KiB each.
    checks.growth_within(UPLOADS * 8 * 1024);
    checks.done();
}
