//! What a pool agent (`testenv-agent`) and a broker tell each other about the TEs of a host,
//! beyond the lease protocol itself. Everything rides on ordinary Gearman jobs, so it works
//! through any broker; only tebroker *understands* the reports.
//!
//! - **State reports**: an agent that finds tebroker (admin `version` starts with
//!   [`TEBROKER_VERSION_PREFIX`]) submits an [`AgentReport`] as a background job of
//!   [`REPORT_FUNCTION`] whenever a TE changes state, and at least every
//!   [`REPORT_INTERVAL_SECS`]. tebroker consumes such jobs itself (they are never queued) and
//!   keeps the inventory; it forgets an agent's TEs when no report came for
//!   [`REPORT_STALE_SECS`]. Through other brokers the agent sends none (nobody would take them).
//! - **Control**: every agent registers [`control_function`] (`testenv-agent:ctl:<agent>`) and
//!   runs the [`ControlCommand`]s it is given, answering with a [`ControlReply`] as the job's
//!   result. Any Gearman client can send one (`gearman -f testenv-agent:ctl:host1
//!   '{"op":"drain","env":"te1"}'`); tebroker's `drain|undrain|hold|release|rebuild TE` admin
//!   commands and API submit them to the agent that reported the TE. The agent's local control
//!   socket takes the same commands.

use serde::{Deserialize, Serialize};

use crate::LOCKENV;

/// The background-job function agents send their [`AgentReport`]s to.
pub const REPORT_FUNCTION: &str = "tebroker:te-report";

/// Every agent's control function starts with this, followed by the agent's name.
pub const CONTROL_PREFIX: &str = "testenv-agent:ctl:";

/// tebroker answers the admin command `version` with a line that starts with this.
pub const TEBROKER_VERSION_PREFIX: &str = "tebroker";

/// An agent reports at least this often, even when nothing changed.
pub const REPORT_INTERVAL_SECS: u64 = 30;

/// A broker forgets an agent's TEs after this long without a report.
pub const REPORT_STALE_SECS: u64 = 3 * REPORT_INTERVAL_SECS;

/// The longest agent, TE or label name accepted in a report or command.
pub const MAX_NAME_LEN: usize = 128;

/// The most TEs one report may describe.
pub const MAX_ENVS_PER_REPORT: usize = 4096;

/// The control function of agent `agent`.
pub fn control_function(agent: &str) -> String {
    format!("{CONTROL_PREFIX}{agent}")
}

/// The lock function a TE with label `label` registers besides [`LOCKENV`].
pub fn label_function(label: &str) -> String {
    format!("{LOCKENV}:{label}")
}

/// The life cycle of a TE under an agent (LAVA's health states and nodepool's node states are
/// the models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvState {
    /// Being set up (carved) or created (on demand); not offered yet.
    Provisioning,
    /// Healthy and offered to clients.
    Ready,
    /// Held by a client.
    Leased,
    /// Its cleanup hook runs after a lease.
    Cleaning,
    /// Failed a health check or too many leases in a row; not offered; a rebuild comes next.
    Unhealthy,
    /// Its rebuild hook runs.
    Rebuilding,
    /// Finishes its lease, then stops being offered.
    Draining,
    /// Not offered, by an operator's decision.
    Drained,
    /// Kept aside (autohold after a failed job, or by an operator) until released or expired.
    Held,
    /// Rebuilds failed `max_rebuilds` times in a row; out until an operator acts.
    Failed,
}

impl EnvState {
    pub const ALL: [EnvState; 10] = [
        EnvState::Provisioning,
        EnvState::Ready,
        EnvState::Leased,
        EnvState::Cleaning,
        EnvState::Unhealthy,
        EnvState::Rebuilding,
        EnvState::Draining,
        EnvState::Drained,
        EnvState::Held,
        EnvState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EnvState::Provisioning => "provisioning",
            EnvState::Ready => "ready",
            EnvState::Leased => "leased",
            EnvState::Cleaning => "cleaning",
            EnvState::Unhealthy => "unhealthy",
            EnvState::Rebuilding => "rebuilding",
            EnvState::Draining => "draining",
            EnvState::Drained => "drained",
            EnvState::Held => "held",
            EnvState::Failed => "failed",
        }
    }

    /// Whether a TE in this state is offered to clients.
    pub fn is_offered(self) -> bool {
        self == EnvState::Ready
    }
}

