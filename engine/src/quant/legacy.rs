//! Scalar reference kernels for F32, F16 and the "legacy" 32-element block formats (Q4_0, Q4_1,
//! Q5_0, Q8_0, and the activation formats Q8_0 / Q8_1).
//!
//! These follow ggml-quants.c (`dequantize_row_*`, `quantize_row_q8_*_ref`) and the generic
//! `ggml_vec_dot_*` of ggml-cpu bit for bit where it matters (activation quantization, integer
//! block sums), so the SIMD kernels and gguf-py can be checked against them. They are also the
//! fallback on CPUs without a SIMD path, so they avoid per-element calls and allocation.
//!
//! Blocks are read from byte slices at fixed offsets (no `repr(C)` casts, so no alignment or
//! `unsafe` concerns). Layouts (ggml-common.h), all little-endian:
//! - `block_q4_0` (18 B): `d: f16`, `qs: [u8; 16]`; x[j] = d·(lo(qs[j]) − 8), x[j+16] = d·(hi(qs[j]) − 8)
//! - `block_q4_1` (20 B): `d: f16`, `m: f16`, `qs: [u8; 16]`; x = d·q + m
//! - `block_q5_0` (22 B): `d: f16`, `qh: u32`, `qs: [u8; 16]`; bit j of qh is bit 4 of element j
//! - `block_q8_0` (34 B): `d: f16`, `qs: [i8; 32]`
//! - `block_q8_1` (36 B): `d: f16`, `s: f16` (= d·Σqs), `qs: [i8; 32]`

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Elements per legacy block.
pub(super) const QK: usize = 32;
pub(super) const Q4_0_BYTES: usize = 18;
pub(super) const Q4_1_BYTES: usize = 20;
pub(super) const Q5_0_BYTES: usize = 22;
pub(super) const Q8_0_BYTES: usize = 34;
pub(super) const Q8_1_BYTES: usize = 36;

/// Reads the little-endian f16 at `b[i..i + 2]` as f32.
#[inline(always)]
pub(super) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[inline(always)]
fn put_f16(b: &mut [u8], i: usize, v: f32) {
    b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Activation quantizers (quantize_row_q8_0_ref / quantize_row_q8_1_ref)

/// One Q8 block: returns the scale `d` (as f32, before f16 rounding) and writes the 32 quants.
/// `roundf` semantics (half away from zero), which `f32::round` shares.
#[inline(always)]
fn quantize_block_q8(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = (v * id).round() as i8;
        sum += i32::from(r);
        *q = r as u8;
    }
    (d, sum)
}

pub(super) fn quantize_row_q8_0(x: &[f32], out: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = quantize_block_q8(xb, &mut yb[2..]);
        put_f16(yb, 0, d);
    }
}

pub(super) fn quantize_row_q8_1(x: &[f32], out: &mut [u8]) {
    for (xb, yb) in x.chunks_exact(QK).zip(out.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, sum) = quantize_block_q8(xb, &mut yb[4..]);
        put_f16(yb, 0, d);
        put_f16(yb, 2, sum as f32 * d);
    }
}

pub(super) fn quantize_row_f32(x: &[f32], out: &mut [u8]) {
    for (v, o) in x.iter().zip(out.chunks_exact_mut(4)) {
        o.copy_from_slice(&v.to_le_bytes());
    }
}

