//! Deadlines that callers send in request headers, one convention per module:
//!
//! * `grpc-timeout` (gRPC over HTTP/2): digits and a unit, [`grpc`];
//! * `connect-timeout-ms` (Connect RPC) and `x-envoy-expected-rq-timeout-ms` (Envoy, and so
//!   Istio, to the upstream it routes to): a whole number of milliseconds, [`millis`].
//!
//! Each is parsed on the way in (a server's deadline, when its layer honours the convention)
//! and encoded on the way out ([`PropagateLayer`](crate::PropagateLayer): the time that
//! remains, for a downstream call). A malformed value is ignored, never an error: one `debug`
//! event says which header and why.

use std::fmt;
use std::time::Duration;

use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, Uri};
use tokio::time::Instant;

use crate::event::TARGET;

pub(crate) mod grpc;
pub(crate) mod millis;

/// The deadline conventions a layer honours, as a set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Conventions(u8);

impl Conventions {
    pub(crate) const GRPC: Self = Self(1);
    pub(crate) const CONNECT: Self = Self(1 << 1);
    pub(crate) const ENVOY: Self = Self(1 << 2);

    /// `self` with `convention` turned on or off.
    pub(crate) fn set(self, convention: Self, on: bool) -> Self {
        if on {
            Self(self.0 | convention.0)
        } else {
            Self(self.0 & !convention.0)
        }
    }

