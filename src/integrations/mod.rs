//! Glue for the frameworks, each behind its feature: the axum extractor (`axum`) and the
//! `tonic::Status` conversions (`tonic`).

#[cfg(feature = "axum")]
mod axum;
#[cfg(feature = "tonic")]
mod tonic;
