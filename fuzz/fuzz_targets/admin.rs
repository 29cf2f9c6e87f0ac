//! The admin command parser, and geard's ACL commands and file format, on arbitrary text.
#![no_main]

use broker_core::acl::Acl;
use gearman_proto::AdminCommand;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        match AdminCommand::parse(line) {
            Ok(_) => {}
            Err(e) => {
                let l = e.to_line();
                assert!(l.starts_with("ERR ") && l.ends_with('\n'));
                // One line only: nothing from the input may inject another reply line.
                assert_eq!(l.matches('\n').count(), 1, "{l:?}");
            }
        }
    }
    let mut acl = Acl::parse("[admin]\ngrant = true\n[w]\nregister = lockenv\n").unwrap();
    for line in text.split('\n') {
        for me in [Some("admin"), Some("w"), None] {
            let reply = acl.admin(me, &format!("acl {line}"));
            assert!(reply.ends_with('\n'));
            if !reply.ends_with(".\n") {
                assert_eq!(reply.matches('\n').count(), 1, "{reply:?}");
            }
        }
    }
    let _ = acl.list();
    if let Ok(parsed) = Acl::parse(&text) {
        let _ = parsed.list();
        let _ = parsed.can_register(Some("x"), data);
    }
});
