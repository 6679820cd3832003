//! [`NbdUri`]: the `nbd://HOST[:PORT][/EXPORT]` URIs Cairn agents publish, parsed and checked.
//!
//! Guarantees: a parsed URI is plain TCP, has a host and a port in 1..=65535, and carries no
//! query, fragment, whitespace or control character, so the string handed to a helper means
//! exactly host, port and export. Assumes nothing about the host (no lookup happens here).

use crate::host::error::{HostError, Result};

/// A parsed `nbd://HOST[:PORT][/EXPORT]` URI (plain TCP; the form Cairn agents publish).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// TCP port (10809 when the URI has none).
    pub port: u16,
    /// Export name (empty: the default export).
    pub export: String,
    text: String,
}

impl NbdUri {
    /// Parses and checks `uri`. Only `nbd://` is accepted, without query or fragment, so
    /// the string handed to nbdfuse means exactly host, port and export.
    pub fn parse(uri: &str) -> Result<NbdUri> {
        let bad = |why| HostError::InvalidUri {
            uri: uri.to_string(),
            why,
        };
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or_else(|| bad("only nbd:// URIs are supported"))?;
        if uri.contains(['?', '#']) || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(
                "no query, fragment, whitespace or control characters allowed",
            ));
        }
        let (authority, export) = match rest.split_once('/') {
            Some((a, e)) => (a, e),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => 10809,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("bad port"))?,
        };
        Ok(NbdUri {
            host: host.to_string(),
            port,
            export: export.to_string(),
            text: uri.to_string(),
        })
    }

    /// The URI as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse() {
        let u = NbdUri::parse("nbd://127.0.0.1:10809/vol0").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("127.0.0.1", 10809, "vol0")
        );
        let u = NbdUri::parse("nbd://[::1]:2000/a/b").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("::1", 2000, "a/b")
        );
        let u = NbdUri::parse("nbd://node-1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.export.as_str()),
            ("node-1", 10809, "")
        );
        assert_eq!(NbdUri::parse("nbd://[::1]/x").unwrap().port, 10809);
        for bad in [
            "nbds://h/x",
            "nbd+unix:///x?socket=/s",
            "nbd://h:0/x",
            "nbd://h:99999/x",
            "nbd://:1/x",
            "nbd://h/x?tls=on",
            "nbd://h/x y",
            "nbd://[::1/x",
            "http://h/x",
        ] {
            assert!(NbdUri::parse(bad).is_err(), "{bad}");
        }
    }
}
