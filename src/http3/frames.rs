//! A request stream's frames as they arrive, read ahead of h3.
//!
//! h3 0.0.8 buffers a whole frame before it looks at it (a HEADERS frame, an unknown one),
//! checks `max_field_section_size` only then, takes a zero-length DATA frame for the end of the
//! body, and asserts (a panic) when a stream that ended inside a DATA frame is asked for its
//! trailers. So every byte of a request stream passes this filter first, which sees frame
//! boundaries as they go by and hands h3 only what it handles well:
//!
//! - a frame other than DATA that announces more than the bound, and a request head (every byte
//!   before the request's HEADERS frame is complete) over it, are a [`Violation::TooLarge`] as
//!   soon as the length is read, nothing of them buffered;
//! - unknown frames (RFC 9114 §9: to be ignored) are dropped as they arrive, never buffered
//!   (still bounded like any frame but DATA, and counted in the request head);
//! - zero-length DATA frames in the body carry nothing and are dropped (h3 would end the body);
//! - a stream that ends inside a frame is a [`Violation::Truncated`] (RFC 9114 §7.1:
//!   `H3_FRAME_ERROR`), so h3 never sees a clean end there.
//!
//! Anything else (DATA before HEADERS, a SETTINGS frame, a second HEADERS after the trailers)
//! goes through as it came, for h3 to refuse as the RFC says.

use bytes::Bytes;

/// `DATA`, `HEADERS`, and the WebTransport stream signal (no length: h3 decodes it and refuses
/// it on a request stream).
const DATA: u64 = 0x00;
const HEADERS: u64 = 0x01;
const WEBTRANSPORT_STREAM: u64 = 0x41;

/// The frame types h3 decodes on a request stream (the others are unknown to it, and ignored):
/// HTTP/3's own (0x03 CANCEL_PUSH, 0x04 SETTINGS, 0x05 PUSH_PROMISE, 0x07 GOAWAY, 0x0d
/// MAX_PUSH_ID) and HTTP/2's reserved ones (0x02, 0x06, 0x08, 0x09), all refused by h3.
fn known(ty: u64) -> bool {
    matches!(ty, 0x00..=0x09 | 0x0d)
}

/// Why a request stream is ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A frame, or the request head, larger than the bound (`H3_EXCESSIVE_LOAD`).
    TooLarge,
    /// The stream ended inside a frame (`H3_FRAME_ERROR`, a connection error).
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the request's HEADERS frame is complete: every byte counts against the bound.
    Head,
    /// The body: zero-length DATA frames are dropped.
    Body,
    /// After the trailers: everything h3 knows goes to it, to be refused.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a frame header (`held` bytes of it so far).
    Header,
    /// Passing on a payload; `head` is set for the request's HEADERS frame.
    Pass { left: u64, head: bool },
    /// Dropping an unknown frame's payload.
    Skip { left: u64 },
    /// Everything after a WebTransport stream signal, as it comes (h3 refuses it).
    Raw,
}

/// The filter of one request stream. [`feed`](Self::feed) it each chunk read, and
/// [`end`](Self::end) at the stream's end.
#[derive(Debug)]
pub(crate) struct Filter {
    max: u64,
    phase: Phase,
    /// The bytes of the request head so far.
    head: u64,
    state: State,
    /// A frame header split across chunks: type and length, two varints of 8 bytes at most.
    header: [u8; 16],
    held: usize,
}

/// The length of the QUIC varint whose first byte is `first`.
fn varint_len(first: u8) -> usize {
    1 << (first >> 6)
}

fn varint(bytes: &[u8]) -> u64 {
    let mut value = u64::from(bytes[0] & 0x3f);
    for byte in &bytes[1..] {
        value = (value << 8) | u64::from(*byte);
    }
    value
}

/// What to do with a frame whose header was just read.
enum Decision {
    Pass,
    Drop,
}

impl Filter {
    /// A filter with `max` as the bound on a request head and on any frame but DATA.
    pub(crate) fn new(max: u64) -> Self {
        Filter {
            max,
            phase: Phase::Head,
            head: 0,
            state: State::Header,
            header: [0; 16],
            held: 0,
        }
    }

    /// Whether the request's HEADERS frame is still being read.
    pub(crate) fn in_head(&self) -> bool {
        self.phase == Phase::Head
    }

