//! Arbitrary bytes on an HTTP/3 request stream, read as `tower_cancel::http3::serve` reads
//! them: through the crate's frame filter, then h3's own frame decoder (`FrameStream`, public
//! under h3's backend feature), in the order h3's server and the crate's `IncomingBody` call
//! it: the request's HEADERS frame, the DATA frames, then the trailers.
//!
//! Input: byte 0 sets the bound on a request head (64 to 16 384 bytes), byte 1 the size of the
//! reads (1 to 256 bytes); the rest is the stream, which ends (FIN) after its last byte.
//!
//! Checked: nothing panics (h3 0.0.8 asserts when it is asked for trailers while a DATA frame
//! is unfinished, which a stream ending inside one reached); h3 never sees a stream end inside
//! a DATA frame when the filter let the stream end cleanly; no HEADERS frame reaches h3 larger
//! than the bound; the DATA h3 yields is never more than the stream carried.
#![no_main]

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use h3::frame::{FrameStream, FrameStreamError};
use h3::proto::frame::Frame;
use h3::quic::{RecvStream, StreamErrorIncoming, StreamId};
use h3::stream::BufRecvStream;
use libfuzzer_sys::fuzz_target;
use tower_cancel::http3::fuzzing::RequestFilter;

/// The request direction as the crate's backend hands it to h3: chunks through the filter,
/// the filter's verdict at the end.
struct Filtered {
    reads: VecDeque<Bytes>,
    filter: RequestFilter,
    ready: VecDeque<Bytes>,
    failed: bool,
    ended: bool,
    /// The stream ended cleanly by the filter's word.
    clean_end: Rc<Cell<bool>>,
}

impl RecvStream for Filtered {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        loop {
            if self.failed {
                return Poll::Ready(Err(StreamErrorIncoming::Unknown("refused".into())));
            }
            if let Some(chunk) = self.ready.pop_front() {
                return Poll::Ready(Ok(Some(chunk)));
            }
            if self.ended {
                return Poll::Ready(Ok(None));
            }
            match self.reads.pop_front() {
                Some(chunk) => {
                    let mut out = Vec::new();
                    match self.filter.feed(&chunk, &mut out) {
                        Ok(()) => self.ready.extend(out),
                        Err(_) => self.failed = true,
                    }
                }
                None => match self.filter.end() {
                    Ok(()) => {
                        self.ended = true;
                        self.clean_end.set(true);
                    }
                    Err(_) => self.failed = true,
                },
            }
        }
    }

    fn stop_sending(&mut self, _error_code: u64) {}

    fn recv_id(&self) -> StreamId {
        StreamId::try_from(0u64).unwrap()
    }
}

type Stream = FrameStream<Filtered, Bytes>;

/// Polls once: every read is ready, so nothing may be pending.
fn ready<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> T {
    let mut cx = Context::from_waker(Waker::noop());
    match f(&mut cx) {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("pending on a stream that is always ready"),
    }
}

fn next(
    stream: &mut Stream,
    max: u64,
) -> Result<Option<Frame<h3::proto::frame::PayloadLen>>, FrameStreamError> {
    let frame = ready(|cx| stream.poll_next(cx))?;
    if let Some(Frame::Headers(headers)) = &frame {
        assert!(
            headers.len() as u64 <= max,
            "a HEADERS frame over the bound reached h3"
        );
    }
    Ok(frame)
}

/// Reads the stream as the server does; `Err` where h3 (or the filter) ends it.
fn serve(
    stream: &mut Stream,
    max: u64,
    carried: usize,
    clean_end: &Cell<bool>,
) -> Result<(), FrameStreamError> {
    // `RequestResolver::resolve_request`: the first frame must be HEADERS.
    match next(stream, max)? {
        Some(Frame::Headers(_)) => {}
        _ => return Ok(()),
    }
    // `RequestStream::poll_recv_data`, as `IncomingBody` calls it until it yields `None`.
    let mut remaining = 0usize;
    let mut data = 0usize;
    loop {
        if remaining == 0 {
            match next(stream, max)? {
                None => return Ok(()),
                Some(Frame::Headers(_)) => return Ok(()),
                Some(Frame::Data(len)) => remaining = len.0,
                Some(_) => return Ok(()),
            }
        }
        let chunk = ready(|cx| stream.poll_data(cx));
        // h3 sees a stream end inside a DATA frame only where the filter did not let it end
        // cleanly. (A known frame h3 cannot decode is also its `UnexpectedEnd`, from
        // `poll_next`: that one is h3's to refuse.)
        if let Err(FrameStreamError::UnexpectedEnd) = &chunk {
            assert!(!clean_end.get(), "h3 saw a stream end inside a DATA frame");
        }
        match chunk? {
            Some(mut chunk) => {
                let n = chunk.remaining();
                chunk.advance(n);
                remaining -= n;
                data += n;
                assert!(data <= carried, "more DATA than the stream carried");
            }
            None => break,
        }
    }
    // `RequestStream::poll_recv_trailers` (h3 asserts in here if a DATA frame is unfinished).
    next(stream, max)?;
    Ok(())
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let max = 64 * (u64::from(input[0]) + 1);
    let step = usize::from(input[1]) + 1;
    let body = &input[2..];
    let reads = body.chunks(step).map(Bytes::copy_from_slice).collect();
    let clean_end = Rc::new(Cell::new(false));
    let filtered = Filtered {
        reads,
        filter: RequestFilter::new(max),
        ready: VecDeque::new(),
        failed: false,
        ended: false,
        clean_end: clean_end.clone(),
    };
    let mut stream = FrameStream::new(BufRecvStream::new(filtered));
    let _ = serve(&mut stream, max, body.len(), &clean_end);
});
