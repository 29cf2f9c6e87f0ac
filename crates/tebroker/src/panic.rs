//! A panic anywhere ends the process. The broker's state lives behind one lock; a panic while
//! it is held would poison it and leave a server that accepts connections but serves none.
//! Exiting lets the service manager restart a clean broker (the systemd unit says
//! `Restart=on-failure`).

/// Exit status after a panic (Rust's own for a panicking main thread).
pub const EXIT_AFTER_PANIC: i32 = 101;

/// Installs the hook: the default report (message and location, a backtrace if asked for),
/// then one clear log line, then exit.
pub fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(
            "tebroker: internal error (panic: {info}); exiting with status {EXIT_AFTER_PANIC} \
             so that the service manager restarts the broker"
        );
        std::process::exit(EXIT_AFTER_PANIC);
    }));
}
