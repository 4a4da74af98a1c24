//! The [`DeviceBuffer`] implementation both backends share.
//!
//! A backend's typed buffer implements [`Resident`]: the few operations
//! that really differ between CUDA and wgpu (allocate, stage bytes out and
//! in, copy on the device). The checks, the element bookkeeping and the
//! messages of [`DeviceBuffer`] are written once, here.

use super::{byte_range, check_range, gpu_err, BoxFut, DeviceBuffer};
use crate::datatype::{DType, ReduceOp};
use crate::Result;
use bytes::Bytes;
use std::any::Any;
use std::future::Future;
use std::ops::Range;
use tokio::sync::mpsc;

/// A backend's typed buffer of `DTYPE` elements, as the shared
/// [`DeviceBuffer`] implementation drives it. Ranges passed in are already
/// checked against the buffer (and `src` is of the same backend, element
/// type and device).
pub trait Resident: Send + Sync + Sized + 'static {
    /// The backend's name in messages ("CUDA", "wgpu").
    const BACKEND: &'static str;
    /// The backend's device type, for messages ("Cuda", "Wgpu").
    const BACKEND_TYPE: &'static str;
    /// The element type.
    const DTYPE: DType;

    /// Number of elements.
    fn elements(&self) -> usize;

    /// The device, for messages.
    fn device_name(&self) -> &str;

    /// Whether `other` lives on the same device as `self`.
    fn same_device(&self, other: &Self) -> bool;

    /// A new zero-filled buffer of `len` elements on the same device.
    fn zeroed_like(&self, len: usize) -> Result<Self>;

    /// [`DeviceBuffer::download`] of the byte range `bytes`.
    fn download_bytes(
        &self,
        bytes: Range<usize>,
        out: mpsc::Sender<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_;

    /// [`DeviceBuffer::upload`] into the byte range `bytes`.
    fn upload_bytes(
        &self,
        bytes: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> impl Future<Output = Result<()>> + Send + '_;

    /// Copy the elements `range` of `src` to elements from `at` of `self`.
    fn copy_on_device(&self, src: &Self, range: Range<usize>, at: usize) -> Result<()>;
}

impl<B: Resident> DeviceBuffer for B {
    fn dtype(&self) -> DType {
        B::DTYPE
    }

    fn len(&self) -> usize {
        self.elements()
    }

    fn describe(&self) -> String {
        self.device_name().to_owned()
    }

    fn download(&self, range: Range<usize>, out: mpsc::Sender<Bytes>) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let bytes = byte_range("download", &range, self.elements(), B::DTYPE.size())?;
            self.download_bytes(bytes, out).await
        })
    }

    fn upload(
        &self,
        range: Range<usize>,
        op: Option<ReduceOp>,
        input: mpsc::Receiver<Bytes>,
    ) -> BoxFut<'_, Result<()>> {
        Box::pin(async move {
            let bytes = byte_range("upload", &range, self.elements(), B::DTYPE.size())?;
            self.upload_bytes(bytes, op, input).await
        })
    }

    fn duplicate(&self, range: Range<usize>) -> Result<Box<dyn DeviceBuffer>> {
        check_range("duplicate", &range, self.elements())?;
        let copy = self.zeroed_like(range.len())?;
        if !range.is_empty() {
            copy.copy_on_device(self, range, 0)?;
        }
        Ok(Box::new(copy))
    }

    fn copy_from(&self, src: &dyn DeviceBuffer, range: Range<usize>, at: usize) -> Result<()> {
        let Some(same) = src.as_any().downcast_ref::<B>() else {
            return Err(gpu_err(format!(
                "cannot copy from a {} buffer of {:?} into a {} buffer of {:?}; use buffers of \
                 one backend and element type",
                src.describe(),
                src.dtype(),
                self.describe(),
                B::DTYPE
            )));
        };
        check_range("copy source", &range, same.elements())?;
        check_range("copy destination", &(at..at + range.len()), self.elements())?;
        if !same.same_device(self) {
            return Err(gpu_err(format!(
                "cannot copy between buffers of two different {} devices (each `{}::new` \
                 opens a device of its own; use buffers of one)",
                B::BACKEND,
                B::BACKEND_TYPE
            )));
        }
        if range.is_empty() {
            return Ok(());
        }
        self.copy_on_device(same, range, at)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
