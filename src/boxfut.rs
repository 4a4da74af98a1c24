//! The boxed future of object-safe async traits (`Transport`,
//! `DeviceBuffer`), shared by the layers that define them.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// A boxed, sendable future.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Drive `futs` concurrently (slots already done are `None`); the first
/// error wins, and the futures still running are then dropped by the
/// caller with the vector.
pub async fn try_join_all<E>(mut futs: Vec<Option<BoxFut<'_, Result<(), E>>>>) -> Result<(), E> {
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for slot in futs.iter_mut() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => *slot = None,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(Ok(()))
        }
    })
    .await
}
