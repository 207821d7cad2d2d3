//! NBD URIs in the standard form: `nbd://host[:port][/export]` and
//! `nbd+unix:///[export]?socket=PATH`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Default NBD TCP port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// TCP host and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// Unix socket path.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI: address plus export name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub addr: NbdAddr,
    /// Export name (may be empty: the default export).
    pub export: String,
}

/// Why an NBD URI was rejected.
#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// The scheme is not `nbd` or `nbd+unix`.
    #[error("unsupported scheme in {uri:?} (want nbd:// or nbd+unix://)")]
    Scheme {
        /// The URI.
        uri: String,
    },
    /// The URI is malformed.
    #[error("malformed NBD URI {uri:?}: {reason}")]
    Malformed {
        /// The URI.
        uri: String,
        /// What is wrong.
        reason: &'static str,
    },
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl FromStr for NbdUri {
    type Err = UriError;

    fn from_str(uri: &str) -> Result<NbdUri, UriError> {
        let bad = |reason| UriError::Malformed {
            uri: uri.to_string(),
            reason,
        };
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| UriError::Scheme {
            uri: uri.to_string(),
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export =
            percent_decode(path).ok_or_else(|| bad("bad percent-encoding in export name"))?;
        match scheme {
            "nbd" => {
                if query.is_some() {
                    return Err(bad("nbd:// takes no query"));
                }
                let (host, port) = if let Some(stripped) = authority.strip_prefix('[') {
                    let (h, p) = stripped
                        .split_once(']')
                        .ok_or_else(|| bad("unclosed [ in host"))?;
                    (h.to_string(), p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), Some(p)),
                        None => (authority.to_string(), None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("missing host"));
                }
                let port = match port {
                    Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                    None => DEFAULT_PORT,
                };
                Ok(NbdUri {
                    addr: NbdAddr::Tcp { host, port },
                    export,
                })
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad("nbd+unix:// takes no host"));
                }
                let socket = query
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("socket="))
                    .ok_or_else(|| bad("missing ?socket=PATH"))?;
                let path =
                    percent_decode(socket).ok_or_else(|| bad("bad percent-encoding in socket"))?;
                Ok(NbdUri {
                    addr: NbdAddr::Unix {
                        path: PathBuf::from(path),
                    },
                    export,
                })
            }
            _ => Err(UriError::Scheme {
                uri: uri.to_string(),
            }),
        }
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            NbdAddr::Tcp { .. } => write!(f, "nbd://{}/{}", self.addr, self.export),
            NbdAddr::Unix { path } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_standard_forms() {
        let u: NbdUri = "nbd://127.0.0.1:10900/lun0".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10900
            }
        );
        assert_eq!(u.export, "lun0");
        let u: NbdUri = "nbd://example.com".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "example.com".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(u.export, "");
        let u: NbdUri = "nbd://[::1]:99/a%20b".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 99
            }
        );
        assert_eq!(u.export, "a b");
        let u: NbdUri = "nbd+unix:///exp?socket=/tmp/x.sock".parse().unwrap();
        assert_eq!(
            u.addr,
            NbdAddr::Unix {
                path: "/tmp/x.sock".into()
            }
        );
        assert_eq!(u.export, "exp");
        let u: NbdUri = "nbd+unix://?socket=/tmp/x.sock".parse().unwrap();
        assert_eq!(u.export, "");
        assert_eq!(u.to_string().parse::<NbdUri>().unwrap(), u);
    }

    #[test]
    fn rejects_bad_forms() {
        assert!(matches!(
            "http://x/".parse::<NbdUri>(),
            Err(UriError::Scheme { .. })
        ));
        assert!(matches!(
            "nbd+unix:///e".parse::<NbdUri>(),
            Err(UriError::Malformed { .. })
        ));
        assert!(matches!(
            "nbd://h:notaport/e".parse::<NbdUri>(),
            Err(UriError::Malformed { .. })
        ));
        assert!(matches!(
            "nbd:///e".parse::<NbdUri>(),
            Err(UriError::Malformed { .. })
        ));
    }
}
