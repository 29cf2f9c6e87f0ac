//! Deliberate faults, for the tests of what happens when the broker core fails: compiled into
//! debug builds only (release builds have none), and even there inert unless the environment
//! sets `TEBROKER_FAULT_INJECTION=1`. Two admin lines then act inside the broker lock:
//!
//! * `debug panic`: panics, as a bug in the core would;
//! * `debug hang MS`: holds the lock for MS milliseconds, as a core stuck in a loop would.

use broker_core::{Action, ConnId};

/// Acts on `line` if it is a fault-injection command and faults are enabled; returns whether
/// it did.
#[cfg(debug_assertions)]
pub fn inject(line: &str, out: &mut Vec<Action>, conn: ConnId) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled = *ENABLED
        .get_or_init(|| std::env::var_os("TEBROKER_FAULT_INJECTION").is_some_and(|v| v == "1"));
    if !enabled {
        return false;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        ["debug", "panic"] => panic!("fault injection: deliberate panic in the broker core"),
        ["debug", "hang", ms] => {
            let Ok(ms) = ms.parse::<u64>() else {
                return false;
            };
            std::thread::sleep(std::time::Duration::from_millis(ms));
            out.push(Action::Text(conn, "OK\n".into()));
            true
        }
        _ => false,
    }
}

#[cfg(not(debug_assertions))]
pub fn inject(_line: &str, _out: &mut Vec<Action>, _conn: ConnId) -> bool {
    false
}
