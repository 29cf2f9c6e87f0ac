//! The testenv protocol that `testenv-client`, `testenv-worker`, tebroker and the bench speak
//! over Gearman, in one place and without I/O:
//!
//! 1. a testenv-client registers `callback_<jobnum>` and submits [`LOCKENV`] with a
//!    [`LockRequest`] naming that callback;
//! 2. a testenv-worker takes the `lockenv` job, checks the request ([`LockRequest::validate`]),
//!    and submits the TE data ([`tedata`]) — or a [`tedata::RETRIEVE_FAILED`] notice — as a job
//!    of the client's callback function;
//! 3. the lease lasts until the callback job ends; the worker then completes `lockenv`;
//! 4. with a `resume_key` in the request, both sides can find each other again after the broker
//!    carrying the lease is lost ([`resume`]).

pub mod agent;
pub mod request;
pub mod resume;
pub mod tedata;

pub use request::{LockRequest, RequestError, ValidLockRequest, MAX_TIMEOUT_SECS};
pub use tedata::{TeData, TeSummary};

/// The function testenv-workers register. Deployments may register names that start with it
/// (a pool suffix), which tebroker also treats as lock requests.
pub const LOCKENV: &str = "lockenv";

/// Every callback function a testenv-client registers starts with this; tebroker's hijack
/// protection guards exactly these names.
pub const CALLBACK_PREFIX: &str = "callback_";

/// The callback function of client job `jobnum`.
pub fn callback_name(jobnum: &str) -> String {
    format!("{CALLBACK_PREFIX}{jobnum}")
}

/// Whether `function` (a Gearman function name) carries lock requests.
pub fn is_lockenv(function: &[u8]) -> bool {
    function.starts_with(LOCKENV.as_bytes())
}