impl std::fmt::Display for EnvState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One TE in a report. Never carries TE data (keys, passwords): only what an operator may see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvReport {
    pub name: String,
    pub state: EnvState,
    /// When it entered `state`, milliseconds since the epoch.
    pub since_ms: u64,
    #[serde(default)]
    pub labels: Vec<String>,
    /// The job identifier of the lease holder (leased, draining) or of the held job (held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// Why it is in this state, for people (the failing hook and its last output line, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Failed leases in a row, and failed rebuilds in a row.
    #[serde(default)]
    pub failed_leases: u32,
    #[serde(default)]
    pub failed_rebuilds: u32,
}

/// Everything one agent serves, as a whole (a report replaces the previous one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    pub agent: String,
    pub host: String,
    /// The agent's version (`testenv-agent 0.1.0`).
    #[serde(default)]
    pub version: String,
    pub sent_ms: u64,
    pub envs: Vec<EnvReport>,
}

/// What an operator asks an agent to do with one TE (or, with `env` = `*`, with every TE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlOp {
    /// Finish the lease, then stop offering the TE.
    Drain,
    /// Offer a drained TE again.
    Undrain,
    /// Keep the TE aside, for `hold_secs` or until released.
    Hold,
    /// End a hold.
    Release,
    /// Run the rebuild hook (then health) now.
    Rebuild,
    /// Change nothing; the reply carries the current report.
    Status,
}

impl ControlOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlOp::Drain => "drain",
            ControlOp::Undrain => "undrain",
            ControlOp::Hold => "hold",
            ControlOp::Release => "release",
            ControlOp::Rebuild => "rebuild",
            ControlOp::Status => "status",
        }
    }

    pub fn parse(word: &str) -> Option<ControlOp> {
        Some(match word {
            "drain" => ControlOp::Drain,
            "undrain" => ControlOp::Undrain,
            "hold" => ControlOp::Hold,
            "release" => ControlOp::Release,
            "rebuild" => ControlOp::Rebuild,
            "status" => ControlOp::Status,
            _ => return None,
        })
    }
}

/// The TE name meaning "every TE of the agent".
pub const ALL_ENVS: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlCommand {
    pub op: ControlOp,
    /// A TE name, or [`ALL_ENVS`]; ignored for `status`.
    #[serde(default)]
    pub env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_secs: Option<u64>,
    /// Who asked, for the agent's log (`tebroker admin`, `api:alice`, `ctl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    pub message: String,
    /// The agent's state after the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<AgentReport>,
}

/// Why a report or command was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage(pub String);

impl std::fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidMessage {}

/// A name (agent, host, TE, label) as a broker will accept it: non-empty, at most
/// [`MAX_NAME_LEN`] bytes, printable ASCII without spaces, so it is safe in admin lines, function
/// names, metric labels and file names.
pub fn check_name(what: &str, name: &str) -> Result<(), InvalidMessage> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(InvalidMessage(format!(
            "{what} name must be 1 to {MAX_NAME_LEN} bytes"
        )));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidMessage(format!(
            "{what} name {:?} must be printable ASCII without spaces",
            name.escape_debug().to_string()
        )));
    }
    Ok(())
}

