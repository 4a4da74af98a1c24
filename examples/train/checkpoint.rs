//! Checkpoints: an atomic, checksummed file format.

use super::*;

/// Training state on disk. Format (little-endian): magic `RMTRAIN1`,
/// hidden, batch, seed, step, loss_count (u64), loss_sum (f64), n (u64),
/// n params (f32), n velocities (f32), then FNV-1a-64 of all of the above.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// Hidden units of the model.
    pub hidden: u64,
    /// Global batch size.
    pub batch: u64,
    /// Seed of the data order.
    pub seed: u64,
    /// Global steps done.
    pub step: u64,
    /// Loss summed over the current epoch's steps done so far.
    pub loss_sum: f64,
    /// Samples in `loss_sum`.
    pub loss_count: u64,
    /// Model parameters.
    pub params: Vec<f32>,
    /// Momentum buffer.
    pub velocity: Vec<f32>,
}

const MAGIC: &[u8; 8] = b"RMTRAIN1";
const HEADER: usize = 8 + 7 * 8;

impl Checkpoint {
    /// The checkpoint file in `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("checkpoint.bin")
    }

    /// Serialise, checksum included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + 8 * self.params.len() + 8);
        b.extend_from_slice(MAGIC);
        for v in [
            self.hidden,
            self.batch,
            self.seed,
            self.step,
            self.loss_count,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.loss_sum.to_le_bytes());
        b.extend_from_slice(&(self.params.len() as u64).to_le_bytes());
        for v in self.params.iter().chain(&self.velocity) {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let sum = fnv1a64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parse and verify `bytes` (read from `path`, named in errors).
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint, TrainError> {
        let bad = |why: String| {
            TrainError::Checkpoint(format!(
                "{} is not a usable checkpoint: {why}; delete it (or restore a copy) to start over",
                path.display()
            ))
        };
        if bytes.len() < HEADER + 8 {
            return Err(bad(format!(
                "truncated: {} bytes, a header needs {}",
                bytes.len(),
                HEADER + 8
            )));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("wrong magic (not written by examples/train)".into()));
        }
        let u = |i: usize| {
            u64::from_le_bytes(bytes[8 + 8 * i..16 + 8 * i].try_into().unwrap_or_default())
        };
        let n = u(6);
        let want = (n as u128) * 8 + HEADER as u128 + 8;
        if (bytes.len() as u128) < want {
            return Err(bad(format!(
                "truncated: {} bytes, expected {want}",
                bytes.len()
            )));
        }
        if (bytes.len() as u128) > want {
            return Err(bad(format!(
                "{} bytes, expected {want} (trailing data)",
                bytes.len()
            )));
        }
        let body = &bytes[..bytes.len() - 8];
        let stored = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap_or_default());
        let actual = fnv1a64(body);
        if stored != actual {
            return Err(bad(format!(
                "checksum mismatch (stored {stored:016x}, computed {actual:016x}): the file is corrupt"
            )));
        }
        let floats: Vec<f32> = body[HEADER..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        let (params, velocity) = floats.split_at(n as usize);
        Ok(Checkpoint {
            hidden: u(0),
            batch: u(1),
            seed: u(2),
            step: u(3),
            loss_count: u(4),
            loss_sum: f64::from_bits(u(5)),
            params: params.to_vec(),
            velocity: velocity.to_vec(),
        })
    }

    /// Write atomically into `dir`: a temporary file, flushed to disk, then
    /// renamed over the previous checkpoint (which stays intact until then).
    pub fn save_to_dir(&self, dir: &Path) -> Result<(), TrainError> {
        let io = |what: &str, p: &Path, e: std::io::Error| {
            TrainError::Checkpoint(format!("{what} {}: {e}", p.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create", dir, e))?;
        let path = Self::path_in(dir);
        let tmp = dir.join("checkpoint.bin.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| io("cannot create", &tmp, e))?;
            f.write_all(&self.to_bytes())
                .map_err(|e| io("cannot write", &tmp, e))?;
            f.sync_all().map_err(|e| io("cannot flush", &tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| io("cannot rename onto", &path, e))?;
        // Make the rename itself durable (best effort; not possible everywhere).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The checkpoint in `dir`: `None` if there is none; an error if it
    /// cannot be read or is corrupt.
    pub fn load_from_dir(dir: &Path) -> Result<Option<Checkpoint>, TrainError> {
        let path = Self::path_in(dir);
        match std::fs::read(&path) {
            Ok(bytes) => Self::from_bytes(&bytes, &path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TrainError::Checkpoint(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Refuse a checkpoint of a different model or batch size.
    pub fn check_fits(
        c: Option<Self>,
        cfg: &TrainConfig,
        n: usize,
    ) -> Result<Option<Self>, TrainError> {
        let Some(c) = c else { return Ok(None) };
        if c.hidden != cfg.hidden as u64 || c.batch != cfg.batch as u64 || c.params.len() != n {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint is for --hidden {} --batch {}, this run has --hidden {} --batch {}; \
                 resume with the same settings",
                c.hidden, c.batch, cfg.hidden, cfg.batch
            )));
        }
        Ok(Some(c))
    }
}
