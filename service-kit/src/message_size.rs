//! Refuses oversize request messages with RESOURCE_EXHAUSTED, judged from the gRPC
//! length prefix before the message is buffered.
//!
//! tonic's own `max_decoding_message_size` answers OUT_OF_RANGE, which clients treat as a
//! bug in the request rather than a limit; the gRPC spec asks for RESOURCE_EXHAUSTED.
//! This layer wraps the request body and reads each message's 5-byte prefix
//! (1 byte compressed flag, 4 bytes big-endian length) as the bytes stream past. When a
//! length exceeds the limit the body fails with a RESOURCE_EXHAUSTED [`Status`], which
//! tonic's decoder surfaces as the call's status: a unary handler is never invoked, and
//! a streaming handler sees the error in place of the message.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use tonic::Status;

/// The boxed error type of request bodies.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Length of the gRPC message prefix: compressed flag + u32 length.
const PREFIX_LEN: usize = 5;

/// Wraps request bodies in a [`LimitedBody`].
#[derive(Debug, Clone)]
pub struct MessageSizeLimit {
    max_message_bytes: usize,
    refused: Arc<AtomicU64>,
}

impl MessageSizeLimit {
    /// Messages longer than `max_message_bytes` are refused.
    pub fn new(max_message_bytes: usize) -> Self {
        Self::with_counter(max_message_bytes, Arc::default())
    }

    /// Like [`MessageSizeLimit::new`], counting refusals in `refused`.
    pub fn with_counter(max_message_bytes: usize, refused: Arc<AtomicU64>) -> Self {
        Self {
            max_message_bytes,
            refused,
        }
    }

    /// How many messages this limit has refused (for metrics and tests).
    pub fn refused_count(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Wraps one request body.
    pub fn wrap<B>(&self, body: B) -> LimitedBody<B> {
        LimitedBody {
            inner: body,
            max_message_bytes: self.max_message_bytes,
            refused: Arc::clone(&self.refused),
            prefix: [0; PREFIX_LEN],
            prefix_filled: 0,
            message_remaining: 0,
            failed: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request body that fails with RESOURCE_EXHAUSTED at the first oversize message.
    /// Frames pass through unchanged; only the prefixes are inspected.
    #[derive(Debug)]
    pub struct LimitedBody<B> {
        #[pin]
        inner: B,
        max_message_bytes: usize,
        refused: Arc<AtomicU64>,
        prefix: [u8; PREFIX_LEN],
        prefix_filled: usize,
        message_remaining: u64,
        failed: bool,
    }
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        let frame = match std::task::ready!(this.inner.poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
            Some(Ok(frame)) => frame,
        };
        if let Some(data) = frame.data_ref() {
            let mut chunk = data.clone();
            while chunk.has_remaining() {
                if *this.message_remaining > 0 {
                    let skip = chunk
                        .remaining()
                        .min(usize::try_from(*this.message_remaining).unwrap_or(usize::MAX));
                    chunk.advance(skip);
                    *this.message_remaining -= skip as u64;
                    continue;
                }
                let take = (PREFIX_LEN - *this.prefix_filled).min(chunk.remaining());
                this.prefix[*this.prefix_filled..*this.prefix_filled + take]
                    .copy_from_slice(&chunk[..take]);
                chunk.advance(take);
                *this.prefix_filled += take;
                if *this.prefix_filled == PREFIX_LEN {
                    *this.prefix_filled = 0;
                    let length = u32::from_be_bytes([
                        this.prefix[1],
                        this.prefix[2],
                        this.prefix[3],
                        this.prefix[4],
                    ]);
                    if u64::from(length) > *this.max_message_bytes as u64 {
                        *this.failed = true;
                        this.refused.fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(Status::resource_exhausted(
                            format!(
                                "request message of {length} bytes exceeds the limit of {} bytes",
                                this.max_message_bytes
                            ),
                        )))));
                    }
                    *this.message_remaining = u64::from(length);
                }
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};
    use http_body_util::{BodyExt, StreamBody};

    fn message(len: usize) -> Bytes {
        let mut buf = BytesMut::new();
        buf.put_u8(0);
        buf.put_u32(len as u32);
        buf.put_bytes(b'x', len);
        buf.freeze()
    }

    async fn drain(chunks: Vec<Bytes>, max: usize) -> Result<usize, Status> {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(c))),
        );
        let limit = MessageSizeLimit::new(max);
        let mut body = limit.wrap(StreamBody::new(stream));
        let mut total = 0;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => total += frame.into_data().map(|d| d.len()).unwrap_or(0),
                Err(err) => return Err(Status::from_error(err)),
            }
        }
        Ok(total)
    }

    #[tokio::test]
    async fn passes_messages_at_the_limit_split_anywhere() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&message(10));
        all.extend_from_slice(&message(0));
        all.extend_from_slice(&message(10));
        let all = all.freeze();
        // Split into 1-byte chunks: prefixes straddle frame boundaries.
        let chunks = (0..all.len()).map(|i| all.slice(i..i + 1)).collect();
        assert_eq!(drain(chunks, 10).await.ok(), Some(all.len()));
    }

    #[tokio::test]
    async fn refuses_the_first_oversize_message_from_its_prefix() {
        let mut all = BytesMut::new();
        all.extend_from_slice(&message(3));
        // Only the prefix of the oversize message arrives: no buffering is needed to refuse it.
        all.extend_from_slice(&message(11)[..PREFIX_LEN]);
        let err = drain(vec![all.freeze()], 10).await.err();
        assert_eq!(err.map(|s| s.code()), Some(tonic::Code::ResourceExhausted));
    }
}
