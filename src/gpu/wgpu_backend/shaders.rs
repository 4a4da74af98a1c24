//! The WGSL compute shaders that reduce or copy one chunk on the device, one
//! per element type and operation.

use super::*;

pub(super) fn wgsl_type(d: DType) -> Option<&'static str> {
    match d {
        DType::F32 => Some("f32"),
        DType::I32 => Some("i32"),
        DType::U32 => Some("u32"),
        DType::F16 => Some("f16"),
        // WGSL has no bf16: pairs of them are handled as u32 words.
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// `dst[off + i] = dst[off + i] op src[soff + i]` (or `= src[soff + i]`)
/// for `i < count`.
pub(super) fn reduce_shader(ty: &str, op: Option<ReduceOp>) -> String {
    if ty == "bf16" {
        return bf16_shader(op);
    }
    let expr = match op {
        None => "b",
        Some(ReduceOp::Sum) => "a + b",
        Some(ReduceOp::Prod) => "a * b",
        Some(ReduceOp::Min) => "min(a, b)",
        Some(ReduceOp::Max) => "max(a, b)",
    };
    let enable = if ty == "f16" { "enable f16;\n" } else { "" };
    format!(
        "{enable}struct Params {{ off: u32, count: u32, soff: u32, pad: u32 }}
@group(0) @binding(0) var<storage, read_write> dst: array<{ty}>;
@group(0) @binding(1) var<storage, read> src: array<{ty}>;
@group(0) @binding(2) var<uniform> p: Params;
@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) id: vec3<u32>) {{
    let i = id.x;
    if (i >= p.count) {{ return; }}
    let a = dst[p.off + i];
    let b = src[p.soff + i];
    _ = a;
    dst[p.off + i] = {expr};
}}
"
    )
}

/// The bf16 kernel (WGSL has no bf16 type, and no 16-bit stores): the
/// buffers are arrays of u32 words holding two elements each, and one
/// invocation owns one destination word, so no two invocations write the
/// same word. Elements are widened to f32 (a shift), combined, and rounded
/// back to nearest even, keeping a NaN a quiet NaN: the host path's `half`
/// arithmetic, bit for bit.
pub(super) fn bf16_shader(op: Option<ReduceOp>) -> String {
    let expr = match op {
        None => "b",
        Some(ReduceOp::Sum) => "narrow(widen(a) + widen(b))",
        Some(ReduceOp::Prod) => "narrow(widen(a) * widen(b))",
        Some(ReduceOp::Min) => "narrow(min(widen(a), widen(b)))",
        Some(ReduceOp::Max) => "narrow(max(widen(a), widen(b)))",
    };
    format!(
        "struct Params {{ off: u32, count: u32, soff: u32, pad: u32 }}
@group(0) @binding(0) var<storage, read_write> dst: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<u32>;
@group(0) @binding(2) var<uniform> p: Params;
fn widen(h: u32) -> f32 {{ return bitcast<f32>(h << 16u); }}
fn narrow(f: f32) -> u32 {{
    let u = bitcast<u32>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {{ return ((u >> 16u) | 0x40u) & 0xffffu; }}
    return ((u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u) & 0xffffu;
}}
fn src_elem(e: u32) -> u32 {{ return (src[e >> 1u] >> ((e & 1u) * 16u)) & 0xffffu; }}
@compute @workgroup_size({WORKGROUP})
fn main(@builtin(global_invocation_id) id: vec3<u32>) {{
    let end = p.off + p.count;
    let word = (p.off >> 1u) + id.x;
    if (word * 2u >= end) {{ return; }}
    var out = dst[word];
    for (var h = 0u; h < 2u; h = h + 1u) {{
        let e = word * 2u + h;
        if (e >= p.off && e < end) {{
            let shift = h * 16u;
            let a = (out >> shift) & 0xffffu;
            let b = src_elem(p.soff + (e - p.off));
            _ = a;
            let r = {expr};
            out = (out & ~(0xffffu << shift)) | (r << shift);
        }}
    }}
    dst[word] = out;
}}
"
    )
}
