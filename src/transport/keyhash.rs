//! The hasher of the mailbox's maps.

use std::hash::{BuildHasherDefault, Hasher};

/// Hasher for the mailbox's keys (ranks, communicator ids, sequence
/// numbers): a multiply-xorshift mix, several times cheaper than the
/// default SipHash on every frame. Keys come only from authenticated members
/// of the job, so deliberate collisions are not a concern here.
#[derive(Default, Clone, Copy)]
pub(crate) struct KeyHasher(u64);

const MIX: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let x = self.0 ^ (self.0 >> 31);
        x.wrapping_mul(MIX) ^ (x >> 29)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(MIX);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map with [`KeyHasher`].
pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Remove the entries whose key `which` selects; their values, to be
/// dropped by the caller (outside a lock, when a value may own a stream).
pub(crate) fn remove_where<K, V>(map: &mut HashMap<K, V>, which: impl Fn(&K) -> bool) -> Vec<V>
where
    K: std::hash::Hash + Eq + Copy,
{
    let keys: Vec<K> = map.keys().filter(|k| which(k)).copied().collect();
    keys.iter().filter_map(|k| map.remove(k)).collect()
}
