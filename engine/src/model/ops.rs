//! The elementwise and matrix ops of a decoder forward pass, over row-major f32 activations.

use crate::pool::{DisjointSlice, ThreadPool};
use crate::quant::{self, Gemm, GgmlType};

use super::config::RopeStyle;

/// A weight matrix of `rows` outputs over `cols` inputs, stored in the model file.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    /// Byte range of the data inside the model file.
    pub offset: usize,
    pub row_bytes: usize,
    /// Type the activations are quantized to for this matrix's dot products.
    pub act_ty: GgmlType,
    pub gemm: Gemm,
    /// The weights repacked at load (`quant::packed`), which `gemm` then multiplies instead of
    /// the file's bytes.
    pub packed: Option<std::sync::Arc<quant::packed::PackedBuf>>,
}

impl Matrix {
    /// The bytes `gemm` multiplies: the packed copy, or the range of `file` (the model file's
    /// bytes).
    pub fn data<'a>(&'a self, file: &'a [u8]) -> &'a [u8] {
        match &self.packed {
            Some(p) => p.bytes(),
            None => file
                .get(self.offset..self.offset + self.rows * self.row_bytes)
                .unwrap_or(&[]),
        }
    }

    /// Dequantizes row `r` into `out` (`cols` floats).
    pub fn dequantize_row(
        &self,
        file: &[u8],
        r: usize,
        out: &mut [f32],
    ) -> Result<(), quant::QuantError> {
        match &self.packed {
            Some(p) => quant::packed::dequantize_row(self.ty, self.cols, p.bytes(), r, out),
            None => {
                let at = self.offset + r * self.row_bytes;
                let src = file.get(at..at + self.row_bytes).unwrap_or(&[]);
                quant::dequantize_row(self.ty, src, out)
            }
        }
    }

    /// Repacks the weights (`quant::packed`) when their type and row count allow it, and
    /// returns whether it did; `file` is the model file's bytes, `done` gets each range of
    /// `file` once it is packed.
    pub fn pack(&mut self, file: &[u8], done: &mut dyn FnMut(std::ops::Range<usize>)) -> bool {
        if self.packed.is_some()
            || !quant::packed::packable(self.ty)
            || !self.rows.is_multiple_of(quant::packed::STRIP)
        {
            return false;
        }
        let (Ok(buf), Some(tile)) = (
            quant::packed::PackedBuf::new(
                self.ty,
                self.cols,
                self.rows,
                self.data(file),
                &mut |r| done(self.offset + r.start..self.offset + r.end),
            ),
            quant::packed::tile_fn(self.ty),
        ) else {
            return false;
        };
        self.packed = Some(std::sync::Arc::new(buf));
        self.gemm.tile = Some(tile);
        true
    }
}

/// Most weight rows per kernel call with many tokens (the kernels decode each strip of rows once
/// per call, for every token of the call, and convert the call's activation scales once).
const ROW_BLOCK: usize = 512;
/// Tokens per kernel call: a block of quantized activations stays in L2 across row blocks.
const TOK_BLOCK: usize = 64;

/// Elements below which a row-wise op runs on the calling thread alone: dispatching it to the
/// pool costs more than it saves (a decode token's norms and residual adds; a batch of 8
/// sequences' SwiGLU, 8 × 1536 elements with an `exp` each, is worth splitting).
const PAR_ELEMS: usize = 8192;

/// Runs `f(rows, range)` over the rows of `x` (each `width` wide; `range` = the rows' indices),
/// split into one contiguous block per pool thread when there are enough rows. Row-wise ops
/// give the same bits however the rows are split; run on the caller alone, they left the
/// other threads idle between the products of a prefill.
pub fn par_rows(
    pool: &ThreadPool,
    x: &mut [f32],
    width: usize,
    f: &(dyn Fn(&mut [f32], std::ops::Range<usize>) + Sync),
) {
    let n = x.len().checked_div(width).unwrap_or(0);
    let parts = pool.n_threads().min(n);
    if n * width < PAR_ELEMS || parts <= 1 {
        f(x, 0..n);
        return;
    }
    let mut blocks = Vec::with_capacity(parts);
    let mut rest = x;
    for i in 0..parts {
        let rows = crate::pool::split_range(n, parts, i);
        let (block, tail) = rest.split_at_mut(rows.len() * width);
        blocks.push(std::sync::Mutex::new((block, rows)));
        rest = tail;
    }
    pool.run_tasks(parts, &|i, _| {
        // Each block is taken by exactly one task: the lock is never contended.
        let mut guard = blocks[i].lock().unwrap_or_else(|e| e.into_inner());
        let (block, rows) = &mut *guard;
        f(block, rows.clone());
    });
}

