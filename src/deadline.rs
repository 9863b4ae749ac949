//! Deadlines: the `grpc-timeout` header and the timer that enforces a request's deadline.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderMap;
use tokio::time::{Instant, Sleep};

/// The header gRPC clients send their deadline in (gRPC over HTTP/2, "Requests").
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";

/// Why a `grpc-timeout` value was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// More than one `grpc-timeout` header.
    Repeated,
    /// No digits before the unit (this includes an empty value).
    NoDigits,
    /// More than the 8 digits the specification allows.
    TooManyDigits,
    /// Something other than ASCII digits before the unit (a sign, a space, a dot...).
    NotADigit,
    /// The last byte is not one of `H M S m u n`.
    UnknownUnit,
}

impl Malformed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Repeated => "more than one grpc-timeout header",
            Self::NoDigits => "no digits before the unit",
            Self::TooManyDigits => "more than 8 digits",
            Self::NotADigit => "not an ASCII digit before the unit",
            Self::UnknownUnit => "unit is not one of H M S m u n",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits, then one of `H M S m u n`.
///
/// Never panics, whatever the bytes: the largest value (99 999 999 hours) fits a `Duration`.
pub(crate) fn parse_grpc_timeout(value: &[u8]) -> Result<Duration, Malformed> {
    let Some((&unit, digits)) = value.split_last() else {
        return Err(Malformed::NoDigits);
    };
    if digits.is_empty() {
        return Err(Malformed::NoDigits);
    }
    if digits.len() > 8 {
        return Err(Malformed::TooManyDigits);
    }
    let mut amount: u64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return Err(Malformed::NotADigit);
        }
        // At most 8 digits: no overflow possible.
        amount = amount * 10 + u64::from(digit - b'0');
    }
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

/// How long a request may run, and from when a drop already counts as the deadline's doing.
///
/// Others enforce the same deadline and may drop the request a moment before the layer's
/// timer fires, so a drop within a slack before the deadline is recorded as
/// `DeadlineExceeded`:
///
/// * the server's own limit (`timeout`): 1 ms, tokio's timer resolution (it rounds sleeps up
///   to the next millisecond), so that another layer outside this one with the same limit,
///   whose timer started a little earlier, counts;
/// * the client's (`grpc-timeout`): 20 ms. The client resets the stream at its deadline, on a
///   clock that started before the request reached us; the reset arrives early by the time
///   the request took to arrive minus the time the reset took (queueing on either side, not
///   the network latency, which cancels out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TimeLimit {
    /// From the start to the deadline.
    pub(crate) after: Duration,
    /// From the start to the point after which a drop counts as the deadline's doing.
    pub(crate) timed_out_from: Duration,
}

pub(crate) const SERVER_SLACK: Duration = Duration::from_millis(1);
pub(crate) const CLIENT_SLACK: Duration = Duration::from_millis(20);

impl TimeLimit {
    /// A limit the server chose.
    pub(crate) fn server(after: Duration) -> Self {
        Self {
            after,
            timed_out_from: after.saturating_sub(SERVER_SLACK),
        }
    }

    /// A deadline the client chose and enforces itself.
    pub(crate) fn client(after: Duration) -> Self {
        Self {
            after,
            timed_out_from: after.saturating_sub(CLIENT_SLACK),
        }
    }

    /// Both limits at once: the earlier deadline, and the earlier point from which a drop
    /// counts (so a tie keeps the client's wider slack).
    pub(crate) fn earliest(a: Option<Self>, b: Option<Self>) -> Option<Self> {
        match (a, b) {
            (Some(a), Some(b)) => Some(Self {
                after: a.after.min(b.after),
                timed_out_from: a.timed_out_from.min(b.timed_out_from),
            }),
            (a, b) => a.or(b),
        }
    }
}

/// The `grpc-timeout` of a request, if it carries a well-formed one. A malformed one is
/// ignored with a `debug` event.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let mut values = headers.get_all(GRPC_TIMEOUT).iter();
    let value = values.next()?;
    let parsed = if values.next().is_some() {
        Err(Malformed::Repeated)
    } else {
        parse_grpc_timeout(value.as_bytes())
    };
    match parsed {
        Ok(timeout) => Some(timeout),
        Err(why) => {
            tracing::debug!(
                target: "tower_cancel",
                value = ?value,
                why = why.as_str(),
                "ignoring malformed grpc-timeout header",
            );
            None
        }
    }
}

