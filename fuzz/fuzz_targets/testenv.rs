//! The agents' parsing of remote input: a lock request (as a testenv-worker gets it from any
//! client) and TE data (as a testenv-client gets it from any worker). Nothing may panic; what
//! validates must be usable as it promises.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use testenv_proto::request::{MAX_CALLBACK_LEN, MAX_FIELD_LEN, MAX_NODES};
use testenv_proto::{tedata, LockRequest, TeData, CALLBACK_PREFIX, MAX_TIMEOUT_SECS};

fuzz_target!(|data: &[u8]| {
    if let Ok(wire) = LockRequest::parse(data) {
        let _ = wire.timeout_secs();
        // The wire form survives its own round trip (what the client sends is what it meant).
        assert_eq!(LockRequest::parse(wire.to_json().as_bytes()).as_ref(), Ok(&wire));
        match wire.validate() {
            Ok(v) => {
                assert!(v.callback_name.starts_with(CALLBACK_PREFIX));
                assert!(v.callback_name.len() <= MAX_CALLBACK_LEN);
                assert!(!v.callback_name.bytes().any(|b| b == 0 || b.is_ascii_whitespace()));
                if let Some(t) = v.timeout {
                    assert!(t > Duration::ZERO && t <= Duration::from_secs(MAX_TIMEOUT_SECS));
                }
                let hold = v.timeout_or(Duration::from_secs(u64::MAX));
                assert!(hold <= Duration::from_secs(MAX_TIMEOUT_SECS));
                // The worker adds the lease length to "now": that must never overflow.
                assert!(std::time::Instant::now().checked_add(hold).is_some());
                for n in [v.envsize, v.compute_envsize, v.extra_nodes].into_iter().flatten() {
                    assert!(n <= MAX_NODES);
                }
                for f in [&v.ucinstance, &v.ssh_key, &v.net_iso, &v.job_identifier] {
                    assert!(f.len() <= MAX_FIELD_LEN && !f.contains('\0'));
                }
            }
            Err(e) => {
                let _ = e.to_string();
                if let Some(cb) = &e.callback {
                    assert_eq!(cb, &wire.callback_name);
                }
            }
        }
    }
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = tedata::is_failure_notice(&text);
    if let Ok(te) = TeData::parse(text.clone()) {
        assert_eq!(te.text(), text);
        let line = te.summary().to_string();
        assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
        assert_eq!(tedata::describe(&text), line);
    }
});
