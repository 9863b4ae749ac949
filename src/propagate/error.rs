//! `InboundCancelled`: why an outbound call was abandoned.

use std::error::Error;
use std::fmt;

use crate::record::{CancelReason, Cancelled};

/// The error type of [`PropagateService`] (the same as `tower::BoxError`): the inner client's error, or
/// [`InboundCancelled`].
pub(crate) type BoxError = Box<dyn Error + Send + Sync>;

/// How [`InboundCancelled`] and its gRPC status begin.
const ABANDONED: &str = "the outbound call was abandoned: the inbound request was cancelled";

/// An outbound call was abandoned because the inbound request it served was cancelled.
///
/// The error of a [`PropagateService`](crate::propagate::PropagateService) client's future or
/// response body, boxed: find it with [`InboundCancelled::find`], which also looks through the
/// chain of [`source`](std::error::Error::source)s that a client (hyper-util's, reqwest's)
/// wraps it in. With the `tonic` feature, a tonic client behind
/// the layer reports it as the reason's status (`CANCELLED`, or `UNAVAILABLE` on shutdown, or
/// `DEADLINE_EXCEEDED`), with this error's message.
#[derive(Debug)]
pub struct InboundCancelled {
    cancelled: Cancelled,
    /// What tonic finds in the source chain.
    #[cfg(feature = "tonic")]
    status: tonic::Status,
}

impl InboundCancelled {
    pub(crate) fn new(cancelled: Cancelled) -> Self {
        #[cfg(feature = "tonic")]
        let status = {
            let code = tonic::Status::from(cancelled.reason()).code();
            tonic::Status::new(code, format!("{ABANDONED} ({})", cancelled.reason()))
        };
        Self {
            cancelled,
            #[cfg(feature = "tonic")]
            status,
        }
    }

    /// Why the inbound request was cancelled.
    pub fn reason(&self) -> CancelReason {
        self.cancelled.reason()
    }

    /// The inbound request's cancellation record.
    pub fn cancelled(&self) -> &Cancelled {
        &self.cancelled
    }

    /// Finds an `InboundCancelled` in `error` or its chain of
    /// [`source`](std::error::Error::source)s: an outbound call's error tells a call dropped
    /// because the inbound request was cancelled from one that failed on its own.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a InboundCancelled> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<InboundCancelled>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }
}

impl fmt::Display for InboundCancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{ABANDONED} ({})", self.cancelled)
    }
}

/// The source is the call's gRPC status when the crate's `tonic` feature is on, and none
/// without it: tonic looks for a `tonic::Status` in an error's source chain to answer a call
/// with the right code, and the status only exists with the feature. Code that walks the chain
/// should look for this type itself ([`InboundCancelled::find`]), which is there either way;
/// [`reason`](InboundCancelled::reason) says why.
impl Error for InboundCancelled {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        #[cfg(feature = "tonic")]
        return Some(&self.status);
        #[cfg(not(feature = "tonic"))]
        None
    }
}
