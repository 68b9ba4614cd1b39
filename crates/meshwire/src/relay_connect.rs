//! Joining a relay: which URL to dial, what went wrong when it failed, and
//! the shared-secret token of the `connect` frame.
//!
//! **The URL rule.** A relay URL with a path is used as given (so a router
//! that serves the relay under `http://127.0.0.1:8443/agt/relay` works); a
//! bare `ws(s)://host[:port]` or `http(s)://host[:port]` gets `/ws`, where
//! meshwire's server and the AGT relay listen. `http` becomes `ws` and
//! `https` becomes `wss`. See [`RelayEndpoint::parse`].

use std::fmt;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

/// The path a bare relay URL gets.
pub const DEFAULT_RELAY_PATH: &str = "/ws";

/// Longest part of an HTTP error body quoted in a [`ConnectFailure`].
pub const MAX_QUOTED_BODY: usize = 200;

/// A relay URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayUrlError {
    /// Not a URL at all.
    #[error("relay URL {url:?} is not a URL: {reason}")]
    Invalid {
        /// The URL as given.
        url: String,
        /// What the URL parser said.
        reason: String,
    },
    /// A scheme other than `ws`, `wss`, `http` or `https`.
    #[error("relay URL {url:?} has scheme {scheme:?}; use ws://, wss://, http:// or https://")]
    Scheme {
        /// The URL as given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// No host name.
    #[error("relay URL {url:?} has no host")]
    NoHost {
        /// The URL as given.
        url: String,
    },
}

/// The WebSocket URL a client dials, after the URL rule (module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEndpoint {
    url: url::Url,
}

impl RelayEndpoint {
    /// Applies the URL rule to `given`:
    ///
    /// ```
    /// use meshwire::relay_connect::RelayEndpoint;
    /// let e = |u: &str| RelayEndpoint::parse(u).map(|e| e.to_string());
    /// assert_eq!(e("ws://127.0.0.1:8765").unwrap(), "ws://127.0.0.1:8765/ws");
    /// assert_eq!(e("ws://127.0.0.1:8765/ws").unwrap(), "ws://127.0.0.1:8765/ws");
    /// assert_eq!(e("https://relay.example.com").unwrap(), "wss://relay.example.com/ws");
    /// assert_eq!(e("http://127.0.0.1:8443/agt/relay").unwrap(), "ws://127.0.0.1:8443/agt/relay");
    /// assert!(e("ftp://x").is_err());
    /// ```
    pub fn parse(given: &str) -> Result<Self, RelayUrlError> {
        let trimmed = given.trim();
        let mut url = url::Url::parse(trimmed).map_err(|e| RelayUrlError::Invalid {
            url: given.to_owned(),
            reason: e.to_string(),
        })?;
        let scheme = match url.scheme() {
            "ws" | "http" => "ws",
            "wss" | "https" => "wss",
            other => {
                return Err(RelayUrlError::Scheme {
                    url: given.to_owned(),
                    scheme: other.to_owned(),
                })
            }
        };
        if url.host_str().is_none_or(str::is_empty) {
            return Err(RelayUrlError::NoHost { url: given.to_owned() });
        }
        if url.scheme() != scheme {
            // ws/wss and http/https are all "special" schemes: the switch
            // between them cannot fail, but a failure must not go unseen.
            url.set_scheme(scheme).map_err(|()| RelayUrlError::Scheme {
                url: given.to_owned(),
                scheme: url.scheme().to_owned(),
            })?;
        }
        if url.path().is_empty() || url.path() == "/" {
            url.set_path(DEFAULT_RELAY_PATH);
        }
        Ok(Self { url })
    }

    /// The URL to dial.
    pub fn as_str(&self) -> &str {
        self.url.as_str()
    }

    /// `scheme://host[:port]`, the relay's origin (the audience of a
    /// challenge-bound proof).
    pub fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// The path (and query) of the upgrade request, e.g. `/ws`.
    pub fn path_and_query(&self) -> String {
        match self.url.query() {
            Some(q) => format!("{}?{q}", self.url.path()),
            None => self.url.path().to_owned(),
        }
    }

    /// Whether the relay is dialled over TLS (`wss`).
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "wss"
    }

    /// `host:port` (the default port of the scheme when none is given).
    pub fn host_port(&self) -> String {
        let host = self.url.host_str().unwrap_or_default();
        let port = self.url.port_or_known_default().unwrap_or(80);
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    }
}

