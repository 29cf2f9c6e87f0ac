//! Lease resume: the messages a testenv-client and a testenv-worker exchange so that a lease
//! outlives the broker carrying it (docs/design/lease-resume.md), and the lease's identity.
//!
//! The client puts a secret [`LeaseKey`] in its lock request (`resume_key`). The public
//! [`LeaseId`] derived from it names the function `lease_<id>` the worker registers while it
//! holds a resumable lease. Every message carries a proof derived from the key, its op and the
//! function it is sent to ([`LeaseKey::proof`]): nobody who only saw function names or other
//! messages can forge one, and taking a message (anyone may register a function name on some
//! brokers) does not reveal the key. [`LeaseKey`] never prints itself.

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

/// A client that already holds a TE answers a second environment's callback job with this
/// result (WORK_COMPLETE), and a resuming worker then completes the `lockenv` it served with it:
/// that lock request was a duplicate (submitted again after its broker died while a worker
/// already held the first), so its end is not the end of the client's lease.
pub const ALREADY_SERVED: &str = "testenv: already served";

/// A client still waiting for its TE answers a lease message (WORK_COMPLETE) with this: it never
/// got the TE data (that callback job was lost on its way), so COMMAND never started and the
/// worker may free the TE at once.
pub const NEVER_STARTED: &str = "testenv: never started";

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
        same_bytes(&self.0, &other.0)
    }

    /// What a message `op` sent to `to` carries instead of the key: the first 16 bytes of
    /// SHA-256 over a label, the op, the carrier and the key. One-way, so a message taken by a
    /// stranger does not give the key away; bound to op and carrier, so one cannot be turned
    /// into another.
    pub fn proof(&self, op: LeaseOp, to: Carrier) -> Proof {
        let mut h = Sha256::new();
        h.update(b"testenv-lease-v1\0");
        h.update(op.name().as_bytes());
        h.update(b"\0");
        h.update(to.name().as_bytes());
        h.update(b"\0");
        h.update(self.secret_hex().as_bytes());
        let digest = h.finalize();
        let mut out = [0u8; KEY_BYTES];
        out.copy_from_slice(&digest[..KEY_BYTES]);
        Proof(out)
    }
}

fn same_bytes(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The function a lease message is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// The client's `callback_<jobnum>` (C2 resume, revoke).
    Callback,
    /// The worker's `lease_<id>` (C1 resume, released).
    Lease,
}

impl Carrier {
    fn name(self) -> &'static str {
        match self {
            Carrier::Callback => "callback",
            Carrier::Lease => "lease",
        }
    }
}

/// A message's proof of the key (see [`LeaseKey::proof`]); 32 hex digits on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof([u8; KEY_BYTES]);

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

impl LeaseOp {
    fn name(self) -> &'static str {
        match self {
            LeaseOp::Resume => "resume",
            LeaseOp::Revoke => "revoke",
            LeaseOp::Released => "released",
        }
    }
}

/// One lease message: `{"testenv_lease": {"op": ..., "proof": ..., "te": ..., "exit": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseMessage {
    pub op: LeaseOp,
    pub proof: Proof,
    /// The TE's name (worker → client), for the client's log; empty otherwise.
    pub te: String,
    /// COMMAND's exit status (`released` only).
    pub exit: Option<i32>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    op: LeaseOp,
    proof: String,
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
    /// Whether this message was made with `key` for its op, sent to `to`.
    pub fn proves(&self, key: &LeaseKey, to: Carrier) -> bool {
        same_bytes(&self.proof.0, &key.proof(self.op, to).0)
    }

    /// A message `op` for the function kind `to`, proved with `key`.
    pub fn new(op: LeaseOp, key: &LeaseKey, to: Carrier) -> LeaseMessage {
        LeaseMessage {
            op,
            proof: key.proof(op, to),
            te: String::new(),
            exit: None,
        }
    }

    pub fn to_json(&self) -> String {
        let wire = Wire {
            op: self.op,
            proof: hex(&self.proof.0),
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
            MessageError("expected {\"op\": resume|revoke|released, \"proof\": PROOF}".into())
        })?;
        let proof = LeaseKey::parse(&wire.proof)
            .map(|k| Proof(k.0))
            .map_err(|_| MessageError(format!("proof must be {} hex digits", KEY_BYTES * 2)))?;
        Ok(LeaseMessage {
            op: wire.op,
            proof,
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
    fn messages_round_trip_and_prove_only_their_key_op_and_carrier() {
        let mut m = LeaseMessage::new(LeaseOp::Resume, &key(7), Carrier::Callback);
        m.te = "te-1".into();
        let text = m.to_json();
        assert!(
            !text.contains(&key(7).secret_hex()),
            "the key is on the wire: {text}"
        );
        let parsed = LeaseMessage::parse(text.as_bytes()).unwrap().unwrap();
        assert_eq!(parsed, m);
        assert!(parsed.proves(&key(7), Carrier::Callback));
        assert!(!parsed.proves(&key(8), Carrier::Callback), "another key");
        assert!(!parsed.proves(&key(7), Carrier::Lease), "another carrier");
        let mut as_revoke = parsed.clone();
        as_revoke.op = LeaseOp::Revoke;
        assert!(!as_revoke.proves(&key(7), Carrier::Callback), "another op");

        let mut released = LeaseMessage::new(LeaseOp::Released, &key(7), Carrier::Lease);
        released.exit = Some(3);
        let text = released.to_json();
        assert!(
            text.contains("\"op\":\"released\"") && text.contains("\"exit\":3"),
            "{text}"
        );
        let back = LeaseMessage::parse(text.as_bytes()).unwrap().unwrap();
        assert_eq!(back, released);
        assert!(back.proves(&key(7), Carrier::Lease));
        let revoke = LeaseMessage::new(LeaseOp::Revoke, &key(1), Carrier::Callback);
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
            format!("{{\"testenv_lease\": {{\"op\": \"resume\", \"proof\": \"{secretish}\"}}}}"),
            format!("{{\"testenv_lease\": {{\"op\": \"steal\", \"proof\": \"{secretish}\"}}}}"),
            "{\"testenv_lease\": 5}".to_string(),
        ] {
            let err = LeaseMessage::parse(bad.as_bytes()).unwrap().unwrap_err();
            assert!(!err.to_string().contains(secretish), "{err}");
        }
    }
}
