//! Striping: a large message to a peer across hosts is split into parts
//! (`wire::stripe`) that go out at once, part 0 with the message header on
//! the main connection and part `k` on the connection of lane `k`, each
//! driven on its own thread; the receiver reads them back in order as one
//! payload.
//!
//! Parts meet their header in a rendezvous table keyed by (peer, stripe
//! number, part): whichever comes first waits there for the other. A
//! message dropped unread leaves a mark, so its parts that arrive later
//! are discarded rather than kept. A lane connection that ends while its
//! peer lives cuts the peer off: its large messages cannot arrive whole.

use super::lanes::Lane;
use super::*;
use crate::wire::stripe::{part_range, StripeHeader, STRIPE_HEADER_LEN};
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
    fn part_arrived(
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

/// How a message is split for a peer: `parts` parts (2 or more).
pub(super) struct Plan {
    parts: u8,
}

/// Bytes of the caller's buffer copied per write on a lane.
const COPY_PIECE: usize = 1 << 20;

impl Shared {
    /// How to stripe a `len`-byte message to `dst`, if at all: into as many
    /// parts as both ranks have transport threads, each at least the eager
    /// limit.
    pub(super) fn stripe_plan(&self, dst: usize, len: usize) -> Option<Plan> {
        if self.lanes.is_empty() {
            return None;
        }
        let theirs = {
            let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
            g.get(dst).map_or(0, |p| p.lanes.len())
        };
        let threads = 1 + self.lanes.len().min(theirs);
        let by_size = len / self.cfg.eager_limit().max(1);
        let parts = u8::try_from(threads.min(by_size)).unwrap_or(u8::MAX);
        (parts >= 2 && part_range(len as u64, parts, parts - 1).is_some()).then_some(Plan { parts })
    }

    /// Send `payload` to `dst` striped by `plan`: part 0 behind `header`
    /// on `conn`, the others on lane connections, all at once.
    pub(super) async fn send_striped(
        self: &Arc<Self>,
        dst: usize,
        conn: &quinn::Connection,
        mut header: Header,
        payload: Payload<'_>,
        stamp: Stamp<'_>,
        plan: Plan,
    ) -> std::result::Result<(), Failure> {
        let len = payload.len() as u64;
        let link = self.link(dst);
        let mut lanes = Vec::with_capacity(usize::from(plan.parts) - 1);
        for k in 1..usize::from(plan.parts) {
            lanes.push(self.lane_connection(dst, k).await?);
        }
        header.stripes = plan.parts;
        header.stripe = link.next_stripe.fetch_add(1, Ordering::Relaxed);
        let lost = |e: &dyn std::fmt::Display| self.send_failure(dst, format!("send failed: {e}"));
        let part = |k: u8| -> std::result::Result<Piece<'_>, Failure> {
            let r = part_range(len, plan.parts, k).ok_or_else(|| {
                self.failure(dst, "internal: a stripe plan left a part empty".into())
            })?;
            let (a, b) = (r.start as usize, r.end as usize);
            Ok(match &payload {
                Payload::Borrowed(d) => Piece::Borrowed(&d[a..b]),
                Payload::Owned(v) => Piece::Owned(slice_owned(v, a, b)),
                Payload::Stream { .. } => {
                    return Err(self.failure(dst, "internal: a streamed payload was striped".into()))
                }
            })
        };
        let mut sends: Vec<BoxFut<'_, std::result::Result<(), Failure>>> =
            Vec::with_capacity(usize::from(plan.parts) - 1);
        let first = part(0)?;
        let part0 = async move {
            let s = conn.open_uni().await.map_err(|e| lost(&e))?;
            if let Some(s) = stamp {
                header.sub = s();
            }
            write_part(s, &header.encode(), first)
                .await
                .map_err(|e| lost(&e))
        };
        for (i, c) in lanes.into_iter().enumerate() {
            let k = (i + 1) as u8;
            let piece = part(k)?;
            let sh = StripeHeader {
                part: k,
                stripe: header.stripe,
                len: piece.len() as u64,
            };
            sends.push(Box::pin(async move {
                let s = c.open_uni().await.map_err(|e| lost(&e))?;
                let written = write_part(s, &sh.encode(), piece).await;
                written.and_then(finish).map_err(|e| lost(&e))
            }));
        }
        let rest = crate::boxfut::try_join_all(sends.into_iter().map(Some).collect());
        // Part 0 ends only once every other part is written: a send
        // cancelled or failed before then resets part 0's stream, so the
        // receiver fails the message instead of waiting for a part that
        // will not come.
        let (first, ()) = tokio::try_join!(part0, rest)?;
        finish(first).map_err(|e| lost(&e))
    }

    /// The connection of lane `k` to `dst` (dialled on first use, from this
    /// rank's lane `k` to the peer's).
    async fn lane_connection(
        self: &Arc<Self>,
        dst: usize,
        k: usize,
    ) -> std::result::Result<quinn::Connection, Failure> {
        let link = self.link(dst);
        let get = || {
            let g = link.lanes_out.lock().unwrap_or_else(|p| p.into_inner());
            g.get(&k).cloned()
        };
        if let Some(c) = get() {
            return Ok(c);
        }
        let _dialing = link.lane_dial.lock().await;
        if let Some(c) = get() {
            return Ok(c);
        }
        let lane = self
            .lanes
            .get(k - 1)
            .ok_or_else(|| self.failure(dst, format!("internal: no transport thread {k}")))?;
        let addr = {
            let g = self.peers.read().unwrap_or_else(|p| p.into_inner());
            g.get(dst)
                .and_then(|p| Some(std::net::SocketAddr::new(p.addr.ip(), *p.lanes.get(k - 1)?)))
        };
        let Some(addr) = addr else {
            return Err(self.failure(
                dst,
                format!("no address known for its transport thread {k}"),
            ));
        };
        let conn = self
            .dial(
                &lane.endpoint,
                dst,
                addr,
                &format!("its transport thread {k}"),
            )
            .await?;
        link.lanes_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, conn.clone());
        // Its end is watched where it is driven.
        let sh = self.clone();
        let watched = conn.clone();
        self.spawn_on_lane(lane, async move {
            let end = watched.closed().await;
            sh.lane_ended(dst, k, &end).await;
        });
        Ok(conn)
    }

    pub(super) fn spawn_on_lane(
        &self,
        lane: &Lane,
        fut: impl Future<Output = ()> + Send + 'static,
    ) {
        let mut tasks = self.lane_tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(fut, &lane.runtime);
    }

    /// Close and forget this rank's lane connections to `rank` (it is
    /// gone or cut off).
    pub(super) fn drop_lanes(&self, rank: usize, code: u32, why: &[u8]) {
        let link = self.link(rank);
        let conns: Vec<quinn::Connection> = {
            let mut g = link.lanes_out.lock().unwrap_or_else(|p| p.into_inner());
            g.drain().map(|(_, c)| c).collect()
        };
        for c in conns {
            c.close(VarInt::from_u32(code), why);
        }
    }

    /// Accept loop of lane `k` (runs on its thread).
    pub(super) async fn lane_accept_loop(self: Arc<Self>, k: usize) {
        let Some(lane) = self.lanes.get(k - 1).cloned() else {
            return;
        };
        while let Some(incoming) = lane.endpoint.accept().await {
            if self.closing.load(Ordering::Acquire) {
                incoming.refuse();
                continue;
            }
            if self.handshakes.held() >= accept::RETRY_ABOVE && !incoming.remote_address_validated()
            {
                // As on the main endpoint: forged addresses hold no place.
                let _ = incoming.retry();
                continue;
            }
            let Some(place) = self.handshakes.take(incoming.remote_address().ip()) else {
                incoming.refuse();
                continue;
            };
            let sh = self.clone();
            self.spawn_on_lane(&lane, async move {
                if let Some((rank, conn)) = sh.handshake(incoming, place).await {
                    let end = sh.serve_lane(rank, &conn).await;
                    sh.lane_ended(rank, k, &end).await;
                }
            });
        }
    }

    /// Read the parts a peer sends on a lane connection until it ends.
    async fn serve_lane(
        self: &Arc<Self>,
        rank: usize,
        conn: &quinn::Connection,
    ) -> ConnectionError {
        let mut parts: JoinSet<std::result::Result<(), String>> = JoinSet::new();
        loop {
            tokio::select! {
                s = conn.accept_uni() => match s {
                    Ok(mut s) => {
                        let rdv = self.rdv.clone();
                        parts.spawn(async move {
                            let mut hb = [0u8; STRIPE_HEADER_LEN];
                            if s.read_exact(&mut hb).await.is_err() {
                                // Reset by the sender: the message was not sent.
                                return Ok(());
                            }
                            let h = StripeHeader::decode(&hb).map_err(|e| e.to_string())?;
                            rdv.part_arrived(rank, &h, s)
                        });
                    }
                    Err(e) => return e,
                },
                Some(Ok(Err(why))) = parts.join_next() => {
                    self.cut_off(
                        rank,
                        &format!("it sent an invalid part of a striped message: {why}"),
                        &why,
                        Some(conn),
                    );
                }
            }
        }
    }

    /// A lane connection with `rank` ended. The peer's own close (it
    /// finalized or failed: every connection of its endpoints says so, the
    /// main one with the reason) is reported by the main connection; any
    /// other end while the peer lives loses its large messages, so the
    /// peer is cut off.
    async fn lane_ended(self: &Arc<Self>, rank: usize, k: usize, end: &ConnectionError) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        // The peer's own close (it finalized, failed or was aborted: its
        // endpoints all close, the main connection with the reason) is
        // reported by the main connection, as is this rank's.
        if matches!(
            end,
            ConnectionError::LocallyClosed | ConnectionError::ApplicationClosed(_)
        ) {
            return;
        }
        // When the whole peer is gone (its host, its process), its main
        // connection times out or is reset too, within a keep-alive
        // interval or so, and says so better: wait for it that long.
        let wait = self.cfg.idle_timeout() + self.cfg.keep_alive() + LANE_END_GRACE;
        if let Some(main) = self.registered(rank) {
            let _ = tokio::time::timeout(wait, main.closed()).await;
        }
        let main_ended = self
            .registered(rank)
            .is_none_or(|c| c.close_reason().is_some());
        if self.closing.load(Ordering::Acquire) || main_ended {
            return;
        }
        if self.mailbox.gone_reason(rank).is_none()
            && self.link(rank).ending.load(Ordering::Acquire) == 0
        {
            let why = format!(
                "its connection for transport thread {k} ended ({end}) while the rank was \
                 alive; its large messages can no longer arrive whole"
            );
            self.cut_off(rank, &why, "transport thread connection lost", None);
        }
        self.rdv.forget(rank);
    }
}

