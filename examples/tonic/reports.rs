// What `tonic-build` generates from the service below, written out by hand so that the
// example and the tests build without `protoc`. In a real project, generate it:
//
// ```proto
// syntax = "proto3";
// package reports;
//
// service Reports {
//   // Works for `millis` milliseconds, then answers.
//   rpc Generate(ReportRequest) returns (Report);
//   // Sends `count` ticks (0: forever), one every `interval_millis`.
//   rpc Watch(WatchRequest) returns (stream Tick);
// }
//
// message ReportRequest { string name = 1; uint32 millis = 2; }
// message Report { string text = 1; }
// message WatchRequest { uint32 interval_millis = 1; uint32 count = 2; }
// message Tick { uint64 n = 1; }
// ```
//
// Same shape as tonic-build 0.14's output (messages at the top, `reports_server` with an
// `#[async_trait]` trait and `ReportsServer`, `reports_client` with `ReportsClient<T>`), so that
// code written against it works against generated code. Nothing here knows about
// cancellation: the layer wraps the generated server from outside.
//
// Plain comments, not `//!`, and no inner attributes: the README's tonic snippet `include!`s
// this file. Modules that use it add `#[allow(dead_code, unreachable_pub)]`.

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReportRequest {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub millis: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Report {
    #[prost(string, tag = "1")]
    pub text: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchRequest {
    #[prost(uint32, tag = "1")]
    pub interval_millis: u32,
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Tick {
    #[prost(uint64, tag = "1")]
    pub n: u64,
}

const GENERATE: &str = "/reports.Reports/Generate";
const WATCH: &str = "/reports.Reports/Watch";

pub mod reports_server {
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use futures_util::Stream;
    use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
    use tonic::{Request, Response, Status};
    use tonic_prost::ProstCodec;

    use super::{GENERATE, Report, ReportRequest, Tick, WATCH, WatchRequest};

    type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

    /// The service's methods, implemented by the application.
    #[tonic::async_trait]
    pub trait Reports: Send + Sync + 'static {
        /// The stream `watch` answers with.
        type WatchStream: Stream<Item = Result<Tick, Status>> + Send + 'static;

        async fn generate(
            &self,
            request: Request<ReportRequest>,
        ) -> Result<Response<Report>, Status>;

        async fn watch(
            &self,
            request: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status>;
    }

    /// The generated server: routes each call to its method.
    #[derive(Debug)]
    pub struct ReportsServer<T> {
        inner: Arc<T>,
    }

    impl<T> ReportsServer<T> {
        pub fn new(inner: T) -> Self {
            Self {
                inner: Arc::new(inner),
            }
        }
    }

    impl<T> Clone for ReportsServer<T> {
        fn clone(&self) -> Self {
            Self {
                inner: self.inner.clone(),
            }
        }
    }

    impl<T> NamedService for ReportsServer<T> {
        const NAME: &'static str = "reports.Reports";
    }

    struct GenerateSvc<T>(Arc<T>);

    impl<T: Reports> UnaryService<ReportRequest> for GenerateSvc<T> {
        type Response = Report;
        type Future = BoxFuture<Result<Response<Report>, Status>>;

        fn call(&mut self, request: Request<ReportRequest>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move { inner.generate(request).await })
        }
    }

    struct WatchSvc<T>(Arc<T>);

    impl<T: Reports> ServerStreamingService<WatchRequest> for WatchSvc<T> {
        type Response = Tick;
        type ResponseStream = T::WatchStream;
        type Future = BoxFuture<Result<Response<T::WatchStream>, Status>>;

        fn call(&mut self, request: Request<WatchRequest>) -> Self::Future {
            let inner = self.0.clone();
            Box::pin(async move { inner.watch(request).await })
        }
    }

    impl<T, B> tower::Service<http::Request<B>> for ReportsServer<T>
    where
        T: Reports,
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
                GENERATE => Box::pin(async move {
                    let mut grpc = Grpc::new(ProstCodec::default());
                    Ok(grpc.unary(GenerateSvc(inner), req).await)
                }),
                WATCH => Box::pin(async move {
                    let mut grpc = Grpc::new(ProstCodec::default());
                    Ok(grpc.server_streaming(WatchSvc(inner), req).await)
                }),
                _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
            }
        }
    }
}

pub mod reports_client {
    use http::uri::PathAndQuery;
    use tonic::client::GrpcService;
    use tonic::codec::Streaming;
    use tonic::codegen::{Body, Bytes, StdError};
    use tonic::transport::{Channel, Endpoint};
    use tonic::{IntoRequest, Response, Status};
    use tonic_prost::ProstCodec;

    use super::{GENERATE, Report, ReportRequest, Tick, WATCH, WatchRequest};

    /// The generated client.
    #[derive(Debug, Clone)]
    pub struct ReportsClient<T> {
        inner: tonic::client::Grpc<T>,
    }

    impl ReportsClient<Channel> {
        /// Connects to `dst`, e.g. `"http://127.0.0.1:50051"`.
        pub async fn connect<D>(dst: D) -> Result<Self, tonic::transport::Error>
        where
            D: TryInto<Endpoint>,
            D::Error: Into<StdError>,
        {
            let channel = Endpoint::new(dst)?.connect().await?;
            Ok(Self::new(channel))
        }
    }

    impl<T> ReportsClient<T>
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

        pub async fn generate(
            &mut self,
            request: impl IntoRequest<ReportRequest>,
        ) -> Result<Response<Report>, Status> {
            self.ready().await?;
            let path = PathAndQuery::from_static(GENERATE);
            self.inner
                .unary(request.into_request(), path, ProstCodec::default())
                .await
        }

        pub async fn watch(
            &mut self,
            request: impl IntoRequest<WatchRequest>,
        ) -> Result<Response<Streaming<Tick>>, Status> {
            self.ready().await?;
            let path = PathAndQuery::from_static(WATCH);
            self.inner
                .server_streaming(request.into_request(), path, ProstCodec::default())
                .await
        }

        async fn ready(&mut self) -> Result<(), Status> {
            self.inner.ready().await.map_err(|e| {
                Status::unavailable(format!("service not ready: {}", Into::<StdError>::into(e)))
            })
        }
    }
}
