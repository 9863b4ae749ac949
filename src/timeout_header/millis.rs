//! Deadlines in whole milliseconds: `connect-timeout-ms` (Connect RPC: a positive integer of at
//! most 10 ASCII digits) and `x-envoy-expected-rq-timeout-ms` (Envoy's route timeout, sent to
//! the upstream it routes to; held to the same 10 digits here, 115 days). Parsed on the way
//! in, encoded on the way out, in any header that takes milliseconds.

use std::time::Duration;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::timeout_header::{self, Malformed};

/// The header Connect clients send their deadline in.
pub(crate) const CONNECT_TIMEOUT: &str = "connect-timeout-ms";

/// The header Envoy sends its route's timeout in, to the upstream host.
pub(crate) const ENVOY_EXPECTED_TIMEOUT: &str = "x-envoy-expected-rq-timeout-ms";

/// The most digits a millisecond value may have (Connect's limit).
const MAX_DIGITS: usize = 10;

/// Parses a millisecond deadline: 1 to 10 ASCII digits, not zero (Connect requires a positive
/// number; Envoy's route timeout of 0 disables the timeout).
pub(crate) fn parse(value: &[u8]) -> Result<Duration, Malformed> {
    match timeout_header::digits(value, MAX_DIGITS)? {
        0 => Err(Malformed::Zero),
        millis => Ok(Duration::from_millis(millis)),
    }
}

/// `remaining` in whole milliseconds: rounded down (never more time than remains), at least 1
/// (0 is not a deadline in these conventions), at most 10 digits.
pub(crate) fn encode(remaining: Duration) -> HeaderValue {
    const MAX: u128 = 9_999_999_999;
    let millis = remaining.as_millis().clamp(1, MAX);
    HeaderValue::from(u64::try_from(millis).expect("at most 10 digits"))
}

/// Sets header `name` to the time left until `deadline` in milliseconds (measured now, when
/// the call is made), or to the shortest well-formed value the request already carries there
/// if that is shorter. Always one header: a server takes repeated ones as malformed.
pub(crate) fn set(headers: &mut HeaderMap, name: HeaderName, deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let already = headers
        .get_all(&name)
        .iter()
        .filter_map(|value| parse(value.as_bytes()).ok())
        .min();
    let timeout = already.map_or(remaining, |already| already.min(remaining));
    headers.insert(name, encode(timeout));
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn well_formed_values() {
        let cases = [
            ("1", 1),
            ("250", 250),
            ("0000000001", 1),
            ("9999999999", 9_999_999_999),
        ];
        for (value, millis) in cases {
            let expected = Ok(Duration::from_millis(millis));
            assert_eq!(parse(value.as_bytes()), expected, "{value}");
        }
    }

    #[test]
    fn malformed_values_say_why() {
        use Malformed::*;
        let cases: [(&[u8], Malformed); 11] = [
            (b"", NoDigits),
            (b"0", Zero),
            (b"0000", Zero),
            (b"12345678901", TooManyDigits),
            (b"-1", NotADigit),
            (b"+1", NotADigit),
            (b" 1", NotADigit),
            (b"1.5", NotADigit),
            (b"1e3", NotADigit),
            (b"100ms", NotADigit),
            (b"\xd9\xa1", NotADigit), // ARABIC-INDIC DIGIT ONE
        ];
        for (value, why) in cases {
            assert_eq!(parse(value), Err(why), "{value:?}");
        }
    }

    #[test]
    fn encodes_whole_milliseconds_rounded_down_at_least_one() {
        let cases = [
            (Duration::ZERO, "1"),
            (Duration::from_micros(999), "1"),
            (Duration::from_micros(1_999), "1"),
            (Duration::from_millis(250), "250"),
            (Duration::from_secs(u64::MAX), "9999999999"),
        ];
        for (remaining, expected) in cases {
            assert_eq!(encode(remaining), expected, "{remaining:?}");
        }
    }

    #[test]
    fn keeps_a_shorter_value_and_replaces_a_longer_one() {
        let name = HeaderName::from_static(CONNECT_TIMEOUT);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        headers.insert(&name, HeaderValue::from_static("5000"));
        set(&mut headers, name.clone(), deadline);
        assert_eq!(headers[&name], "5000");
        headers.insert(&name, HeaderValue::from_static("20000"));
        set(&mut headers, name.clone(), deadline);
        let sent = parse(headers[&name].as_bytes()).unwrap();
        assert!(
            sent <= Duration::from_secs(10) && sent > Duration::from_secs(9),
            "{sent:?}"
        );
        // Repeated and malformed values: one header, the shortest valid value.
        headers.insert(&name, HeaderValue::from_static("50000"));
        headers.append(&name, HeaderValue::from_static("1000"));
        headers.append(&name, HeaderValue::from_static("0"));
        headers.append(&name, HeaderValue::from_static("x"));
        set(&mut headers, name.clone(), deadline);
        assert_eq!(headers.get_all(&name).iter().count(), 1);
        assert_eq!(headers[&name], "1000");
        // A deadline that passed is sent as 1 ms, never 0 (which would mean "no deadline").
        set(&mut headers, name.clone(), Instant::now());
        assert_eq!(headers[&name], "1");
    }

    proptest! {
        #[test]
        fn accepted_values_are_1_to_10_digits_and_not_zero(
            value in proptest::collection::vec(prop::sample::select(&b"0123456789+- .e\xff"[..]), 0..14),
        ) {
            let spec = (1..=10).contains(&value.len())
                && value.iter().all(u8::is_ascii_digit)
                && value.iter().any(|&d| d != b'0');
            let parsed = parse(&value);
            prop_assert_eq!(parsed.is_ok(), spec, "{:?}", value);
            if let Ok(parsed) = parsed {
                let text = std::str::from_utf8(&value).unwrap();
                prop_assert_eq!(parsed, Duration::from_millis(text.parse().unwrap()));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(value in proptest::collection::vec(any::<u8>(), 0..24)) {
            let _ = parse(&value);
        }

        #[test]
        fn the_encoding_parses_back_to_at_most_what_remains(nanos in any::<u64>(), secs in any::<u64>()) {
            for remaining in [Duration::from_nanos(nanos), Duration::from_secs(secs)] {
                let value = encode(remaining);
                let parsed = parse(value.as_bytes()).unwrap();
                prop_assert!(parsed <= remaining.max(Duration::from_millis(1)), "{remaining:?} -> {value:?}");
                if remaining < Duration::from_millis(9_999_999_999) {
                    prop_assert!(remaining.saturating_sub(parsed) < Duration::from_millis(1),
                        "{remaining:?} -> {value:?}");
                }
            }
        }
    }
}
