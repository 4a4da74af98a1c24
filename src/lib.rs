//! rankmesh: an MPI-style SPMD collective runtime over QUIC with mutual TLS.
//!
//! A seed forms a rank-numbered cluster and acts as its ephemeral certificate
//! authority; every rank runs the same program and talks to the others
//! through a [`Communicator`].
//!
//! ```no_run
//! # async fn demo() -> rankmesh::Result<()> {
//! let comm = rankmesh::init().await?; // environment set by `rankrun`
//! let right = (comm.rank() + 1) % comm.size();
//! let left = (comm.rank() + comm.size() - 1) % comm.size();
//! let mine = [comm.rank() as u32];
//! let (a, b) = tokio::join!(comm.send(&mine, right, 0), async {
//!     let mut got = [0u32];
//!     comm.recv(&mut got, left, 0).await.map(|_| got)
//! });
//! a?;
//! assert_eq!(b?[0] as usize, left);
//! comm.finalize().await?;
//! # Ok(()) }
//! ```
//!
//! See `docs/architecture.md` for the layers and `docs/security.md` for the
//! threat model.

#![warn(missing_docs)]

mod boxfut;
mod tags;

pub mod blocking;
mod coll;
mod comm;
mod config;
mod datatype;
mod env;
mod error;
pub mod gpu;
pub mod launch;
pub mod testing;

#[doc(hidden)]
pub mod internals;
pub(crate) use internals::{bootstrap, pki, reduce, transport, wire};

pub use comm::{
    init, init_elastic, init_elastic_with_config, init_with_config, Communicator, Membership,
    Rebuilt,
};
pub use config::{Algorithm, Config, UnknownAlgorithm};
pub use datatype::{DType, Element, ReduceOp};
pub use error::{Error, Result};
pub use transport::PeerPath;
