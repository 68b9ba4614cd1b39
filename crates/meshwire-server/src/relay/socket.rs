//! Writing to and reading from a relay WebSocket, with timeouts: frames,
//! error frames, close frames and the linger after a close.

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use std::borrow::Cow;
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long to wait for the peer's close frame after sending ours.
const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// A peer that does not take a frame within this long is dropped.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A relay connection's WebSocket (see [`super::upgrade`]).
pub(crate) type WebSocket = WebSocketStream<TokioIo<Upgraded>>;
/// The sending half of a relay connection.
pub(crate) type Sink = SplitSink<WebSocket, Message>;
/// The receiving half of a relay connection.
pub(crate) type Stream = SplitStream<WebSocket>;

/// The socket went away while we were writing to it.
#[derive(Debug)]
pub(crate) struct Gone;

/// `{"type":"error","detail":...}`, keys in the reference's order.
pub(crate) fn error_frame(detail: &str) -> String {
    let detail = serde_json::to_string(detail).unwrap_or_else(|_| "\"\"".to_owned());
    format!("{{\"type\":\"error\",\"detail\":{detail}}}")
}

/// Sends one text frame.
pub(crate) async fn send_text(sink: &mut Sink, text: String) -> Result<(), Gone> {
    match tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(Gone),
    }
}

/// Sends an error frame.
pub(crate) async fn send_error(sink: &mut Sink, detail: &str) -> Result<(), Gone> {
    send_text(sink, error_frame(detail)).await
}

/// Sends a close frame (errors ignored: the socket is ending anyway).
pub(crate) async fn send_close(sink: &mut Sink, code: u16, reason: &'static str) {
    send_close_within(sink, code, reason, WRITE_TIMEOUT).await;
}

/// Sends a close frame, giving up after `wait`.
pub(crate) async fn send_close_within(sink: &mut Sink, code: u16, reason: &'static str, wait: Duration) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Cow::Borrowed(reason),
    };
    let _ = tokio::time::timeout(wait, sink.send(Message::Close(Some(frame)))).await;
}

/// Reads until the peer's close frame (or end of stream), briefly, so our
/// close frame gets its reply and queued writes are flushed.
pub(crate) async fn linger(stream: &mut Stream) {
    let _ = tokio::time::timeout(CLOSE_LINGER, async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Completes once the server shuts down (without holding the watch guard).
pub(crate) async fn shutting_down(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// Sends an error frame and closes with `code` and `reason`.
pub(crate) async fn reject_with_reason(
    sink: &mut Sink,
    stream: &mut Stream,
    code: u16,
    detail: &str,
    reason: &'static str,
) {
    if send_error(sink, detail).await.is_ok() {
        send_close(sink, code, reason).await;
        linger(stream).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_frames_keep_the_reference_key_order() {
        assert_eq!(
            error_frame("Unknown frame type: x\"y"),
            r#"{"type":"error","detail":"Unknown frame type: x\"y"}"#
        );
    }
}