impl AgentReport {
    /// Parses and checks a report received from the network.
    pub fn parse(data: &[u8]) -> Result<AgentReport, InvalidMessage> {
        let report: AgentReport = serde_json::from_slice(data)
            .map_err(|e| InvalidMessage(format!("agent report is not valid JSON: {e}")))?;
        check_name("agent", &report.agent)?;
        check_name("host", &report.host)?;
        if report.envs.len() > MAX_ENVS_PER_REPORT {
            return Err(InvalidMessage(format!(
                "agent report lists {} TEs, more than {MAX_ENVS_PER_REPORT}",
                report.envs.len()
            )));
        }
        for env in &report.envs {
            check_name("TE", &env.name)?;
            for label in &env.labels {
                check_name("label", label)?;
            }
            for text in [&env.holder, &env.detail].into_iter().flatten() {
                if text.len() > 1024 {
                    return Err(InvalidMessage(format!(
                        "TE {}: holder/detail longer than 1024 bytes",
                        env.name
                    )));
                }
            }
        }
        Ok(report)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report serialises")
    }
}

impl ControlCommand {
    pub fn parse(data: &[u8]) -> Result<ControlCommand, InvalidMessage> {
        let cmd: ControlCommand = serde_json::from_slice(data)
            .map_err(|e| InvalidMessage(format!("control command is not valid JSON: {e}")))?;
        if cmd.op != ControlOp::Status && cmd.env != ALL_ENVS {
            check_name("TE", &cmd.env)?;
        }
        Ok(cmd)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a command serialises")
    }
}

impl ControlReply {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a reply serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            agent: "host1".into(),
            host: "host1.example".into(),
            version: "testenv-agent 0.1.0".into(),
            sent_ms: 1,
            envs: vec![EnvReport {
                name: "te1".into(),
                state: EnvState::Leased,
                since_ms: 1,
                labels: vec!["ovb".into()],
                holder: Some("12345: gate-tripleo-ci".into()),
                detail: None,
                failed_leases: 0,
                failed_rebuilds: 0,
            }],
        }
    }

    #[test]
    fn a_report_round_trips_and_states_are_snake_case() {
        let r = report();
        let json = r.to_json();
        assert!(json.contains(r#""state":"leased""#), "{json}");
        assert_eq!(AgentReport::parse(json.as_bytes()).unwrap(), r);
        for state in EnvState::ALL {
            let text = serde_json::to_string(&state).unwrap();
            assert_eq!(text, format!("\"{}\"", state.as_str()));
        }
    }

    #[test]
    fn hostile_reports_are_refused() {
        let mut r = report();
        r.envs[0].name = "te 1".into();
        assert!(AgentReport::parse(r.to_json().as_bytes()).is_err());
        let mut r = report();
        r.envs[0].labels = vec!["a\"b\nc".into()];
        assert!(AgentReport::parse(r.to_json().as_bytes()).is_err());
        let mut r = report();
        r.agent = "x".repeat(MAX_NAME_LEN + 1);
        assert!(AgentReport::parse(r.to_json().as_bytes()).is_err());
        assert!(AgentReport::parse(b"{").is_err());
        assert!(AgentReport::parse(br#"{"agent":"a","host":"h","sent_ms":1,"envs":[{"name":"t","state":"exploded","since_ms":1}]}"#).is_err());
    }

    #[test]
    fn commands_parse_with_and_without_a_te() {
        let cmd = ControlCommand::parse(br#"{"op":"drain","env":"te1"}"#).unwrap();
        assert_eq!(cmd.op, ControlOp::Drain);
        assert_eq!(cmd.env, "te1");
        assert!(ControlCommand::parse(br#"{"op":"status"}"#).is_ok());
        assert!(ControlCommand::parse(br#"{"op":"hold","env":"*","hold_secs":60}"#).is_ok());
        assert!(ControlCommand::parse(br#"{"op":"drain"}"#).is_err());
        assert!(ControlCommand::parse(br#"{"op":"explode","env":"te1"}"#).is_err());
        for op in ["drain", "undrain", "hold", "release", "rebuild", "status"] {
            assert_eq!(ControlOp::parse(op).unwrap().as_str(), op);
        }
    }

    #[test]
    fn function_names() {
        assert_eq!(control_function("host1"), "testenv-agent:ctl:host1");
        assert_eq!(label_function("ovb"), "lockenv:ovb");
        assert!(crate::is_lockenv(label_function("ovb").as_bytes()));
    }
}