    /// Filters one chunk: what h3 is to see is pushed to `out`, in order (slices of `chunk`,
    /// or a copy of a frame header that was split across chunks).
    pub(crate) fn feed(&mut self, chunk: &Bytes, out: &mut Vec<Bytes>) -> Result<(), Violation> {
        // `chunk[run..pos]` is to be passed on, not pushed yet.
        let (mut pos, mut run) = (0, 0);
        let flush = |run: usize, end: usize, out: &mut Vec<Bytes>| {
            if end > run {
                out.push(chunk.slice(run..end));
            }
        };
        while pos < chunk.len() {
            let rest = (chunk.len() - pos) as u64;
            match self.state {
                State::Pass { left, head } => {
                    let n = left.min(rest);
                    self.count(n)?;
                    pos += n as usize;
                    if n == left {
                        self.state = State::Header;
                        if head {
                            self.phase = Phase::Body;
                        }
                    } else {
                        self.state = State::Pass {
                            left: left - n,
                            head,
                        };
                    }
                }
                State::Skip { left } => {
                    flush(run, pos, out);
                    let n = left.min(rest);
                    self.count(n)?;
                    pos += n as usize;
                    run = pos;
                    self.state = if n == left {
                        State::Header
                    } else {
                        State::Skip { left: left - n }
                    };
                }
                State::Raw => {
                    self.count(rest)?;
                    pos = chunk.len();
                }
                State::Header => {
                    let start = pos;
                    let before = self.held;
                    let Some((ty, len)) = self.read_header(chunk, &mut pos)? else {
                        // Held until the rest of the header comes.
                        flush(run, start, out);
                        run = pos;
                        continue;
                    };
                    let decision = self.decide(ty, len)?;
                    let header = self.held;
                    self.held = 0;
                    match decision {
                        Decision::Drop => {
                            flush(run, start, out);
                            run = pos;
                        }
                        // The header began in an earlier chunk: pass a copy of all of it.
                        Decision::Pass if before > 0 => {
                            flush(run, start, out);
                            out.push(Bytes::copy_from_slice(&self.header[..header]));
                            run = pos;
                        }
                        Decision::Pass => {}
                    }
                }
            }
        }
        flush(run, pos, out);
        Ok(())
    }

    /// The stream ended: fine unless it ended inside a frame.
    pub(crate) fn end(&self) -> Result<(), Violation> {
        match self.state {
            State::Header if self.held == 0 => Ok(()),
            State::Raw => Ok(()),
            _ => Err(Violation::Truncated),
        }
    }

    /// Counts `n` bytes against the bound while the request head is read.
    fn count(&mut self, n: u64) -> Result<(), Violation> {
        if self.phase == Phase::Head {
            self.head = self.head.saturating_add(n);
            if self.head > self.max {
                return Err(Violation::TooLarge);
            }
        }
        Ok(())
    }

    /// Reads header bytes from `chunk` at `pos`: the frame's type and length once complete.
    fn read_header(
        &mut self,
        chunk: &Bytes,
        pos: &mut usize,
    ) -> Result<Option<(u64, u64)>, Violation> {
        loop {
            let type_len = (self.held > 0).then(|| varint_len(self.header[0]));
            let needed = match type_len {
                None => 1,
                Some(t) if self.held < t => t,
                Some(t) => {
                    let ty = varint(&self.header[..t]);
                    if ty == WEBTRANSPORT_STREAM {
                        return Ok(Some((ty, 0)));
                    }
                    if self.held == t {
                        t + 1
                    } else {
                        let len_len = varint_len(self.header[t]);
                        if self.held == t + len_len {
                            return Ok(Some((ty, varint(&self.header[t..self.held]))));
                        }
                        t + len_len
                    }
                }
            };
            if *pos == chunk.len() {
                return Ok(None);
            }
            let take = (needed - self.held).min(chunk.len() - *pos);
            self.header[self.held..self.held + take].copy_from_slice(&chunk[*pos..*pos + take]);
            self.held += take;
            *pos += take;
            self.count(take as u64)?;
        }
    }

