//! Macros shared by the crate's middleware.

/// The accessors of a middleware service whose inner service is the field `inner` of type `S`:
/// `get_ref`, `get_mut` and `into_inner`, as tower-http's services have them.
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Unwraps the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

pub(crate) use inner_service_accessors;
