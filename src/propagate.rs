//! `PropagateLayer`: carries an inbound request's cancellation and deadline to the outbound
//! calls made on its behalf.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ends_body;
use crate::deadline::{GRPC_TIMEOUT, parse_grpc_timeout};
use crate::{CancelReason, Cancelled, RequestCancellation};

/// The error type of [`Propagate`] (the same as `tower::BoxError`): the inner client's error, or
/// [`InboundCancelled`].
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// A [`Layer`] for outbound clients (hyper-util's `Client`, a tonic `Channel`, any tower
/// `Service` of `http::Request`s) that carries the inbound request's cancellation and
/// deadline to the calls made on its behalf, as Go's `context` and gRPC deadline propagation
/// do.
///
/// For each outbound request it finds the inbound [`RequestCancellation`]: the one given to
/// [`PropagateLayer::from_inbound`], or else one in the outbound request's extensions (insert
/// a clone there; a tonic `Request`'s extensions become the HTTP request's). Then:
///
/// * **Deadline.** If the inbound request has a deadline, the outbound request carries a
///   `grpc-timeout` header with the time that remains: never longer (rounded down), never
///   below one unit (`1n` once it has passed), and never longer than a `grpc-timeout` the
///   request already had. No deadline, no header. A server behind a
///   [`CancellationLayer`](crate::CancellationLayer) with
///   [`grpc_timeout(true)`](crate::CancellationLayer::grpc_timeout), and tonic, enforce it.
/// * **Cancellation.** When the inbound request is cancelled (its client left, the server shuts
///   down, its deadline passed, or the token was cancelled), the outbound call is abandoned:
///   its response future, or its response body if the call already answered, is dropped, so
///   the downstream server sees `RST_STREAM` (HTTP/2) or a closed connection (HTTP/1.1) and
///   its own scope is cancelled. The call then fails with [`InboundCancelled`], which says why.
///
/// Without an inbound `RequestCancellation` the request passes through unchanged. The time
/// that remains is measured when the call is made (`call`), not when its headers are written:
/// time the call then spends waiting for a connection is not taken off.
///
/// A handler that is dropped (its client left) drops its outbound calls anyway; this layer
/// matters for the handler that keeps running: on shutdown, at its deadline, on an explicit
/// cancel, or for work it spawned while the request is still running (once the request
/// completes, its token never fires). Do not put it in front of calls that must finish even
/// if the client leaves, such as those of a [`detached`](crate::CancellationLayer::detached)
/// payment route: there the client leaving still cancels the request, and the layer would
/// abandon the call.
///
/// The gRPC status mapping needs the crate's `tonic` feature; without it a tonic client reports
/// the abandoned call as `UNKNOWN` with this error's message.
///
/// # Example
///
/// ```no_run
/// use hyper_util::client::legacy::Client;
/// use hyper_util::rt::TokioExecutor;
/// use tower::{Layer, Service, ServiceExt};
/// use tower_cancel::{InboundCancelled, PropagateLayer, RequestCancellation};
///
/// async fn handler(req: http::Request<hyper::body::Incoming>) -> Result<String, tower::BoxError> {
///     let inbound = RequestCancellation::from_extensions(req.extensions())?;
///     let client = Client::builder(TokioExecutor::new()).build_http::<String>();
///     // In a real service, build the client once and add the layer per call (it is cheap).
///     let mut backend = PropagateLayer::from_inbound(inbound).layer(client);
///     let call = http::Request::get("http://backend.internal/items").body(String::new())?;
///     match backend.ready().await?.call(call).await {
///         Ok(response) => Ok(format!("backend answered {}", response.status())),
///         Err(error) => match error.downcast_ref::<InboundCancelled>() {
///             Some(why) => Err(format!("gave up on the backend: {}", why.reason()).into()),
///             None => Err(error),
///         },
///     }
/// }
/// ```
#[derive(Clone, Debug, Default)]
pub struct PropagateLayer {
    inbound: Option<RequestCancellation>,
}

impl PropagateLayer {
    /// A layer that takes the inbound [`RequestCancellation`] from each outbound request's
    /// extensions.
    pub fn new() -> Self {
        Self::default()
    }

    /// A layer bound to one inbound request: every call through it propagates `inbound`.
    pub fn from_inbound(inbound: RequestCancellation) -> Self {
        Self {
            inbound: Some(inbound),
        }
    }
}

impl<S> Layer<S> for PropagateLayer {
    type Service = Propagate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Propagate {
            inner,
            inbound: self.inbound.clone(),
        }
    }
}

/// The outbound client behind a [`PropagateLayer`].
#[derive(Clone, Debug)]
pub struct Propagate<S> {
    inner: S,
    inbound: Option<RequestCancellation>,
}

