//! The `grpc-timeout` parser against the specification, on arbitrary bytes: it never panics,
//! and it accepts exactly 1 to 8 ASCII digits followed by one of `H M S m u n`, with the value
//! those digits say.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|value: &[u8]| {
    let parsed = tower_cancel::__fuzz::grpc_timeout(value);
    assert_eq!(parsed, specification(value), "{value:?}");
});

/// gRPC over HTTP/2: `TimeoutValue TimeoutUnit`, where the value is 1 to 8 ASCII digits.
fn specification(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if !(1..=8).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let nanos_per_unit: u64 = match unit {
        b'H' => 3_600_000_000_000,
        b'M' => 60_000_000_000,
        b'S' => 1_000_000_000,
        b'm' => 1_000_000,
        b'u' => 1_000,
        b'n' => 1,
        _ => return None,
    };
    // 99 999 999 hours is 3.6e20 ns: past u64, so build the Duration in two parts.
    let nanos = u128::from(amount) * u128::from(nanos_per_unit);
    Some(Duration::new(
        u64::try_from(nanos / 1_000_000_000).ok()?,
        (nanos % 1_000_000_000) as u32,
    ))
}
