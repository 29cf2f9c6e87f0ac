//! The hold log: every COMMAND the chaos runner gives a testenv-client appends a `start` line
//! when it runs (it holds the TE from then on) and an `end` line when it is done, or a `term`
//! line when it was told to stop (SIGTERM from its client). A COMMAND killed with SIGKILL writes
//! nothing more; the checker then takes its client's end as the end of the hold.
//!
//! One line per event, tab-separated: `KIND TE CLIENT PID MONO_MS WALL_MS CODE`, where CODE is
//! the exit status the COMMAND was told to return. Lines are written with one `write` on a file
//! opened for appending, so lines of concurrent holders never interleave.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::clock::{mono_ms, wall_ms};

/// The field of a chaos TE's datafile that names the TE.
pub const TE_FIELD: &str = "chaos_te";

/// What a COMMAND exits with when it cannot tell which TE it holds: no status the runner ever
/// chooses, so the client's exit check flags it.
pub const EXIT_NO_TE: i32 = 99;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldKind {
    Start,
    End,
    Term,
}

impl HoldKind {
    fn word(self) -> &'static str {
        match self {
            HoldKind::Start => "start",
            HoldKind::End => "end",
            HoldKind::Term => "term",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldEvent {
    pub kind: HoldKind,
    pub te: String,
    pub client: String,
    pub pid: u32,
    pub mono_ms: u64,
    pub wall_ms: u64,
    pub code: i32,
}

impl fmt::Display for HoldEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            self.kind.word(),
            self.te,
            self.client,
            self.pid,
            self.mono_ms,
            self.wall_ms,
            self.code
        )
    }
}

impl HoldEvent {
    pub fn parse(line: &str) -> Result<HoldEvent, String> {
        let fields: Vec<&str> = line.split('\t').collect();
        let [kind, te, client, pid, mono, wall, code] = fields.as_slice() else {
            return Err(format!("{} fields, not 7", fields.len()));
        };
        let kind = match *kind {
            "start" => HoldKind::Start,
            "end" => HoldKind::End,
            "term" => HoldKind::Term,
            other => return Err(format!("unknown event {other:?}")),
        };
        let number = |what: &str, text: &str| format!("{what} {text:?} is not a number");
        Ok(HoldEvent {
            kind,
            te: te.to_string(),
            client: client.to_string(),
            pid: pid.parse().map_err(|_| number("pid", pid))?,
            mono_ms: mono.parse().map_err(|_| number("time", mono))?,
            wall_ms: wall.parse().map_err(|_| number("wall time", wall))?,
            code: code.parse().map_err(|_| number("code", code))?,
        })
    }
}

/// A parsed log: the events, and the lines that did not parse (with their line numbers).
#[derive(Debug, Default)]
pub struct HoldLog {
    pub events: Vec<HoldEvent>,
    pub bad_lines: Vec<(usize, String)>,
}

pub fn parse_log(text: &str) -> HoldLog {
    let mut log = HoldLog::default();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        match HoldEvent::parse(line) {
            Ok(e) => log.events.push(e),
            Err(why) => log.bad_lines.push((i + 1, format!("{why}: {line:?}"))),
        }
    }
    log
}

/// The TE a datafile names, from its [`TE_FIELD`].
pub fn te_of_datafile(text: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    match value.get(TE_FIELD).and_then(|v| v.as_str()) {
        Some(name) if !name.is_empty() && !name.contains(['\t', '\n']) => Ok(name.to_string()),
        _ => Err(format!("no usable {TE_FIELD:?} field")),
    }
}

static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst);
}

fn append(log: &Path, event: &HoldEvent) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    file.write_all(format!("{event}\n").as_bytes())
}

/// The COMMAND of every chaos lease: logs `start`, holds for `hold`, logs `end` and returns
/// `code`; on SIGTERM logs `term` and returns 128+SIGTERM at once.
pub fn hold(log: &Path, client: &str, hold: Duration, code: i32) -> i32 {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let te = std::env::var_os("TE_DATAFILE")
        .ok_or_else(|| "TE_DATAFILE is not set".to_string())
        .and_then(|p| std::fs::read_to_string(p).map_err(|e| e.to_string()))
        .and_then(|text| te_of_datafile(&text));
    let te = match te {
        Ok(te) => te,
        Err(why) => {
            eprintln!("testenv-chaos hold: which TE? {why}");
            return EXIT_NO_TE;
        }
    };
    let event = |kind| HoldEvent {
        kind,
        te: te.clone(),
        client: client.to_string(),
        pid: std::process::id(),
        mono_ms: mono_ms(),
        wall_ms: wall_ms(),
        code,
    };
    if let Err(e) = append(log, &event(HoldKind::Start)) {
        eprintln!("testenv-chaos hold: cannot write {}: {e}", log.display());
        return EXIT_NO_TE;
    }
    let until = mono_ms().saturating_add(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
    while mono_ms() < until {
        if TERMINATED.load(Ordering::SeqCst) {
            let _ = append(log, &event(HoldKind::Term));
            return 128 + libc::SIGTERM;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = append(log, &event(HoldKind::End));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_reads_back_as_written() {
        let e = HoldEvent {
            kind: HoldKind::Term,
            te: "te03".into(),
            client: "c07-12".into(),
            pid: 4242,
            mono_ms: 123_456,
            wall_ms: 1_700_000_000_000,
            code: 7,
        };
        assert_eq!(HoldEvent::parse(&e.to_string()), Ok(e));
    }

    #[test]
    fn bad_lines_are_kept_with_their_numbers() {
        let log = parse_log("start\tte1\tc1\t1\t10\t20\t0\nnonsense\nend\tte1\tc1\tx\t11\t21\t0\n");
        assert_eq!(log.events.len(), 1);
        assert_eq!(log.bad_lines.len(), 2);
        assert_eq!(log.bad_lines[0].0, 2);
        assert!(log.bad_lines[1].1.contains("pid"), "{:?}", log.bad_lines);
    }

    #[test]
    fn the_te_comes_from_the_datafile() {
        assert_eq!(
            te_of_datafile(r#"{"chaos_te":"te05","x":1}"#),
            Ok("te05".into())
        );
        assert!(te_of_datafile(r#"{"other":"te05"}"#).is_err());
        assert!(te_of_datafile("[1]").is_err());
        assert!(te_of_datafile(r#"{"chaos_te":"a\tb"}"#).is_err());
    }
}
