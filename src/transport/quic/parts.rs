//! Striping, the receiving side: the parts of a striped message meet their
//! header in a rendezvous table keyed by (peer, stripe number, part),
//! whichever comes first waiting there for the other, and are read back as
//! one payload. A message dropped unread leaves a mark, so its parts that
//! arrive later are discarded rather than kept; entries nobody claims
//! expire.

use super::*;
use crate::wire::stripe::{part_range, StripeHeader};
use std::collections::{HashMap, VecDeque};
use std::task::{Context, Poll};

/// A part that arrived on a lane, with the length its header announced.
type Arrival = (quinn::RecvStream, u64);

enum Slot {
    /// The message header came first; its body waits for the part.
    Waiting(tokio::sync::oneshot::Sender<Arrival>),
    /// The part came first.
    Arrived(Arrival),
    /// The message was dropped unread: discard the part when it comes.
    Abandoned,
}

type Slots = HashMap<(usize, u32, u8), (Slot, std::time::Instant)>;

/// Where parts and their message headers meet.
pub(super) struct Rendezvous {
    slots: Mutex<Slots>,
    /// How long a part may wait for a header that never comes (its send
    /// was cancelled before the header went out), or a mark for a part
    /// that never comes, before it is dropped.
    keep: Duration,
}

/// The table is swept for expired entries when it holds more than this.
const SWEEP_ABOVE: usize = 64;

impl Rendezvous {
    pub(super) fn new(keep: Duration) -> Rendezvous {
        Rendezvous {
            slots: Mutex::new(HashMap::new()),
            keep,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        let mut g = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() > SWEEP_ABOVE {
            // Dropping an expired part's stream stops it, which gives the
            // peer its stream credit back.
            let keep = self.keep;
            g.retain(|_, (slot, since)| matches!(slot, Slot::Waiting(_)) || since.elapsed() < keep);
        }
        g
    }

    /// A part from `rank` arrived on a lane.
    pub(super) fn part_arrived(
        &self,
        rank: usize,
        h: &StripeHeader,
        s: quinn::RecvStream,
    ) -> std::result::Result<(), String> {
        let key = (rank, h.stripe, h.part);
        let mut g = self.lock();
        match g.remove(&key).map(|(slot, _)| slot) {
            Some(Slot::Waiting(tx)) => {
                // A body dropped since marks its slot abandoned first, so
                // the receiver is there; if not, the part is dropped.
                let _ = tx.send((s, h.len));
                Ok(())
            }
            Some(Slot::Abandoned) => Ok(()),
            Some(Slot::Arrived(a)) => {
                g.insert(key, (Slot::Arrived(a), std::time::Instant::now()));
                Err(format!(
                    "it sent part {} of striped message {} twice",
                    h.part, h.stripe
                ))
            }
            None => {
                g.insert(key, (Slot::Arrived((s, h.len)), std::time::Instant::now()));
                Ok(())
            }
        }
    }

    /// The header of striped message `stripe` from `rank` arrived: claim
    /// its part `part`.
    fn claim(&self, rank: usize, stripe: u32, part: u8) -> std::result::Result<PartState, String> {
        let key = (rank, stripe, part);
        let mut g = self.lock();
        match g.remove(&key) {
            Some((Slot::Arrived(a), _)) => Ok(PartState::Arrived(a)),
            None => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                g.insert(key, (Slot::Waiting(tx), std::time::Instant::now()));
                Ok(PartState::Waiting(rx))
            }
            Some(other) => {
                g.insert(key, other);
                Err(format!(
                    "it reused the number {stripe} of a striped message"
                ))
            }
        }
    }

    /// A body dropped before part `part` reached it.
    fn abandon(&self, rank: usize, stripe: u32, part: u8) {
        let mut g = self.lock();
        if let Some(entry @ (Slot::Waiting(_), _)) = g.get_mut(&(rank, stripe, part)) {
            *entry = (Slot::Abandoned, std::time::Instant::now());
        }
    }

