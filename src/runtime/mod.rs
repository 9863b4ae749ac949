//! The mechanisms the scope uses, none of which names it: running a callback with its panic
//! contained ([`hooks`]), the bounded async cleanup limiter ([`cleanup`]), the sharded shutdown
//! registry ([`shutdown`]) and the deadline's limits and timer ([`deadline`]).

pub(crate) mod callback;
pub(crate) mod cleanup;
pub(crate) mod deadline;
pub(crate) mod shutdown;
