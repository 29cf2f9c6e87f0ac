//! Server addresses: parsing of `host[:port],host[:port]` lists, as given on the command line of
//! the testenv agents (`-b BROKER[,BROKER...]`).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The port Gearman servers listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4730;

/// Per-server TLS settings, mirroring python gear's `addServer(ssl_key, ssl_cert, ssl_ca)`.
///
/// `ssl_ca` is required; `ssl_cert` and `ssl_key` (together) present a client certificate. The
/// server's certificate must chain to `ssl_ca` and name the host connected to. Unusable settings
/// fail with [`Error::TlsConfig`](crate::Error::TlsConfig), which is not retried.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TlsConfig {
    /// Client certificate (PEM) presented to the server.
    pub ssl_cert: Option<PathBuf>,
    /// Private key (PEM) of `ssl_cert`.
    pub ssl_key: Option<PathBuf>,
    /// CA bundle (PEM) the server certificate must chain to.
    pub ssl_ca: Option<PathBuf>,
}

/// One Gearman server to connect to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// TLS settings; `None` means plain TCP.
    pub tls: Option<TlsConfig>,
}

impl ServerAddr {
    /// A plain-TCP server address.
    pub fn new(host: impl Into<String>, port: u16) -> ServerAddr {
        ServerAddr {
            host: host.into(),
            port,
            tls: None,
        }
    }

    /// `127.0.0.1:port`, handy in tests.
    pub fn localhost(port: u16) -> ServerAddr {
        ServerAddr::new("127.0.0.1", port)
    }

    /// The same address with TLS settings attached.
    pub fn with_tls(mut self, tls: TlsConfig) -> ServerAddr {
        self.tls = Some(tls);
        self
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a server address could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server address {input:?}: {reason}")]
pub struct AddrError {
    pub input: String,
    pub reason: String,
}

fn bad(input: &str, reason: impl Into<String>) -> AddrError {
    AddrError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

impl FromStr for ServerAddr {
    type Err = AddrError;

    /// Parses `host`, `host:port`, `[v6]`, `[v6]:port`. A bare IPv6 literal such as `::1` is
    /// accepted too (it cannot carry a port, since the colons are ambiguous).
    fn from_str(input: &str) -> Result<ServerAddr, AddrError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(bad(input, "empty address"));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some(end) = rest.find(']') else {
                return Err(bad(input, "missing ']' after IPv6 address"));
            };
            let host = &rest[..end];
            let after = &rest[end + 1..];
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad(input, "expected ':PORT' after ']'"))?,
                ),
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad(input, "brackets must hold an IPv6 address"));
            }
            (host, port)
        } else if s.matches(':').count() > 1 {
            if s.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad(
                    input,
                    "too many ':'; write IPv6 addresses as [ADDR]:PORT",
                ));
            }
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() {
            return Err(bad(input, "empty host"));
        }
        if host.chars().any(|c| c.is_whitespace() || c == '/') {
            return Err(bad(input, "host contains invalid characters"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some("") => return Err(bad(input, "empty port")),
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err(bad(input, "port 0 is not valid")),
                Ok(n) => n,
                Err(_) => return Err(bad(input, format!("port {p:?} is not a number 1-65535"))),
            },
        };
        Ok(ServerAddr::new(host, port))
    }
}

/// Parses a comma separated server list such as `gear1,gear2:4731,[::1]:4730`.
///
/// Spaces around entries are ignored; an empty list or an empty entry is an error, so that a
/// typo like `a,,b` is reported rather than silently dropped.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, AddrError> {
    if list.trim().is_empty() {
        return Err(bad(list, "no servers given"));
    }
    list.split(',').map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hosts_ports_and_ipv6() {
        let got = parse_servers("gear1, gear2:4731,[::1]:5000,[fe80::1],10.0.0.1:1,::1").unwrap();
        let want = vec![
            ServerAddr::new("gear1", 4730),
            ServerAddr::new("gear2", 4731),
            ServerAddr::new("::1", 5000),
            ServerAddr::new("fe80::1", 4730),
            ServerAddr::new("10.0.0.1", 1),
            ServerAddr::new("::1", 4730),
        ];
        assert_eq!(got, want);
        assert_eq!(got[2].to_string(), "[::1]:5000");
        assert_eq!(got[1].to_string(), "gear2:4731");
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for bad in [
            "",
            " ",
            "a,,b",
            "host:",
            ":4730",
            "host:abc",
            "host:70000",
            "host:0",
            "[::1",
            "[::1]x",
            "[nothost]:1",
            "a:b:c",
            "ho st",
        ] {
            let err = parse_servers(bad).unwrap_err();
            assert!(!err.reason.is_empty(), "{bad:?}");
            assert!(err.to_string().contains("invalid server address"), "{err}");
        }
    }
}
