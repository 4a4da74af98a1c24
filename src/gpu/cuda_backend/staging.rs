//! Pinned host staging slots (pooled, reused once the device is done with
//! them) and a downloaded chunk that hands its slot back when dropped.

use super::*;

/// A staging slot for copies to the device: pinned host memory (write-
/// combined: the host only writes it), the device scratch the reduce kernel
/// reads, and the event recorded after the slot's last kernel.
pub(super) struct UpSlot {
    pub(super) pinned: PinnedHostSlice<u8>,
    pub(super) scratch: CudaSlice<u8>,
    pub(super) done: CudaEvent,
}

/// A staging slot for copies to the host: pinned host memory and the event
/// recorded after the slot's last copy.
pub(super) struct DownSlot {
    pub(super) pinned: PinnedHostSlice<u8>,
    pub(super) done: CudaEvent,
}

impl Drop for UpSlot {
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

impl Drop for DownSlot {
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

/// A downloaded chunk handed to the network layer without copying: the
/// bytes stay in the pinned slot, which goes back to the pool when the last
/// `Bytes` referring to it is dropped.
pub(super) struct StagedChunk {
    slot: Option<DownSlot>,
    data: &'static [u8],
    pool: Arc<Mutex<Vec<DownSlot>>>,
}

impl AsRef<[u8]> for StagedChunk {
    fn as_ref(&self) -> &[u8] {
        self.data
    }
}

impl Drop for StagedChunk {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.pool).push(slot);
        }
    }
}

impl StagedChunk {
    /// The first `n` bytes of `slot`, whose copy has completed.
    pub(super) fn new(
        slot: DownSlot,
        n: usize,
        pool: Arc<Mutex<Vec<DownSlot>>>,
    ) -> Result<StagedChunk> {
        let bytes = slot
            .pinned
            .as_slice()
            .map_err(|e| gpu_err(format!("staged chunk: {e}")))?;
        let bytes = bytes
            .get(..n)
            .ok_or_else(|| gpu_err(format!("staged chunk: {n} bytes from a smaller slot")))?;
        // SAFETY: the slice points into the pinned allocation owned by
        // `slot`, which this value owns until it is dropped and which is
        // neither freed nor written before then (it returns to the pool only
        // in `drop`, and the device's copy into it completed before this was
        // built). The `'static` lifetime never escapes: `as_ref` hands out
        // a borrow of `self`, and `Bytes::from_owner` keeps `self` alive
        // while any `Bytes` uses the data.
        let data: &'static [u8] = unsafe { std::slice::from_raw_parts(bytes.as_ptr(), n) };
        Ok(StagedChunk {
            slot: Some(slot),
            data,
            pool,
        })
    }
}