    /// Forget everything of `rank` (it is gone): waiting bodies fail.
    pub(super) fn forget(&self, rank: usize) {
        self.lock().retain(|k, _| k.0 != rank);
    }
}

enum PartState {
    Waiting(tokio::sync::oneshot::Receiver<Arrival>),
    Arrived(Arrival),
    Open(quinn::RecvStream),
    Done,
    /// The part failed; every later poll says so again.
    Failed(Broken),
}

struct Part {
    index: u8,
    /// Where the part starts in the payload.
    start: u64,
    expect: u64,
    got: u64,
    state: PartState,
    /// Read ahead of the consumer, so this part's flow-control window
    /// keeps opening while an earlier part is consumed.
    ahead: VecDeque<Bytes>,
}

impl Part {
    /// The next piece of this part, `None` at its (checked) end.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<Option<Bytes>, Broken>> {
        if let PartState::Failed(e) = &self.state {
            return Poll::Ready(Err(e.clone()));
        }
        let polled = self.poll_step(cx);
        if let Poll::Ready(Err(e)) = &polled {
            self.state = PartState::Failed(e.clone());
        }
        polled
    }

    fn poll_step(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<std::result::Result<Option<Bytes>, Broken>> {
        loop {
            match &mut self.state {
                PartState::Waiting(rx) => match std::pin::Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(a)) => self.state = PartState::Arrived(a),
                    Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(Broken(format!(
                            "part {} of the striped message never arrived (the peer's lane \
                             connection ended)",
                            self.index
                        ))))
                    }
                    Poll::Pending => return Poll::Pending,
                },
                PartState::Arrived(_) => {
                    let PartState::Arrived((s, len)) =
                        std::mem::replace(&mut self.state, PartState::Done)
                    else {
                        continue;
                    };
                    if len != self.expect {
                        return Poll::Ready(Err(Broken(format!(
                            "part {} of the striped message announces {len} bytes, not {}",
                            self.index, self.expect
                        ))));
                    }
                    self.state = PartState::Open(s);
                }
                PartState::Open(s) => {
                    // One byte more than expected is asked for, to notice
                    // an overlong part.
                    let left = self.expect.saturating_sub(self.got);
                    let want = usize::try_from(left.saturating_add(1)).unwrap_or(usize::MAX);
                    let polled = {
                        let read = std::pin::pin!(s.read_chunk(want, true));
                        read.poll(cx)
                    };
                    return match polled {
                        Poll::Pending => Poll::Pending,
                        Poll::Ready(Ok(Some(c))) => {
                            self.got += c.bytes.len() as u64;
                            if self.got > self.expect {
                                return Poll::Ready(Err(Broken(format!(
                                    "part {} of the striped message is longer than its {} bytes",
                                    self.index, self.expect
                                ))));
                            }
                            Poll::Ready(Ok(Some(c.bytes)))
                        }
                        Poll::Ready(Ok(None)) => {
                            if self.got != self.expect {
                                return Poll::Ready(Err(Broken(format!(
                                    "part {} of the striped message ended after {} of its {} bytes",
                                    self.index, self.got, self.expect
                                ))));
                            }
                            self.state = PartState::Done;
                            Poll::Ready(Ok(None))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(Broken(format!(
                            "part {} of the striped message failed: {e}",
                            self.index
                        )))),
                    };
                }
                PartState::Done => return Poll::Ready(Ok(None)),
                PartState::Failed(e) => return Poll::Ready(Err(e.clone())),
            }
        }
    }
}

/// The payload of a striped message: its parts, read at once, returned in
/// order.
pub(super) struct StripedBody {
    rdv: Arc<Rendezvous>,
    rank: usize,
    stripe: u32,
    parts: Vec<Part>,
    /// The part being returned; earlier ones are done.
    cur: usize,
    /// Whether the payload is being read straight into the receiver's
    /// buffer ([`StreamBody::poll_fill`]), each part at its place.
    direct: bool,
}

