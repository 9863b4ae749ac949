#![doc = include_str!("../docs/guide.md")]
//!
//! Each page is a markdown file in the repository's `docs/` folder.

#[doc = include_str!("../docs/servers.md")]
pub mod servers {}

#[doc = include_str!("../docs/frameworks.md")]
pub mod frameworks {}

#[doc = include_str!("../docs/transport.md")]
pub mod transport {}

#[doc = include_str!("../docs/reliability.md")]
pub mod reliability {}
