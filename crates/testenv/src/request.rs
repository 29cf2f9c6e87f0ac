//! The `lockenv` request a testenv-client sends: JSON whose values are all strings, with the keys
//! the original client used.

use serde::{Deserialize, Serialize};

/// The function testenv-workers register.
pub const LOCKENV: &str = "lockenv";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockRequest {
    pub callback_name: String,
    pub timeout: String,
    pub envsize: String,
    pub compute_envsize: String,
    pub ucinstance: String,
    pub create_undercloud: String,
    pub ssh_key: String,
    pub net_iso: String,
    pub extra_nodes: String,
    pub job_identifier: String,
}

impl LockRequest {
    /// Parses a request, accepting the original client's quirks: `null` for unset values and
    /// numbers where strings were meant.
    pub fn parse(data: &[u8]) -> Result<LockRequest, String> {
        let value: serde_json::Value =
            serde_json::from_slice(data).map_err(|e| format!("lockenv data is not JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| "lockenv data is not a JSON object".to_string())?;
        let get = |k: &str| match obj.get(k) {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Bool(b)) => {
                if *b {
                    "true".into()
                } else {
                    String::new()
                }
            }
            Some(other) => other.to_string(),
        };
        let req = LockRequest {
            callback_name: get("callback_name"),
            timeout: get("timeout"),
            envsize: get("envsize"),
            compute_envsize: get("compute_envsize"),
            ucinstance: get("ucinstance"),
            create_undercloud: get("create_undercloud"),
            ssh_key: get("ssh_key"),
            net_iso: get("net_iso"),
            extra_nodes: get("extra_nodes"),
            job_identifier: get("job_identifier"),
        };
        if req.callback_name.is_empty() {
            return Err("lockenv data has no callback_name".into());
        }
        Ok(req)
    }

    /// The timeout the client asked for, if it is a number of seconds.
    pub fn timeout_secs(&self) -> Option<u64> {
        self.timeout.trim().parse().ok()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("strings serialise")
    }

    /// The job identifier the original client built: `"$ZUUL_CHANGE: $TOCI_JOBTYPE"`.
    pub fn job_identifier_from_env() -> String {
        let change = std::env::var("ZUUL_CHANGE").unwrap_or_else(|_| "No change".into());
        let jobtype = std::env::var("TOCI_JOBTYPE").unwrap_or_default();
        format!("{change}: {jobtype}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_original_quirks() {
        let req = LockRequest {
            callback_name: "callback_x".into(),
            timeout: "60".into(),
            ..LockRequest::default()
        };
        assert_eq!(LockRequest::parse(req.to_json().as_bytes()).unwrap(), req);
        let orig = br#"{"callback_name": "callback_1", "timeout": "10800", "ucinstance": null, "envsize": 2}"#;
        let parsed = LockRequest::parse(orig).unwrap();
        assert_eq!(parsed.ucinstance, "");
        assert_eq!(parsed.envsize, "2");
        assert_eq!(parsed.timeout_secs(), Some(10800));
        assert!(LockRequest::parse(b"{}").is_err());
        assert!(LockRequest::parse(b"not json").is_err());
    }
}
