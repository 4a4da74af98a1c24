//! The boxed future of object-safe async traits (`Transport`,
//! `DeviceBuffer`), shared by the layers that define them.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
