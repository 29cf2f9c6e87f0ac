//! Lease resume: the messages a testenv-client and a testenv-worker exchange so that a lease
//! outlives the broker carrying it (docs/design/lease-resume.md), and the lease's identity.
//!
//! The client puts a secret [`LeaseKey`] in its lock request (`resume_key`). The public
//! [`LeaseId`] derived from it names the function `lease_<id>` the worker registers while it
//! holds a resumable lease. Every message carries the key, so nobody who only saw function
//! names can forge one; [`LeaseKey`] never prints itself.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The function a worker holding a resumable lease registers: this followed by the lease id.
pub const LEASE_PREFIX: &str = "lease_";

/// The top-level key of every lease message; TE data never has it.
const ENVELOPE: &str = "testenv_lease";

/// The WORK_EXCEPTION data tebroker ends a callback job with when the holder's connection
/// failed (timed out, cut) instead of closing: the holder may still be alive. A plain
/// WORK_FAIL from tebroker means the connection closed (the holder's process is gone).
pub const HOLDER_CONNECTION_LOST: &str = "testenv: holder connection lost";

/// The number of random bytes in a key (128 bits).
pub const KEY_BYTES: usize = 16;

/// The secret of one lease: 128 random bits, 32 lowercase hex digits on the wire.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseKey([u8; KEY_BYTES]);

impl fmt::Debug for LeaseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseKey(<secret>)")
    }
}

/// Why a `resume_key` is not a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError;

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resume_key must be {} lowercase hex digits",
            KEY_BYTES * 2
        )
    }
}

impl std::error::Error for KeyError {}

impl LeaseKey {
    /// A key from random bytes the caller drew (this crate does no I/O).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> LeaseKey {
        LeaseKey(bytes)
    }

    pub fn parse(text: &str) -> Result<LeaseKey, KeyError> {
        let text = text.as_bytes();
        if text.len() != KEY_BYTES * 2 {
            return Err(KeyError);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(KeyError),
        };
        let mut out = [0u8; KEY_BYTES];
        for (i, pair) in text.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(LeaseKey(out))
    }

    /// The wire form. Named so that a call site shows it handles a secret.
    pub fn secret_hex(&self) -> String {
        hex(&self.0)
    }

    /// The public identity: the first 8 bytes of SHA-256 of the wire form, in hex.
    pub fn lease_id(&self) -> LeaseId {
        let digest = Sha256::digest(self.secret_hex().as_bytes());
        LeaseId(hex(&digest[..8]))
    }

    /// Compares without an early exit, so the time taken does not tell how much matched.
    pub fn matches(&self, other: &LeaseKey) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The public name of a lease (16 hex digits); safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseId(String);

impl LeaseId {
    /// `lease_<id>`, the worker's function for this lease.
    pub fn function(&self) -> String {
        format!("{LEASE_PREFIX}{}", self.0)
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a lease message asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseOp {
    /// "Take this job as the new carrier of our lease." Worker → client on `callback_<jobnum>`
    /// (the new C2), client → worker on `lease_<id>` (the new C1). Accepted with WORK_STATUS
    /// 1/1 at once, refused with WORK_FAIL.
    Resume,
    /// Worker → client on `callback_<jobnum>`: the TE is taken back; kill COMMAND, then
    /// complete this job.
    Revoke,
    /// Client → worker on `lease_<id>`: COMMAND has ended (`exit` says how) and there was no
    /// callback job left to report it on. The worker completes this job once it took it.
    Released,
}

/// One lease message: `{"testenv_lease": {"op": ..., "key": ..., "te": ..., "exit": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseMessage {
    pub op: LeaseOp,
    pub key: LeaseKey,
    /// The TE's name (worker → client), for the client's log; empty otherwise.
    pub te: String,
    /// COMMAND's exit status (`released` only).
    pub exit: Option<i32>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    op: LeaseOp,
    key: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    te: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit: Option<i32>,
}

/// Why a lease message cannot be read; never contains the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError(String);

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad lease message: {}", self.0)
    }
}

impl std::error::Error for MessageError {}

impl LeaseMessage {
    pub fn new(op: LeaseOp, key: &LeaseKey) -> LeaseMessage {
        LeaseMessage {
            op,
            key: key.clone(),
            te: String::new(),
            exit: None,
        }
    }

    pub fn to_json(&self) -> String {
        let wire = Wire {
            op: self.op,
            key: self.key.secret_hex(),
            te: self.te.clone(),
            exit: self.exit,
        };
        serde_json::json!({ ENVELOPE: wire }).to_string()
    }

