//! `meshwire serve`'s addresses: what `--listen` means and what the
//! clients are told to use.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The address to bind for `--listen VALUE`: a bare port (`8765`, `:8765`)
/// means `127.0.0.1:PORT` (this machine only); anything else is used as
/// given (`0.0.0.0:8765` for every interface).
pub fn bind_address(listen: &str) -> String {
    let trimmed = listen.trim();
    let port = trimmed.strip_prefix(':').unwrap_or(trimmed);
    if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) {
        format!("127.0.0.1:{port}")
    } else {
        trimmed.to_owned()
    }
}

/// What clients should be given for a server bound to `bound`: the relay
/// URL (with `/ws`), the registry URL, and a note when the address is a
/// wildcard (`0.0.0.0`, `::`), which no client can dial: the URLs then
/// name the loopback address, and the note says what other machines use.
pub fn client_urls(bound: SocketAddr) -> (String, String, Option<String>) {
    let port = bound.port();
    let (host, note) = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (
            Ipv4Addr::LOCALHOST.to_string(),
            Some(format!(
                "listening on every interface ({bound}); on other machines use ws://<this machine's address>:{port}/ws \
                 and http://<this machine's address>:{port}"
            )),
        ),
        IpAddr::V6(ip) if ip.is_unspecified() => (
            format!("[{}]", Ipv6Addr::LOCALHOST),
            Some(format!(
                "listening on every interface ({bound}); on other machines use ws://<this machine's address>:{port}/ws \
                 and http://<this machine's address>:{port}"
            )),
        ),
        IpAddr::V4(ip) => (ip.to_string(), None),
        IpAddr::V6(ip) => (format!("[{ip}]"), None),
    };
    (format!("ws://{host}:{port}/ws"), format!("http://{host}:{port}"), note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_is_loopback() {
        assert_eq!(bind_address("8765"), "127.0.0.1:8765");
        assert_eq!(bind_address(":8765"), "127.0.0.1:8765");
        assert_eq!(bind_address("0.0.0.0:8765"), "0.0.0.0:8765");
        assert_eq!(bind_address("localhost:9"), "localhost:9");
    }

    #[test]
    fn wildcards_are_not_given_to_clients() {
        let (relay, registry, note) = client_urls("0.0.0.0:8765".parse().unwrap_or_else(|e| unreachable!("{e}")));
        assert_eq!(relay, "ws://127.0.0.1:8765/ws");
        assert_eq!(registry, "http://127.0.0.1:8765");
        assert!(note.is_some_and(|n| n.contains("every interface")));
        let (relay, _, note) = client_urls("[::]:1".parse().unwrap_or_else(|e| unreachable!("{e}")));
        assert_eq!(relay, "ws://[::1]:1/ws");
        assert!(note.is_some());
        let (relay, _, note) = client_urls("10.0.0.5:80".parse().unwrap_or_else(|e| unreachable!("{e}")));
        assert_eq!(relay, "ws://10.0.0.5:80/ws");
        assert!(note.is_none());
    }
}
