//! The layers under the `Communicator`: transports, frames and control
//! messages, the job's PKI, reduction kernels, the seed's and the joining
//! rank's protocol (whose launcher-facing part is `rankmesh::launch`). Reachable for rankmesh's own
//! tests, benchmarks and fuzz targets; not part of the API (no stability
//! promise, hidden from the documentation).

#[path = "bootstrap/mod.rs"]
pub mod bootstrap;
#[path = "pki/mod.rs"]
pub mod pki;
#[path = "reduce.rs"]
pub mod reduce;
#[path = "transport/mod.rs"]
pub mod transport;
#[path = "wire/mod.rs"]
pub mod wire;
