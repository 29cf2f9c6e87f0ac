//! The `lockenv` request: JSON whose values are all strings, with the keys the original client
//! used. [`LockRequest`] is the wire form (what a client sends, read leniently, as the original
//! worker did); [`ValidLockRequest`] is what a worker may act on, every field checked.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::CALLBACK_PREFIX;

/// The longest lease a request may ask for: 30 days. Longer (or non-finite, zero or negative)
/// timeouts are refused; the longest real CI jobs take hours.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// The longest value any field may have; an SSH public key is well under it.
pub const MAX_FIELD_LEN: usize = 16 * 1024;

/// The longest callback function name (Gearman function names are short words).
pub const MAX_CALLBACK_LEN: usize = 255;

/// The largest node count `envsize`, `compute_envsize` and `extra_nodes` may give.
pub const MAX_NODES: u32 = 1000;

/// The wire form of a lock request. Read leniently: `null` and missing keys are empty, numbers
/// and `true` become their text, as with the original client.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LockRequest {
    #[serde(deserialize_with = "lenient")]
    pub callback_name: String,
    #[serde(deserialize_with = "lenient")]
    pub timeout: String,
    #[serde(deserialize_with = "lenient")]
    pub envsize: String,
    #[serde(deserialize_with = "lenient")]
    pub compute_envsize: String,
    #[serde(deserialize_with = "lenient")]
    pub ucinstance: String,
    #[serde(deserialize_with = "lenient")]
    pub create_undercloud: String,
    #[serde(deserialize_with = "lenient")]
    pub ssh_key: String,
    #[serde(deserialize_with = "lenient")]
    pub net_iso: String,
    #[serde(deserialize_with = "lenient")]
    pub extra_nodes: String,
    #[serde(deserialize_with = "lenient")]
    pub job_identifier: String,
    /// The project the job runs for (`testenv-client --tenant`, default `$ZUUL_PROJECT`), so a
    /// broker can share TEs fairly between projects; not sent when empty (the original client
    /// never sends it, and empty means the one shared tenant).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// The lease's secret ([`crate::resume::LeaseKey`]) from a resume-capable client; never
    /// logged. Not sent when empty (the original client has none; its leases do not resume).
    #[serde(deserialize_with = "lenient", skip_serializing_if = "String::is_empty")]
    pub resume_key: String,
}

/// Why a lock request cannot be served. `callback` is the request's callback function when it
/// is usable, so the worker can tell the client (`Couldn't retrieve env: ...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub callback: Option<String>,
    pub reason: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad lockenv request: {}", self.reason)
    }
}

impl std::error::Error for RequestError {}

/// A lock request a worker may act on: the callback is a `callback_*` function name a Gearman
/// packet can carry, the timeout is in range, node counts are numbers, and no field holds a NUL
/// byte (which would end a process argument early) or exceeds [`MAX_FIELD_LEN`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidLockRequest {
    pub callback_name: String,
    /// The lease length the client asked for; `None` leaves it to the worker.
    pub timeout: Option<Duration>,
    /// Node counts, as the create script takes them; `None` when the client left them out.
    pub envsize: Option<u32>,
    pub compute_envsize: Option<u32>,
    pub extra_nodes: Option<u32>,
    pub ucinstance: String,
    pub create_undercloud: bool,
    pub ssh_key: String,
    pub net_iso: String,
    pub job_identifier: String,
    /// Empty for the shared tenant.
    pub tenant: String,
    /// The client can resume this lease (see [`crate::resume`]).
    pub resume_key: Option<crate::resume::LeaseKey>,
}

impl LockRequest {
    /// Parses the wire form. Fails only if `data` is not a JSON object.
    pub fn parse(data: &[u8]) -> Result<LockRequest, String> {
        // serde would also take a JSON array, as the struct's fields in order.
        if data.trim_ascii_start().first() != Some(&b'{') {
            return Err("lockenv data is not a JSON object".into());
        }
        serde_json::from_slice(data).map_err(|e| format!("lockenv data is not a JSON object: {e}"))
    }

