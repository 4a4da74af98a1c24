//! The layers under the `Communicator`: transports, frames and control
//! messages, the job's PKI, reduction kernels. Reachable for rankmesh's own
//! tests, benchmarks and fuzz targets; not part of the API (no stability
//! promise, hidden from the documentation).

#[path = "pki/mod.rs"]
pub mod pki;
#[path = "reduce.rs"]
pub mod reduce;
#[path = "transport/mod.rs"]
pub mod transport;
#[path = "wire/mod.rs"]
pub mod wire;
