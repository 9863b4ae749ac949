//! One request: the handler and then the response body, each raced against the client leaving.

use std::future::poll_fn;
use std::pin::pin;
use std::time::Duration;

use bytes::{Buf, Bytes};
use h3::error::Code;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use crate::event::TARGET;
use crate::http3::body::{IncomingBody, content_length};
use crate::http3::quic::{Connection, Gone, RecvHalf, SendHalf, Streams};
use crate::propagate::BoxError;
use crate::server::future::has_no_content;

type Resolver = h3::server::RequestResolver<Connection, Bytes>;
type Send = h3::server::RequestStream<SendHalf, Bytes>;

/// Serves one request stream to its end, or until the client leaves it.
///
/// The service's future is polled here, not spawned: when the client sends `STOP_SENDING` or
/// resets the request, or the connection is lost, the future (or the response body) is dropped
/// at once, which is what `CancellationLayer` turns into `Disconnected`. A finished response
/// waits (at most `linger`) for the client's acknowledgement, since closing the connection
/// would discard what was not delivered yet.
pub(crate) async fn serve_request<S, B>(
    resolver: Resolver,
    mut service: S,
    streams: Streams,
    linger: Duration,
) where
    S: Service<Request<IncomingBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let (head, stream) = match resolver.resolve_request().await {
        Ok(resolved) => resolved,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "HTTP/3 request refused before its headers were read");
            return;
        }
    };
    let gone = streams.take(stream.id());
    let refuser = gone.as_ref().map(|watch| watch.refuser());
    let mut gone = pin!(async move {
        match gone {
            Some(watch) => watch.gone().await,
            None => std::future::pending().await,
        }
    });
    let (mut send, mut recv): (Send, h3::server::RequestStream<RecvHalf, Bytes>) = stream.split();
    let (parts, ()) = head.into_parts();
    let method = parts.method.clone();
    let Ok(expected) = content_length(&parts.headers) else {
        // Malformed (RFC 9114 §4.1.2): a stream error, and no handler sees it.
        tracing::debug!(target: TARGET, "HTTP/3 request with an invalid content-length: stream reset");
        recv.stop_sending(Code::H3_MESSAGE_ERROR);
        send.stop_stream(Code::H3_MESSAGE_ERROR);
        return;
    };
    let body = IncomingBody::new(recv, expected, refuser);
    let request = Request::from_parts(parts, body);

    let response = async {
        poll_fn(|cx| service.poll_ready(cx)).await?;
        service.call(request).await
    };
    // The client's leaving is looked at first, so that a handler which sees it too (as its
    // body's error) is dropped rather than allowed to answer.
    let response = tokio::select! {
        biased;
        gone = &mut gone => return left(gone, "handler"),
        response = response => response.map_err(Into::<BoxError>::into),
    };
    let response = match response {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(target: TARGET, %error, "HTTP/3 service failed: stream reset");
            send.stop_stream(Code::H3_INTERNAL_ERROR);
            return;
        }
    };

    let (mut parts, body) = response.into_parts();
    strip_connection_headers(&mut parts.headers);
    // As over HTTP/1.1 and HTTP/2, these responses have no content whatever the body says.
    let bodiless = has_no_content(&method, parts.status);
    let head = Response::from_parts(parts, ());
    tokio::select! {
        biased;
        sent = send.send_response(head) => if let Err(error) = sent {
            tracing::debug!(target: TARGET, %error, "HTTP/3 response head not sent: stream reset");
            send.stop_stream(Code::H3_INTERNAL_ERROR);
            return;
        },
        gone = &mut gone => return left(gone, "body"),
    }

    let mut body = pin!(body);
    let mut ended = bodiless;
    while !ended {
        let frame = tokio::select! {
            biased;
            gone = &mut gone => return left(gone, "body"),
            frame = poll_fn(|cx| body.as_mut().poll_frame(cx)) => {
                frame.map(|frame| frame.map_err(Into::<BoxError>::into))
            }
        };
        let sent = match frame {
            None => break,
            Some(Err(error)) => {
                tracing::debug!(target: TARGET, %error, "HTTP/3 response body failed: stream reset");
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    if data.is_empty() {
                        continue;
                    }
                    tokio::select! {
                        biased;
                        gone = &mut gone => return left(gone, "body"),
                        sent = send.send_data(data) => sent,
                    }
                }
                Err(frame) => match frame.into_trailers() {
                    // Trailers end the response, whatever the body would yield next.
                    Ok(trailers) => {
                        ended = true;
                        tokio::select! {
                            biased;
                            gone = &mut gone => return left(gone, "body"),
                            sent = send.send_trailers(trailers) => sent,
                        }
                    }
                    Err(_) => continue,
                },
            },
        };
        if let Err(error) = sent {
            // The client stopped reading (its STOP_SENDING came in with the write) or the
            // connection is gone: the body is dropped here, unfinished.
            tracing::debug!(target: TARGET, %error, "HTTP/3 response body not sent");
            return;
        }
    }
    if let Err(error) = send.finish().await {
        tracing::debug!(target: TARGET, %error, "HTTP/3 response not finished");
        return;
    }
    // `finish` only queued the FIN: this task (which the connection waits for before closing)
    // ends when the client has acknowledged the whole response, or stopped it, or left.
    let _ = tokio::time::timeout(linger, gone).await;
}

/// The client left: what is dropped on return is the handler's future or the body.
fn left(gone: Gone, during: &'static str) {
    tracing::debug!(target: TARGET, ?gone, during, "HTTP/3 client left the request");
}

/// Removes the connection-specific header fields, which make an HTTP/3 message malformed
/// (RFC 9114 §4.2), as hyper does for HTTP/2: a handler written for HTTP/1.1 may set them
/// (`connection: close`, `keep-alive`), and so may a layer that answers for it.
fn strip_connection_headers(headers: &mut http::HeaderMap) {
    use http::header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE};
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    // `te` is allowed in requests only ("trailers"); a response has no use for it.
    headers.remove(TE);
}

#[cfg(test)]
mod tests {
    #[test]
    fn connection_specific_headers_are_stripped() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("te", "trailers"),
            ("content-type", "text/plain"),
        ] {
            headers.insert(name, value.parse().unwrap());
        }
        super::strip_connection_headers(&mut headers);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }
}