impl StripedBody {
    /// The body of striped message `h` from `rank`, whose part 0 follows
    /// the header on `first`. `Err`: the header is inconsistent.
    pub(super) fn new(
        rdv: Arc<Rendezvous>,
        rank: usize,
        h: &Header,
        first: quinn::RecvStream,
    ) -> std::result::Result<StripedBody, String> {
        let mut first = Some(first);
        let mut body = StripedBody {
            rdv,
            rank,
            stripe: h.stripe,
            parts: Vec::with_capacity(usize::from(h.stripes)),
            cur: 0,
            direct: false,
        };
        for k in 0..h.stripes {
            let Some(r) = part_range(h.len, h.stripes, k) else {
                return Err(format!(
                    "a message of {} bytes cannot be striped into {} parts",
                    h.len, h.stripes
                ));
            };
            let state = match first.take() {
                Some(s) => PartState::Open(s),
                None => body.rdv.claim(rank, h.stripe, k)?,
            };
            body.parts.push(Part {
                index: k,
                start: r.start,
                expect: r.end - r.start,
                got: 0,
                state,
                ahead: VecDeque::new(),
            });
        }
        Ok(body)
    }
}

impl StreamBody for StripedBody {
    /// Every part straight to its place in `out` as it arrives (nothing is
    /// held read ahead). Only for a payload not yet read in pieces;
    /// `filled` jumps to the end once every part is in.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [u8],
        filled: &mut usize,
    ) -> Option<Poll<std::result::Result<(), Broken>>> {
        if !self.direct {
            let untouched = *filled == 0
                && self.cur == 0
                && self.parts.iter().all(|p| p.got == 0 && p.ahead.is_empty());
            let total: u64 = self.parts.iter().map(|p| p.expect).sum();
            if !untouched || out.len() as u64 != total {
                return None;
            }
            self.direct = true;
        }
        let mut pending = false;
        for p in self.parts.iter_mut() {
            loop {
                match p.poll_next(cx) {
                    Poll::Ready(Ok(Some(b))) => {
                        // `got` already counts `b`, and never passes `expect`.
                        let at = (p.start + p.got) as usize - b.len();
                        out[at..at + b.len()].copy_from_slice(&b);
                    }
                    Poll::Ready(Ok(None)) => break,
                    Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                    Poll::Pending => {
                        pending = true;
                        break;
                    }
                }
            }
        }
        if pending {
            return Some(Poll::Pending);
        }
        *filled = out.len();
        self.cur = self.parts.len();
        Some(Poll::Ready(Ok(())))
    }

    fn poll_piece(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<std::result::Result<Option<Bytes>, Broken>> {
        // Parts beyond the current one are read ahead as they arrive.
        for p in self.parts.iter_mut().skip(self.cur + 1) {
            while !matches!(p.state, PartState::Done | PartState::Failed(_)) {
                match p.poll_next(cx) {
                    Poll::Ready(Ok(Some(b))) => p.ahead.push_back(b),
                    Poll::Ready(Ok(None)) | Poll::Pending => break,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                }
            }
        }
        while let Some(p) = self.parts.get_mut(self.cur) {
            let piece = match p.ahead.pop_front() {
                Some(b) => Some(b),
                None => match p.poll_next(cx) {
                    Poll::Ready(Ok(b)) => b,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                },
            };
            match piece {
                Some(mut b) => {
                    if b.len() > max {
                        p.ahead.push_front(b.split_off(max));
                    }
                    return Poll::Ready(Ok(Some(b)));
                }
                None => self.cur += 1,
            }
        }
        Poll::Ready(Ok(None))
    }
}

impl Drop for StripedBody {
    fn drop(&mut self) {
        for p in &self.parts {
            if matches!(p.state, PartState::Waiting(_)) {
                self.rdv.abandon(self.rank, self.stripe, p.index);
            }
        }
    }
}