    pub(crate) fn contains(self, convention: Self) -> bool {
        self.0 & convention.0 == convention.0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The shortest well-formed deadline among the headers of the honoured conventions.
    pub(crate) fn shortest(self, headers: &HeaderMap) -> Option<Duration> {
        let mut shortest: Option<Duration> = None;
        let mut consider = |found: Option<Duration>| {
            if let Some(found) = found {
                shortest = Some(shortest.map_or(found, |s| s.min(found)));
            }
        };
        if self.contains(Self::GRPC) {
            consider(grpc::from_headers(headers));
        }
        if self.contains(Self::CONNECT) {
            consider(lookup(headers, millis::CONNECT_TIMEOUT, millis::parse));
        }
        if self.contains(Self::ENVOY) {
            consider(lookup(
                headers,
                millis::ENVOY_EXPECTED_TIMEOUT,
                millis::parse,
            ));
        }
        shortest
    }
}

/// The header Connect clients name their protocol version in (a Connect `GET` may carry
/// `connect=v1` in its query instead).
const CONNECT_PROTOCOL_VERSION: &str = "connect-protocol-version";

/// Writes the time left until `deadline` into an outbound request, in the convention the
/// request speaks: `grpc-timeout` for gRPC (a `content-type` of `application/grpc…`, gRPC-Web
/// included), `connect-timeout-ms` for Connect (a `connect-protocol-version` header, a
/// `content-type` of `application/connect+…`, or `connect=v1` in the query), and otherwise
/// `other` in milliseconds, or nothing if no `other` header was configured: a plain HTTP
/// callee (a third party's API) has no known convention, and a header it does not expect
/// would leak the inbound deadline to it and could change how it behaves.
pub(crate) fn propagate(
    headers: &mut HeaderMap,
    uri: &Uri,
    deadline: Instant,
    other: Option<&HeaderName>,
) {
    let content_type = headers
        .get(CONTENT_TYPE)
        .map_or(&b""[..], |value| value.as_bytes());
    // Media types are case-insensitive.
    let starts_with = |prefix: &[u8]| {
        content_type
            .get(..prefix.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
    };
    if starts_with(b"application/grpc") {
        grpc::set(headers, deadline);
    } else if headers.contains_key(CONNECT_PROTOCOL_VERSION)
        || starts_with(b"application/connect+")
        || uri
            .query()
            .is_some_and(|query| query.split('&').any(|pair| pair == "connect=v1"))
    {
        millis::set(
            headers,
            HeaderName::from_static(millis::CONNECT_TIMEOUT),
            deadline,
        );
    } else if let Some(other) = other {
        millis::set(headers, other.clone(), deadline);
    }
}

/// Why a deadline header's value was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// The header appears more than once.
    Repeated,
    /// No digits (this includes an empty value, and for `grpc-timeout` a lone unit).
    NoDigits,
    /// More digits than the convention allows: 8 for `grpc-timeout`, 10 for milliseconds.
    TooManyDigits,
    /// Something other than ASCII digits (a sign, a space, a dot...), before the unit if any.
    NotADigit,
    /// `grpc-timeout`: the last byte is not one of `H M S m u n`.
    UnknownUnit,
    /// A millisecond header of `0`: Connect requires a positive number, and Envoy's route
    /// timeout of 0 means "none".
    Zero,
}

impl Malformed {
    fn as_str(self) -> &'static str {
        match self {
            Self::Repeated => "the header is repeated",
            Self::NoDigits => "no digits",
            Self::TooManyDigits => "more digits than the convention allows",
            Self::NotADigit => "not an ASCII digit",
            Self::UnknownUnit => "unit is not one of H M S m u n",
            Self::Zero => "zero is not a deadline",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value of header `name` as `parse` reads it, if there is exactly one and it is
/// well-formed; otherwise `None`, with a `debug` event for a value that was there but ignored.
pub(crate) fn lookup(
    headers: &HeaderMap,
    name: &'static str,
    parse: fn(&[u8]) -> Result<Duration, Malformed>,
) -> Option<Duration> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    let parsed = if values.next().is_some() {
        Err(Malformed::Repeated)
    } else {
        parse(value.as_bytes())
    };
    match parsed {
        Ok(timeout) => Some(timeout),
        Err(why) => {
            tracing::debug!(
                target: TARGET,
                header = name,
                value = ?value,
                why = why.as_str(),
                "ignoring a malformed deadline header",
            );
            None
        }
    }
}

/// The digits of `value` as a number: 1 to `max` ASCII digits, nothing else.
fn digits(value: &[u8], max: usize) -> Result<u64, Malformed> {
    if value.is_empty() {
        return Err(Malformed::NoDigits);
    }
    if value.len() > max {
        return Err(Malformed::TooManyDigits);
    }
    debug_assert!(max <= 19, "u64 holds any 19 digits");
    value.iter().try_fold(0u64, |amount, &digit| {
        if digit.is_ascii_digit() {
            Ok(amount * 10 + u64::from(digit - b'0'))
        } else {
            Err(Malformed::NotADigit)
        }
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn the_shortest_honoured_deadline_wins() {
        let all = Conventions::default()
            .set(Conventions::GRPC, true)
            .set(Conventions::CONNECT, true)
            .set(Conventions::ENVOY, true);
        let ms = Duration::from_millis;
        let every = headers(&[
            ("grpc-timeout", "300m"),
            ("connect-timeout-ms", "100"),
            ("x-envoy-expected-rq-timeout-ms", "200"),
        ]);
        assert_eq!(all.shortest(&every), Some(ms(100)));
        let no_connect = all.set(Conventions::CONNECT, false);
        assert_eq!(no_connect.shortest(&every), Some(ms(200)));
        assert_eq!(
            Conventions::GRPC.shortest(&every),
            Some(ms(300)),
            "only the honoured conventions count"
        );
        assert_eq!(Conventions::default().shortest(&every), None);
        // A malformed value drops out; the others still count.
        let malformed = headers(&[
            ("grpc-timeout", "300m"),
            ("connect-timeout-ms", "0"),
            ("x-envoy-expected-rq-timeout-ms", "2e2"),
        ]);
        assert_eq!(all.shortest(&malformed), Some(ms(300)));
        assert!(Conventions::default().is_empty());
        assert!(!all.is_empty());
    }

    #[test]
    fn outbound_requests_get_the_header_of_their_convention() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let custom = HeaderName::from_static("x-request-timeout-ms");
        // (content-type, extra header, uri, configured header) → the one header written, if any
        type Case = (
            &'static str,
            Option<(&'static str, &'static str)>,
            &'static str,
            bool,
            &'static str,
        );
        let cases: [Case; 10] = [
            ("application/grpc", None, "/svc/M", false, "grpc-timeout"),
            (
                "application/grpc+proto",
                None,
                "/svc/M",
                true,
                "grpc-timeout",
            ),
            (
                "application/grpc-web+proto",
                None,
                "/svc/M",
                true,
                "grpc-timeout",
            ),
            ("Application/gRPC", None, "/svc/M", true, "grpc-timeout"),
            (
                "application/json",
                Some(("connect-protocol-version", "1")),
                "/svc/M",
                true,
                "connect-timeout-ms",
            ),
            (
                "application/connect+proto",
                None,
                "/svc/M",
                false,
                "connect-timeout-ms",
            ),
            (
                "",
                None,
                "/svc/M?connect=v1&encoding=json&message=%7B%7D",
                true,
                "connect-timeout-ms",
            ),
            ("application/json", None, "/items?xconnect=v1", false, ""),
            (
                "application/json",
                None,
                "/items",
                true,
                "x-request-timeout-ms",
            ),
            ("", None, "/items", false, ""),
        ];
        for (content_type, extra, uri, configured, written) in cases {
            let mut headers = HeaderMap::new();
            if !content_type.is_empty() {
                headers.insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
            }
            if let Some((name, value)) = extra {
                headers.insert(name, http::HeaderValue::from_static(value));
            }
            let uri: Uri = uri.parse().unwrap();
            propagate(&mut headers, &uri, deadline, configured.then_some(&custom));
            let deadline_headers: Vec<_> =
                ["grpc-timeout", "connect-timeout-ms", "x-request-timeout-ms"]
                    .into_iter()
                    .filter(|name| headers.contains_key(*name))
                    .collect();
            let written: &[&str] = if written.is_empty() { &[] } else { &[written] };
            assert_eq!(deadline_headers, written, "{content_type} {uri}");
        }
    }

    #[test]
    fn a_repeated_header_is_ignored() {
        let repeated = headers(&[("connect-timeout-ms", "100"), ("connect-timeout-ms", "100")]);
        assert_eq!(
            lookup(&repeated, millis::CONNECT_TIMEOUT, millis::parse),
            None
        );
    }
}