    /// Parses and checks a request in one go.
    pub fn parse_valid(data: &[u8]) -> Result<ValidLockRequest, RequestError> {
        LockRequest::parse(data)
            .map_err(|reason| RequestError {
                callback: None,
                reason,
            })?
            .validate()
    }

    /// Checks every field; see [`ValidLockRequest`].
    pub fn validate(&self) -> Result<ValidLockRequest, RequestError> {
        let callback = check_callback(&self.callback_name).map_err(|reason| RequestError {
            callback: None,
            reason,
        })?;
        let refuse = |reason: String| RequestError {
            callback: Some(callback.clone()),
            reason,
        };
        for (name, value) in self.fields() {
            if value.len() > MAX_FIELD_LEN {
                return Err(refuse(format!(
                    "{name} is longer than {MAX_FIELD_LEN} bytes"
                )));
            }
            if value.contains('\0') {
                return Err(refuse(format!("{name} contains a NUL byte")));
            }
        }
        let nodes = |name: &str, value: &str| -> Result<Option<u32>, RequestError> {
            let value = value.trim();
            if value.is_empty() {
                return Ok(None);
            }
            match value.parse::<u32>() {
                Ok(n) if n <= MAX_NODES => Ok(Some(n)),
                _ => Err(refuse(format!(
                    "{name} must be a whole number from 0 to {MAX_NODES}, not {:?}",
                    shorten(value)
                ))),
            }
        };
        Ok(ValidLockRequest {
            timeout: parse_timeout(&self.timeout).map_err(refuse)?,
            envsize: nodes("envsize", &self.envsize)?,
            compute_envsize: nodes("compute_envsize", &self.compute_envsize)?,
            extra_nodes: nodes("extra_nodes", &self.extra_nodes)?,
            ucinstance: self.ucinstance.clone(),
            create_undercloud: is_true(&self.create_undercloud),
            ssh_key: self.ssh_key.clone(),
            net_iso: self.net_iso.clone(),
            job_identifier: self.job_identifier.clone(),
            tenant: self.tenant.trim().to_string(),
            resume_key: match self.resume_key.trim() {
                "" => None,
                text => {
                    Some(crate::resume::LeaseKey::parse(text).map_err(|e| refuse(e.to_string()))?)
                }
            },
            callback_name: callback,
        })
    }

    /// The timeout in seconds, if it is a valid one that sets the lease length; for display.
    pub fn timeout_secs(&self) -> Option<u64> {
        Some(parse_timeout(&self.timeout).ok()??.as_secs())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings serialises")
    }

    /// The job identifier the original client built: `"$ZUUL_CHANGE: $TOCI_JOBTYPE"`.
    pub fn job_identifier(zuul_change: Option<&str>, toci_jobtype: Option<&str>) -> String {
        format!(
            "{}: {}",
            zuul_change.unwrap_or("No change"),
            toci_jobtype.unwrap_or_default()
        )
    }

    /// [`LockRequest::job_identifier`] from this process's environment.
    pub fn job_identifier_from_env() -> String {
        let change = std::env::var("ZUUL_CHANGE").ok();
        let jobtype = std::env::var("TOCI_JOBTYPE").ok();
        LockRequest::job_identifier(change.as_deref(), jobtype.as_deref())
    }

