//! HTTPS with HTTP/2 and HTTP/1.1 on one port (rustls, ALPN), the same `CancellationLayer` as
//! the other examples, and the vanished-client settings.
//!
//! Run with: cargo run --example https [CERT.pem KEY.pem]
//!
//! Without files it makes a self-signed certificate for `localhost` and `127.0.0.1`. Then,
//! from another terminal:
//!
//! ```text
//! curl -k --http2 --max-time 1 https://127.0.0.1:3443/slow     # cancelled: disconnected, handler
//! curl -k --http1.1 --max-time 1 https://127.0.0.1:3443/slow   # the same over HTTP/1.1
//! curl -k --http2 -N --max-time 1 https://127.0.0.1:3443/stream  # cancelled in the body phase
//! curl -k https://127.0.0.1:3443/fast                          # completes: nothing cancelled
//! ```
//!
//! Set `PORT` to listen elsewhere.

#[path = "https/tls.rs"]
mod tls;

use std::convert::Infallible;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tower::ServiceBuilder;
use tower_cancel::{CancellationLayer, Cancelled, RequestCancellation};

async fn handler(
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let rc =
        RequestCancellation::from_extensions(req.extensions()).expect("the layer is installed");
    println!("{:?} {} started", req.version(), req.uri().path());
    let body = match req.uri().path() {
        "/slow" => {
            let answer = match rc.run(tokio::time::sleep(Duration::from_secs(10))).await {
                Ok(()) => "done\n".to_owned(),
                Err(cancelled) => format!("{cancelled}\n"),
            };
            Full::new(Bytes::from(answer)).boxed()
        }
        "/stream" => {
            let ticks = futures_util::stream::unfold(0u32, |n| async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                Some((Ok(Frame::data(Bytes::from(format!("tick {n}\n")))), n + 1))
            });
            StreamBody::new(ticks).boxed()
        }
        _ => Full::new(Bytes::from_static(b"hello over TLS\n")).boxed(),
    };
    Ok(Response::new(body))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let files = match &args[..] {
        [cert, key] => Some((cert.as_path(), key.as_path())),
        [] => None,
        _ => {
            eprintln!("usage: cargo run --example https [CERT.pem KEY.pem]");
            std::process::exit(2);
        }
    };
    let (config, self_signed) = tls::server_config(files)?;
    if self_signed.is_some() {
        println!("using a self-signed certificate for localhost and 127.0.0.1 (curl -k)");
    }
    let svc = ServiceBuilder::new()
        .layer(CancellationLayer::new().on_cancel(|c: &Cancelled| {
            println!(
                "{} {} cancelled: {}, phase {}, after {:?}",
                c.method(),
                c.uri(),
                c.reason(),
                c.phase(),
                c.elapsed()
            );
        }))
        .service(tower::service_fn(handler));
    let port: u16 = std::env::var("PORT")
        .map_or(Ok(3443), |p| p.parse())
        .unwrap_or(3443);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!(
        "listening on https://{} (HTTP/2 and HTTP/1.1, ALPN)",
        listener.local_addr()?
    );
    tls::serve(listener, config, svc).await;
    Ok(())
}