    /// `None` when `data` is not a lease message at all (e.g. TE data, which a callback job
    /// also carries); `Some(Err)` when it is one but malformed.
    pub fn parse(data: &[u8]) -> Option<Result<LeaseMessage, MessageError>> {
        if data.trim_ascii_start().first() != Some(&b'{') {
            return None;
        }
        let mut value: serde_json::Value = serde_json::from_slice(data).ok()?;
        let inner = value.as_object_mut()?.remove(ENVELOPE)?;
        Some(Self::from_value(inner))
    }

    fn from_value(inner: serde_json::Value) -> Result<LeaseMessage, MessageError> {
        // serde's message could quote the key; say only which shape was wrong.
        let wire: Wire = serde_json::from_value(inner).map_err(|_| {
            MessageError("expected {\"op\": resume|revoke|released, \"key\": KEY}".into())
        })?;
        let key = LeaseKey::parse(&wire.key).map_err(|e| MessageError(e.to_string()))?;
        Ok(LeaseMessage {
            op: wire.op,
            key,
            te: wire.te,
            exit: wire.exit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> LeaseKey {
        LeaseKey::from_bytes([n; KEY_BYTES])
    }

    #[test]
    fn keys_round_trip_and_reject_anything_else() {
        let k = LeaseKey::from_bytes(
            *b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\xfe\xff",
        );
        assert_eq!(k.secret_hex(), "000102030405060708090a0b0c0dfeff");
        assert_eq!(LeaseKey::parse(&k.secret_hex()), Ok(k.clone()));
        for bad in [
            "",
            "00",
            &"0".repeat(31),
            &"0".repeat(33),
            &"A".repeat(32),
            &"g".repeat(32),
            &"é".repeat(16),
        ] {
            assert_eq!(LeaseKey::parse(bad), Err(KeyError), "{bad:?}");
        }
        assert!(k.matches(&k.clone()));
        assert!(!k.matches(&key(0)));
        assert_eq!(format!("{k:?}"), "LeaseKey(<secret>)");
    }

    #[test]
    fn the_lease_id_is_public_stable_and_does_not_contain_the_key() {
        let k = key(0xab);
        let id = k.lease_id();
        // sha256("abab...ab" x16), first 8 bytes.
        assert_eq!(id.to_string().len(), 16);
        assert_eq!(id, k.clone().lease_id());
        assert_ne!(id, key(0xac).lease_id());
        assert!(!k.secret_hex().contains(&id.to_string()));
        assert_eq!(id.function(), format!("lease_{id}"));
        assert!(id.to_string().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn messages_round_trip() {
        let mut m = LeaseMessage::new(LeaseOp::Resume, &key(7));
        m.te = "te-1".into();
        let parsed = LeaseMessage::parse(m.to_json().as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(parsed, m);
        let mut released = LeaseMessage::new(LeaseOp::Released, &key(7));
        released.exit = Some(3);
        let text = released.to_json();
        assert!(
            text.contains("\"op\":\"released\"") && text.contains("\"exit\":3"),
            "{text}"
        );
        assert_eq!(
            LeaseMessage::parse(text.as_bytes()).unwrap().unwrap(),
            released
        );
        let revoke = LeaseMessage::new(LeaseOp::Revoke, &key(1));
        assert_eq!(
            LeaseMessage::parse(revoke.to_json().as_bytes())
                .unwrap()
                .unwrap()
                .op,
            LeaseOp::Revoke
        );
    }

    #[test]
    fn te_data_is_not_a_lease_message_and_bad_ones_do_not_echo_the_key() {
        for te in [
            &b"{\"nodes\": []}"[..],
            b"[1]",
            b"Couldn't retrieve env: x",
            b"",
            b"\xff",
        ] {
            assert!(LeaseMessage::parse(te).is_none(), "{te:?}");
        }
        let secretish = "0123456789abcdef0123456789abcdeX";
        for bad in [
            format!("{{\"testenv_lease\": {{\"op\": \"resume\", \"key\": \"{secretish}\"}}}}"),
            format!("{{\"testenv_lease\": {{\"op\": \"steal\", \"key\": \"{secretish}\"}}}}"),
            "{\"testenv_lease\": 5}".to_string(),
        ] {
            let err = LeaseMessage::parse(bad.as_bytes()).unwrap().unwrap_err();
            assert!(!err.to_string().contains(secretish), "{err}");
        }
    }
}
