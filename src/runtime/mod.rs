//! The mechanisms the scope uses, none of which names it: running a callback with its panic
//! contained ([`callback`]), the bounded async cleanup limiter ([`cleanup`]), the bound on
//! detached handlers ([`handlers`]), the sharded shutdown
//! registry ([`shutdown`]), the deadline's limits and timer ([`deadline`]) and the metrics of
//! feature `metrics` ([`metrics`]).

pub(crate) mod callback;
pub(crate) mod cleanup;
pub(crate) mod deadline;
pub(crate) mod handlers;
pub(crate) mod metrics;
pub(crate) mod shutdown;
