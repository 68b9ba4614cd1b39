//! The WebSocket upgrade of `/ws` (RFC 6455 section 4.2), done here rather
//! than through axum's `WebSocketUpgrade` so that the socket is built with
//! an empty read buffer: tungstenite's default one reserves 4 KiB up front
//! for every connection, most of which an idle connection never uses.
//!
//! The request checks and the 101 answer are those of axum 0.7's
//! extractor: `GET`, `Connection` containing `upgrade`, `Upgrade:
//! websocket`, `Sec-WebSocket-Version: 13`, a `Sec-WebSocket-Key`, and a
//! connection hyper can upgrade. No subprotocol is negotiated.

use super::socket::WebSocket;
use axum::extract::Request;
use axum::http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// A request that asked for a WebSocket and can be upgraded.
pub(crate) struct WsUpgrade {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

impl WsUpgrade {
    /// Takes the upgrade out of `request`; `None` when it is not a valid
    /// WebSocket opening handshake (answered as plain HTTP by the caller).
    pub(crate) fn take(request: &mut Request) -> Option<Self> {
        let accept = accept_key(request.method(), request.headers())?;
        let on_upgrade = request.extensions_mut().remove::<OnUpgrade>()?;
        Some(Self { accept, on_upgrade })
    }

    /// The 101 answer; once it is sent, `callback` gets the socket on a
    /// task of its own (nothing happens if the upgrade fails).
    pub(crate) fn on_upgrade<C, F>(self, config: WebSocketConfig, callback: C) -> Response
    where
        C: FnOnce(WebSocket) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                tracing::debug!("relay WebSocket upgrade failed");
                return;
            };
            // An empty (unallocated) read buffer: it grows to what is read.
            let socket =
                WebSocketStream::from_partially_read(TokioIo::new(upgraded), Vec::new(), Role::Server, Some(config))
                    .await;
            callback(socket).await;
        });
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(SEC_WEBSOCKET_ACCEPT, self.accept);
        response
    }
}

/// The `Sec-WebSocket-Accept` answer to an opening handshake's method and
/// headers, if they are a valid one.
fn accept_key(method: &Method, headers: &HeaderMap) -> Option<HeaderValue> {
    if method != Method::GET
        || !header_contains(headers, CONNECTION, "upgrade")
        || !header_eq(headers, UPGRADE, "websocket")
        || !header_eq(headers, SEC_WEBSOCKET_VERSION, "13")
    {
        return None;
    }
    let key = headers.get(SEC_WEBSOCKET_KEY)?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).ok()
}

fn header_eq(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|header| header.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

fn header_contains(headers: &HeaderMap, name: HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .and_then(|header| header.to_str().ok())
        .is_some_and(|header| header.to_ascii_lowercase().contains(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        headers.insert(SEC_WEBSOCKET_KEY, HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="));
        headers
    }

    #[test]
    fn a_valid_opening_handshake_gets_the_rfc_accept_key() {
        // RFC 6455 section 1.3's example.
        let accept = accept_key(&Method::GET, &headers());
        assert_eq!(
            accept.as_ref().map(HeaderValue::as_bytes),
            Some(&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..])
        );
    }

    #[test]
    fn invalid_opening_handshakes_are_refused() {
        assert_eq!(accept_key(&Method::HEAD, &headers()), None);
        assert_eq!(accept_key(&Method::POST, &headers()), None);
        let changes = [
            (CONNECTION, Some("keep-alive")),
            (UPGRADE, Some("h2c")),
            (SEC_WEBSOCKET_VERSION, Some("8")),
            (SEC_WEBSOCKET_VERSION, None),
            (SEC_WEBSOCKET_KEY, None),
            (UPGRADE, None),
            (CONNECTION, None),
        ];
        for (name, value) in changes {
            let mut headers = headers();
            match value {
                Some(value) => headers.insert(name.clone(), HeaderValue::from_static(value)),
                None => headers.remove(&name),
            };
            assert_eq!(accept_key(&Method::GET, &headers), None, "{name}: {value:?} accepted");
        }
    }

    #[test]
    fn a_request_hyper_cannot_upgrade_is_refused() {
        let mut request = Request::new(axum::body::Body::empty());
        *request.method_mut() = Method::GET;
        *request.headers_mut() = headers();
        assert!(WsUpgrade::take(&mut request).is_none());
    }
}
