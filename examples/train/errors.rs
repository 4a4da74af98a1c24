//! What can go wrong in training.

use super::*;

/// Why training stopped.
#[derive(Debug)]
pub enum TrainError {
    /// A rankmesh operation failed.
    Comm(rankmesh::Error),
    /// A checkpoint could not be read, is corrupt, or does not fit this run.
    Checkpoint(String),
    /// Bad command line.
    Usage(String),
    /// Ranks ended a step with different parameters (`verify_sync`).
    Diverged(String),
}

impl fmt::Display for TrainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrainError::Comm(e) => write!(f, "{e}"),
            TrainError::Checkpoint(s) => write!(f, "checkpoint: {s}"),
            TrainError::Usage(s) => write!(f, "{s}"),
            TrainError::Diverged(s) => write!(f, "ranks diverged: {s}"),
        }
    }
}

impl std::error::Error for TrainError {}

impl From<rankmesh::Error> for TrainError {
    fn from(e: rankmesh::Error) -> Self {
        TrainError::Comm(e)
    }
}