impl<S> Propagate<S> {
    /// The inner client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner client, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner client.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Propagate<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<PropagateBody<ResBody>>;
    type Error = BoxError;
    type Future = PropagateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let inbound = self
            .inbound
            .clone()
            .or_else(|| req.extensions().get::<RequestCancellation>().cloned());
        if let Some(deadline) = inbound.as_ref().and_then(RequestCancellation::deadline) {
            set_grpc_timeout(req.headers_mut(), deadline);
        }
        PropagateFuture {
            inner: Some(self.inner.call(req)),
            watch: Watch::new(inbound),
        }
    }
}

/// What a call watches: the inbound request's token, until the call has ended.
struct Watch {
    inbound: RequestCancellation,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Watch {
    fn new(inbound: Option<RequestCancellation>) -> Option<Self> {
        inbound.map(|inbound| Self {
            cancelled: Box::pin(inbound.token().clone().cancelled_owned()),
            inbound,
        })
    }

    /// The inbound request's cancellation, once it happened.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<InboundCancelled> {
        self.cancelled
            .as_mut()
            .poll(cx)
            .map(|()| InboundCancelled::new(self.inbound.record()))
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("inbound", &self.inbound)
            .finish_non_exhaustive()
    }
}

pin_project! {
    /// Response future of [`Propagate`]: the outbound call, abandoned if the inbound request
    /// is cancelled first.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct PropagateFuture<F> {
        #[pin]
        inner: Option<F>,
        watch: Option<Watch>,
    }
}

impl<F, B, E> Future for PropagateFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<PropagateBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The inbound request first: once it is cancelled, nobody wants the answer.
        if let Some(watch) = this.watch.as_mut() {
            if let Poll::Ready(cancelled) = watch.poll(cx) {
                // Dropping the call is what tells the downstream server.
                this.inner.set(None);
                *this.watch = None;
                return Poll::Ready(Err(Box::new(cancelled)));
            }
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(Err("PropagateFuture polled after it completed".into()));
        };
        let result = std::task::ready!(inner.poll(cx));
        this.inner.set(None);
        let watch = this.watch.take();
        Poll::Ready(match result {
            Ok(response) => Ok(response.map(|body| PropagateBody {
                inner: Some(body),
                watch,
            })),
            Err(error) => Err(error.into()),
        })
    }
}

pin_project! {
    /// Response body of [`Propagate`]: the outbound response's body, dropped (and ended with
    /// an [`InboundCancelled`] error) if the inbound request is cancelled while it streams.
    #[derive(Debug)]
    pub struct PropagateBody<B> {
        #[pin]
        inner: Option<B>,
        watch: Option<Watch>,
    }
}

impl<B> Body for PropagateBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Some(watch) = this.watch.as_mut() {
            if let Poll::Ready(cancelled) = watch.poll(cx) {
                this.inner.set(None);
                *this.watch = None;
                return Poll::Ready(Some(Err(Box::new(cancelled))));
            }
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            return Poll::Ready(None);
        };
        let frame = std::task::ready!(inner.poll_frame(cx));
        let over = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(frame)) => this
                .inner
                .as_ref()
                .as_pin_ref()
                .is_some_and(|body| ends_body(frame, &*body)),
        };
        if over {
            // The call is over: a later cancellation of the inbound request changes nothing.
            *this.watch = None;
        }
        if frame.is_none() {
            this.inner.set(None);
        }
        Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// How [`InboundCancelled`] and its gRPC status begin.
const ABANDONED: &str = "the outbound call was abandoned: the inbound request was cancelled";

/// An outbound call was abandoned because the inbound request it served was cancelled.
///
/// The error of a [`Propagate`] client's future or response body, boxed: find it with
/// `error.downcast_ref::<InboundCancelled>()`. With the `tonic` feature, a tonic client behind
/// the layer reports it as the reason's status (`CANCELLED`, or `UNAVAILABLE` on shutdown, or
/// `DEADLINE_EXCEEDED`), with this error's message.
#[derive(Debug)]
pub struct InboundCancelled {
    cancelled: Cancelled,
    /// What tonic finds in the source chain.
    #[cfg(feature = "tonic")]
    status: tonic::Status,
}

impl InboundCancelled {
    fn new(cancelled: Cancelled) -> Self {
        #[cfg(feature = "tonic")]
        let status = {
            let code = tonic::Status::from(cancelled.reason()).code();
            tonic::Status::new(code, format!("{ABANDONED} ({})", cancelled.reason()))
        };
        Self {
            cancelled,
            #[cfg(feature = "tonic")]
            status,
        }
    }

    /// Why the inbound request was cancelled.
    pub fn reason(&self) -> CancelReason {
        self.cancelled.reason()
    }

    /// The inbound request's cancellation record.
    pub fn cancelled(&self) -> &Cancelled {
        &self.cancelled
    }
}

impl fmt::Display for InboundCancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ABANDONED} ({})", self.cancelled)
    }
}

impl Error for InboundCancelled {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "tonic")]
        return Some(&self.status);
        #[cfg(not(feature = "tonic"))]
        None
    }
}

