//! The request-stream frame filter, for `fuzz/fuzz_targets/h3_request_stream.rs`: built only
//! with `--cfg fuzzing` (cargo-fuzz sets it), not part of the API.

use bytes::Bytes;

use crate::http3::frames::{Filter, Violation};

/// The filter every byte of a request stream passes before h3 reads it (see the
/// [module docs](crate::http3)).
#[derive(Debug)]
pub struct RequestFilter(Filter);

impl RequestFilter {
    /// A filter bounding the request head and any frame but DATA to `max` bytes.
    pub fn new(max: u64) -> Self {
        RequestFilter(Filter::new(max))
    }

    /// Filters one chunk read from the stream; what h3 is to see goes to `out`. An error ends
    /// the stream (the server resets it, or closes the connection).
    pub fn feed(&mut self, chunk: &Bytes, out: &mut Vec<Bytes>) -> Result<(), &'static str> {
        self.0.feed(chunk, out).map_err(describe)
    }

    /// The stream ended: an error if it ended inside a frame.
    pub fn end(&self) -> Result<(), &'static str> {
        self.0.end().map_err(describe)
    }

    /// Whether the request's HEADERS frame is still being read.
    pub fn in_head(&self) -> bool {
        self.0.in_head()
    }
}

fn describe(violation: Violation) -> &'static str {
    match violation {
        Violation::TooLarge => "too large",
        Violation::Truncated => "truncated",
    }
}