    fn fields(&self) -> [(&'static str, &str); 12] {
        [
            ("callback_name", &self.callback_name),
            ("timeout", &self.timeout),
            ("envsize", &self.envsize),
            ("compute_envsize", &self.compute_envsize),
            ("ucinstance", &self.ucinstance),
            ("create_undercloud", &self.create_undercloud),
            ("ssh_key", &self.ssh_key),
            ("net_iso", &self.net_iso),
            ("extra_nodes", &self.extra_nodes),
            ("job_identifier", &self.job_identifier),
            ("tenant", &self.tenant),
            ("resume_key", &self.resume_key),
        ]
    }
}

impl ValidLockRequest {
    /// The lease length: the client's timeout, else `default`, capped at [`MAX_TIMEOUT_SECS`].
    pub fn timeout_or(&self, default: Duration) -> Duration {
        self.timeout
            .unwrap_or(default)
            .min(Duration::from_secs(MAX_TIMEOUT_SECS))
    }
}

/// A timeout in seconds: a finite number in (0, [`MAX_TIMEOUT_SECS`]], else refused. Only
/// whole seconds set the lease length; empty, or a number with a fraction (`"1.5"`), leaves it
/// to the worker's `-t`, as the original worker did.
pub fn parse_timeout(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let bad = || {
        format!(
            "timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT_SECS}, not {:?}",
            shorten(text)
        )
    };
    let secs: f64 = text.parse().map_err(|_| bad())?;
    if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS as f64) {
        return Err(bad());
    }
    if secs.fract() != 0.0 {
        return Ok(None);
    }
    // Whole and at most MAX_TIMEOUT_SECS, so the conversion is exact.
    Ok(Some(Duration::from_secs(secs as u64)))
}

fn check_callback(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("it has no callback_name".into());
    }
    let ok = name.len() <= MAX_CALLBACK_LEN
        && name.starts_with(CALLBACK_PREFIX)
        && name.len() > CALLBACK_PREFIX.len()
        && name.bytes().all(|b| b.is_ascii_graphic());
    if !ok {
        return Err(format!(
            "callback_name must be {CALLBACK_PREFIX}<id>, printable ASCII without spaces, at \
             most {MAX_CALLBACK_LEN} bytes; got {:?}",
            shorten(name)
        ));
    }
    Ok(name.to_string())
}

/// The original client sent `create_undercloud` as a flag: any non-empty value but "false"/"0".
fn is_true(text: &str) -> bool {
    let t = text.trim();
    !(t.is_empty() || t.eq_ignore_ascii_case("false") || t == "0")
}

