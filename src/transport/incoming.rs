//! A received message: its header and a payload that is either already in
//! memory or still arriving on a stream of its own. Streams are behind
//! [`StreamBody`], implemented where they live (`quic/` for QUIC streams
//! and same-host sockets), so this layer names no connection type.

use super::failure::Broken;
use crate::wire::Header;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// A message payload still arriving on a stream that carries it alone.
pub trait StreamBody: Send {
    /// Poll for the next piece of the payload, of at most `max` bytes;
    /// `Ok(None)` once the stream ended.
    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Option<Bytes>, Broken>>;

    /// Poll to fill `out[*filled..]` straight from the stream, advancing
    /// `filled`, for streams that can read into the caller's buffer without
    /// an intermediate piece; `None` if this one cannot (pieces are copied
    /// instead).
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
        filled: &mut usize,
    ) -> Option<Poll<Result<(), Broken>>> {
        let _ = (cx, out, filled);
        None
    }
}

enum Body {
    Chunks(VecDeque<Bytes>),
    Stream(Box<dyn StreamBody>),
}

/// A received message.
pub struct Incoming {
    header: Header,
    body: Body,
    remaining: u64,
    /// The bytes this message holds against its sender's allowance.
    charge: Option<Charge>,
}

/// What holding one message costs besides its payload (the message, its
/// slot in the maps), as counted against its sender's allowance.
pub(crate) const HELD_OVERHEAD: u64 = 256;

/// Bytes of one sender's messages held in memory until they are received:
/// returned when the message is dropped (received or discarded).
pub(crate) struct Charge {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl Charge {
    /// Count `bytes` against `held`; returns the charge and the new total.
    pub(crate) fn take(held: Arc<AtomicU64>, bytes: u64) -> (Charge, u64) {
        let now = held.fetch_add(bytes, AtomicOrdering::Relaxed) + bytes;
        (Charge { held, bytes }, now)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, AtomicOrdering::Relaxed);
    }
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("header", &self.header)
            .field("remaining", &self.remaining)
            .finish()
    }
}

impl Incoming {
    /// A message whose payload is already in memory.
    pub fn from_chunks(header: Header, chunks: Vec<Bytes>) -> Incoming {
        Incoming {
            header,
            remaining: header.len,
            body: Body::Chunks(chunks.into()),
            charge: None,
        }
    }

    /// A message whose payload is still arriving on `body`.
    pub fn streamed(header: Header, body: Box<dyn StreamBody>) -> Incoming {
        Incoming {
            header,
            remaining: header.len,
            body: Body::Stream(body),
            charge: None,
        }
    }

    /// The frame header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The payload's pieces, if it is all in memory.
    pub(crate) fn in_memory(&self) -> Option<&VecDeque<Bytes>> {
        match &self.body {
            Body::Chunks(q) => Some(q),
            Body::Stream(_) => None,
        }
    }

    /// Keep `charge` with the message until it is dropped.
    pub(crate) fn hold(&mut self, charge: Charge) {
        self.charge = Some(charge);
    }

    /// Next piece of the payload, `None` once all `header.len` bytes were
    /// returned. Never returns more than `header.len` bytes in total.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Broken> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let want = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        let chunk = match &mut self.body {
            Body::Chunks(q) => q.pop_front(),
            Body::Stream(s) => std::future::poll_fn(|cx| s.poll_piece(cx, want)).await?,
        };
        let Some(mut chunk) = chunk else {
            return Err(Broken(format!(
                "message ended {} bytes early (announced {})",
                self.remaining, self.header.len
            )));
        };
        if chunk.len() as u64 > self.remaining {
            chunk.truncate(self.remaining as usize);
        }
        self.remaining -= chunk.len() as u64;
        Ok(Some(chunk))
    }

    /// Copy the whole payload into `out`, whose length must equal `header.len`.
    pub async fn read_into(&mut self, out: &mut [u8]) -> Result<(), Broken> {
        if out.len() as u64 != self.header.len {
            return Err(Broken(format!(
                "message has {} bytes, buffer has {}",
                self.header.len,
                out.len()
            )));
        }
        let mut at = (self.header.len - self.remaining) as usize;
        if let Body::Stream(s) = &mut self.body {
            // Straight from the stream into the destination, where it can.
            let direct = std::future::poll_fn(|cx| match s.poll_fill(cx, out, &mut at) {
                None => Poll::Ready(None),
                Some(p) => p.map(Some),
            })
            .await;
            if let Some(done) = direct {
                self.remaining = (self.header.len as usize - at) as u64;
                return done;
            }
        }
        while let Some(c) = self.next_chunk().await? {
            out[at..at + c.len()].copy_from_slice(&c);
            at += c.len();
        }
        Ok(())
    }
}
