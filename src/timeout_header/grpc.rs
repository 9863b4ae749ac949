//! The `grpc-timeout` header (gRPC over HTTP/2, "Requests"): `TimeoutValue TimeoutUnit`, 1 to 8
//! ASCII digits and one of `H M S m u n`. Parsed on the way in (a server's deadline), encoded
//! on the way out (the time that remains, for a downstream call).

use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderValue;
use tokio::time::Instant;

use crate::timeout_header::{self, Malformed, lookup};

/// The header gRPC clients send their deadline in (gRPC over HTTP/2, "Requests").
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits, then one of `H M S m u n`.
///
/// Never panics, whatever the bytes: the largest value (99 999 999 hours) fits a `Duration`.
pub(crate) fn parse(value: &[u8]) -> Result<Duration, Malformed> {
    let Some((&unit, digits)) = value.split_last() else {
        return Err(Malformed::NoDigits);
    };
    // At most 8 digits: no overflow below.
    let amount = timeout_header::digits(digits, 8)?;
    Ok(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return Err(Malformed::UnknownUnit),
    })
}

/// The `grpc-timeout` of a request, if it carries a well-formed one. A malformed one is
/// ignored with a `debug` event.
pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Duration> {
    lookup(headers, GRPC_TIMEOUT, parse)
}

/// Sets `grpc-timeout` to the time left until `deadline` (measured now, when the call is
/// made), or to the shortest valid `grpc-timeout` the request already carries if that is
/// shorter. Always one header: a server takes repeated ones as malformed.
pub(crate) fn set(headers: &mut HeaderMap, deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let already = headers
        .get_all(GRPC_TIMEOUT)
        .iter()
        .filter_map(|value| parse(value.as_bytes()).ok())
        .min();
    let timeout = already.map_or(remaining, |already| already.min(remaining));
    headers.insert(GRPC_TIMEOUT, encode(timeout));
}

