//! `RequestBodyLayer::read_ahead` with arbitrary frame splits, waits and limits: whatever was
//! read ahead, the handler receives exactly the original bytes, in order.
//!
//! Input: byte 0 is the read-ahead limit (1 to 256 bytes); byte 1 holds, in its low nibble, how
//! many times the handler is pending before it reads its body (0 to 15, during which the layer
//! reads ahead) and, in its high nibble, the layer's read-ahead budget (`read_ahead_total`) in
//! steps of 32 bytes (0 for the default). Then a script: a byte with the high bit set makes the
//! body pending once; any other byte `n` is a data frame of the next `n & 0x3f` bytes.
//!
//! Checked: the handler receives exactly the original bytes, what was read ahead stayed within
//! the limit and the budget plus one frame, and every byte went back to the budget.
#![no_main]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::{Layer, Service, service_fn};
use tower_cancel::{RequestBody, RequestBodyLayer};

/// A body that plays a script: `Some(bytes)` is a frame, `None` is one pending poll.
struct Scripted(VecDeque<Option<Bytes>>);

impl Body for Scripted {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.0.pop_front() {
            Some(Some(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(None) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            None => Poll::Ready(None),
        }
    }
}

/// Pending once, then ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, waits, script @ ..] = data else {
        return;
    };
    let limit = usize::from(*limit) + 1;
    let total = match usize::from(waits >> 4) {
        0 => RequestBodyLayer::DEFAULT_READ_AHEAD_TOTAL,
        steps => steps * 32,
    };
    let waits = waits & 0x0f;
    let mut frames = VecDeque::new();
    let mut original = Vec::new();
    let mut rest = script;
    while let [first, tail @ ..] = rest {
        if first & 0x80 != 0 {
            frames.push_back(None);
            rest = tail;
        } else {
            let n = usize::from(first & 0x3f).min(tail.len());
            frames.push_back(Some(Bytes::copy_from_slice(&tail[..n])));
            original.extend_from_slice(&tail[..n]);
            rest = &tail[n..];
        }
    }

    let handler = service_fn(move |req: Request<RequestBody<Scripted>>| async move {
        for _ in 0..waits {
            YieldOnce(false).await;
        }
        let bytes = req.into_body().collect().await?.to_bytes();
        Ok::<_, tower::BoxError>(Response::new(bytes))
    });
    let layer = RequestBodyLayer::new()
        .read_ahead(limit)
        .read_ahead_total(total);
    let mut svc = layer.layer(handler);
    let mut future = pin!(svc.call(Request::new(Scripted(frames))));
    let mut cx = Context::from_waker(Waker::noop());
    let response = loop {
        if let Poll::Ready(response) = future.as_mut().poll(&mut cx) {
            break response.unwrap();
        }
    };
    assert_eq!(response.into_body(), Bytes::from(original));
    // Frames are at most 63 bytes.
    let peak = layer.read_ahead_peak();
    assert!(
        peak <= limit.min(total) + 63,
        "peak {peak}, limit {limit}, total {total}"
    );
    assert_eq!(layer.read_ahead_held(), 0);
});
