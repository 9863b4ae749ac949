#![doc = include_str!("../docs/guide.md")]
//!
//! Each page is a markdown file in the repository's `docs/` folder. A page whose examples need
//! features is built (and its examples compiled) with those features, as on docs.rs.

#[cfg_attr(
    all(feature = "socket2", feature = "axum"),
    doc = include_str!("../docs/servers.md")
)]
#[cfg_attr(
    not(all(feature = "socket2", feature = "axum")),
    doc = "Serving with hyper: built with features `socket2` and `axum`, as on docs.rs."
)]
pub mod servers {}

#[cfg_attr(
    all(feature = "tonic", feature = "axum"),
    doc = include_str!("../docs/frameworks.md")
)]
#[cfg_attr(
    not(all(feature = "tonic", feature = "axum")),
    doc = "hyper, axum, tonic and tower-http: built with features `tonic` and `axum`, as on docs.rs."
)]
pub mod frameworks {}

#[doc = include_str!("../docs/transport.md")]
pub mod transport {}

#[doc = include_str!("../docs/reliability.md")]
pub mod reliability {}