/// `out[i] = x[i] / rms(x) * w[i]` for each row of `x` (width `w.len()`), in place.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(w.len()) {
        rms_norm(row, w, eps);
    }
}

#[inline]
pub fn rms_norm(row: &mut [f32], w: &[f32], eps: f32) {
    // Sum in f64 as ggml does: rows are short, and it keeps us closer to the reference.
    let ss: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    let scale = 1.0 / ((ss / row.len() as f64) as f32 + eps).sqrt();
    for (v, &g) in row.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// `dst = rms_norm(src) * w` row by row.
pub fn rms_norm_into(dst: &mut [f32], src: &[f32], w: &[f32], eps: f32) {
    dst.copy_from_slice(src);
    rms_norm_rows(dst, w, eps);
}

pub fn add_in_place(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Adds `bias` to every row of `x`.
pub fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) · up[i]` (the SwiGLU of the feed-forward block), with an 8-lane
/// `exp` on AVX2 CPUs (within a few ulp of [`silu`]).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if quant::avx2::available() {
        // SAFETY: AVX2/FMA checked just above.
        done = unsafe { swiglu_avx2(gate, up) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = silu(*g) * u;
    }
}

/// The whole 8-element groups of [`swiglu`]; returns how many elements it did.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn swiglu_avx2(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n8 = gate.len().min(up.len()) / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let neg = _mm256_set1_ps(-0.0);
    for (g, u) in gate[..n8].chunks_exact_mut(8).zip(up[..n8].chunks_exact(8)) {
        // SAFETY: `g` and `u` hold 8 floats.
        let x = _mm256_loadu_ps(g.as_ptr());
        let e = quant::avx2::exp8(_mm256_xor_ps(x, neg));
        let s = _mm256_div_ps(x, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            g.as_mut_ptr(),
            _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
        );
    }
    n8
}

/// GELU with the tanh approximation, computed exactly.
pub fn gelu_tanh_exact(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// GELU (tanh approximation) as ggml computes it: looked up in a table indexed by the input
/// rounded to f16, with f16 outputs. Matching it keeps Gemma's logits measurably closer to
/// llama.cpp's (mean top-5 difference 0.43 -> 0.30 on the worst reference case), and a table
/// lookup is cheaper than `tanh`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        gelu_table()[half::f16::from_f32(x).to_bits() as usize].to_f32()
    }
}

/// GELU of every f16 input, by bit pattern, plus one padding entry (the AVX2 gather reads 4
/// bytes at each 2-byte entry).
fn gelu_table() -> &'static [half::f16] {
    GELU_F16.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::f16::from_f32(gelu_tanh_exact(half::f16::from_bits(bits).to_f32())))
            .chain([half::f16::ZERO])
            .collect()
    })
}

static GELU_F16: std::sync::OnceLock<Vec<half::f16>> = std::sync::OnceLock::new();

/// `gate[i] = gelu_tanh(gate[i]) · up[i]` (Gemma's GeGLU), 8 lanes at a time on AVX2 CPUs with
/// the same table and the same f16 rounding as [`gelu_tanh`].
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (gate, up) = (&mut gate[..n], &up[..n]);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if quant::avx2::available() {
        // SAFETY: AVX2/FMA/F16C checked just above.
        done = unsafe { geglu_avx2(gate, up, gelu_table()) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = gelu_tanh(*g) * u;
    }
}

/// The whole 8-element groups of [`geglu`]; returns how many elements it did.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `table` must be [`gelu_table`] (65537 entries).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn geglu_avx2(gate: &mut [f32], up: &[f32], table: &[half::f16]) -> usize {
    use std::arch::x86_64::*;
    if table.len() <= usize::from(u16::MAX) + 1 {
        return 0;
    }
    let n8 = gate.len().min(up.len()) / 8 * 8;
    let (lo, hi) = (_mm256_set1_ps(-10.0), _mm256_set1_ps(10.0));
    // Low 16 bits of each 32-bit lane to the first 8 bytes of its 128-bit half.
    let pick = _mm256_setr_epi8(
        0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1,
        -1, -1, -1, -1, -1, -1,
    );
    let base = table.as_ptr().cast::<i32>();
    for (g, u) in gate[..n8].chunks_exact_mut(8).zip(up[..n8].chunks_exact(8)) {
        // SAFETY: `g` and `u` hold 8 floats.
        let x = _mm256_loadu_ps(g.as_ptr());
        let bits = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
        let idx = _mm256_cvtepu16_epi32(bits);
        // SAFETY: each index is ≤ 65535, so the 4 bytes read at `2·index` lie within the
        // table's 65537 two-byte entries (checked above).
        let got = _mm256_i32gather_epi32::<2>(base, idx);
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(got, pick));
        let y = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
        // x ≤ -10 → 0, x ≥ 10 → x, as the scalar path (NaN stays with the table: NaN).
        let y = _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LE_OQ>(x, lo), y);
        let y = _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi));
        _mm256_storeu_ps(
            g.as_mut_ptr(),
            _mm256_mul_ps(y, _mm256_loadu_ps(u.as_ptr())),
        );
    }
    n8
}

/// Inverse frequencies of rotary embeddings: `base^(-2i/dims) / factor_i`.
pub fn rope_inv_freqs(base: f32, dims: usize, factors: Option<&[f32]>) -> Vec<f32> {
    (0..dims / 2)
        .map(|i| {
            let f = base.powf(-2.0 * i as f32 / dims as f32);
            match factors.and_then(|fs| fs.get(i)) {
                Some(&div) if div > 0.0 => f / div,
                _ => f,
            }
        })
        .collect()
}

/// Rotates the first `2 * inv_freq.len()` dimensions of every head of `row` for position `pos`.
pub fn rope(
    row: &mut [f32],
    head_dim: usize,
    pos: f32,
    inv_freq: &[f32],
    style: RopeStyle,
    cos_sin: &mut Vec<(f32, f32)>,
) {
    cos_sin.clear();
    cos_sin.extend(inv_freq.iter().map(|&f| {
        let theta = pos * f;
        (theta.cos(), theta.sin())
    }));
    let half = inv_freq.len();
    for head in row.chunks_exact_mut(head_dim) {
        match style {
            RopeStyle::Adjacent => {
                for (pair, &(c, s)) in head.chunks_exact_mut(2).zip(cos_sin.iter()) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
            RopeStyle::HalfSplit => {
                let (lo, hi) = head.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(cos_sin.iter()) {
                    let (x, y) = (*a, *b);
                    *a = x * c - y * s;
                    *b = x * s + y * c;
                }
            }
        }
    }
}

/// One matrix of a (possibly fused) product: its weights and where its result goes,
/// `out[t * w.rows + r]`.
pub struct MatJob<'a> {
    pub w: &'a Matrix,
    pub data: &'a [u8],
    pub out: &'a mut [f32],
}

/// Reusable buffers of quantized activations, one per activation type in use.
#[derive(Default)]
pub struct ActBuffers {
    bufs: Vec<(GgmlType, Vec<u8>)>,
}

impl ActBuffers {
    fn get(&self, ty: GgmlType) -> &[u8] {
        self.bufs
            .iter()
            .find(|(t, _)| *t == ty)
            .map_or(&[][..], |(_, b)| b.as_slice())
    }
}

/// Quantizes the `n` rows of `x` (width `cols`) to `ty` into `buf`, split across threads.
fn quantize_rows(
    pool: &ThreadPool,
    ty: GgmlType,
    x: &[f32],
    n: usize,
    cols: usize,
    buf: &mut Vec<u8>,
) -> Result<(), quant::QuantError> {
    let act_row = ty
        .row_bytes(cols)
        .ok_or(quant::QuantError::Unsupported(ty))?;
    buf.resize(n * act_row, 0);
    if n == 1 {
        return quant::quantize_row(ty, x, buf);
    }
    let failed = std::sync::atomic::AtomicBool::new(false);
    let shared = DisjointSlice::new(buf.as_mut_slice());
    pool.for_ranges(n, &|toks| {
        // SAFETY: token ranges are disjoint, so are their activation rows.
        let dst = unsafe { shared.slice_mut(toks.start * act_row..toks.end * act_row) };
        for (t, d) in toks.zip(dst.chunks_exact_mut(act_row)) {
            if quant::quantize_row(ty, &x[t * cols..(t + 1) * cols], d).is_err() {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    if failed.into_inner() {
        return Err(quant::QuantError::Unsupported(ty));
    }
    Ok(())
}

/// `out[t][r] = dot(w[r], x[t])` for `n` token rows of `x` (width `w.cols`).
pub fn matmul(
    pool: &ThreadPool,
    w: &Matrix,
    w_data: &[u8],
    x: &[f32],
    n: usize,
    acts: &mut ActBuffers,
    out: &mut [f32],
) -> Result<(), quant::QuantError> {
    matmul_many(
        pool,
        &mut [MatJob {
            w,
            data: w_data,
            out,
        }],
        x,
        n,
        acts,
    )
}

/// Several products of the same input `x` (`n` rows, width `cols` of every job's matrix) in
/// one dispatch: weights stay quantized, activations are quantized once per activation type,
/// and the rows of all jobs together are split across threads, in blocks of rows reused for
/// every block of tokens.
pub fn matmul_many(
    pool: &ThreadPool,
    jobs: &mut [MatJob<'_>],
    x: &[f32],
    n: usize,
    acts: &mut ActBuffers,
) -> Result<(), quant::QuantError> {
    matmul_many_pf(pool, jobs, x, n, acts, None)
}

/// A side job of a product's tasks: `f(task, n_tasks)` runs once per task (prefetches of the
/// next layer's cache, see [`matmul_many_pf`]).
pub type SideFn<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// [`matmul_many`], running `side(task, n_tasks)` after each task's rows.
pub fn matmul_many_pf(
    pool: &ThreadPool,
    jobs: &mut [MatJob<'_>],
    x: &[f32],
    n: usize,
    acts: &mut ActBuffers,
    side: Option<SideFn<'_>>,
) -> Result<(), quant::QuantError> {
    let Some(cols) = jobs.first().map(|j| j.w.cols) else {
        return Ok(());
    };
    debug_assert_eq!(x.len(), n * cols);
    let mut used = 0;
    for j in jobs.iter() {
        debug_assert_eq!(j.w.cols, cols);
        debug_assert_eq!(j.out.len(), n * j.w.rows);
        let ty = j.w.act_ty;
        if acts.bufs[..used].iter().any(|(t, _)| *t == ty) {
            continue;
        }
        if acts.bufs.len() <= used {
            acts.bufs.push((ty, Vec::new()));
        }
        acts.bufs[used].0 = ty;
        quantize_rows(pool, ty, x, n, cols, &mut acts.bufs[used].1)?;
        used += 1;
    }
    let acts: &ActBuffers = acts;
    if jobs.len() > MAX_JOBS {
        return Err(quant::QuantError::Unsupported(jobs[0].w.ty));
    }
    // Fixed-size table: no allocation per call.
    let mut it = jobs.iter_mut();
    let outs: [Option<JobOut<'_>>; MAX_JOBS] = std::array::from_fn(|_| {
        it.next()
            .map(|j| (j.w, j.data, DisjointSlice::new(&mut *j.out)))
    });
    let outs = &outs;
    let total_bytes: usize = outs
        .iter()
        .flatten()
        .map(|(w, _, _)| w.rows * w.row_bytes)
        .sum();
    // A few tasks per thread, claimed dynamically: a thread slowed down (another process on
    // its core, a slower core) takes fewer of them instead of holding up the others.
    let n_tasks = match pool.n_threads() {
        1 => 1,
        t => t * TASKS_PER_THREAD,
    };
    pool.run_tasks(n_tasks, &|idx, n_tasks| {
        // This task's share: a contiguous range of the jobs' rows taken together, split by
        // weight bytes (the jobs' types may differ).
        let (lo_b, hi_b) = (
            split_point(total_bytes, n_tasks, idx),
            split_point(total_bytes, n_tasks, idx + 1),
        );
        let mut first_b = 0;
        for (w, w_data, out) in outs.iter().flatten() {
            let job_b = w.rows * w.row_bytes;
            // Task boundaries fall on multiples of 8 rows (the kernels' strips).
            let row_at =
                |b: usize| match (b.clamp(first_b, first_b + job_b) - first_b) / w.row_bytes {
                    r if r >= w.rows => w.rows,
                    r => r / 8 * 8,
                };
            let (lo, hi) = (row_at(lo_b), row_at(hi_b));
            first_b += job_b;
            if lo >= hi {
                continue;
            }
            let a = acts.get(w.act_ty);
            if n <= SMALL_N {
                small_n(w, w_data, a, n, out, lo, hi);
            } else {
                blocked(w, w_data, a, n, out, lo, hi);
            }
        }
        if let Some(f) = side {
            f(idx, n_tasks);
        }
    });
    Ok(())
}

/// A job's matrix, its weights and its output, shared by the pool threads.
type JobOut<'a> = (&'a Matrix, &'a [u8], DisjointSlice<'a, f32>);

/// Tasks per pool thread in one [`matmul_many`] call.
const TASKS_PER_THREAD: usize = 4;
/// Most jobs of one [`matmul_many`] call.
const MAX_JOBS: usize = 4;
/// Token counts up to this (decode, batched decode) stream each thread's whole row range
/// through the kernels in long calls instead of row blocks.
const SMALL_N: usize = 8;
/// Outputs per kernel call on the small-n path.
const SMALL_TILE: usize = 2048;

/// The boundary between pieces `idx - 1` and `idx` when `total` is cut into `parts` near-equal
/// pieces (a multiple of 64 bytes, so threads do not share a cache line of weights).
fn split_point(total: usize, parts: usize, idx: usize) -> usize {
    if idx >= parts {
        return total;
    }
    let p = (total as u128 * idx as u128 / parts as u128) as usize;
    (p / 64 * 64).min(total)
}

/// Rows `lo..hi` of `w` against all `n <= SMALL_N` tokens, in calls of up to
/// `SMALL_TILE / n` rows.
fn small_n(
    w: &Matrix,
    w_data: &[u8],
    a: &[u8],
    n: usize,
    out: &DisjointSlice<'_, f32>,
    lo: usize,
    hi: usize,
) {
    let mut tile = [0.0f32; SMALL_TILE];
    let (rows, rb) = (w.rows, w.row_bytes);
    // Whole 8-row strips per call (packed weights need them).
    let chunk = SMALL_TILE / n / 8 * 8;
    let mut r0 = lo;
    while r0 < hi {
        let nr = chunk.min(hi - r0);
        let wblk = &w_data[r0 * rb..(r0 + nr) * rb];
        w.gemm.run(w.cols, wblk, nr, a, n, &mut tile, nr);
        for t in 0..n {
            let at = t * rows + r0;
            // SAFETY: rows lo..hi of this job belong to this thread alone, for every token.
            let dst = unsafe { out.slice_mut(at..at + nr) };
            dst.copy_from_slice(&tile[t * nr..(t + 1) * nr]);
        }
        r0 += nr;
    }
}

/// Rows `lo..hi` of `w` against all `n` tokens, in calls of up to `ROW_BLOCK` rows (split
/// evenly) × `TOK_BLOCK` tokens.
fn blocked(
    w: &Matrix,
    w_data: &[u8],
    a: &[u8],
    n: usize,
    out: &DisjointSlice<'_, f32>,
    lo: usize,
    hi: usize,
) {
    thread_local! {
        /// Each pool thread's output tile (ROW_BLOCK × TOK_BLOCK f32, too big for the stack).
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    TILE.with(|cell| {
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let tile = match borrowed.as_mut() {
            Ok(t) => &mut **t,
            // Not reached (products do not nest); kept for soundness of the borrow.
            Err(_) => &mut own,
        };
        tile.resize(ROW_BLOCK * TOK_BLOCK, 0.0);
        let act_row = a.len() / n;
        let (rows, rb) = (w.rows, w.row_bytes);
        let n_calls = (hi - lo).div_ceil(ROW_BLOCK);
        for c in 0..n_calls {
            let r0 = lo + split_point_rows(hi - lo, n_calls, c);
            let nr = lo + split_point_rows(hi - lo, n_calls, c + 1) - r0;
            let wblk = &w_data[r0 * rb..(r0 + nr) * rb];
            for t0 in (0..n).step_by(TOK_BLOCK) {
                let nt = TOK_BLOCK.min(n - t0);
                let ablk = &a[t0 * act_row..(t0 + nt) * act_row];
                w.gemm.run(w.cols, wblk, nr, ablk, nt, tile, nr);
                for t in 0..nt {
                    let at = (t0 + t) * rows + r0;
                    // SAFETY: rows lo..hi of this job belong to this task alone, for every
                    // token.
                    let dst = unsafe { out.slice_mut(at..at + nr) };
                    dst.copy_from_slice(&tile[t * nr..(t + 1) * nr]);
                }
            }
        }
    });
}

/// The boundary between pieces `idx - 1` and `idx` of `n` rows cut into `parts`, a multiple of
/// 8 rows (the kernels' strips) except at the end.
fn split_point_rows(n: usize, parts: usize, idx: usize) -> usize {
    if idx >= parts {
        return n;
    }
    (n * idx / parts / 8 * 8).min(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_rows_gives_every_row_to_one_call_and_the_same_bits_as_serial() {
        let width = 24;
        let w: Vec<f32> = (0..width).map(|i| 0.5 + i as f32 / 7.0).collect();
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads).unwrap();
            for n in [0, 1, PAR_ELEMS / width - 1, PAR_ELEMS / width, 400, 512] {
                let src: Vec<f32> = (0..n * width)
                    .map(|i| ((i * 37) % 101) as f32 - 50.0)
                    .collect();
                let mut serial = vec![0.0; n * width];
                rms_norm_into(&mut serial, &src, &w, 1e-5);
                let mut par = vec![0.0; n * width];
                let seen = std::sync::Mutex::new(vec![0u32; n]);
                par_rows(&pool, &mut par, width, &|rows, r| {
                    assert_eq!(rows.len(), r.len() * width);
                    rms_norm_into(rows, &src[r.start * width..r.end * width], &w, 1e-5);
                    for t in r {
                        seen.lock().unwrap()[t] += 1;
                    }
                });
                assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1), "n={n}");
                assert_eq!(
                    serial.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    par.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "threads={threads} n={n}"
                );
            }
        }
    }

    #[test]
    fn rms_norm_matches_definition() {
        let mut x = vec![1.0f32, 2.0, 3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 1.0, 2.0, 1.0], 0.0);
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((x[0] - 1.0 / rms).abs() < 1e-6);
        assert!((x[2] - 6.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs() {
        let inv = rope_inv_freqs(10000.0, 4, None);
        let mut cs = Vec::new();
        let mut adj = vec![1.0f32, 0.0, 1.0, 0.0];
        rope(&mut adj, 4, 1.0, &inv, RopeStyle::Adjacent, &mut cs);
        assert!((adj[0] - 1f32.cos()).abs() < 1e-6 && (adj[1] - 1f32.sin()).abs() < 1e-6);
        let mut neox = vec![1.0f32, 1.0, 0.0, 0.0];
        rope(&mut neox, 4, 1.0, &inv, RopeStyle::HalfSplit, &mut cs);
        assert!((neox[0] - 1f32.cos()).abs() < 1e-6 && (neox[2] - 1f32.sin()).abs() < 1e-6);
        let f1 = 10000f32.powf(-0.5);
        assert!((neox[1] - f1.cos()).abs() < 1e-6 && (neox[3] - f1.sin()).abs() < 1e-6);
        // Position 0 is the identity.
        let mut id = vec![0.3f32, -0.7, 0.2, 0.9];
        let orig = id.clone();
        rope(&mut id, 4, 0.0, &inv, RopeStyle::HalfSplit, &mut cs);
        assert_eq!(id, orig);
    }

    /// Random weights of a legacy type: random quants, f16 scales of a sane size.
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Matrix, Vec<u8>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let row_bytes = ty.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rows * row_bytes];
        rng.fill(&mut data[..]);
        for b in data.chunks_exact_mut(ty.type_size()) {
            let d = half::f16::from_f32(rng.gen_range(-0.05f32..0.05));
            b[0..2].copy_from_slice(&d.to_le_bytes());
            if ty == GgmlType::Q4_1 {
                let m = half::f16::from_f32(rng.gen_range(-0.4f32..0.1));
                b[2..4].copy_from_slice(&m.to_le_bytes());
            }
        }
        let m = Matrix {
            name: format!("{ty}"),
            ty,
            rows,
            cols,
            offset: 0,
            row_bytes,
            act_ty: quant::vec_dot_type(ty),
            gemm: Gemm::new(ty).unwrap(),
            packed: None,
        };
        (m, data)
    }

    /// `matmul_many` on 1..3 threads, for decode-sized and prefill-sized token counts and jobs
    /// of different types (the byte split between threads), against scalar dots.
    #[test]
    fn matmul_many_matches_scalar_dots() {
        let cols = 320;
        let mats = [
            random_matrix(GgmlType::Q4_1, 77, cols, 1),
            random_matrix(GgmlType::Q8_0, 45, cols, 2),
            random_matrix(GgmlType::Q5_0, 130, cols, 3),
        ];
        for threads in 1..=3 {
            let pool = ThreadPool::new(threads).unwrap();
            let mut acts = ActBuffers::default();
            for n in [1, 2, 5, 8, 9, 40] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
                    .collect();
                let mut outs: Vec<Vec<f32>> = mats
                    .iter()
                    .map(|(m, _)| vec![f32::NAN; n * m.rows])
                    .collect();
                let mut jobs: Vec<MatJob<'_>> = mats
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|((m, d), o)| MatJob {
                        w: m,
                        data: d,
                        out: o,
                    })
                    .collect();
                matmul_many(&pool, &mut jobs, &x, n, &mut acts).unwrap();
                for ((m, d), o) in mats.iter().zip(&outs) {
                    let scalar = Gemm::scalar(m.ty).unwrap();
                    let mut q = vec![0u8; m.act_ty.row_bytes(cols).unwrap()];
                    for t in 0..n {
                        quant::quantize_row(m.act_ty, &x[t * cols..(t + 1) * cols], &mut q)
                            .unwrap();
                        for r in 0..m.rows {
                            let want =
                                (scalar.vec_dot)(cols, &d[r * m.row_bytes..][..m.row_bytes], &q);
                            let got = o[t * m.rows + r];
                            assert!(
                                (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                                "{} threads={threads} n={n} t={t} r={r}: {got} vs {want}",
                                m.ty
                            );
                        }
                    }
                }
            }
        }
    }

    /// Time of every matrix product of one forward pass (no attention) on a real model, for
    /// a few token counts (run by hand: `LLMSD_BENCH_MODEL=gemma-3-270m-q4_k_m.gguf
    /// LLMSD_THREADS=2 cargo test -p llmsd-engine --release matmul_bench -- --ignored
    /// --nocapture`; `LLMSD_BENCH_TOKENS=1,8,64` picks the counts).
    #[test]
    #[ignore = "benchmark, run by hand"]
    fn matmul_bench() {
        let name = std::env::var("LLMSD_BENCH_MODEL")
            .unwrap_or_else(|_| "SmolLM2-135M-Instruct.Q4_1.gguf".into());
        let path =
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(&name);
        let model = crate::model::Model::load(&path).unwrap();
        let threads: usize = std::env::var("LLMSD_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let pool = ThreadPool::new(threads).unwrap();
        let toks: Vec<usize> = std::env::var("LLMSD_BENCH_TOKENS")
            .unwrap_or_else(|_| "1,2,8,64".into())
            .split(',')
            .map(|v| v.parse().unwrap())
            .collect();
        let bytes = model.file().bytes();
        fn data<'a>(m: &'a Matrix, bytes: &'a [u8]) -> &'a [u8] {
            m.data(bytes)
        }
        let w = &model.weights;
        let mut groups: Vec<(&str, Vec<&Matrix>)> = Vec::new();
        for l in &w.layers {
            groups.push(("qkv", vec![&l.wq, &l.wk, &l.wv]));
            groups.push(("wo", vec![&l.wo]));
            groups.push(("gate_up", vec![&l.ffn_gate, &l.ffn_up]));
            groups.push(("down", vec![&l.ffn_down]));
        }
        groups.push(("output", vec![&w.output]));
        let mut acts = ActBuffers::default();
        let max_cols = groups.iter().map(|g| g.1[0].cols).max().unwrap();
        let mut outs: Vec<Vec<Vec<f32>>> = groups
            .iter()
            .map(|g| {
                g.1.iter()
                    .map(|m| vec![0.0; toks.iter().max().unwrap() * m.rows])
                    .collect()
            })
            .collect();
        for &n in &toks {
            let x: Vec<f32> = (0..n * max_cols)
                .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
                .collect();
            let reps = (160 / n).clamp(4, 20);
            // Whole passes (each weight read once per pass, as in a forward call); the best
            // time of each product over the passes (robust to other load on the machine).
            let mut best: Option<Vec<f64>> = None;
            for _ in 0..reps {
                let mut times = Vec::with_capacity(groups.len());
                for ((_, mats), out) in groups.iter().zip(outs.iter_mut()) {
                    let cols = mats[0].cols;
                    let mut jobs: Vec<MatJob<'_>> = mats
                        .iter()
                        .zip(out.iter_mut())
                        .map(|(m, o)| MatJob {
                            w: m,
                            data: data(m, bytes),
                            out: &mut o[..n * m.rows],
                        })
                        .collect();
                    let t = std::time::Instant::now();
                    matmul_many(&pool, &mut jobs, &x[..n * cols], n, &mut acts).unwrap();
                    times.push(t.elapsed().as_secs_f64());
                }
                best = Some(match best {
                    None => times,
                    Some(b) => b.iter().zip(&times).map(|(a, b)| a.min(*b)).collect(),
                });
            }
            let best = best.unwrap();
            let mut by_kind: Vec<(&str, f64, usize)> = Vec::new();
            for ((kind, mats), t) in groups.iter().zip(&best) {
                let b: usize = mats.iter().map(|m| m.rows * m.row_bytes).sum();
                match by_kind.iter_mut().find(|(k, _, _)| k == kind) {
                    Some(e) => {
                        e.1 += t;
                        e.2 += b;
                    }
                    None => by_kind.push((kind, *t, b)),
                }
            }
            let total: f64 = by_kind.iter().map(|e| e.1).sum();
            let total_b: usize = by_kind.iter().map(|e| e.2).sum();
            println!(
                "{name} threads={threads} n={n}: {:.3} ms/pass, {:.1} tok/s, {:.2} GB/s",
                total * 1e3,
                n as f64 / total,
                total_b as f64 / total / 1e9
            );
            for (k, t, b) in by_kind {
                println!(
                    "    {k:>8}: {:7.3} ms {:6.2} GB/s {:.1} MB",
                    t * 1e3,
                    b as f64 / t / 1e9,
                    b as f64 / 1e6
                );
            }
        }
    }

    /// The AVX2 SwiGLU against the scalar formula, over the range where it matters and the
    /// extremes (exp overflow / underflow), with a tail that is not a multiple of 8.
    /// The AVX2 GeGLU against the scalar table lookup, bit for bit: every f16 input, the
    /// clamps at ±10, values that round across them, NaN and infinities, a ragged tail.
    #[test]
    fn geglu_matches_scalar() {
        let mut gate: Vec<f32> = (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .chain([-10.0, 10.0, -9.999, 9.999, -10.001, 10.001, 1e-8, f32::NAN])
            .chain([f32::INFINITY, f32::NEG_INFINITY, 3.000_1, -2.5, 0.1])
            .collect();
        gate.extend((0..1001).map(|i| (i as f32 - 500.0) / 41.0));
        let up: Vec<f32> = (0..gate.len())
            .map(|i| (i % 7) as f32 / 3.0 - 1.0)
            .collect();
        let mut got = gate.clone();
        geglu(&mut got, &up);
        for ((&g, &u), &x) in gate.iter().zip(&up).zip(&got) {
            let want = gelu_tanh(g) * u;
            assert!(
                x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()),
                "geglu({g}, {u}) = {x}, scalar {want}"
            );
        }
    }

    #[test]
    fn swiglu_matches_scalar() {
        let gate: Vec<f32> = (0..2003)
            .map(|i| (i as f32 - 1000.0) / 37.0)
            .chain([-200.0, -88.5, -87.0, 87.0, 88.5, 200.0, 0.0])
            .collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| (i % 13) as f32 / 6.0 - 1.0)
            .collect();
        let mut got = gate.clone();
        swiglu(&mut got, &up);
        for ((&g, &u), &x) in gate.iter().zip(&up).zip(&got) {
            let want = silu(g) * u;
            assert!(
                (x - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "swiglu({g}, {u}) = {x}, scalar {want}"
            );
        }
    }

    #[test]
    fn activations() {
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
        assert!((gelu_tanh_exact(1.0) - 0.841_192).abs() < 1e-5);
        assert_eq!(gelu_tanh(0.0), 0.0);
        // The table agrees with the exact function to f16 precision.
        for i in -1000..1000 {
            let x = i as f32 / 97.0;
            let (t, e) = (gelu_tanh(x), gelu_tanh_exact(x));
            assert!((t - e).abs() <= 2e-3 * e.abs() + 1e-4, "{x}: {t} vs {e}");
        }
        assert_eq!(gelu_tanh(12.0), 12.0);
        assert_eq!(gelu_tanh(-12.0), 0.0);
    }
}
