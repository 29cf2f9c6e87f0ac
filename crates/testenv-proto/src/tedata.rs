//! TE data: the JSON document a worker hands the client through its callback, and the
//! failure notices that take its place when there is no environment.
//!
//! TE data holds secrets (SSH keys, power-management passwords). Only [`TeSummary`] — a
//! whitelist of identifying fields — may be logged.

use std::fmt;

/// What a failed environment looks like to the client; the original client checks for these.
pub const RETRIEVE_FAILED: &str = "Couldn't retrieve env";
pub const OVB_FAILED_PREFIX: &str = "Failed creating OVB stack";

/// True if callback data says the worker could not produce an environment.
pub fn is_failure_notice(data: &str) -> bool {
    data.contains(RETRIEVE_FAILED) || data.starts_with(OVB_FAILED_PREFIX)
}

/// The notice a worker sends instead of TE data: `Couldn't retrieve env: {why}`.
pub fn failure_notice(why: impl fmt::Display) -> String {
    format!("{RETRIEVE_FAILED}: {why}")
}

/// TE data that is a JSON object, with its loggable summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeData {
    text: String,
    summary: TeSummary,
}

impl TeData {
    /// Checks that `text` is a JSON object; the text itself is kept as it was.
    pub fn parse(text: String) -> Result<TeData, String> {
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("TE data is not valid JSON: {e}"))?;
        if !value.is_object() {
            return Err("TE data is not a JSON object".into());
        }
        let summary = TeSummary::of(&value);
        Ok(TeData { text, summary })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }

    pub fn summary(&self) -> &TeSummary {
        &self.summary
    }
}

/// The identifying, non-secret fields of a TE, for logs: `env-num`, `host-ip`, `seed-ip` and
/// the node count. Values are cut to 64 characters with control characters escaped, so remote
/// data cannot forge log lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeSummary {
    pub env_num: String,
    pub host_ip: String,
    pub seed_ip: String,
    pub nodes: usize,
}

impl TeSummary {
    fn of(v: &serde_json::Value) -> TeSummary {
        let field = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .map_or("?".into(), loggable)
        };
        TeSummary {
            env_num: field("env-num"),
            host_ip: field("host-ip"),
            seed_ip: field("seed-ip"),
            nodes: v
                .get("nodes")
                .and_then(|n| n.as_array())
                .map_or(0, Vec::len),
        }
    }
}

impl fmt::Display for TeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "env-num={} host-ip={} seed-ip={} nodes={}",
            self.env_num, self.host_ip, self.seed_ip, self.nodes
        )
    }
}

/// A one-line description of TE data for logs: identifying fields only, never keys or passwords.
pub fn describe(text: &str) -> String {
    match TeData::parse(text.to_string()) {
        Ok(te) => te.summary.to_string(),
        Err(_) => "(not a JSON object)".into(),
    }
}

/// Checks that `text` is TE data (a JSON object).
pub fn validate(text: &str) -> Result<(), String> {
    TeData::parse(text.to_string()).map(|_| ())
}

fn loggable(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_default).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_hides_secrets() {
        let te = r#"{"env-num": "3", "host-ip": "192.0.2.1", "ssh-key": "PRIVATE",
                     "nodes": [{"pm_password": "hunter2"}]}"#;
        let d = describe(te);
        assert_eq!(d, "env-num=3 host-ip=192.0.2.1 seed-ip=? nodes=1");
        assert!(!d.contains("PRIVATE") && !d.contains("hunter2"));
    }

    #[test]
    fn te_data_must_be_an_object_and_cannot_forge_log_lines() {
        assert!(TeData::parse("[1]".into()).is_err());
        assert!(TeData::parse("{".into()).is_err());
        assert!(validate("{}").is_ok());
        let te = TeData::parse(r#"{"env-num": "1\nERROR forged"}"#.into()).unwrap();
        assert_eq!(te.summary().env_num, "1\\nERROR forged");
        assert!(!te.summary().to_string().contains('\n'));
        let long = format!(r#"{{"host-ip": "{}"}}"#, "x".repeat(500));
        assert_eq!(
            describe(&long).len(),
            "env-num=? host-ip= seed-ip=? nodes=0".len() + 64
        );
    }

    #[test]
    fn failure_notices() {
        assert!(is_failure_notice(&failure_notice("no such file")));
        assert!(is_failure_notice("Failed creating OVB stack foo"));
        assert!(!is_failure_notice("{}"));
    }
}
