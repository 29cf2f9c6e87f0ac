//! TE datafiles: reading, validating, and describing them in logs without their secrets.

/// What a failed environment looks like to the client; the original client checks for these.
pub const RETRIEVE_FAILED: &str = "Couldn't retrieve env";
pub const OVB_FAILED_PREFIX: &str = "Failed creating OVB stack";

/// True if callback data says the worker could not produce an environment.
pub fn is_failure_notice(data: &str) -> bool {
    data.contains(RETRIEVE_FAILED) || data.starts_with(OVB_FAILED_PREFIX)
}

/// Checks that `text` is a JSON document, returning it unchanged.
pub fn validate(text: &str) -> Result<(), String> {
    serde_json::from_str::<serde_json::Value>(text)
        .map(|_| ())
        .map_err(|e| format!("TE data is not valid JSON: {e}"))
}

/// A one-line description of a TE for logs: identifying fields only, never keys or passwords.
pub fn describe(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return "(not JSON)".into();
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let nodes = v
        .get("nodes")
        .and_then(|n| n.as_array())
        .map_or(0, Vec::len);
    format!(
        "env-num={} host-ip={} seed-ip={} nodes={}",
        field("env-num"),
        field("host-ip"),
        field("seed-ip"),
        nodes
    )
}

/// The last `max` bytes of a command's output, on a character boundary.
pub fn tail(output: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(output);
    let text = text.trim_end();
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_hides_secrets() {
        let te = r#"{"env-num": "3", "host-ip": "192.0.2.1", "ssh-key": "PRIVATE",
                     "nodes": [{"pm_password": "hunter2"}]}"#;
        let d = describe(te);
        assert!(d.contains("env-num=3") && d.contains("nodes=1"));
        assert!(!d.contains("PRIVATE") && !d.contains("hunter2"));
    }

    #[test]
    fn failure_notices() {
        assert!(is_failure_notice("Couldn't retrieve env: no such file"));
        assert!(is_failure_notice("Failed creating OVB stack foo"));
        assert!(!is_failure_notice("{}"));
        assert_eq!(tail("héllo world".as_bytes(), 5), "world");
    }
}
