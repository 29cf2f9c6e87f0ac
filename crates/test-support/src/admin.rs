//! The Gearman admin text protocol, as the tests use it: one command on a fresh connection,
//! and parsers for the answers.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

use crate::wait::TIMEOUT;

/// Whether `command`'s answer is a list ending with a `.` line (else it is one line).
pub fn answers_with_list(command: &str) -> bool {
    matches!(
        command.split_whitespace().collect::<Vec<_>>()[..],
        ["status"]
            | ["workers"]
            | ["stats"]
            | ["acl", "list"]
            | ["show", ..]
            | ["leases"]
            | ["envs"]
            | ["prioritystatus"]
    )
}

/// Sends `command` on a new connection to `addr` and returns the answer's lines, without the
/// final `.` of a list. A one-line error (`ERR ...`) is returned as that one line.
pub fn admin(addr: SocketAddr, command: &str) -> Vec<String> {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr} for {command:?}: {e}"));
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(format!("{command}\n").as_bytes())
        .unwrap_or_else(|e| panic!("send {command:?}: {e}"));
    let list = answers_with_list(command);
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("no answer to {command:?} within {TIMEOUT:?}: {e}"));
        assert!(
            n > 0,
            "connection closed during the answer to {command:?}: {lines:?}"
        );
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if !list || (lines.is_empty() && line.starts_with("ERR")) {
            return vec![line];
        }
        if line == "." {
            return lines;
        }
        lines.push(line);
    }
}

/// One row of the `status` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    pub function: String,
    /// Jobs queued or running.
    pub total: u64,
    pub running: u64,
    /// Workers registered for the function.
    pub workers: u64,
}

/// Parses `status` lines (`function TAB total TAB running TAB workers`); panics on a line of
/// another shape.
pub fn parse_status(lines: &[String]) -> Vec<StatusRow> {
    lines
        .iter()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(
                f.len(),
                4,
                "status line {l:?} should have 4 tab-separated fields"
            );
            let n = |s: &str| {
                s.parse::<u64>()
                    .unwrap_or_else(|_| panic!("non-numeric field {s:?} in status line {l:?}"))
            };
            StatusRow {
                function: f[0].to_string(),
                total: n(f[1]),
                running: n(f[2]),
                workers: n(f[3]),
            }
        })
        .collect()
}

/// Parses `stats` lines (`name TAB value`) into the value of `name`.
pub fn stat(lines: &[String], name: &str) -> Option<u64> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('\t')?.parse().ok())
}
