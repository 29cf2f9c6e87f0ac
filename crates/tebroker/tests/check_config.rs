//! `tebroker check-config FILE` on real files: the shipped config, each kind of mistake an
//! operator makes (unknown key, bad value, unreadable or invalid ACL and TLS files), and TLS
//! files that load.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use test_support::{run_with_timeout, Pki};

struct Checked {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn check_config(file: &Path) -> Checked {
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_tebroker"))
            .arg("check-config")
            .arg(file),
        Duration::from_secs(30),
    );
    Checked {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn config(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tebroker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Exit 1, nothing on stdout, and stderr says `what`.
fn refused(checked: &Checked, what: &[&str]) {
    assert_eq!(checked.code, Some(1), "stderr: {}", checked.stderr);
    assert_eq!(checked.stdout, "", "no settings printed for a bad file");
    for part in what {
        assert!(
            checked.stderr.contains(part),
            "stderr should mention {part:?}: {}",
            checked.stderr
        );
    }
}

#[test]
fn the_shipped_config_is_valid_and_every_default_is_printed() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/tebroker.toml");
    let checked = check_config(&shipped);
    assert_eq!(checked.code, Some(0), "stderr: {}", checked.stderr);
    let lines: Vec<&str> = checked.stdout.lines().collect();
    // From the file, and defaults the file does not set.
    for line in [
        "port = 4730",
        "keepalive_idle = 300",
        "http = \"127.0.0.1:8080\"",
        "shutdown_timeout = 60",
        "backlog = 4096",
        "callback_protection = true",
    ] {
        assert!(
            lines.contains(&line),
            "{line:?} missing: {}",
            checked.stdout
        );
    }
    // What it prints is itself a valid config file meaning the same.
    let dir = tempfile::tempdir().unwrap();
    let again = check_config(&config(dir.path(), &checked.stdout));
    assert_eq!(again.code, Some(0), "stderr: {}", again.stderr);
    assert_eq!(
        again.stdout.lines().skip(1).collect::<Vec<_>>(),
        lines[1..].to_vec()
    );
}

#[test]
fn an_unknown_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let checked = check_config(&config(dir.path(), "port = 4730\nmax_conections = 5\n"));
    refused(
        &checked,
        &["unknown field `max_conections`", "tebroker.toml"],
    );
}

#[test]
fn a_bad_value_is_named() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &check_config(&config(dir.path(), "port = 70000\n")),
        &["port", "tebroker.toml"],
    );
    refused(
        &check_config(&config(dir.path(), "keepalive = \"yes\"\n")),
        &["keepalive"],
    );
    refused(
        &check_config(&config(dir.path(), "http = \"localhost\"\n")),
        &["http = \"localhost\""],
    );
    refused(
        &check_config(&config(dir.path(), "ssl_cert = \"/x.pem\"\n")),
        &["--ssl-key"],
    );
}

#[test]
fn a_missing_or_unreadable_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    refused(
        &check_config(&dir.path().join("absent.toml")),
        &["cannot read config file", "absent.toml"],
    );
    let acl = dir.path().join("acl.ini");
    let text = format!("acl = {:?}\n", acl.display().to_string());
    refused(
        &check_config(&config(dir.path(), &text)),
        &["cannot read ACL file", "acl.ini"],
    );
    std::fs::write(&acl, "[worker]\nregister = (\n").unwrap();
    refused(
        &check_config(&config(dir.path(), &text)),
        &["invalid ACL file", "acl.ini"],
    );
    std::fs::write(&acl, "[worker]\nregister = lockenv\n").unwrap();
    let ok = check_config(&config(dir.path(), &text));
    assert_eq!(ok.code, Some(0), "a valid ACL file: {}", ok.stderr);
}

#[test]
fn tls_files_are_loaded_as_serve_loads_them() {
    let pki = Pki::new("check-config CA");
    let server = pki.issue("localhost");
    let dir = tempfile::tempdir().unwrap();
    let tls = |cert: &Path, key: &Path| {
        format!(
            "ssl_cert = {:?}\nssl_key = {:?}\nssl_ca = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            pki.ca().display().to_string()
        )
    };
    let ok = check_config(&config(dir.path(), &tls(&server.cert, &server.key)));
    assert_eq!(ok.code, Some(0), "stderr: {}", ok.stderr);
    assert!(ok.stdout.contains("ssl_ca = "), "{}", ok.stdout);

    let missing = dir.path().join("missing.key");
    refused(
        &check_config(&config(dir.path(), &tls(&server.cert, &missing))),
        &["TLS files", "missing.key"],
    );
    // A certificate where the key should be: named, and no key material printed.
    refused(
        &check_config(&config(dir.path(), &tls(&server.cert, &server.cert))),
        &["no private key in", &server.cert.display().to_string()],
    );
    let other = pki.issue("other");
    let mismatched = check_config(&config(dir.path(), &tls(&server.cert, &other.key)));
    refused(&mismatched, &["do not make a usable certificate and key"]);
    assert!(!mismatched.stderr.contains("PRIVATE KEY"));
}