/// At most 64 characters of `text`, for error messages that quote remote input.
fn shorten(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// A field value as text: strings as they are, `null` as empty, `true` as "true" and `false` as
/// empty (the original client's flags), numbers, arrays and objects as their JSON.
fn lenient<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct Text;
    impl<'de> Visitor<'de> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
            Ok(v)
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(if v { "true".into() } else { String::new() })
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(serde_json::Number::from_f64(v).map_or_else(String::new, |n| n.to_string()))
        }
        fn visit_unit<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<String, E> {
            Ok(String::new())
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<String, A::Error> {
            let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
            Ok(v.to_string())
        }
        fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<String, A::Error> {
            let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text)
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
        let orig = br#"{"callback_name": "callback_1", "timeout": "10800", "ucinstance": null,
                        "envsize": 2, "create_undercloud": true, "net_iso": false, "x": [1]}"#;
        let parsed = LockRequest::parse(orig).unwrap();
        assert_eq!(parsed.ucinstance, "");
        assert_eq!(parsed.envsize, "2");
        assert_eq!(parsed.create_undercloud, "true");
        assert_eq!(parsed.net_iso, "");
        assert_eq!(parsed.timeout_secs(), Some(10800));
        let valid = parsed.validate().unwrap();
        assert_eq!(valid.timeout, Some(Duration::from_secs(10800)));
        assert_eq!(valid.envsize, Some(2));
        assert!(valid.create_undercloud);
        assert_eq!(
            LockRequest::parse(br#"{"timeout": [1, {"a": null}]}"#)
                .unwrap()
                .timeout,
            r#"[1,{"a":null}]"#
        );
        assert!(LockRequest::parse(b"not json").is_err());
        assert!(LockRequest::parse(b"[]").is_err());
        let err = LockRequest::parse_valid(b"{}").unwrap_err();
        assert_eq!(err.callback, None);
    }

    #[test]
    fn timeouts_out_of_range_are_refused_with_the_callback_named() {
        for bad in [
            "10000000000000000000",
            "1e400",
            "inf",
            "NaN",
            "-5",
            "0",
            "2592001",
            "ten",
        ] {
            let req = LockRequest {
                callback_name: "callback_1".into(),
                timeout: bad.into(),
                ..LockRequest::default()
            };
            let err = req.validate().unwrap_err();
            assert_eq!(err.callback.as_deref(), Some("callback_1"), "{bad}");
            assert!(err.to_string().contains("timeout"), "{err}");
            assert_eq!(req.timeout_secs(), None);
        }
        let huge = br#"{"callback_name": "callback_1", "timeout": 1e300}"#;
        assert!(LockRequest::parse_valid(huge).is_err());
        let fraction = br#"{"callback_name": "callback_1", "timeout": 0.5}"#;
        let v = LockRequest::parse_valid(fraction).unwrap();
        assert_eq!(v.timeout, None, "not whole seconds: the worker's default");
        assert_eq!(v.timeout_or(Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(LockRequest::parse(fraction).unwrap().timeout_secs(), None);
        let exponent = br#"{"callback_name": "callback_1", "timeout": "1e3"}"#;
        assert_eq!(
            LockRequest::parse_valid(exponent).unwrap().timeout,
            Some(Duration::from_secs(1000))
        );
        let max = format!(r#"{{"callback_name": "callback_1", "timeout": "{MAX_TIMEOUT_SECS}"}}"#);
        assert!(LockRequest::parse_valid(max.as_bytes()).is_ok());
    }

    #[test]
    fn callbacks_and_fields_are_checked() {
        for bad in [
            "lockenv",
            "callback_",
            "callback_a b",
            "callback_a\0",
            "callback_é",
        ] {
            let req = LockRequest {
                callback_name: bad.into(),
                ..LockRequest::default()
            };
            assert_eq!(req.validate().unwrap_err().callback, None, "{bad:?}");
        }
        let with = |f: fn(&mut LockRequest)| {
            let mut r = LockRequest {
                callback_name: "callback_1".into(),
                ..LockRequest::default()
            };
            f(&mut r);
            r.validate()
        };
        assert!(with(|r| r.envsize = "-1".into()).is_err());
        assert!(with(|r| r.extra_nodes = "1001".into()).is_err());
        assert!(with(|r| r.ssh_key = "a\0b".into()).is_err());
        assert!(with(|r| r.ssh_key = "k".repeat(MAX_FIELD_LEN + 1)).is_err());
        let v = with(|r| r.compute_envsize = " 3 ".into()).unwrap();
        assert_eq!(
            (v.compute_envsize, v.envsize, v.timeout),
            (Some(3), None, None)
        );
        assert!(
            !with(|r| r.create_undercloud = "false".into())
                .unwrap()
                .create_undercloud
        );
        assert_eq!(
            LockRequest::job_identifier(None, Some("ovb")),
            "No change: ovb"
        );
    }

    #[test]
    fn a_resume_key_is_optional_checked_and_not_sent_when_empty() {
        let plain = LockRequest {
            callback_name: "callback_1".into(),
            ..LockRequest::default()
        };
        assert!(!plain.to_json().contains("resume_key"));
        assert_eq!(plain.validate().unwrap().resume_key, None);
        let key = "00112233445566778899aabbccddeeff";
        let with_key = LockRequest {
            resume_key: key.into(),
            ..plain.clone()
        };
        let valid = LockRequest::parse_valid(with_key.to_json().as_bytes()).unwrap();
        assert_eq!(valid.resume_key.unwrap().secret_hex(), key);
        let bad = LockRequest {
            resume_key: "not a key".into(),
            ..plain
        };
        let err = bad.validate().unwrap_err();
        assert_eq!(err.callback.as_deref(), Some("callback_1"));
        assert!(err.reason.contains("resume_key"), "{err}");
    }
}