pub(super) fn quantize_row_f16(x: &[f32], out: &mut [u8]) {
    let mut tmp = [f16::ZERO; QK];
    for (xc, oc) in x.chunks(QK).zip(out.chunks_mut(2 * QK)) {
        let t = &mut tmp[..xc.len()];
        t.convert_from_f32_slice(xc);
        for (h, o) in t.iter().zip(oc.chunks_exact_mut(2)) {
            o.copy_from_slice(&h.to_le_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization (dequantize_row_*)

pub(super) fn dequantize_row_f32(data: &[u8], out: &mut [f32]) {
    for (b, o) in data.chunks_exact(4).zip(out.iter_mut()) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Loads up to 32 f16 from little-endian bytes into `tmp`, returning the filled prefix.
#[inline(always)]
fn load_f16s<'a>(bytes: &[u8], tmp: &'a mut [f16; QK]) -> &'a [f16] {
    let mut n = 0;
    for (t, b) in tmp.iter_mut().zip(bytes.chunks_exact(2)) {
        *t = f16::from_le_bytes([b[0], b[1]]);
        n += 1;
    }
    &tmp[..n]
}

pub(super) fn dequantize_row_f16(data: &[u8], out: &mut [f32]) {
    let mut tmp = [f16::ZERO; QK];
    for (dc, oc) in data.chunks(2 * QK).zip(out.chunks_mut(QK)) {
        let h = load_f16s(dc, &mut tmp);
        let m = h.len().min(oc.len());
        h[..m].convert_to_f32_slice(&mut oc[..m]);
    }
}

pub(super) fn dequantize_row_q4_0(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(Q4_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((&q, l), h) in b[2..].iter().zip(lo).zip(hi) {
            *l = f32::from((q & 0x0F) as i8 - 8) * d;
            *h = f32::from((q >> 4) as i8 - 8) * d;
        }
    }
}

pub(super) fn dequantize_row_q4_1(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(Q4_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for ((&q, l), h) in b[4..].iter().zip(lo).zip(hi) {
            *l = f32::from(q & 0x0F) * d + m;
            *h = f32::from(q >> 4) * d + m;
        }
    }
}

pub(super) fn dequantize_row_q5_0(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(Q5_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let (lo, hi) = y.split_at_mut(QK / 2);
        for (j, ((&q, l), h)) in b[6..].iter().zip(lo).zip(hi).enumerate() {
            let xh0 = (((qh >> j) << 4) & 0x10) as u8;
            let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
            *l = f32::from(((q & 0x0F) | xh0) as i8 - 16) * d;
            *h = f32::from(((q >> 4) | xh1) as i8 - 16) * d;
        }
    }
}

pub(super) fn dequantize_row_q8_0(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(Q8_0_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (&q, o) in b[2..].iter().zip(y) {
            *o = f32::from(q as i8) * d;
        }
    }
}

pub(super) fn dequantize_row_q8_1(data: &[u8], out: &mut [f32]) {
    for (b, y) in data.chunks_exact(Q8_1_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_at(b, 0);
        for (&q, o) in b[4..].iter().zip(y) {
            *o = f32::from(q as i8) * d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dot products (generic ggml_vec_dot_*)

/// Checks the lengths the caller promised (debug builds only); release builds truncate.
#[inline(always)]
pub(super) fn debug_check(n: usize, w: &[u8], a: &[u8], w_block: usize, a_block: usize, qk: usize) {
    debug_assert!(n.is_multiple_of(qk), "n = {n} is not a multiple of {qk}");
    debug_assert_eq!(w.len(), n / qk * w_block, "weight row length");
    debug_assert_eq!(a.len(), n / qk * a_block, "activation row length");
}

pub(super) fn vec_dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, 4, 4, 1);
    // Eight independent partial sums, like a vector register, so the order of additions is
    // deterministic and the loop vectorises.
    let mut acc = [0.0f32; 8];
    let (wc, ac) = (w.chunks_exact(32), a.chunks_exact(32));
    let (wr, ar) = (wc.remainder(), ac.remainder());
    for (wb, ab) in wc.zip(ac) {
        for (k, s) in acc.iter_mut().enumerate() {
            let i = 4 * k;
            let x = f32::from_le_bytes([wb[i], wb[i + 1], wb[i + 2], wb[i + 3]]);
            let y = f32::from_le_bytes([ab[i], ab[i + 1], ab[i + 2], ab[i + 3]]);
            *s += x * y;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in wr.chunks_exact(4).zip(ar.chunks_exact(4)) {
        sum += f32::from_le_bytes([x[0], x[1], x[2], x[3]])
            * f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    }
    sum
}

pub(super) fn vec_dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, 2, 2, 1);
    let (mut tw, mut ta) = ([f16::ZERO; QK], [f16::ZERO; QK]);
    let (mut fw, mut fa) = ([0.0f32; QK], [0.0f32; QK]);
    let mut sum = 0.0f32;
    for (wc, ac) in w.chunks(2 * QK).zip(a.chunks(2 * QK)) {
        let hw = load_f16s(wc, &mut tw);
        let ha = load_f16s(ac, &mut ta);
        let m = hw.len().min(ha.len());
        hw[..m].convert_to_f32_slice(&mut fw[..m]);
        ha[..m].convert_to_f32_slice(&mut fa[..m]);
        sum += fw[..m]
            .iter()
            .zip(&fa[..m])
            .map(|(x, y)| x * y)
            .sum::<f32>();
    }
    sum
}

pub(super) fn vec_dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, Q4_0_BYTES, Q8_0_BYTES, QK);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let (yl, yh) = y[2..].split_at(QK / 2);
        let mut sumi = 0i32;
        for ((&q, &l), &h) in x[2..].iter().zip(yl).zip(yh) {
            let v0 = i32::from(q & 0x0F) - 8;
            let v1 = i32::from(q >> 4) - 8;
            sumi += v0 * i32::from(l as i8) + v1 * i32::from(h as i8);
        }
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

pub(super) fn vec_dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, Q4_1_BYTES, Q8_1_BYTES, QK);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q4_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        let (yl, yh) = y[4..].split_at(QK / 2);
        let mut sumi = 0i32;
        for ((&q, &l), &h) in x[4..].iter().zip(yl).zip(yh) {
            let v0 = i32::from(q & 0x0F);
            let v1 = i32::from(q >> 4);
            sumi += v0 * i32::from(l as i8) + v1 * i32::from(h as i8);
        }
        sumf += (f16_at(x, 0) * f16_at(y, 0)) * sumi as f32 + f16_at(x, 2) * f16_at(y, 2);
    }
    sumf
}

pub(super) fn vec_dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, Q5_0_BYTES, Q8_0_BYTES, QK);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q5_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let (yl, yh) = y[2..].split_at(QK / 2);
        let mut sumi = 0i32;
        for (j, ((&q, &l), &h)) in x[6..].iter().zip(yl).zip(yh).enumerate() {
            let xh0 = ((qh >> j) << 4) & 0x10;
            let xh1 = (qh >> (j + 12)) & 0x10;
            let v0 = (u32::from(q & 0x0F) | xh0) as i32 - 16;
            let v1 = (u32::from(q >> 4) | xh1) as i32 - 16;
            sumi += v0 * i32::from(l as i8) + v1 * i32::from(h as i8);
        }
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}

pub(super) fn vec_dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 {
    debug_check(n, w, a, Q8_0_BYTES, Q8_0_BYTES, QK);
    let mut sumf = 0.0f32;
    for (x, y) in w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let sumi: i32 = x[2..]
            .iter()
            .zip(&y[2..])
            .map(|(&p, &q)| i32::from(p as i8) * i32::from(q as i8))
            .sum();
        sumf += sumi as f32 * (f16_at(x, 0) * f16_at(y, 0));
    }
    sumf
}
