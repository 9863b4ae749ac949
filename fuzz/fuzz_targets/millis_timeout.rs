//! The millisecond deadline parser (`connect-timeout-ms`, `x-envoy-expected-rq-timeout-ms`)
//! against the specification, on arbitrary bytes: it never panics, and it accepts exactly 1 to
//! 10 ASCII digits that are not all zeros, with the value those digits say.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &[u8]| {
    let parsed = tower_cancel::__fuzz::millis_timeout(value);
    assert_eq!(parsed, specification(value), "{value:?}");
});

/// Connect: "Timeout-Milliseconds → {positive integer as ASCII string of at most 10 digits}".
fn specification(value: &[u8]) -> Option<Duration> {
    if !(1..=10).contains(&value.len()) || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let millis: u64 = std::str::from_utf8(value).ok()?.parse().ok()?;
    (millis > 0).then(|| Duration::from_millis(millis))
}
