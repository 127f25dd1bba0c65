//! [`ChunkedKv`]: a [`KvCache`] made of chunk slots, with per-slot attention-density statistics
//! and a [`LayerGate`] for layer-by-layer restores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::format::{SealedChunk, StagedChunk};
use super::{BlockLayout, ChunkError, Precision, CHUNK_TOKENS};
use crate::kv::{AttnQuery, KvCache, KvError, KvShape};

const T: usize = CHUNK_TOKENS;

/// One chunk position of a [`ChunkedKv`].
#[derive(Debug)]
pub enum ChunkSlot {
    Staged(Box<StagedChunk>),
    Sealed(Arc<SealedChunk>),
}

impl ChunkSlot {
    pub fn shape(&self) -> KvShape {
        match self {
            ChunkSlot::Staged(s) => s.shape(),
            ChunkSlot::Sealed(s) => s.shape(),
        }
    }

    pub fn is_sealed(&self) -> bool {
        matches!(self, ChunkSlot::Sealed(_))
    }

    /// The sealed chunk's precision; `None` for a staged (f32) slot.
    pub fn precision(&self) -> Option<Precision> {
        match self {
            ChunkSlot::Staged(_) => None,
            ChunkSlot::Sealed(s) => Some(s.precision()),
        }
    }

    /// Bytes of chunk data this slot holds ([`staged_bytes`](super::staged_bytes) for a
    /// staged slot, the layers present for a sealed one).
    pub fn resident_bytes(&self) -> usize {
        match self {
            ChunkSlot::Staged(s) => super::staged_bytes(s.shape()),
            ChunkSlot::Sealed(s) => s.resident_bytes(),
        }
    }
}

/// Attention-mass statistics of one chunk since the cache was built / last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Density {
    /// Sum over observations of the probability mass the chunk's positions received.
    pub mass: f64,
    /// (query, head) pairs that saw the chunk.
    pub observations: u64,
}

impl Density {
    /// Mean mass per observation (0 when there are none).
    pub fn mean(&self) -> f64 {
        if self.observations == 0 {
            0.0
        } else {
            self.mass / self.observations as f64
        }
    }
}

/// Per-slot atomic accumulators (mass as f64 bits).
#[derive(Debug, Default)]
struct SlotStats {
    mass: AtomicU64,
    observations: AtomicU64,
}