    /// What becomes of a frame whose header was just read.
    fn decide(&mut self, ty: u64, len: u64) -> Result<Decision, Violation> {
        let left = self.max.saturating_sub(self.head);
        let fits = match self.phase {
            Phase::Head => len <= left,
            // The body's DATA is the handler's to read, as much as it wants.
            _ => ty == DATA || len <= self.max,
        };
        if ty == WEBTRANSPORT_STREAM {
            self.state = State::Raw;
            return Ok(Decision::Pass);
        }
        if !fits {
            return Err(Violation::TooLarge);
        }
        if !known(ty) {
            self.state = State::Skip { left: len };
            return Ok(Decision::Drop);
        }
        if ty == DATA && len == 0 && self.phase == Phase::Body {
            return Ok(Decision::Drop);
        }
        let head = ty == HEADERS && self.phase == Phase::Head;
        if ty == HEADERS && self.phase == Phase::Body {
            self.phase = Phase::Trailers;
        }
        if len == 0 {
            if head {
                self.phase = Phase::Body;
            }
        } else {
            self.state = State::Pass { left: len, head };
        }
        Ok(Decision::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![ty, payload.len() as u8];
        out.extend_from_slice(payload);
        out
    }

    /// Feeds `input` in chunks of `step` bytes; the bytes h3 sees, or the violation.
    fn run(input: &[u8], step: usize, max: u64) -> Result<Vec<u8>, Violation> {
        let mut filter = Filter::new(max);
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            filter.feed(&Bytes::copy_from_slice(chunk), &mut out)?;
        }
        filter.end()?;
        Ok(out.concat())
    }

    #[test]
    fn passes_a_request_as_it_is() {
        let mut input = frame(1, b"head");
        input.extend(frame(0, b"body"));
        input.extend(frame(1, b"trailers"));
        for step in 1..=input.len() {
            assert_eq!(run(&input, step, 64), Ok(input.clone()), "step {step}");
        }
    }

    #[test]
    fn drops_unknown_frames_and_empty_data() {
        let mut input = frame(0x21, b"grease");
        input.extend(frame(1, b"head"));
        input.extend(frame(0, b""));
        input.extend(frame(0, b"body"));
        input.extend(frame(0x21, b"x"));
        input.extend(frame(0, b""));
        let mut expected = frame(1, b"head");
        expected.extend(frame(0, b"body"));
        for step in 1..=input.len() {
            assert_eq!(run(&input, step, 64), Ok(expected.clone()), "step {step}");
        }
        // Before the head, an empty DATA frame is h3's to refuse.
        assert_eq!(run(&frame(0, b""), 1, 64), Ok(frame(0, b"")));
    }

    #[test]
    fn bounds_the_head_and_every_frame_but_data() {
        assert_eq!(run(&frame(1, &[0; 40]), 1, 42), Ok(frame(1, &[0; 40])));
        // Announced over the bound: refused at the length, before any payload.
        assert_eq!(run(&[1, 40], 2, 41), Err(Violation::TooLarge));
        let mut input = frame(0x21, &[0; 30]);
        input.extend(frame(1, &[0; 20]));
        assert_eq!(run(&input, 7, 41), Err(Violation::TooLarge));
        // In the body, DATA is not bounded; any other frame is, the trailers and unknown frames
        // (dropped as they come) alike.
        let mut input = frame(1, b"head");
        input.extend(frame(0x21, &[0; 30]));
        input.extend(frame(0, &[0; 60]));
        assert!(run(&input, 5, 41).is_ok());
        let mut unknown = input.clone();
        unknown.extend(frame(0x21, &[0; 50]));
        assert_eq!(run(&unknown, 5, 41), Err(Violation::TooLarge));
        input.extend(frame(1, &[0; 50]));
        assert_eq!(run(&input, 5, 41), Err(Violation::TooLarge));
    }

    #[test]
    fn an_end_inside_a_frame_is_truncated() {
        let mut input = frame(1, b"head");
        input.extend([0, 100]);
        input.extend([b'x'; 10]);
        assert_eq!(run(&input, 3, 64), Err(Violation::Truncated));
        assert_eq!(run(&[1], 1, 64), Err(Violation::Truncated));
        assert_eq!(run(&[0x21, 5, 0], 1, 64), Err(Violation::Truncated));
        // Multi-byte varints split anywhere.
        let mut input = vec![0x40, 0x01, 0x40, 0x04];
        input.extend(b"head");
        for step in 1..=input.len() {
            assert_eq!(run(&input, step, 64), Ok(input.clone()), "step {step}");
        }
    }
}
