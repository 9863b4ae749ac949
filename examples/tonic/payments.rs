// A second service beside `reports.rs`, written out by hand the same way (what `tonic-build`
// 0.14 generates, so no `protoc` is needed), for the examples of one `CancellationLayer` per
// service: `Server::builder().add_service(layer.layer(PaymentsServer::new(..)))`.
//
// ```proto
// syntax = "proto3";
// package payments;
//
// service Payments {
//   // Takes `millis` milliseconds to settle, then answers.
//   rpc Pay(PayRequest) returns (Receipt);
// }
//
// message PayRequest { string id = 1; uint32 millis = 2; }
// message Receipt { string text = 1; }
// ```
//
// Plain comments and no inner attributes, as in `reports.rs`: doc tests `include!` this file.
// Modules that use it add `#[allow(dead_code, unreachable_pub)]`.

#[derive(Clone, PartialEq, prost::Message)]
pub struct PayRequest {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(uint32, tag = "2")]
    pub millis: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    #[prost(string, tag = "1")]
    pub text: String,
}

const PAY: &str = "/payments.Payments/Pay";

pub mod payments_server {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tonic::server::{Grpc, NamedService, UnaryService};
    use tonic::{Request, Response, Status};
    use tonic_prost::ProstCodec;

    use super::{PAY, PayRequest, Receipt};

    type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

    /// The service's methods, implemented by the application.
    #[tonic::async_trait]
    pub trait Payments: Send + Sync + 'static {
        async fn pay(&self, request: Request<PayRequest>) -> Result<Response<Receipt>, Status>;
    }

    /// The generated server: routes each call to its method.
    #[derive(Debug)]
    pub struct PaymentsServer<T> {
        inner: Arc<T>,
    }

    impl<T> PaymentsServer<T> {
        pub fn new(inner: T) -> Self {
            Self {
                inner: Arc::new(inner),
            }
        }
    }

    impl<T> Clone for PaymentsServer<T> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
            }
        }
    }

    impl<T> NamedService for PaymentsServer<T> {
        const NAME: &'static str = "payments.Payments";
    }

    struct PaySvc<T>(Arc<T>);

    impl<T: Payments> UnaryService<PayRequest> for PaySvc<T> {
        type Response = Receipt;
        type Future = BoxFuture<Result<Response<Receipt>, Status>>;

        fn call(&mut self, request: Request<PayRequest>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move { inner.pay(request).await })
        }
    }

    impl<T, B> tower::Service<http::Request<B>> for PaymentsServer<T>
    where
        T: Payments,
        B: http_body::Body + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<B>) -> Self::Future {
            let inner = self.inner.clone();
            match req.uri().path() {
                PAY => Box::pin(async move {
                    let mut grpc = Grpc::new(ProstCodec::default());
                    Ok(grpc.unary(PaySvc(inner), req).await)
                }),
                _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
            }
        }
    }
}

pub mod payments_client {
    use http::uri::PathAndQuery;
    use tonic::client::GrpcService;
    use tonic::codegen::{Body, Bytes, StdError};
    use tonic::{IntoRequest, Response, Status};
    use tonic_prost::ProstCodec;

    use super::{PAY, PayRequest, Receipt};

    /// The generated client.
    #[derive(Debug, Clone)]
    pub struct PaymentsClient<T> {
        inner: tonic::client::Grpc<T>,
    }

    impl<T> PaymentsClient<T>
    where
        T: GrpcService<tonic::body::Body>,
        T::Error: Into<StdError>,
        T::ResponseBody: Body<Data = Bytes> + Send + 'static,
        <T::ResponseBody as Body>::Error: Into<StdError> + Send,
    {
        pub fn new(inner: T) -> Self {
            Self {
                inner: tonic::client::Grpc::new(inner),
            }
        }

        pub async fn pay(
            &mut self,
            request: impl IntoRequest<PayRequest>,
        ) -> Result<Response<Receipt>, Status> {
            self.inner.ready().await.map_err(|e| {
                Status::unavailable(format!("service not ready: {}", Into::<StdError>::into(e)))
            })?;
            let path = PathAndQuery::from_static(PAY);
            self.inner
                .unary(request.into_request(), path, ProstCodec::default())
                .await
        }
    }
}
