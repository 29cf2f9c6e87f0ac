//! Waiting for an observable event with a deadline (never a fixed sleep).

use std::time::{Duration, Instant};

/// How long one wait (start-up, one answer, one event) may take before a test fails.
/// Generous: the tests assert behaviour, never speed.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `f` until it returns `Some`, or panics naming `what` after [`TIMEOUT`].
pub fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_until_within(what, TIMEOUT, f)
}

/// Polls `f` until it returns `Some`, or panics naming `what` after `limit`.
pub fn wait_until_within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some` or `limit` has passed; `None` then, for a caller that
/// says more about what it saw when it fails.
pub fn wait_until_within_or_none<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs an async test body on a fresh multi-threaded tokio runtime, failing the test if it has
/// not finished within `limit`: no await in it can hang the test for ever.
pub fn block_on_within<F: std::future::Future>(limit: Duration, body: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async { tokio::time::timeout(limit, body).await })
        .unwrap_or_else(|_| panic!("the async test body did not finish within {limit:?}"))
}
