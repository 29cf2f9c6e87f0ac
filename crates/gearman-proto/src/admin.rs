//! The admin text protocol: one command per line, answered with lines of text.
//!
//! Replies follow gearmand's formats so that `gearadmin` and monitoring scripts written for
//! gearmand or geard parse them: list replies end with a line holding a single `.`, one-line
//! replies start with `OK`, and errors are `ERR CODE text-with-plus-for-spaces`.

/// A parsed admin command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCommand {
    Status,
    Workers,
    Version,
    GetPid,
    /// `maxqueue FUNC [ALL | HIGH NORMAL LOW]`; no sizes means "unlimited".
    MaxQueue {
        function: String,
        sizes: Option<[i64; 3]>,
    },
    ShowJobs,
    ShowUniqueJobs,
    CancelJob {
        handle: String,
    },
    PriorityStatus,
    Shutdown {
        graceful: bool,
    },
    Verbose,
    /// `acl ...` (geard's ACL administration); the words after `acl`.
    Acl(Vec<String>),
    /// tebroker's own extension: the leases it sees (`leases`).
    Leases,
    /// tebroker's own extension: counters (`stats`), one `name<TAB>value` line each.
    Stats,
    /// tebroker's own extension: where a queued job stands (`position HANDLE`).
    Position {
        handle: String,
    },
}

/// An admin command that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    UnknownCommand(String),
    InvalidArguments(String),
    UnknownJob,
    /// Any other failure, with a code word and a text.
    Other(&'static str, String),
}

impl AdminError {
    /// The reply line, spelled as gearmand spells it.
    pub fn to_line(&self) -> String {
        let (code, text) = match self {
            AdminError::UnknownCommand(cmd) => {
                ("UNKNOWN_COMMAND", format!("Unknown server command{cmd}"))
            }
            AdminError::InvalidArguments(cmd) => (
                "INVALID_ARGUMENTS",
                format!("An incomplete set of arguments was sent to this command {cmd}"),
            ),
            AdminError::UnknownJob => return "ERR UNKNOWN_JOB\r\n".to_string(),
            AdminError::Other(code, text) if text.is_empty() => {
                return format!("ERR {code}\r\n");
            }
            AdminError::Other(code, text) => (*code, text.clone()),
        };
        format!("ERR {code} {}\r\n", text.replace(' ', "+"))
    }
}

impl AdminCommand {
    /// Parses one admin line (without its line ending).
    pub fn parse(line: &str) -> Result<AdminCommand, AdminError> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let first = words.first().copied().unwrap_or("");
        let cmd = match first {
            "status" => AdminCommand::Status,
            "workers" => AdminCommand::Workers,
            "version" => AdminCommand::Version,
            "getpid" => AdminCommand::GetPid,
            "prioritystatus" => AdminCommand::PriorityStatus,
            "verbose" => AdminCommand::Verbose,
            "leases" => AdminCommand::Leases,
            "stats" => AdminCommand::Stats,
            "position" => match words.get(1..) {
                Some([handle]) => AdminCommand::Position {
                    handle: handle.to_string(),
                },
                _ => return Err(AdminError::InvalidArguments(first.into())),
            },
            "shutdown" => match words.get(1) {
                None => AdminCommand::Shutdown { graceful: false },
                Some(&"graceful") => AdminCommand::Shutdown { graceful: true },
                Some(_) => return Err(AdminError::InvalidArguments(first.into())),
            },
            "maxqueue" => {
                let function = words
                    .get(1)
                    .ok_or_else(|| AdminError::InvalidArguments(first.into()))?
                    .to_string();
                let nums: Result<Vec<i64>, _> = words[2..].iter().map(|w| w.parse()).collect();
                let nums = nums.map_err(|_| AdminError::InvalidArguments(first.into()))?;
                let sizes = match nums.as_slice() {
                    [] => None,
                    [all] => Some([*all; 3]),
                    [high, normal, low] => Some([*high, *normal, *low]),
                    _ => return Err(AdminError::InvalidArguments(first.into())),
                };
                AdminCommand::MaxQueue { function, sizes }
            }
            "show" => match words.get(1..) {
                Some(["jobs"]) => AdminCommand::ShowJobs,
                Some(["unique", "jobs"]) => AdminCommand::ShowUniqueJobs,
                _ => return Err(AdminError::UnknownCommand(first.into())),
            },
            "cancel" => match words.get(1..) {
                Some(["job", handle]) => AdminCommand::CancelJob {
                    handle: handle.to_string(),
                },
                Some(["job"]) => return Err(AdminError::InvalidArguments(first.into())),
                _ => return Err(AdminError::UnknownCommand(first.into())),
            },
            "acl" => AdminCommand::Acl(words[1..].iter().map(|w| w.to_string()).collect()),
            _ => return Err(AdminError::UnknownCommand(first.into())),
        };
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gearmand_commands() {
        assert_eq!(AdminCommand::parse("status"), Ok(AdminCommand::Status));
        assert_eq!(
            AdminCommand::parse("  workers  "),
            Ok(AdminCommand::Workers)
        );
        assert_eq!(
            AdminCommand::parse("show unique jobs"),
            Ok(AdminCommand::ShowUniqueJobs)
        );
        assert_eq!(
            AdminCommand::parse("maxqueue f 1 2 3"),
            Ok(AdminCommand::MaxQueue {
                function: "f".into(),
                sizes: Some([1, 2, 3])
            })
        );
        assert_eq!(
            AdminCommand::parse("maxqueue f 7"),
            Ok(AdminCommand::MaxQueue {
                function: "f".into(),
                sizes: Some([7; 3])
            })
        );
        assert_eq!(
            AdminCommand::parse("cancel job H:x:1"),
            Ok(AdminCommand::CancelJob {
                handle: "H:x:1".into()
            })
        );
        assert_eq!(
            AdminCommand::parse("shutdown graceful"),
            Ok(AdminCommand::Shutdown { graceful: true })
        );
    }

    #[test]
    fn errors_read_like_gearmand() {
        assert_eq!(
            AdminCommand::parse("bogus").unwrap_err().to_line(),
            "ERR UNKNOWN_COMMAND Unknown+server+commandbogus\r\n"
        );
        assert_eq!(
            AdminCommand::parse("maxqueue").unwrap_err().to_line(),
            "ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+maxqueue\r\n"
        );
        assert_eq!(
            AdminCommand::parse("").unwrap_err().to_line(),
            "ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
        );
        assert!(AdminCommand::parse("maxqueue f x").is_err());
        assert!(AdminCommand::parse("show nothing").is_err());
    }
}