impl fmt::Display for RelayEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.url.as_str())
    }
}

/// Why joining the relay failed, as a person can act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectFailure {
    /// The URL is unusable.
    #[error(transparent)]
    Url(#[from] RelayUrlError),
    /// Nothing listens there.
    #[error("cannot join the relay at {url}: connection refused by {host_port} (is the relay running there?)")]
    Refused {
        /// The URL dialled.
        url: String,
        /// `host:port` dialled.
        host_port: String,
    },
    /// The host name does not resolve.
    #[error("cannot join the relay at {url}: the host name does not resolve ({detail})")]
    Dns {
        /// The URL dialled.
        url: String,
        /// The resolver's message.
        detail: String,
    },
    /// The server answered the WebSocket upgrade with an HTTP status.
    #[error(
        "cannot join the relay at {url}: the server answered the WebSocket upgrade with HTTP {status}{hint}{body}"
    )]
    HttpStatus {
        /// The URL dialled.
        url: String,
        /// Status code and reason, e.g. `404 Not Found`.
        status: String,
        /// A hint about the usual cause (may be empty).
        hint: String,
        /// The start of the response body (may be empty), prefixed with `: `.
        body: String,
    },
    /// TLS failed (certificate, protocol) or is not available.
    #[error("cannot join the relay at {url}: TLS failed: {detail}")]
    Tls {
        /// The URL dialled.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The relay refused the `connect` frame and closed the socket.
    #[error("the relay at {url} rejected this agent: close code {code}{reason}{hint}")]
    Rejected {
        /// The URL dialled.
        url: String,
        /// WebSocket close code (4003: token, 4005: proof).
        code: u16,
        /// The relay's reason (close reason or error frame), prefixed with `, `.
        reason: String,
        /// What to check.
        hint: String,
    },
    /// The relay closed the connection before the agent joined.
    #[error("the relay at {url} closed the connection before this agent joined ({detail})")]
    Closed {
        /// The URL dialled.
        url: String,
        /// Close code and reason, or the socket error.
        detail: String,
    },
    /// No answer in time.
    #[error("cannot join the relay at {url}: no answer within {after:?}")]
    Timeout {
        /// The URL dialled.
        url: String,
        /// How long it waited.
        after: Duration,
    },
    /// Another network error.
    #[error("cannot join the relay at {url}: {detail}")]
    Network {
        /// The URL dialled.
        url: String,
        /// The error.
        detail: String,
    },
}

impl ConnectFailure {
    /// A rejection (close `code` with `reason`) before the agent joined.
    pub fn rejected(url: &str, code: u16, reason: &str) -> Self {
        let hint = match code {
            4003 => {
                " (authentication failed: the relay wants a shared-secret token; pass it with --relay-token-file, \
                     ClientConfig::relay_token or relay_token=)"
            }
            4005 => {
                " (the proof of possession was refused: check this machine's clock, or whether the \
                     relay requires another proof scheme)"
            }
            _ => "",
        };
        Self::Rejected {
            url: url.to_owned(),
            code,
            reason: if reason.is_empty() {
                String::new()
            } else {
                format!(", {reason:?}")
            },
            hint: hint.to_owned(),
        }
    }

    /// Classifies a failed WebSocket handshake with `endpoint`. A plain I/O
    /// error other than "refused" is checked against the resolver, so that
    /// a name that does not resolve is reported as such.
    pub async fn from_handshake(endpoint: &RelayEndpoint, error: &tungstenite::Error) -> Self {
        let url = endpoint.to_string();
        match error {
            tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => Self::Refused {
                url,
                host_port: endpoint.host_port(),
            },
            // Over wss, bytes that are not TLS (a plain-HTTP port) or a
            // refused certificate surface as invalid data.
            tungstenite::Error::Io(io) if endpoint.is_tls() && io.kind() == std::io::ErrorKind::InvalidData => {
                Self::Tls {
                    url,
                    detail: io.to_string(),
                }
            }
            tungstenite::Error::Io(io) => match tokio::net::lookup_host(endpoint.host_port()).await {
                Err(dns) => Self::Dns {
                    url,
                    detail: dns.to_string(),
                },
                Ok(_) => Self::Network {
                    url,
                    detail: io.to_string(),
                },
            },
            tungstenite::Error::Http(response) => {
                let status = response.status();
                let hint = match status.as_u16() {
                    404 => {
                        " (wrong path? a bare ws://host:port gets /ws; give the full URL of a relay served elsewhere)"
                    }
                    401 | 403 => " (the relay or a proxy in front of it refused the request)",
                    _ => "",
                };
                let body = response
                    .body()
                    .as_deref()
                    .map(|b| {
                        String::from_utf8_lossy(&b[..b.len().min(MAX_QUOTED_BODY)])
                            .trim()
                            .to_owned()
                    })
                    .filter(|b| !b.is_empty())
                    .map(|b| format!(": {b:?}"))
                    .unwrap_or_default();
                Self::HttpStatus {
                    url,
                    status: status.to_string(),
                    hint: hint.to_owned(),
                    body,
                }
            }
            tungstenite::Error::Tls(tls) => Self::Tls {
                url,
                detail: tls.to_string(),
            },
            tungstenite::Error::Url(tungstenite::error::UrlError::TlsFeatureNotEnabled) => Self::Tls {
                url,
                detail: "this build has no TLS support for wss:// relays".into(),
            },
            other => Self::Network {
                url,
                detail: other.to_string(),
            },
        }
    }
}