impl SlotStats {
    fn add(&self, mass: f64, observations: u64) {
        let _ = self
            .mass
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + mass).to_bits())
            });
        self.observations.fetch_add(observations, Ordering::Relaxed);
    }

    fn get(&self) -> Density {
        Density {
            mass: f64::from_bits(self.mass.load(Ordering::Relaxed)),
            observations: self.observations.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct GateState {
    ready: usize,
    failed: Option<String>,
}

/// Signals, layer by layer, that chunks being loaded concurrently have their layer data.
#[derive(Debug, Default)]
pub struct LayerGate {
    state: Mutex<GateState>,
    cond: Condvar,
}

impl LayerGate {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Layers `0..layers_ready` are present in all pending chunks (never moves backwards).
    pub fn advance(&self, layers_ready: usize) {
        let mut s = self.lock();
        s.ready = s.ready.max(layers_ready);
        drop(s);
        self.cond.notify_all();
    }

    /// The loader failed: waiters for layers not yet ready get an error.
    pub fn fail(&self, why: String) {
        let mut s = self.lock();
        if s.failed.is_none() {
            s.failed = Some(why);
        }
        drop(s);
        self.cond.notify_all();
    }

    /// Layers ready so far.
    pub fn ready(&self) -> usize {
        self.lock().ready
    }

    /// Blocks until `layer` is ready (or the loader failed).
    pub fn wait(&self, layer: usize) -> Result<(), KvError> {
        let mut s = self.lock();
        loop {
            if s.ready > layer {
                return Ok(());
            }
            if let Some(why) = &s.failed {
                return Err(KvError::Unavailable(why.clone()));
            }
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A KV cache made of chunk slots: slot `i` holds positions `16 * i .. 16 * i + 16`.
///
/// Staged slots attend from f32, sealed ones from their format directly (see the module docs);
/// one softmax covers all visible positions, as in [`ContiguousKv`](crate::kv::ContiguousKv).
/// Sealed slots always lie entirely below [`KvCache::len`]; writing into a sealed slot, or
/// shortening the cache into one, first replaces it with its dequantized staged copy.
///
/// A sealed slot still missing the layer being attended reads as zeros (scores 0, values 0);
/// the forward pass never sees that, because [`KvCache::wait_layer`] first waits on the gate
/// and then reports any missing layer as [`KvError::Unavailable`].
///
/// While attending, the cache adds to each visible slot the attention mass its positions got
/// (summed over the query's heads) and the number of (query, head) observations, on the layers
/// chosen by [`Self::set_density_layers`]; see [`Self::densities`].
///
/// Cost of the density statistics (measured by the ignored tests `attend_speed` and
/// `density_cost` in `engine/tests/kvchunk_model.rs`, on a shared 2-core AMD EPYC): per
/// attention call they add one pass over the probabilities (summing the heads per position),
/// one 16-element sum per visible slot and two relaxed atomic adds per visible slot. On
/// prefill-style attention (512 causal queries, SmolLM2 shape) that is about +2..6% of the
/// attention time; on a full SmolLM2-135M prefill of 512 tokens, where attention is about a
/// fifth of the time, +1..2.5% (1 thread CPU time 3.03 s → 3.07 s; 2 threads wall 3.26 s →
/// 3.34 s), below this machine's run-to-run noise. Sampling every 4th layer makes it
/// unmeasurable.
#[derive(Debug)]
pub struct ChunkedKv {
    pub(super) shape: KvShape,
    capacity: usize,
    len: usize,
    /// Positions `0..reserved` are writable (and read by attention).
    pub(super) reserved: usize,
    pub(super) slots: Vec<ChunkSlot>,
    stats: Vec<SlotStats>,
    /// Density statistics on layers `l % every == 0`; 0: none.
    density_every: usize,
    gate: Option<Arc<LayerGate>>,
    /// Head-block layout per precision, indexed by `Precision as usize`.
    pub(super) layouts: [BlockLayout; 4],
}

impl ChunkedKv {
    pub fn new(shape: KvShape, capacity: usize) -> Self {
        ChunkedKv {
            shape,
            capacity,
            len: 0,
            reserved: 0,
            slots: Vec::new(),
            stats: Vec::new(),
            density_every: 1,
            gate: None,
            layouts: [
                Precision::Int2,
                Precision::Int4,
                Precision::Int8,
                Precision::F16,
            ]
            .map(|p| BlockLayout::new(shape, p)),
        }
    }

    /// A cache over existing slots holding positions `0..len`: there must be exactly
    /// `ceil(len / 16)` slots, all of this shape. Sealed slots must lie entirely below `len`;
    /// they may still be missing layers that a loader fills behind a [`LayerGate`] (see
    /// [`Self::set_gate`]). Staged slots must hold at least their positions below `len` (their
    /// token counts are set to exactly those).
    pub fn from_slots(
        shape: KvShape,
        capacity: usize,
        mut slots: Vec<ChunkSlot>,
        len: usize,
    ) -> Result<Self, ChunkError> {
        if len > capacity {
            return Err(ChunkError::Capacity { len, capacity });
        }
        if slots.len() != len.div_ceil(T) {
            return Err(ChunkError::SlotCount {
                slots: slots.len(),
                len,
            });
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.shape() != shape {
                return Err(ChunkError::Shape {
                    expected: shape,
                    found: slot.shape(),
                });
            }
            let need = (len - i * T).min(T);
            match slot {
                ChunkSlot::Sealed(_) if need < T => {
                    return Err(ChunkError::Slot {
                        slot: i,
                        reason: format!("sealed but only {need} of its positions are in use"),
                    })
                }
                ChunkSlot::Sealed(_) => {}
                ChunkSlot::Staged(s) if s.n_tokens() < need => {
                    return Err(ChunkError::Slot {
                        slot: i,
                        reason: format!("staged with {} tokens, {need} needed", s.n_tokens()),
                    })
                }
                ChunkSlot::Staged(s) => s.set_tokens(need),
            }
        }
        let mut kv = ChunkedKv::new(shape, capacity);
        kv.stats = slots.iter().map(|_| SlotStats::default()).collect();
        kv.slots = slots;
        kv.len = len;
        kv.reserved = len;
        Ok(kv)
    }

    pub fn into_slots(self) -> Vec<ChunkSlot> {
        self.slots
    }

    pub fn slots(&self) -> &[ChunkSlot] {
        &self.slots
    }

    /// Mutable access to a slot (e.g. to seal a staged one). The caller keeps the invariants:
    /// same shape, and a sealed slot only where all 16 positions are below [`KvCache::len`].
    pub fn slot_mut(&mut self, i: usize) -> Option<&mut ChunkSlot> {
        self.slots.get_mut(i)
    }

    /// Replaces slot `i` after checking the invariants of [`Self::slot_mut`]; returns the old
    /// slot.
    pub fn replace_slot(&mut self, i: usize, slot: ChunkSlot) -> Result<ChunkSlot, ChunkError> {
        if slot.shape() != self.shape {
            return Err(ChunkError::Shape {
                expected: self.shape,
                found: slot.shape(),
            });
        }
        let n_slots = self.slots.len();
        let len = self.len;
        let Some(dst) = self.slots.get_mut(i) else {
            return Err(ChunkError::Slot {
                slot: i,
                reason: format!("out of range ({n_slots} slots)"),
            });
        };
        if matches!(slot, ChunkSlot::Sealed(_)) && (i + 1) * T > len {
            return Err(ChunkError::Slot {
                slot: i,
                reason: format!("a sealed slot must lie below the length {len}"),
            });
        }
        Ok(std::mem::replace(dst, slot))
    }

    /// Attention density of each slot.
    pub fn densities(&self) -> Vec<Density> {
        self.stats.iter().map(SlotStats::get).collect()
    }

    pub fn reset_densities(&mut self) {
        self.stats
            .iter_mut()
            .for_each(|s| *s = SlotStats::default());
    }

    /// Which layers get density statistics: layers `0, n, 2n, ...` (default 1: every layer;
    /// 0: none). Sampling lowers the cost.
    pub fn set_density_layers(&mut self, every_nth: usize) {
        self.density_every = every_nth;
    }

    /// The gate [`KvCache::wait_layer`] waits on (for slots being restored concurrently).
    pub fn set_gate(&mut self, gate: Option<Arc<LayerGate>>) {
        self.gate = gate;
    }

    pub(super) fn is_sampled(&self, layer: usize) -> bool {
        self.density_every != 0 && layer.is_multiple_of(self.density_every)
    }

    pub(super) fn add_density(&self, slot: usize, mass: f64, observations: u64) {
        if let Some(s) = self.stats.get(slot) {
            s.add(mass, observations);
        }
    }

    /// The layout and bytes of kv head `g` of `layer` of a sealed chunk; `None` if that layer
    /// is not loaded (or the chunk does not fit this cache), which attention reads as zeros.
    #[inline]
    pub(super) fn block<'a>(
        &'a self,
        chunk: &'a SealedChunk,
        layer: usize,
        g: usize,
    ) -> Option<(&'a BlockLayout, &'a [u8])> {
        if chunk.shape() != self.shape {
            return None;
        }
        let lay = &self.layouts[chunk.precision() as usize];
        let bytes = chunk.layer(layer)?;
        Some((lay, bytes.get(g * lay.bytes..(g + 1) * lay.bytes)?))
    }

    /// Slot `i` as a staged chunk, dequantizing a sealed one in its place first.
    fn staged_mut(&mut self, i: usize) -> Option<&mut StagedChunk> {
        let slot = self.slots.get_mut(i)?;
        if let ChunkSlot::Sealed(s) = slot {
            if !s.is_complete() {
                tracing::warn!(
                    slot = i,
                    "unsealing an incomplete chunk: missing layers read as zeros"
                );
            }
            *slot = ChunkSlot::Staged(Box::new(s.dequantize_present()));
        }
        match slot {
            ChunkSlot::Staged(s) => Some(s),
            ChunkSlot::Sealed(_) => None,
        }
    }
}

impl KvCache for ChunkedKv {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self) -> usize {
        self.len
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn reserve(&mut self, len: usize) -> Result<(), KvError> {
        if len > self.capacity {
            return Err(KvError::Full {
                needed: len,
                capacity: self.capacity,
            });
        }
        while self.slots.len() * T < len {
            self.slots
                .push(ChunkSlot::Staged(Box::new(StagedChunk::new(self.shape))));
            self.stats.push(SlotStats::default());
        }
        self.reserved = self.reserved.max(len);
        Ok(())
    }

    fn write(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(pos < self.reserved);
        if pos >= self.reserved {
            return;
        }
        if let Some(s) = self.staged_mut(pos / T) {
            s.write(layer, pos % T, k, v);
        }
    }

    fn set_len(&mut self, len: usize) {
        let len = len.min(self.reserved);
        self.len = len;
        for i in 0..self.slots.len() {
            let need = len.saturating_sub(i * T).min(T);
            if need < T && matches!(self.slots[i], ChunkSlot::Sealed(_)) {
                self.staged_mut(i);
            }
            if let ChunkSlot::Staged(s) = &mut self.slots[i] {
                s.set_tokens(need);
            }
        }
    }

    /// Forgets positions from `len` on, dropping the slots wholly past it.
    fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let keep = len.div_ceil(T);
        self.slots.truncate(keep);
        self.stats.truncate(keep);
        self.reserved = self.reserved.min(len);
        self.set_len(len);
    }

    fn attend(&self, query: &AttnQuery<'_>, out: &mut [f32], scores: &mut Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if super::attend::simd_available() {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            unsafe { self.attend_avx2(query, out, scores) };
            return;
        }
        self.attend_scalar(query, out, scores);
    }

    fn prefetch_layer(&self, layer: usize, part: usize, parts: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let n = self.len.div_ceil(T).min(self.slots.len());
            let r = crate::pool::split_range(n, parts.max(1), part);
            for slot in &self.slots[r] {
                match slot {
                    ChunkSlot::Sealed(s) => {
                        if let Some(b) = s.layer(layer) {
                            super::avx2::prefetch_l2(b);
                        }
                    }
                    ChunkSlot::Staged(s) => {
                        super::avx2::prefetch_l2_f32(s.keys(layer));
                        super::avx2::prefetch_l2_f32(s.values(layer));
                    }
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (layer, part, parts);
    }

    /// Waits on the gate (if any), then checks that every sealed slot has `layer`.
    fn wait_layer(&self, layer: usize) -> Result<(), KvError> {
        if let Some(g) = &self.gate {
            g.wait(layer)?;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            if let ChunkSlot::Sealed(s) = slot {
                if s.layer(layer).is_none() {
                    return Err(KvError::Unavailable(format!(
                        "layer {layer} of chunk {i} is not loaded"
                    )));
                }
            }
        }
        Ok(())
    }
}