/// Sets `grpc-timeout` to the time left until `deadline` (measured now, when the call is
/// made), or to the shortest valid `grpc-timeout` the request already carries if that is
/// shorter. Always one header: a server takes repeated ones as malformed.
fn set_grpc_timeout(headers: &mut HeaderMap, deadline: Instant) {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let already = headers
        .get_all(GRPC_TIMEOUT)
        .iter()
        .filter_map(|value| parse_grpc_timeout(value.as_bytes()).ok())
        .min();
    let timeout = already.map_or(remaining, |already| already.min(remaining));
    headers.insert(GRPC_TIMEOUT, encode_grpc_timeout(timeout));
}

/// `remaining` as a `grpc-timeout` value: in the finest unit whose count fits the format's 8
/// digits, rounded down (never more time than remains), and at least 1 (`1n` for none).
pub(crate) fn encode_grpc_timeout(remaining: Duration) -> HeaderValue {
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
    use proptest::prelude::*;

    use super::*;

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
            assert_eq!(encode_grpc_timeout(remaining), expected, "{remaining:?}");
        }
    }

    #[test]
    fn keeps_a_shorter_timeout_and_replaces_a_longer_one() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut headers = HeaderMap::new();
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("5S"));
        set_grpc_timeout(&mut headers, deadline);
        let kept = parse_grpc_timeout(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert_eq!(kept, Duration::from_secs(5));
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("20S"));
        set_grpc_timeout(&mut headers, deadline);
        let set = parse_grpc_timeout(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert!(
            set <= Duration::from_secs(10) && set > Duration::from_secs(9),
            "{set:?}"
        );
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("garbage"));
        set_grpc_timeout(&mut headers, deadline);
        assert!(parse_grpc_timeout(headers[GRPC_TIMEOUT].as_bytes()).is_ok());
        // Repeated headers become one: the shortest valid value, or the time that remains.
        headers.insert(GRPC_TIMEOUT, HeaderValue::from_static("50S"));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("1S"));
        headers.append(GRPC_TIMEOUT, HeaderValue::from_static("x"));
        set_grpc_timeout(&mut headers, deadline);
        assert_eq!(headers.get_all(GRPC_TIMEOUT).iter().count(), 1);
        let set = parse_grpc_timeout(headers[GRPC_TIMEOUT].as_bytes()).unwrap();
        assert_eq!(set, Duration::from_secs(1));
    }

    /// The handle of an inbound request, armed, for a layer with no callbacks.
    fn inbound() -> RequestCancellation {
        use std::sync::Arc;

        use http::{Method, Uri};

        use crate::config::Config;
        use crate::hooks::Bound;
        use crate::scope::Scope;

        let config = Arc::new(Config::new());
        let scope = Scope::new(
            Method::GET,
            Uri::from_static("/"),
            Bound::capture(&config),
            None,
        );
        RequestCancellation::new(scope)
    }

    /// A body that has ended is not turned into an error by a later cancellation.
    #[test]
    fn a_cancellation_after_the_body_ended_changes_nothing() {
        use std::pin::pin;
        use std::task::Waker;

        use bytes::Bytes;
        use http_body_util::Full;

        let inbound = inbound();
        let mut body = pin!(PropagateBody {
            inner: Some(Full::new(Bytes::from_static(b"all of it"))),
            watch: Watch::new(Some(inbound.clone())),
        });
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(Some(Ok(_)))
        ));
        assert!(body.is_end_stream());
        inbound.token().cancel();
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }

    /// A body whose last frame is a trailers frame (as gRPC's are) has ended with it, even if
    /// it never says `is_end_stream`: the consumer stops there, and a later cancellation does
    /// not turn the finished call into an error.
    #[test]
    fn a_body_ends_with_its_trailers() {
        use std::pin::pin;
        use std::task::Waker;

        use bytes::Bytes;
        use http_body_util::StreamBody;

        let inbound = inbound();
        let frames: [Result<Frame<Bytes>, std::convert::Infallible>; 2] = [
            Ok(Frame::data(Bytes::from_static(b"message"))),
            Ok(Frame::trailers(HeaderMap::new())),
        ];
        let mut body = pin!(PropagateBody {
            inner: Some(StreamBody::new(futures_util::stream::iter(frames))),
            watch: Watch::new(Some(inbound.clone())),
        });
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..2 {
            assert!(matches!(
                body.as_mut().poll_frame(&mut cx),
                Poll::Ready(Some(Ok(_)))
            ));
        }
        assert!(!body.is_end_stream(), "the stream itself never says so");
        inbound.token().cancel();
        assert!(matches!(
            body.as_mut().poll_frame(&mut cx),
            Poll::Ready(None)
        ));
    }

    proptest! {
        #[test]
        fn the_encoding_parses_back_to_at_most_what_remains(nanos in any::<u64>(), secs in any::<u64>()) {
            for remaining in [Duration::from_nanos(nanos), Duration::from_secs(secs)] {
                let value = encode_grpc_timeout(remaining);
                let parsed = parse_grpc_timeout(value.as_bytes()).unwrap();
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
