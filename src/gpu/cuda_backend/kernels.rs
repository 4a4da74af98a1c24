//! The CUDA C kernels that reduce or copy one chunk on the device (one per
//! element type and operation), compiled once per process with NVRTC and
//! loaded once per context.

use super::*;

/// C type, and the unsigned type integer arithmetic wraps in. The 16-bit
/// floats travel as their bits (`unsigned short`) and are widened to
/// `float` for the arithmetic, like the host path.
pub(super) fn c_types(d: DType) -> Option<(&'static str, &'static str)> {
    match d {
        DType::F32 => Some(("float", "float")),
        DType::F64 => Some(("double", "double")),
        DType::I32 => Some(("int", "unsigned int")),
        DType::U32 => Some(("unsigned int", "unsigned int")),
        DType::I64 => Some(("long long", "unsigned long long")),
        DType::U64 => Some(("unsigned long long", "unsigned long long")),
        DType::F16 | DType::BF16 => Some(("unsigned short", "unsigned short")),
        _ => None,
    }
}

pub(super) const DTYPES: [DType; 8] = [
    DType::F32,
    DType::F64,
    DType::I32,
    DType::U32,
    DType::I64,
    DType::U64,
    DType::F16,
    DType::BF16,
];

pub(super) fn kernel_name(d: DType, op: Option<ReduceOp>) -> String {
    let op = match op {
        None => "copy",
        Some(ReduceOp::Sum) => "sum",
        Some(ReduceOp::Prod) => "prod",
        Some(ReduceOp::Min) => "min",
        Some(ReduceOp::Max) => "max",
    };
    format!("rankmesh_{}_{op}", format!("{d:?}").to_lowercase())
}

/// Conversions of the 16-bit floats, without NVRTC's headers: f16 with
/// the PTX conversion instructions (round to nearest even), bf16 by bits
/// (widening is a shift; narrowing rounds to nearest even and keeps NaN a
/// quiet NaN, as the `half` crate does on the host).
pub(super) const HALF_HELPERS: &str = r#"
__device__ __forceinline__ float rm_f16_to_f32(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ unsigned short rm_f32_to_f16(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float rm_bf16_to_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short rm_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
"#;

/// `dst[off + i] = dst[off + i] op src[i]` (or `= src[i]`) for `i < n`,
/// for every element type and op. Integers wrap like the host kernels
/// (computed unsigned: signed overflow is undefined in C); float min/max
/// ignore a NaN operand like Rust's `f32::min`; f16 and bf16 are combined
/// in f32 and rounded once, like the host path.
pub(super) fn kernels_source() -> String {
    let mut s = String::from(HALF_HELPERS);
    for d in DTYPES {
        let Some((t, u)) = c_types(d) else { continue };
        let half = match d {
            DType::F16 => Some("f16"),
            DType::BF16 => Some("bf16"),
            _ => None,
        };
        let float = matches!(d, DType::F32 | DType::F64) || half.is_some();
        let ops: [(Option<ReduceOp>, String); 5] = [
            (None, "b".into()),
            (
                Some(ReduceOp::Sum),
                if float {
                    "a + b".into()
                } else {
                    format!("({t})(({u})a + ({u})b)")
                },
            ),
            (
                Some(ReduceOp::Prod),
                if float {
                    "a * b".into()
                } else {
                    format!("({t})(({u})a * ({u})b)")
                },
            ),
            (
                Some(ReduceOp::Min),
                match d {
                    DType::F64 => "fmin(a, b)".into(),
                    _ if float => "fminf(a, b)".into(),
                    _ => "(b < a ? b : a)".into(),
                },
            ),
            (
                Some(ReduceOp::Max),
                match d {
                    DType::F64 => "fmax(a, b)".into(),
                    _ if float => "fmaxf(a, b)".into(),
                    _ => "(b > a ? b : a)".into(),
                },
            ),
        ];
        for (op, expr) in ops {
            let body = match (half, op) {
                // A copy moves the bits as they are.
                (Some(_), None) | (None, _) => format!(
                    "    {t} a = dst[off + i];\n    {t} b = src[i];\n    (void)a;\n    \
                     dst[off + i] = {expr};\n"
                ),
                (Some(h), Some(_)) => format!(
                    "    float a = rm_{h}_to_f32(dst[off + i]);\n    \
                     float b = rm_{h}_to_f32(src[i]);\n    \
                     dst[off + i] = rm_f32_to_{h}({expr});\n"
                ),
            };
            s.push_str(&format!(
                "extern \"C\" __global__ void {name}({t}* dst, const {t}* src, \
                 unsigned long long off, unsigned int n) {{\n\
                 \x20   unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;\n\
                 \x20   if (i >= n) return;\n\
                 {body}}}\n",
                name = kernel_name(d, op)
            ));
        }
    }
    s
}

/// The kernels' PTX, compiled once per process by the first NVRTC whose
/// output a device accepted (and that library, kept loaded).
pub(super) static PTX: OnceLock<(String, Nvrtc)> = OnceLock::new();

/// Compile the kernels with the first NVRTC that works for `ctx` and load
/// them. Tries every candidate library (see `nvrtc.rs`): one that is
/// missing, fails to compile, or emits PTX this driver cannot load (a
/// newer CUDA than the driver's) is skipped, and the error lists them all.
pub(super) fn load_kernels(ctx: &Arc<CudaContext>) -> Result<Arc<CudaModule>> {
    if let Some((ptx, _)) = PTX.get() {
        return ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
            .map_err(|e| gpu_err(format!("CUDA module load: {e}")));
    }
    let src = kernels_source();
    let env = |k: &str| std::env::var(k).ok();
    let mut tried: Vec<String> = Vec::new();
    let mut found_any = false;
    for path in candidates(&env) {
        let nvrtc = match Nvrtc::open(&path) {
            Ok(n) => n,
            Err(e) => {
                // Bare names the loader does not know are the normal case.
                if path.is_absolute() {
                    tried.push(e.to_string());
                }
                continue;
            }
        };
        found_any = true;
        let label = format!(
            "{} (NVRTC {}.{})",
            nvrtc.path.display(),
            nvrtc.version.0,
            nvrtc.version.1
        );
        let ptx = match nvrtc.compile(&src) {
            Ok(p) => p,
            Err(e) => {
                tried.push(format!("{label}: {e}"));
                continue;
            }
        };
        match ctx.load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone())) {
            Ok(m) => {
                tracing::debug!("CUDA kernels compiled with {label}");
                let _ = PTX.set((ptx, nvrtc));
                return Ok(m);
            }
            Err(e) => tried.push(format!("{label}: the driver rejected its PTX: {e}")),
        }
    }
    if !found_any {
        return Err(gpu_err(
            "the CUDA driver is present but NVRTC (libnvrtc) is not: rankmesh compiles its \
             kernels with it. Install the CUDA runtime compiler (Debian/Ubuntu: cuda-nvrtc-12-x \
             or cuda-nvrtc-13-x; pip: nvidia-cuda-nvrtc-cu12), or set RANKMESH_NVRTC to the \
             path of libnvrtc.so",
        ));
    }
    Err(gpu_err(format!(
        "CUDA kernel compilation: no NVRTC worked with this driver; tried: {}. Install an \
         NVRTC no newer than the driver's CUDA version, or set RANKMESH_NVRTC to one",
        tried.join("; ")
    )))
}