/// `connect_frame` (JSON text) with `token` added as its `token` field,
/// where relays started with a shared secret (AGT's
/// `AGENTMESH_RELAY_TOKEN`, `meshwire serve --relay-token`) look for it.
/// Text that is not a JSON object is returned unchanged.
pub fn with_token(connect_frame: &str, token: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(connect_frame) {
        Ok(serde_json::Value::Object(mut frame)) => {
            frame.insert("token".into(), serde_json::Value::String(token.to_owned()));
            serde_json::Value::Object(frame).to_string()
        }
        _ => connect_frame.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial(url: &str) -> String {
        match RelayEndpoint::parse(url) {
            Ok(e) => e.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn the_url_rule() {
        assert_eq!(dial("ws://127.0.0.1:8765"), "ws://127.0.0.1:8765/ws");
        assert_eq!(dial("ws://127.0.0.1:8765/"), "ws://127.0.0.1:8765/ws");
        assert_eq!(dial("ws://127.0.0.1:8765/ws"), "ws://127.0.0.1:8765/ws");
        assert_eq!(dial("  wss://relay.example.com  "), "wss://relay.example.com/ws");
        assert_eq!(dial("http://127.0.0.1:8765"), "ws://127.0.0.1:8765/ws");
        assert_eq!(
            dial("https://relay.example.com:8443"),
            "wss://relay.example.com:8443/ws"
        );
        assert_eq!(dial("http://127.0.0.1:8443/agt/relay"), "ws://127.0.0.1:8443/agt/relay");
        assert_eq!(dial("ws://[::1]:9000/x?y=1"), "ws://[::1]:9000/x?y=1");
        assert!(dial("ftp://host").starts_with("error: relay URL \"ftp://host\" has scheme \"ftp\""));
        assert!(
            dial("127.0.0.1:8765").starts_with("error:"),
            "{}",
            dial("127.0.0.1:8765")
        );
        assert!(dial("not a url").starts_with("error: relay URL \"not a url\" is not a URL"));
    }

    #[test]
    fn endpoint_parts() {
        let e = RelayEndpoint::parse("http://127.0.0.1:8443/agt/relay?x=1").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(e.origin(), "ws://127.0.0.1:8443");
        assert_eq!(e.path_and_query(), "/agt/relay?x=1");
        assert_eq!(e.host_port(), "127.0.0.1:8443");
        let e = RelayEndpoint::parse("wss://relay.example.com").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(e.host_port(), "relay.example.com:443");
        let e = RelayEndpoint::parse("ws://[::1]:9").unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(e.host_port(), "[::1]:9");
    }

    #[test]
    fn tokens_go_into_the_connect_frame() {
        let frame = r#"{"v":1,"type":"connect","from":"did:mesh:x"}"#;
        assert_eq!(
            with_token(frame, "s3cret"),
            r#"{"v":1,"type":"connect","from":"did:mesh:x","token":"s3cret"}"#
        );
        assert_eq!(with_token("[1]", "t"), "[1]");
    }

    #[test]
    fn rejections_explain_themselves() {
        let text = ConnectFailure::rejected("ws://h/ws", 4003, "Authentication failed").to_string();
        assert!(text.contains("close code 4003, \"Authentication failed\""), "{text}");
        assert!(text.contains("token"), "{text}");
        let text = ConnectFailure::rejected("ws://h/ws", 4005, "").to_string();
        assert!(text.contains("close code 4005 (the proof"), "{text}");
    }
}
