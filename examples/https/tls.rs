//! TLS for the `https` example and `tests/tls.rs`: a rustls server configuration (ring as the
//! crypto provider, ALPN `h2` then `http/1.1`) from PEM files or a self-signed certificate, and
//! a connection loop that serves each connection with the HTTP version ALPN chose.

use std::convert::Infallible;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::Service;

/// A server configuration for the certificate chain and key in `cert` and `key` (PEM), or,
/// without them, for a self-signed certificate for `localhost` and `127.0.0.1`, returned in
/// PEM too so that a client can trust it.
pub(crate) fn server_config(
    files: Option<(&Path, &Path)>,
) -> io::Result<(Arc<ServerConfig>, Option<String>)> {
    let (chain, key, self_signed) = match files {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(io::Error::other)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(io::Error::other)?;
            (chain, key, None)
        }
        None => {
            let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
            let certified = rcgen::generate_simple_self_signed(names).map_err(io::Error::other)?;
            let pem = certified.cert.pem();
            let key = PrivateKeyDer::try_from(certified.signing_key.serialize_der())
                .map_err(io::Error::other)?;
            (vec![certified.cert.der().clone()], key, Some(pem))
        }
    };
    // The provider is chosen here, not installed process-wide: ring builds with a C compiler
    // alone.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(io::Error::other)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), self_signed))
}

/// Accepts connections on `listener` forever: TLS handshake, then HTTP/2 or HTTP/1.1 as ALPN
/// chose, with the vanished-client settings of the other examples.
pub(crate) async fn serve<S, B>(listener: TcpListener, config: Arc<ServerConfig>, svc: S)
where
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = TlsAcceptor::from(config);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = tower_cancel::tcp::detect_vanished(&stream, Duration::from_secs(10));
        let acceptor = acceptor.clone();
        let svc = TowerToHyperService::new(svc.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return; // a failed handshake (a client that does not trust the certificate)
            };
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(5));
            let builder = if h2 {
                builder.http2_only()
            } else {
                builder.http1_only()
            };
            let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
        });
    }
}
