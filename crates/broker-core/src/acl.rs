//! Access control lists, with geard's semantics and file format.
//!
//! A connection is identified by the common name (CN) of its TLS client certificate; a
//! connection without one (plain TCP, or TLS without client certificates) has no identity and is
//! allowed nothing. ACLs are deny-by-default: a subject may register (CAN_DO) the functions its
//! `register` regex matches, submit jobs to the functions its `invoke` regex matches, and change
//! the ACL of others if `grant` is set. As in geard (Python's `re.match`), a regex matches when it
//! matches at the *start* of the function name; add `$` to match the whole name.
//!
//! The file is INI, one section per subject:
//!
//! ```ini
//! [testenv-worker]
//! register = lockenv.*
//!
//! [ci-client]
//! register = callback_.*
//! invoke = lockenv.*
//! ```
//!
//! Everything here is pure: no I/O, no clock.

use std::collections::BTreeMap;
use std::fmt::Write;

/// A regular expression as written (kept for `acl list`) and compiled (anchored at the start).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    /// Compiles `source` the way geard's `re.match` applies it: anchored at the start only.
    pub fn new(source: &str) -> Result<Pattern, AclError> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})"))
            // An operator may type any regex; keep a hostile one from eating memory.
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .build()
            .map_err(|e| AclError(format!("Regular expression error: {e}")))?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, name: &[u8]) -> bool {
        // Function names are bytes; a name that is not UTF-8 matches only what its lossy form
        // matches, which is safe since the replacement character is in no sane pattern.
        self.regex.is_match(&String::from_utf8_lossy(name))
    }
}

/// One subject's permissions.
#[derive(Debug, Clone, Default)]
pub struct AclEntry {
    pub register: Option<Pattern>,
    pub invoke: Option<Pattern>,
    pub grant: bool,
}

impl AclEntry {
    fn is_empty(&self) -> bool {
        self.register.is_none() && self.invoke.is_none() && !self.grant
    }
}

/// A failed ACL operation (bad regex, bad file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclError(pub String);

impl std::fmt::Display for AclError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AclError {}

/// Which permission an `acl grant|revoke|self-revoke` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Register,
    Invoke,
    Grant,
    /// Only for revoke: the whole entry.
    All,
}

impl Verb {
    fn parse(word: &str) -> Option<Verb> {
        match word {
            "register" => Some(Verb::Register),
            "invoke" => Some(Verb::Invoke),
            "grant" => Some(Verb::Grant),
            "all" => Some(Verb::All),
            _ => None,
        }
    }
}

/// The access control list: entries by subject, listed in subject order.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    subjects: BTreeMap<String, AclEntry>,
}

impl Acl {
    pub fn new() -> Acl {
        Acl::default()
    }