/// Beyond the main connection's own time to notice, how long a lane that
/// ended waits for it to report the peer's end first.
const LANE_END_GRACE: Duration = Duration::from_millis(500);

/// One part's bytes.
enum Piece<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<Bytes>),
}

impl Piece<'_> {
    fn len(&self) -> usize {
        match self {
            Piece::Borrowed(d) => d.len(),
            Piece::Owned(v) => v.iter().map(|b| b.len()).sum(),
        }
    }
}

/// The bytes `a..b` of the concatenation of `v`, without copying.
fn slice_owned(v: &[Bytes], a: usize, b: usize) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut at = 0;
    for c in v {
        let (start, end) = (at, at + c.len());
        at = end;
        if end <= a || start >= b {
            continue;
        }
        out.push(c.slice(a.max(start) - start..b.min(end) - start));
    }
    out
}

/// Write `head` and `piece` on `s`, not finished yet ([`finish`]); a
/// failure, or dropping the result, resets it.
async fn write_part(
    s: quinn::SendStream,
    head: &[u8],
    piece: Piece<'_>,
) -> std::result::Result<send::ResetOnDrop, quinn::WriteError> {
    let mut guard = send::ResetOnDrop(Some(s));
    let Some(s) = guard.0.as_mut() else {
        return Ok(guard);
    };
    match piece {
        Piece::Owned(v) => {
            let mut bufs = Vec::with_capacity(v.len() + 1);
            bufs.push(Bytes::copy_from_slice(head));
            bufs.extend(v);
            s.write_all_chunks(&mut bufs).await?;
        }
        Piece::Borrowed(data) => {
            let first = data.len().min(COPY_PIECE.saturating_sub(head.len()));
            let mut b = Vec::with_capacity(head.len() + first);
            b.extend_from_slice(head);
            b.extend_from_slice(&data[..first]);
            s.write_chunk(Bytes::from(b)).await?;
            for p in data[first..].chunks(COPY_PIECE) {
                s.write_chunk(Bytes::copy_from_slice(p)).await?;
            }
        }
    }
    Ok(guard)
}

/// End a stream [`write_part`] wrote. A stream already reset by the peer
/// fails here: the message is lost.
fn finish(mut guard: send::ResetOnDrop) -> std::result::Result<(), quinn::WriteError> {
    if let Some(s) = guard.0.as_mut() {
        s.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
    }
    guard.0 = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_payloads_are_sliced_without_gaps() {
        let v: Vec<Bytes> = [&b"abc"[..], b"", b"defgh", b"i"]
            .iter()
            .map(|s| Bytes::copy_from_slice(s))
            .collect();
        let all: Vec<u8> = v.iter().flat_map(|b| b.iter().copied()).collect();
        for a in 0..=all.len() {
            for b in a..=all.len() {
                let got: Vec<u8> = slice_owned(&v, a, b)
                    .iter()
                    .flat_map(|b| b.iter().copied())
                    .collect();
                assert_eq!(got, &all[a..b], "{a}..{b}");
            }
        }
    }
}