/// The timer of a request's deadline, created on first use and reset when the deadline moves.
#[derive(Default)]
pub(crate) struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    /// Set when no timer could be created (no Tokio timer here): the deadline is not enforced.
    unavailable: bool,
}

impl Timer {
    /// Polls the timer for `deadline`; `Ready` once it has passed.
    pub(crate) fn poll_until(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if self.unavailable {
            return Poll::Pending;
        }
        let sleep = match &mut self.sleep {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => {
                // `sleep_until` panics outside a runtime with the time driver enabled. Report
                // that once for this request and leave the deadline unenforced.
                match catch_unwind(AssertUnwindSafe(|| tokio::time::sleep_until(deadline))) {
                    Ok(sleep) => self.sleep.insert(Box::pin(sleep)),
                    Err(_) => {
                        self.unavailable = true;
                        tracing::error!(
                            target: "tower_cancel",
                            "no Tokio timer is available (no runtime, or its time driver is \
                             disabled): the request's deadline is not enforced",
                        );
                        return Poll::Pending;
                    }
                }
            }
        };
        sleep.as_mut().poll(cx)
    }
}

impl fmt::Debug for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timer")
            .field("deadline", &self.sleep.as_ref().map(|s| s.deadline()))
            .finish()
    }
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
            assert_eq!(
                parse_grpc_timeout(value.as_bytes()),
                Ok(expected),
                "{value}"
            );
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
            assert_eq!(parse_grpc_timeout(value), Err(why), "{value:?}");
        }
    }

    #[test]
    fn header_lookup_ignores_repeated_and_malformed_values() {
        let mut headers = HeaderMap::new();
        assert_eq!(grpc_timeout(&headers), None);
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("250m"));
        assert_eq!(grpc_timeout(&headers), Some(Duration::from_millis(250)));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        assert_eq!(grpc_timeout(&headers), None);
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("1 S"));
        assert_eq!(grpc_timeout(&headers), None);
    }

    #[test]
    fn the_earliest_limit_keeps_the_widest_slack_that_applies() {
        let ms = Duration::from_millis;
        let (server, client) = (TimeLimit::server(ms(100)), TimeLimit::client(ms(100)));
        assert_eq!(server.timed_out_from, ms(99));
        assert_eq!(client.timed_out_from, ms(80));
        // `.timeout(100ms)` and `grpc-timeout: 100m` on one layer: the client's slack holds.
        let tie = TimeLimit::earliest(Some(server), Some(client));
        assert_eq!(tie, Some(client));
        // A server limit well before the client's deadline keeps its own 1 ms.
        let shorter = TimeLimit::earliest(Some(TimeLimit::server(ms(50))), Some(client));
        assert_eq!(
            shorter.map(|l| (l.after, l.timed_out_from)),
            Some((ms(50), ms(49)))
        );
        assert_eq!(TimeLimit::earliest(None, Some(client)), Some(client));
        assert_eq!(TimeLimit::earliest(None, None), None);
        // Limits shorter than their slack count from the start.
        assert_eq!(TimeLimit::client(ms(5)).timed_out_from, Duration::ZERO);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(value in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = parse_grpc_timeout(&value);
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
            let parsed = parse_grpc_timeout(value.as_bytes()).unwrap();
            prop_assert_eq!(parsed.as_nanos(), u128::from(amount) * nanos_per_unit);
        }

        #[test]
        fn accepted_values_are_digits_then_a_unit(
            // Mostly bytes that could appear in a timeout, so both outcomes are common.
            value in proptest::collection::vec(prop::sample::select(&b"0123456789HMSmun+- .\xff"[..]), 0..12),
        ) {
            if parse_grpc_timeout(&value).is_ok() {
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
                let _ = grpc_timeout(&headers);
            }
        }
    }
}
