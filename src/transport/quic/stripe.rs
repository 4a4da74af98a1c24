//! Striping, the sending side: a large message to a peer across hosts is
//! split into parts (`wire::stripe`) that go out at once, part 0 with the
//! message header on the main connection and part `k` on the connection of
//! lane `k`, each driven on its own thread. The receiving side is
//! `parts.rs`; the lane connections are `lane_links.rs`.

use super::send::{finish, slice_owned, write_part, Piece};
use super::*;
use crate::wire::stripe::{part_range, StripeHeader};

/// How a message is split for a peer: `parts` parts (2 or more).
pub(super) struct Plan {
    parts: u8,
}

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
}
