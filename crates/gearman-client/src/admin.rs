//! The admin text protocol, client side: send one command to a server over a fresh TCP or TLS
//! connection (the same [`ServerAddr`] and TLS settings as jobs) and read its answer.
//!
//! Answers are either one line (`OK ...`, `version`'s number, ...) or a listing closed by a line
//! holding only `.` (`status`, `workers`, `leases`, ...); which one follows from the command
//! ([`is_listing`]). An `ERR CODE text` line, whatever the command, is [`Error::Server`].
//!
//! ```no_run
//! # async fn demo() -> gearman_client::Result<()> {
//! use std::time::Duration;
//! let server: gearman_client::ServerAddr = "127.0.0.1:4730".parse()?;
//! for line in gearman_client::admin::query(&server, "status", Duration::from_secs(5)).await? {
//!     println!("{line}");
//! }
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::addr::ServerAddr;
use crate::connection::connect_transport;
use crate::error::{Error, Result};

/// Longest answer line accepted; a server sending more is not speaking the admin protocol.
const MAX_LINE: u64 = 1 << 20;

/// Whether the answer to `command` is a listing ended by a `.` line.
pub fn is_listing(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    matches!(
        words.as_slice(),
        ["status", ..]
            | ["workers", ..]
            | ["prioritystatus", ..]
            | ["show", ..]
            | ["leases", ..]
            | ["envs", ..]
            | ["stats", ..]
            | ["acl", "list", ..]
    )
}

/// Sends `command` and returns the answer's lines (without line ends and without the closing
/// `.`); `timeout` bounds the whole exchange, connecting included.
pub async fn query(server: &ServerAddr, command: &str, timeout: Duration) -> Result<Vec<String>> {
    if command.contains(['\n', '\r']) {
        return Err(Error::Protocol {
            server: server.to_string(),
            reason: "an admin command is one line".into(),
        });
    }
    let exchange = async {
        // One short exchange: keepalive would never fire within it.
        let mut stream = connect_transport(server, timeout, None).await?;
        let lost = |e: std::io::Error| Error::Disconnected {
            server: server.to_string(),
            reason: e.to_string(),
        };
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(lost)?;
        stream.flush().await.map_err(lost)?;
        read_answer(server, BufReader::new(stream), is_listing(command)).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("the answer to admin command {command:?} from {server}"),
            after: timeout,
        })?
}

async fn read_answer(
    server: &ServerAddr,
    mut reader: impl tokio::io::AsyncBufRead + Unpin,
    listing: bool,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut raw)
            .await
            .map_err(|e| Error::Disconnected {
                server: server.to_string(),
                reason: e.to_string(),
            })?;
        if n == 0 {
            if listing {
                return Err(Error::Disconnected {
                    server: server.to_string(),
                    reason: "the connection closed before the listing's closing '.'".into(),
                });
            }
            return Ok(lines);
        }
        if !raw.ends_with(b"\n") && n as u64 == MAX_LINE {
            return Err(Error::Protocol {
                server: server.to_string(),
                reason: format!("admin answer line longer than {MAX_LINE} bytes"),
            });
        }
        let line = String::from_utf8_lossy(&raw)
            .trim_end_matches(['\r', '\n'])
            .to_string();
        if let Some(rest) = line.strip_prefix("ERR ") {
            let (code, text) = rest.split_once(' ').unwrap_or((rest, ""));
            return Err(Error::Server {
                server: server.to_string(),
                code: code.to_string(),
                text: text.replace('+', " "),
            });
        }
        if listing && line == "." {
            return Ok(lines);
        }
        lines.push(line);
        if !listing {
            return Ok(lines);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer(text: &str, listing: bool) -> Result<Vec<String>> {
        let server = ServerAddr::localhost(1);
        read_answer(&server, text.as_bytes(), listing).await
    }

    #[tokio::test]
    async fn listings_stop_at_the_dot_and_single_lines_at_the_first_line() {
        let got = answer("a\t1\nb\t2\n.\nnext\n", true).await.unwrap();
        assert_eq!(got, ["a\t1", "b\t2"]);
        let got = answer("OK 3 7\r\nmore\n", false).await.unwrap();
        assert_eq!(got, ["OK 3 7"]);
        assert!(answer("a\n", true).await.is_err(), "a listing cut short");
    }

    #[tokio::test]
    async fn err_lines_are_server_errors_with_spaces_restored() {
        let err = answer("ERR UNKNOWN_JOB No+such+job\n", true)
            .await
            .unwrap_err();
        match err {
            Error::Server { code, text, .. } => {
                assert_eq!(
                    (code.as_str(), text.as_str()),
                    ("UNKNOWN_JOB", "No such job")
                )
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn which_commands_list() {
        for c in [
            "status",
            "workers",
            "show jobs",
            "leases",
            "envs",
            "stats",
            "acl list",
        ] {
            assert!(is_listing(c), "{c}");
        }
        for c in [
            "version",
            "position H:x:1",
            "cancel job H:x:1",
            "maxqueue f 3",
            "drain te1",
            "hold te1 60",
            "acl add x",
        ] {
            assert!(!is_listing(c), "{c}");
        }
    }
}