/// `remaining` as a `grpc-timeout` value: in the finest unit whose count fits the format's 8
/// digits, rounded down (never more time than remains), and at least 1 (`1n` for none).
pub(crate) fn encode(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    let nanos = remaining.as_nanos();
    let (count, unit) = UNITS
        .iter()
        .map(|&(per, unit)| (nanos / per, unit))
        .find(|&(count, _)| count <= MAX)
        .unwrap_or((MAX, 'H'));
    HeaderValue::try_from(format!("{}{unit}", count.max(1))).expect("digits and a letter")
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn every_unit() {
        let cases = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("40m", Duration::from_millis(40)),
            ("50u", Duration::from_micros(50)),
            ("60n", Duration::from_nanos(60)),
            ("0S", Duration::ZERO),
            ("00000001m", Duration::from_millis(1)),
            ("99999999H", Duration::from_secs(99_999_999 * 3600)),
        ];
        for (value, expected) in cases {
            assert_eq!(parse(value.as_bytes()), Ok(expected), "{value}");
        }
    }

    #[test]
    fn malformed_values_say_why() {
        use Malformed::*;
        let cases: [(&[u8], Malformed); 12] = [
            (b"", NoDigits),
            (b"S", NoDigits),
            (b"123456789S", TooManyDigits),
            (b"-1S", NotADigit),
            (b"+1S", NotADigit),
            (b" 1S", NotADigit),
            (b"1.5S", NotADigit),
            (b"\xd9\xa1S", NotADigit), // ARABIC-INDIC DIGIT ONE
            (b"10", UnknownUnit),
            (b"10s", UnknownUnit),
            (b"10ms", NotADigit),
            (b"10\xc2\xb5", NotADigit), // "10µ"
        ];
        for (value, why) in cases {
            assert_eq!(parse(value), Err(why), "{value:?}");
        }
    }

    #[test]
    fn header_lookup_ignores_repeated_and_malformed_values() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_headers(&headers), None);
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("250m"));
        assert_eq!(from_headers(&headers), Some(Duration::from_millis(250)));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        assert_eq!(from_headers(&headers), None);
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1 S"));
        assert_eq!(from_headers(&headers), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse(&value);
        }

        #[test]
        fn well_formed_values_parse_exactly(
            amount in 0u64..100_000_000,
            width in 1usize..=8,
            unit in prop::sample::select(&b"HMSmun"[..]),
        ) {
            let digits = format!("{amount:0width$}");
            prop_assume!(digits.len() <= 8);
            let value = format!("{digits}{}", unit as char);
            let nanos_per_unit: u128 = match unit {
                b'H' => 3_600_000_000_000,
                b'M' => 60_000_000_000,
                b'S' => 1_000_000_000,
                b'm' => 1_000_000,
                b'u' => 1_000,
                _ => 1,
            };
            let parsed = parse(value.as_bytes()).unwrap();
            prop_assert_eq!(parsed.as_nanos(), u128::from(amount) * nanos_per_unit);
        }

        #[test]
        fn accepted_values_are_digits_then_a_unit(
            // Mostly bytes that could appear in a timeout, so both outcomes are common.
            value in proptest::collection::vec(prop::sample::select(&b"0123456789HMSmun+- .\xff"[..]), 0..12),
        ) {
            if parse(&value).is_ok() {
                let (unit, digits) = value.split_last().unwrap();
                prop_assert!(b"HMSmun".contains(unit));
                prop_assert!((1..=8).contains(&digits.len()));
                prop_assert!(digits.iter().all(u8::is_ascii_digit));
            }
        }

        #[test]
        fn headers_with_arbitrary_bytes_never_panic(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            if let Ok(value) = HeaderValue::from_bytes(&value) {
                let mut headers = HeaderMap::new();
                headers.insert(GRPC_TIMEOUT, value);
                let _ = from_headers(&headers);
            }
        }
    }

    #[test]
    fn encodes_in_the_finest_unit_that_fits() {
        let cases = [
            (Duration::ZERO, "1n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_nanos(100_000_000), "100000u"),
            (Duration::from_millis(1_500), "1500000u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(100_000), "100000S"),
            (Duration::from_secs(100_000_000), "1666666M"),
            (Duration::from_secs(u64::MAX), "99999999H"),
        ];
        for (remaining, expected) in cases {
            assert_eq!(encode(remaining), expected, "{remaining:?}");
        }
    }

    #[test]
    fn keeps_a_shorter_timeout_and_replaces_a_longer_one() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        set(&mut headers, deadline);
        let kept = parse(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert_eq!(kept, Duration::from_secs(5));
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("20S"));
        set(&mut headers, deadline);
        let sent = parse(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert!(
            sent <= Duration::from_secs(10) && sent > Duration::from_secs(9),
            "{sent:?}"
        );
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("garbage"));
        set(&mut headers, deadline);
        assert!(parse(headers[GRPC_TIMEOUT].as_bytes()).is_ok());
        // Repeated headers become one: the shortest valid value, or the time that remains.
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("50S"));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("x"));
        set(&mut headers, deadline);
        assert_eq!(headers.get_all(GRPC_TIMEOUT).iter().count(), 1);
        let sent = parse(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert_eq!(sent, Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn the_encoding_parses_back_to_at_most_what_remains(nanos in any::<u64>(), secs in any::<u64>()) {
            for remaining in [Duration::from_nanos(nanos), Duration::from_secs(secs)] {
                let value = encode(remaining);
                let parsed = parse(value.as_bytes()).unwrap();
                // Never longer than what remains (at least 1 unit, which only applies to zero).
                prop_assert!(parsed <= remaining.max(Duration::from_nanos(1)), "{remaining:?} -> {value:?}");
                // And close: rounding down loses less than one unit, and a unit is chosen only
                // when the next finer one overflows 8 digits, so under 0.001 % of the value.
                if remaining < Duration::from_secs(99_999_999 * 3600) {
                    prop_assert!(remaining.saturating_sub(parsed) <= remaining / 100_000 + Duration::from_nanos(1),
                        "{remaining:?} -> {value:?}");
                }
            }
        }
    }
}