    /// Parses geard's ACL file (an INI file read with Python's `RawConfigParser`).
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::new();
        let mut section: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let lineno = n + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(rest) = line.strip_prefix('[') {
                let name = rest
                    .strip_suffix(']')
                    .ok_or_else(|| AclError(format!("line {lineno}: unterminated section header")))?
                    .to_string();
                if acl.subjects.contains_key(&name) {
                    return Err(AclError(format!(
                        "line {lineno}: An ACL entry for {name} already exists"
                    )));
                }
                acl.subjects.insert(name.clone(), AclEntry::default());
                section = Some(name);
                continue;
            }
            let Some(subject) = &section else {
                return Err(AclError(format!(
                    "line {lineno}: setting outside of a [subject] section"
                )));
            };
            let (key, value) = match (line.find('='), line.find(':')) {
                (Some(a), Some(b)) => line.split_at(a.min(b)),
                (Some(a), None) | (None, Some(a)) => line.split_at(a),
                (None, None) => {
                    return Err(AclError(format!("line {lineno}: expected `key = value`")))
                }
            };
            let key = key.trim().to_ascii_lowercase();
            let value = value[1..].trim();
            let entry = acl.subjects.get_mut(subject).expect("section entry");
            let pattern = |v: &str| -> Result<Option<Pattern>, AclError> {
                if v.is_empty() {
                    Ok(None)
                } else {
                    Pattern::new(v)
                        .map(Some)
                        .map_err(|e| AclError(format!("line {lineno}: {e}")))
                }
            };
            match key.as_str() {
                "register" => entry.register = pattern(value)?,
                "invoke" => entry.invoke = pattern(value)?,
                "grant" => {
                    entry.grant = parse_bool(value)
                        .ok_or_else(|| AclError(format!("line {lineno}: Not a boolean: {value}")))?
                }
                // RawConfigParser keeps unknown options; geard ignores them.
                _ => {}
            }
        }
        Ok(acl)
    }

    pub fn entry(&self, subject: &str) -> Option<&AclEntry> {
        self.subjects.get(subject)
    }

    pub fn can_register(&self, subject: Option<&str>, function: &[u8]) -> bool {
        subject
            .and_then(|s| self.subjects.get(s))
            .and_then(|e| e.register.as_ref())
            .is_some_and(|p| p.matches(function))
    }

    pub fn can_invoke(&self, subject: Option<&str>, function: &[u8]) -> bool {
        subject
            .and_then(|s| self.subjects.get(s))
            .and_then(|e| e.invoke.as_ref())
            .is_some_and(|p| p.matches(function))
    }

    pub fn can_grant(&self, subject: Option<&str>) -> bool {
        subject
            .and_then(|s| self.subjects.get(s))
            .is_some_and(|e| e.grant)
    }

    /// `acl list`: geard's format, one line per subject, then `.`.
    pub fn list(&self) -> String {
        let mut s = String::new();
        for (subject, e) in &self.subjects {
            let _ = writeln!(
                s,
                "{subject}\tregister={}\tinvoke={}\tgrant={}",
                e.register.as_ref().map_or("None", Pattern::source),
                e.invoke.as_ref().map_or("None", Pattern::source),
                if e.grant { "True" } else { "False" }
            );
        }
        s.push_str(".\n");
        s
    }

    pub fn grant(
        &mut self,
        verb: Verb,
        subject: &str,
        regex: Option<&str>,
    ) -> Result<(), AclError> {
        let pattern = match verb {
            Verb::Register | Verb::Invoke => {
                Some(Pattern::new(regex.ok_or_else(|| {
                    AclError("a regular expression is required".into())
                })?)?)
            }
            Verb::Grant => None,
            Verb::All => return Err(AclError("cannot grant all".into())),
        };
        let e = self.subjects.entry(subject.to_string()).or_default();
        match verb {
            Verb::Register => e.register = pattern,
            Verb::Invoke => e.invoke = pattern,
            Verb::Grant => e.grant = true,
            Verb::All => unreachable!(),
        }
        Ok(())
    }

    /// Revokes a permission; an entry left with none is removed, as geard does.
    pub fn revoke(&mut self, verb: Verb, subject: &str) {
        if verb == Verb::All {
            self.subjects.remove(subject);
            return;
        }
        let Some(e) = self.subjects.get_mut(subject) else {
            return;
        };
        match verb {
            Verb::Register => e.register = None,
            Verb::Invoke => e.invoke = None,
            Verb::Grant => e.grant = false,
            Verb::All => unreachable!(),
        }
        if e.is_empty() {
            self.subjects.remove(subject);
        }
    }

    /// Runs an `acl ...` admin line for a connection whose identity is `me`; returns the reply.
    ///
    /// Replies are geard's: `OK`, `ERR PERMISSION_DENIED`, `ERR UNKNOWN_ACL_VERB`,
    /// `ERR UNABLE <why>`; arguments missing (geard raises an exception there) give gearmand's
    /// `ERR INVALID_ARGUMENTS`.
    pub fn admin(&mut self, me: Option<&str>, line: &str) -> String {
        let invalid =
            "ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+acl\n";
        // `acl grant VERB SUBJECT REGEX`: the regex is the rest of the line, spaces included.
        let words: Vec<&str> = splitn_whitespace(line, 5);
        match words.get(1).copied() {
            Some("list") => self.list(),
            Some("grant") => {
                let (Some(verb), Some(subject)) = (words.get(2), words.get(3)) else {
                    return invalid.into();
                };
                if !self.can_grant(me) {
                    return "ERR PERMISSION_DENIED\n".into();
                }
                let verb = match Verb::parse(verb) {
                    Some(v @ (Verb::Register | Verb::Invoke | Verb::Grant)) => v,
                    _ => return "ERR UNKNOWN_ACL_VERB\n".into(),
                };
                let regex = words.get(4).map(|r| r.trim_end());
                if verb != Verb::Grant && regex.is_none() {
                    return invalid.into();
                }
                match self.grant(verb, subject, regex) {
                    Ok(()) => "OK\n".into(),
                    Err(e) => format!("ERR UNABLE {}\n", e.0.replace(['\n', '\r'], " ")),
                }
            }
            Some("revoke") => {
                let (Some(verb), Some(subject)) = (words.get(2), words.get(3)) else {
                    return invalid.into();
                };
                if Some(*subject) != me && !self.can_grant(me) {
                    return "ERR PERMISSION_DENIED\n".into();
                }
                let Some(verb) = Verb::parse(verb) else {
                    return "ERR UNKNOWN_ACL_VERB\n".into();
                };
                self.revoke(verb, subject);
                "OK\n".into()
            }
            Some("self-revoke") => {
                let Some(verb) = words.get(2) else {
                    return invalid.into();
                };
                let Some(verb) = Verb::parse(verb) else {
                    return "ERR UNKNOWN_ACL_VERB\n".into();
                };
                if let Some(me) = me {
                    self.revoke(verb, me);
                }
                "OK\n".into()
            }
            _ => "ERR UNKNOWN_COMMAND Unknown+server+commandacl\n".into(),
        }
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// Python's `str.split(None, n - 1)`: at most `n` words, the last one the rest of the line.
fn splitn_whitespace(line: &str, n: usize) -> Vec<&str> {
    let mut words = Vec::new();
    let mut rest = line.trim_start();
    while !rest.is_empty() {
        if words.len() + 1 == n {
            words.push(rest);
            break;
        }
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        words.push(&rest[..end]);
        rest = rest[end..].trim_start();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# testenv deployment
[worker]
register = lockenv.*

[client]
register: callback_.*
invoke = lockenv
; operator
[admin]
grant = yes
";

    #[test]
    fn file_format_and_checks() {
        let acl = Acl::parse(FILE).unwrap();
        assert!(acl.can_register(Some("worker"), b"lockenv"));
        assert!(acl.can_register(Some("worker"), b"lockenv-big"));
        assert!(!acl.can_register(Some("worker"), b"callback_1"));
        assert!(!acl.can_invoke(Some("worker"), b"lockenv"));
        assert!(acl.can_register(Some("client"), b"callback_abc"));
        // Anchored at the start only, like Python's re.match.
        assert!(!acl.can_register(Some("client"), b"xcallback_abc"));
        assert!(acl.can_invoke(Some("client"), b"lockenvzzz"));
        assert!(acl.can_grant(Some("admin")));
        assert!(!acl.can_grant(Some("client")));
        assert!(!acl.can_register(None, b"lockenv"));
        assert!(!acl.can_invoke(Some("nobody"), b"lockenv"));
        assert_eq!(
            acl.list(),
            "admin\tregister=None\tinvoke=None\tgrant=True\n\
             client\tregister=callback_.*\tinvoke=lockenv\tgrant=False\n\
             worker\tregister=lockenv.*\tinvoke=None\tgrant=False\n.\n"
        );
    }

    #[test]
    fn bad_files() {
        assert!(Acl::parse("register = x\n").is_err());
        assert!(Acl::parse("[a]\nregister = (\n").is_err());
        assert!(Acl::parse("[a]\n[a]\n").is_err());
        assert!(Acl::parse("[a]\ngrant = maybe\n").is_err());
        assert!(Acl::parse("[a\n").is_err());
    }

    #[test]
    fn admin_commands() {
        let mut acl = Acl::parse(FILE).unwrap();
        assert_eq!(
            acl.admin(Some("client"), "acl grant invoke x .*"),
            "ERR PERMISSION_DENIED\n"
        );
        assert_eq!(
            acl.admin(None, "acl grant invoke x .*"),
            "ERR PERMISSION_DENIED\n"
        );
        assert_eq!(
            acl.admin(Some("admin"), "acl grant invoke x foo bar"),
            "OK\n"
        );
        assert!(acl.can_invoke(Some("x"), b"foo bar"));
        assert_eq!(acl.admin(Some("admin"), "acl grant register x ^a"), "OK\n");
        assert_eq!(acl.admin(Some("admin"), "acl grant grant x"), "OK\n");
        assert!(acl.can_grant(Some("x")));
        assert_eq!(
            acl.admin(Some("admin"), "acl grant bogus x y"),
            "ERR UNKNOWN_ACL_VERB\n"
        );
        assert!(acl
            .admin(Some("admin"), "acl grant register x (")
            .starts_with("ERR UNABLE "));
        assert!(acl
            .admin(Some("admin"), "acl grant register x")
            .starts_with("ERR INVALID_ARGUMENTS"));
        assert!(acl
            .admin(Some("admin"), "acl grant")
            .starts_with("ERR INVALID_ARGUMENTS"));
        // Revoking another's permission needs grant; revoking one's own does not.
        assert_eq!(
            acl.admin(Some("client"), "acl revoke invoke x"),
            "ERR PERMISSION_DENIED\n"
        );
        assert_eq!(acl.admin(Some("x"), "acl revoke invoke x"), "OK\n");
        assert!(!acl.can_invoke(Some("x"), b"foo bar"));
        assert_eq!(acl.admin(Some("x"), "acl self-revoke grant"), "OK\n");
        assert!(!acl.can_grant(Some("x")));
        assert_eq!(acl.admin(Some("admin"), "acl revoke register x"), "OK\n");
        assert!(acl.entry("x").is_none(), "an empty entry is removed");
        assert_eq!(acl.admin(Some("admin"), "acl revoke all client"), "OK\n");
        assert!(acl.entry("client").is_none());
        assert_eq!(
            acl.admin(Some("worker"), "acl self-revoke frob"),
            "ERR UNKNOWN_ACL_VERB\n"
        );
        assert_eq!(acl.admin(Some("worker"), "acl self-revoke all"), "OK\n");
        assert!(acl.entry("worker").is_none());
        assert!(acl
            .admin(None, "acl frob")
            .starts_with("ERR UNKNOWN_COMMAND"));
    }
}
