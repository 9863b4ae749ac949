//! The HTTP/3 scenarios' server and client: `tower_cancel::http3::serve` on a quinn endpoint at
//! 127.0.0.1:0 with a self-signed certificate, and one connection of the `h3` crate's client.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tower::Service;
use tower_cancel::http3::IncomingBody;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type H3Send = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// Serves `service` over HTTP/3 and returns one client connection to it.
pub(crate) async fn serve_and_connect<S, B>(service: S) -> (SocketAddr, H3Send)
where
    S: Service<Request<IncomingBody>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("a self-signed certificate");
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der()).expect("a key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("a server config");
    server.alpn_protocols = vec![b"h3".to_vec()];
    let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).expect("QUIC TLS");
    let server = quinn::ServerConfig::with_crypto(Arc::new(server));
    let endpoint = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("an address"))
        .expect("a UDP socket");
    let addr = endpoint.local_addr().expect("bound");
    tokio::spawn(tower_cancel::http3::serve(endpoint, service).into_future());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("a trustable certificate");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"h3".to_vec()];
    let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).expect("QUIC TLS");
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")).expect("a socket");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("a connection")
        .await
        .expect("the QUIC handshake");
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .expect("the HTTP/3 connection");
    tokio::spawn(async move {
        // Keeps the endpoint alive with the connection.
        let _endpoint = endpoint;
        std::future::poll_fn(|cx| driver.poll_close(cx)).await
    });
    (addr, send)
}
