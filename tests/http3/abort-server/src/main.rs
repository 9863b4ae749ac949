//! `tower_cancel::http3::serve` in a process built with `panic = "abort"`: any panic reachable
//! from the wire ends it. Prints `PORT CERT_HEX` (the self-signed certificate, DER) on its first
//! line, serves until its standard input closes, then exits 0.
//!
//! Routes: `/read` reads the request body and answers `read N` (`400` if the read failed);
//! anything else answers `hello`. Argument: the header read timeout in milliseconds (default
//! the server's).

use std::convert::Infallible;
use std::future::IntoFuture;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncReadExt;
use tower_cancel::http3::IncomingBody;

async fn handle(req: Request<IncomingBody>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/read" {
        return Ok(Response::new(Full::from("hello")));
    }
    Ok(match req.into_body().collect().await {
        Ok(body) => Response::new(Full::from(format!("read {}", body.to_bytes().len()))),
        Err(_) => {
            let mut response = Response::new(Full::from("bad body"));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let header_timeout = std::env::args().nth(1).map(|ms| ms.parse()).transpose()?;
    let names = vec!["localhost".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    let cert = certified.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse()?)?;
    let port = endpoint.local_addr()?.port();

    let mut serve = tower_cancel::http3::serve(endpoint, tower::service_fn(handle));
    if let Some(ms) = header_timeout {
        serve = serve.header_read_timeout(Duration::from_millis(ms));
    }
    let server = tokio::spawn(serve.into_future());

    let hex: String = cert.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{port} {hex}")?;
    stdout.flush()?;

    let mut stdin = tokio::io::stdin();
    let mut sink = [0u8; 64];
    while stdin.read(&mut sink).await? > 0 {}
    server.abort();
    Ok(())
}
