//! The KV store: every app's contexts, their chunks, and where each chunk lives.
//!
//! A context is its token ids (the ground truth, always kept) plus one chunk per 16 tokens and
//! an open tail. A chunk is resident (an `Arc<SealedChunk>` in budgeted memory), on disk (a
//! swap file), or both. A call works on a [`Session`]: [`KvStore::open_session`] makes the
//! context resident (reading and recomputing missing chunks at once), [`KvStore::forward`]
//! runs the model over new tokens, and [`KvStore::close_session`] seals new chunks, updates
//! densities and precisions, queues the swap-out of everything that changed (ahead of time,
//! on the I/O thread) followed by the app's manifest, and evicts under the budget.
//!
//! Files: `<state>/apps/<hex of app name>/manifest.json` and `f<N>.kv` swap files, 0600 in a
//! 0700 directory. A swap file is a *segment*: everything one call swapped out (its new
//! chunks and their f16 masters, chunks it re-quantized, its tail), so a call costs one file,
//! one fsync and one rename, and a restore opens each segment once however many of its chunks
//! it reads. Chunks refer to (segment, item). A manifest is replaced atomically after the
//! segments it names are durable; a segment no chunk, master, tail or whole-context copy
//! refers to any more is deleted once a manifest without it is durable. A segment or a
//! section of one that is missing or fails its checksum is recomputed from the tokens.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use llmsd_engine::kv::{KvCache, KvShape};
use llmsd_engine::kvchunk::{
    chunk_bytes, layer_bytes, staged_bytes, ChunkError, ChunkSlot, ChunkedKv, Density, LayerGate,
    Precision, SealedChunk, StagedChunk, CHUNK_TOKENS,
};
use llmsd_engine::model::{Logits, Model, ModelError, Scratch, SeqBatch};
use llmsd_engine::pool::ThreadPool;
use serde::{Deserialize, Serialize};

use super::assign::assign_levels;
use super::durable::{self, DurableError};
use super::io::{Done, IoHold, IoThread};
use super::lctru::Lctru;
use super::plan::{self, LinearCost, Missing, RestoreCosts};
use super::swapfile::{self, ItemSpec, SwapFile};

/// Average code width kept by the `llms` policy unless configured otherwise.
pub const DEFAULT_AVG_BITS: f64 = 4.0;
/// Precisions the `llms` policy chooses from (LLMS: 8/4/2 over an INT8 base).
pub const LLMS_LEVELS: [Precision; 3] = [Precision::Int8, Precision::Int4, Precision::Int2];
/// Tokens per forward call while prefilling, so new chunks are sealed as they fill.
pub const DEFAULT_PREFILL_SLICE: usize = 64;
const KIND_SEALED: u8 = 0;
const KIND_TAIL: u8 = 1;
const KIND_WHOLE: u8 = 2;
/// Segments kept open (header and tables read and checked) between restores.
const OPEN_SEGMENTS: usize = 64;
/// A segment being filled is queued for writing once its items hold this many bytes (a long
/// prefill seals many chunks; their f16 masters should not wait in memory for the call's end).
/// Swap-out memory is outside the KV budget (the items, then their encoded copies while the
/// I/O thread writes), so this bounds it: 4 MiB keeps it near 10 MiB per call.
const SEGMENT_MAX_BYTES: u64 = 4 << 20;

/// How the store keeps KV between calls; all are in one binary so they can be compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Drop KV on eviction, rebuild it by prefill (what an OOM kill costs).
    Recompute,
    /// The whole context to one f16 file and back.
    SwapWhole,
    /// 16-token f16 chunks, swapped LRU.
    Paged,
    /// 16-token int8 chunks, swapped LRU.
    PagedInt8,
    /// Tolerance-aware precision, ahead-of-time swap-out, LCTRU, pipelined restore.
    Llms,
}

impl Policy {
    pub const ALL: [Policy; 5] = [
        Policy::Recompute,
        Policy::SwapWhole,
        Policy::Paged,
        Policy::PagedInt8,
        Policy::Llms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Recompute => "recompute",
            Policy::SwapWhole => "swap-whole",
            Policy::Paged => "paged",
            Policy::PagedInt8 => "paged-int8",
            Policy::Llms => "llms",
        }
    }

    /// Precision a chunk is sealed at during a call (`llms`: provisional, until the call's
    /// densities place it; its f16 master goes to disk at once).
    fn seal_precision(self) -> Precision {
        match self {
            Policy::PagedInt8 => Precision::Int8,
            Policy::Llms => Precision::Int4,
            _ => Precision::F16,
        }
    }

    fn uses_chunk_files(self) -> bool {
        matches!(self, Policy::Paged | Policy::PagedInt8 | Policy::Llms)
    }
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Policy::ALL.iter().map(|p| p.name()).collect();
                format!("unknown KV policy {s:?} (one of: {})", names.join(", "))
            })
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub state_dir: PathBuf,
    pub policy: Policy,
    /// Resident KV bytes allowed (all contexts, all precisions); [`KvStore::set_budget`] may
    /// lower the budget in force below it for a while (memory pressure), never raise it.
    pub kv_budget_bytes: u64,
    /// Mean code width of the `llms` policy.
    pub avg_bits: f64,
    /// Longest context, in tokens (further capped by the model's window).
    pub max_context_tokens: usize,
    pub prefill_slice: usize,
    /// Attention density is gathered on every n-th layer.
    pub density_every_nth_layer: usize,
    /// Measure the restore cost models at start-up (otherwise fixed defaults).
    pub fit_costs: bool,
    /// Where what can be measured again is kept (the fitted cost models); none = the state
    /// directory.
    pub cache_dir: Option<PathBuf>,
}

impl StoreConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            state_dir: state_dir.into(),
            policy: Policy::Llms,
            kv_budget_bytes: 256 << 20,
            avg_bits: DEFAULT_AVG_BITS,
            max_context_tokens: 8192,
            prefill_slice: DEFAULT_PREFILL_SLICE,
            density_every_nth_layer: 1,
            fit_costs: true,
            cache_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no context {0:?}")]
    NotFound(String),
    #[error("{0}")]
    ContextWindowExceeded(String),
    /// The context fits the budget, but contexts in use hold it now: try again when one ends.
    #[error("{0}")]
    NoRoomNow(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("KV store I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Where a chunk (or tail, or whole context) is on disk: item `item` of segment `f<num>.kv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileRef {
    num: u64,
    item: u32,
    /// Raw bytes of the item.
    bytes: u64,
}

/// An item of a segment not yet queued for writing.
enum PendingItem {
    Sealed(Arc<SealedChunk>),
    Tail {
        n_tokens: usize,
        bytes: Vec<u8>,
    },
    Whole {
        n_tokens: usize,
        chunks: Vec<Arc<SealedChunk>>,
        tail: Option<Vec<u8>>,
    },
}

/// The segment an app's current call is filling; queued for writing when the call closes
/// (before the manifest naming it), when it grows past [`SEGMENT_MAX_BYTES`], or when
/// something must wait for one of its items to be on disk.
struct PendingSegment {
    num: u64,
    items: Vec<PendingItem>,
    raw_bytes: u64,
}

struct ChunkEntry {
    precision: Precision,
    resident: Option<Arc<SealedChunk>>,
    /// The swap file at `precision`.
    file: Option<FileRef>,
    /// The f16 copy every lower precision is quantized from (`llms` only).
    master: Option<FileRef>,
    density: Density,
    refs: u32,
    last_use: u64,
}

#[derive(Default)]
struct Tail {
    staged: Option<Box<StagedChunk>>,
    file: Option<FileRef>,
}

struct Context {
    tokens: Vec<u32>,
    chunks: Vec<u64>,
    tail: Tail,
    /// `swap-whole`: the one file holding the whole context.
    whole: Option<FileRef>,
    created: u64,
    last_use: u64,
}

struct App {
    name: String,
    dir: PathBuf,
    contexts: BTreeMap<u64, Context>,
    chunks: HashMap<u64, ChunkEntry>,
    next_file: u64,
    next_chunk: u64,
    /// Segments of this app on disk or queued (deleted once nothing refers to them).
    segments: BTreeSet<u64>,
    pending: Option<PendingSegment>,
}

/// Eviction unit: (app, kind, id) with kind 0 = chunk, 1 = tail of a context, 2 = whole context.
type EvictKey = (u32, u8, u64);
const EK_CHUNK: u8 = 0;
const EK_TAIL: u8 = 1;
const EK_WHOLE: u8 = 2;

/// What [`KvStore::compact`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompactStats {
    pub requantized_chunks: u64,
    pub evicted_contexts: u64,
    pub freed_bytes: u64,
    pub files_removed: u64,
}

/// What one restore did, for `llmsctl chunks` and the switch benchmark.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreReport {
    pub elapsed_s: f64,
    pub was_resident: bool,
    pub chunks_read: usize,
    pub chunks_recomputed: usize,
    pub bytes_read: u64,
    pub predicted_s: f64,
}

/// One session's share of [`KvStore::forward_sessions`].
pub struct SessionStep<'a> {
    pub session: &'a mut Session,
    pub tokens: &'a [u32],
    pub logits: Logits,
}

/// A context checked out for one call: resident whole, pinned against eviction.
pub struct Session {
    app: usize,
    ctx: u64,
    pub kv: ChunkedKv,
    /// Tokens forwarded during this session, appended to the context on close.
    appended: Vec<u32>,
    /// The open tail as it was, so an aborted call leaves the context untouched.
    tail_before: Option<Box<StagedChunk>>,
    /// `llms`: f16 masters of the chunks sealed in this session, by slot, already queued.
    masters: HashMap<usize, FileRef>,
    pub restore: RestoreReport,
}

impl Session {
    /// Positions the context holds now.
    pub fn len(&self) -> usize {
        self.kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kv.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub tokens: usize,
    pub chunks: usize,
    pub resident_bytes: u64,
    pub disk_bytes: u64,
    pub created_unix: u64,
    pub last_use_unix: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChunkInfo {
    pub index: usize,
    pub tokens: usize,
    pub precision: String,
    pub resident: bool,
    pub on_disk: bool,
    pub density: f64,
    pub observations: u64,
    pub shared_by: u32,
    pub last_use_unix: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub policy: String,
    /// The budget in force (lowered under memory pressure).
    pub kv_budget_bytes: u64,
    /// The configured budget.
    pub kv_budget_max_bytes: u64,
    pub kv_resident_bytes: u64,
    pub kv_resident_peak_bytes: u64,
    pub kv_disk_bytes: u64,
    pub contexts: usize,
    pub chunks: usize,
    pub io_failures: u64,
    /// Swap files queued for writing since start, and their bytes before compression.
    pub files_written: u64,
    pub bytes_written: u64,
}

// ---- manifest ----

#[derive(Serialize, Deserialize)]
struct AppManifest {
    app: String,
    model: String,
    next_file: u64,
    next_chunk: u64,
    contexts: Vec<CtxRecord>,
    chunks: Vec<ChunkRecord>,
}

#[derive(Serialize, Deserialize)]
struct CtxRecord {
    id: u64,
    tokens: Vec<u32>,
    chunks: Vec<u64>,
    tail_file: Option<FileRec>,
    whole_file: Option<FileRec>,
    created: u64,
    last_use: u64,
}

#[derive(Serialize, Deserialize)]
struct ChunkRecord {
    id: u64,
    precision: Precision,
    file: Option<FileRec>,
    master: Option<FileRec>,
    mass: f64,
    observations: u64,
    last_use: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A file reference as a manifest keeps it: `[num, bytes, item]`, or `[num, bytes]` (item 0)
/// as builds that wrote one file per chunk kept it.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(untagged)]
enum FileRec {
    Item(u64, u64, u32),
    File(u64, u64),
}

fn fref(t: Option<FileRec>) -> Option<FileRef> {
    t.map(|r| match r {
        FileRec::Item(num, bytes, item) => FileRef { num, item, bytes },
        FileRec::File(num, bytes) => FileRef {
            num,
            item: 0,
            bytes,
        },
    })
}

fn tref(f: Option<FileRef>) -> Option<FileRec> {
    f.map(|f| FileRec::Item(f.num, f.bytes, f.item))
}

/// Context ids as apps see them.
pub fn format_id(id: u64) -> String {
    format!("ctx-{id:016x}")
}

/// The id of exactly the spelling [`format_id`] gives: `from_str_radix` alone would also take
/// `+` and upper case, and such aliases would reach transcript file names and usage keys.
fn parse_id(s: &str) -> Option<u64> {
    let hex = s.strip_prefix("ctx-")?;
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// App names map to directory names through hex, so no name can reach outside the state dir.
pub fn app_dir_name(app: &str) -> String {
    app.bytes().map(|b| format!("{b:02x}")).collect()
}

pub fn validate_app_name(app: &str) -> Result<()> {
    if app.is_empty() || app.len() > 64 || app.chars().any(char::is_control) {
        return Err(StoreError::InvalidRequest(format!(
            "app name must be 1-64 printable characters, got {app:?}"
        )));
    }
    Ok(())
}

/// Identifies the model a store's KV was computed with: its size and a hash of its header
/// region and of each tensor's first bytes would be costly; the GGUF metadata and tensor
/// table hash plus the file length is enough to tell models apart.
fn model_fingerprint(model: &Model) -> String {
    let bytes = model.file().bytes();
    let head = &bytes[..bytes.len().min(4 << 20)];
    let tail = &bytes[bytes.len().saturating_sub(1 << 20)..];
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(tail);
    format!("{}-{:08x}", bytes.len(), h.finalize())
}

fn shape_hash(shape: KvShape) -> u64 {
    let mut h = crc32fast::Hasher::new();
    for v in [
        shape.n_layers,
        shape.n_kv_heads,
        shape.head_dim,
        shape.v_head_dim,
    ] {
        h.update(&(v as u64).to_le_bytes());
    }
    h.finalize() as u64 | 0x4b56_0000_0000_0000
}

/// The chunk store of the daemon.
pub struct KvStore {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    shape: KvShape,
    cfg: StoreConfig,
    fingerprint: String,
    apps: Vec<App>,
    app_index: HashMap<String, usize>,
    queue: Lctru<EvictKey>,
    pinned: HashSet<(usize, u64)>,
    /// The KV budget in force: `cfg.kv_budget_bytes` unless memory pressure lowered it.
    budget: u64,
    resident_bytes: u64,
    resident_peak: u64,
    /// Swap files queued and not yet confirmed: (app, file number).
    in_flight: HashSet<(usize, u64)>,
    /// Segments handed to the I/O thread and not yet confirmed on disk, kept in memory: reads
    /// of their items are served from here, and a segment whose write failed (a full disk)
    /// stays here and is written again with the app's next manifest, so nothing is lost or
    /// recomputed differently meanwhile.
    /// Shared with the I/O jobs, which drop a segment from it as soon as it is written (its
    /// memory goes then, not at the next drain).
    unwritten: Arc<Mutex<UnwrittenSegments>>,
    /// Of those, the ones whose last write failed.
    failed_writes: BTreeSet<(usize, u64)>,
    io: IoThread,
    io_failures: u64,
    files_written: u64,
    bytes_written: u64,
    costs: RestoreCosts,
    scratch: Scratch,
    rng_state: u64,
    /// Recently read segments, open: (app, num) → (file, last use). A segment is never
    /// changed once written, so its tables stay valid until it is deleted.
    open_segments: HashMap<(usize, u64), (Arc<SwapFile>, u64)>,
    open_clock: u64,
    /// Layer buffers of chunks evicted to make room for a restore, by length, lent to the
    /// chunks it reads (`Some` only while a session is being opened).
    spare: Option<SpareBuffers>,
}

type UnwrittenSegments = HashMap<(usize, u64), Arc<Vec<PendingItem>>>;

/// Buffers by length, taken by the loader threads of a restore.
#[derive(Default)]
struct SpareBuffers(HashMap<usize, Vec<Vec<u8>>>);

impl SpareBuffers {
    fn put(&mut self, chunk: Arc<SealedChunk>) {
        // A chunk still shared (a fork, a running session) keeps its memory.
        if let Ok(chunk) = Arc::try_unwrap(chunk) {
            for b in chunk.into_layer_buffers() {
                self.0.entry(b.len()).or_default().push(b.into_vec());
            }
        }
    }

    /// A buffer for `len` bytes: a spare one of that length, else a new one.
    fn take(spare: &Mutex<SpareBuffers>, len: usize) -> Vec<u8> {
        let reused = spare
            .lock()
            .ok()
            .and_then(|mut s| s.0.get_mut(&len).and_then(Vec::pop));
        reused.unwrap_or_else(|| Vec::with_capacity(len))
    }
}

impl KvStore {
    /// Opens (or creates) the store in `cfg.state_dir`, loading every app's manifest.
    pub fn open(model: Arc<Model>, pool: Arc<ThreadPool>, mut cfg: StoreConfig) -> Result<Self> {
        cfg.max_context_tokens = cfg
            .max_context_tokens
            .min(model.config.context_length.max(CHUNK_TOKENS));
        cfg.prefill_slice = cfg.prefill_slice.max(1);
        if !(cfg.avg_bits.is_finite() && cfg.avg_bits > 0.0) {
            return Err(StoreError::InvalidRequest(format!(
                "average KV bits must be positive, got {}",
                cfg.avg_bits
            )));
        }
        let apps_dir = cfg.state_dir.join("apps");
        durable::ensure_private_dir(&cfg.state_dir)?;
        durable::ensure_private_dir(&apps_dir)?;
        let shape = model.kv_shape();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ (std::process::id() as u64) << 32;
        let mut store = KvStore {
            fingerprint: model_fingerprint(&model),
            model,
            pool,
            shape,
            cfg,
            apps: Vec::new(),
            app_index: HashMap::new(),
            queue: Lctru::new(),
            pinned: HashSet::new(),
            budget: 0,
            resident_bytes: 0,
            resident_peak: 0,
            in_flight: HashSet::new(),
            unwritten: Arc::default(),
            failed_writes: BTreeSet::new(),
            io: IoThread::start()?,
            io_failures: 0,
            files_written: 0,
            bytes_written: 0,
            costs: default_costs(),
            scratch: Scratch::default(),
            rng_state: seed | 1,
            open_segments: HashMap::new(),
            open_clock: 0,
            spare: None,
        };
        store.budget = store.cfg.kv_budget_bytes;
        store.load_apps(&apps_dir)?;
        if store.cfg.fit_costs {
            store.costs = store.cached_or_fitted_costs()?;
        }
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    pub fn costs(&self) -> RestoreCosts {
        self.costs
    }

    pub fn set_costs(&mut self, costs: RestoreCosts) {
        self.costs = costs;
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    fn load_apps(&mut self, apps_dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(apps_dir)? {
            let dir = entry?.path();
            if !dir.is_dir() {
                continue;
            }
            durable::remove_stale_tmp(&dir)?;
            let manifest: Option<AppManifest> = match durable::read_json(&dir.join("manifest.json"))
            {
                Ok(m) => m,
                Err(e) => {
                    // A manifest is only ever replaced atomically, so this is damage from
                    // outside; keep the directory for the owner to inspect.
                    tracing::error!("skipping {}: unreadable manifest: {e}", dir.display());
                    continue;
                }
            };
            let Some(m) = manifest else { continue };
            if app_dir_name(&m.app) != dir.file_name().and_then(|n| n.to_str()).unwrap_or("") {
                tracing::error!("skipping {}: manifest names app {:?}", dir.display(), m.app);
                continue;
            }
            let same_model = m.model == self.fingerprint;
            if !same_model {
                tracing::warn!(
                    app = m.app,
                    "KV of app was computed with another model; it will be recomputed"
                );
            }
            let mut app = App {
                name: m.app.clone(),
                dir: dir.clone(),
                contexts: BTreeMap::new(),
                chunks: HashMap::new(),
                next_file: m.next_file,
                next_chunk: m.next_chunk,
                segments: BTreeSet::new(),
                pending: None,
            };
            for c in m.chunks {
                let keep = |f: Option<FileRec>| if same_model { fref(f) } else { None };
                app.chunks.insert(
                    c.id,
                    ChunkEntry {
                        precision: c.precision,
                        resident: None,
                        file: keep(c.file),
                        master: keep(c.master),
                        density: Density {
                            mass: c.mass,
                            observations: c.observations,
                        },
                        refs: 0,
                        last_use: c.last_use,
                    },
                );
            }
            for c in m.contexts {
                let n_full = c.tokens.len() / CHUNK_TOKENS;
                if c.chunks.len() != n_full
                    || c.chunks.iter().any(|id| !app.chunks.contains_key(id))
                {
                    tracing::error!(
                        app = m.app,
                        "context {} has an inconsistent chunk list; its KV will be recomputed",
                        format_id(c.id)
                    );
                }
                let mut chunks = Vec::with_capacity(n_full);
                for i in 0..n_full {
                    match c.chunks.get(i).filter(|id| app.chunks.contains_key(id)) {
                        Some(&id) => chunks.push(id),
                        None => {
                            let id = app.next_chunk;
                            app.next_chunk += 1;
                            app.chunks
                                .insert(id, new_entry(self.cfg.policy.seal_precision()));
                            chunks.push(id);
                        }
                    }
                }
                for id in &chunks {
                    if let Some(e) = app.chunks.get_mut(id) {
                        e.refs += 1;
                    }
                }
                let keep = |f: Option<FileRec>| if same_model { fref(f) } else { None };
                app.contexts.insert(
                    c.id,
                    Context {
                        tokens: c.tokens,
                        chunks,
                        tail: Tail {
                            staged: None,
                            file: keep(c.tail_file),
                        },
                        whole: keep(c.whole_file),
                        created: c.created,
                        last_use: c.last_use,
                    },
                );
            }
            app.chunks.retain(|_, e| e.refs > 0);
            let idx = self.apps.len();
            self.app_index.insert(app.name.clone(), idx);
            self.apps.push(app);
            self.collect_garbage(idx);
        }
        Ok(())
    }

    /// The segments something of app `a` refers to.
    fn live_segments(&self, a: usize) -> HashSet<u64> {
        let app = &self.apps[a];
        let mut live = HashSet::new();
        for e in app.chunks.values() {
            live.extend(e.file.map(|f| f.num));
            live.extend(e.master.map(|f| f.num));
        }
        for c in app.contexts.values() {
            live.extend(c.tail.file.map(|f| f.num));
            live.extend(c.whole.map(|f| f.num));
        }
        live
    }

    /// At start (and by [`Self::compact`]): deletes swap files of `app` that its manifest
    /// does not name (left by a crash), and notes the ones it does. Returns how many went.
    fn collect_garbage(&mut self, app: usize) -> u64 {
        let live = self.live_segments(app);
        let a = &mut self.apps[app];
        a.segments = live.iter().copied().collect();
        let mut removed = 0;
        let Ok(rd) = std::fs::read_dir(&a.dir) else {
            return 0;
        };
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let num = name
                .strip_prefix('f')
                .and_then(|n| n.strip_suffix(".kv"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(num) = num {
                if !live.contains(&num)
                    && !self.in_flight.contains(&(app, num))
                    && std::fs::remove_file(entry.path()).is_ok()
                {
                    removed += 1;
                }
            }
        }
        removed
    }

    fn app_idx(&self, app: &str) -> Option<usize> {
        self.app_index.get(app).copied()
    }

    fn app_or_create(&mut self, app: &str) -> Result<usize> {
        validate_app_name(app)?;
        if let Some(i) = self.app_idx(app) {
            return Ok(i);
        }
        let dir = self.cfg.state_dir.join("apps").join(app_dir_name(app));
        durable::ensure_private_dir(&dir)?;
        let idx = self.apps.len();
        self.apps.push(App {
            name: app.to_string(),
            dir,
            contexts: BTreeMap::new(),
            chunks: HashMap::new(),
            next_file: 1,
            next_chunk: 1,
            segments: BTreeSet::new(),
            pending: None,
        });
        self.app_index.insert(app.to_string(), idx);
        Ok(idx)
    }

    fn lookup(&self, app: &str, id: &str) -> Result<(usize, u64)> {
        let not_found = || StoreError::NotFound(id.to_string());
        let a = self.app_idx(app).ok_or_else(not_found)?;
        let c = parse_id(id).ok_or_else(not_found)?;
        if !self.apps[a].contexts.contains_key(&c) {
            return Err(not_found());
        }
        Ok((a, c))
    }

    fn next_rand(&mut self) -> u64 {
        // splitmix64: ids need to be unique and unguessable enough, not cryptographic.
        self.rng_state = self.rng_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    // ---- context operations ----

    /// Creates a context for `app`, prefilled with `tokens` (its system prompt, may be empty).
    pub fn create_context(&mut self, app: &str, tokens: &[u32]) -> Result<String> {
        let a = self.app_or_create(app)?;
        self.check_length(tokens.len())?;
        let mut id = self.next_rand();
        while self.apps[a].contexts.contains_key(&id) {
            id = self.next_rand();
        }
        let now = now_unix();
        self.apps[a].contexts.insert(
            id,
            Context {
                tokens: Vec::new(),
                chunks: Vec::new(),
                tail: Tail::default(),
                whole: None,
                created: now,
                last_use: now,
            },
        );
        if tokens.is_empty() {
            self.write_manifest(a);
        } else {
            let name = format_id(id);
            let mut s = self.open_session(app, &name, tokens.len())?;
            let r = self.forward(&mut s, tokens, Logits::None);
            self.close_session(s)?;
            r?;
        }
        Ok(format_id(id))
    }

    pub fn list(&self, app: &str) -> Vec<ContextInfo> {
        let Some(a) = self.app_idx(app) else {
            return Vec::new();
        };
        self.apps[a]
            .contexts
            .keys()
            .map(|&c| self.context_info(a, c))
            .collect()
    }

    pub fn apps(&self) -> Vec<String> {
        self.apps.iter().map(|a| a.name.clone()).collect()
    }

    pub fn info(&self, app: &str, id: &str) -> Result<ContextInfo> {
        let (a, c) = self.lookup(app, id)?;
        Ok(self.context_info(a, c))
    }

    pub fn tokens(&self, app: &str, id: &str) -> Result<&[u32]> {
        let (a, c) = self.lookup(app, id)?;
        Ok(&self.apps[a].contexts[&c].tokens)
    }

    fn context_info(&self, a: usize, c: u64) -> ContextInfo {
        let app = &self.apps[a];
        let ctx = &app.contexts[&c];
        let mut resident = 0;
        let mut disk = 0;
        for id in &ctx.chunks {
            if let Some(e) = app.chunks.get(id) {
                resident += e.resident.as_ref().map_or(0, |r| r.resident_bytes() as u64);
                disk += e.file.map_or(0, |f| f.bytes) + e.master.map_or(0, |f| f.bytes);
            }
        }
        if ctx.tail.staged.is_some() {
            resident += staged_bytes(self.shape) as u64;
        }
        disk += ctx.tail.file.map_or(0, |f| f.bytes) + ctx.whole.map_or(0, |f| f.bytes);
        ContextInfo {
            id: format_id(c),
            tokens: ctx.tokens.len(),
            chunks: ctx.chunks.len() + usize::from(!ctx.tokens.len().is_multiple_of(CHUNK_TOKENS)),
            resident_bytes: resident,
            disk_bytes: disk,
            created_unix: ctx.created,
            last_use_unix: ctx.last_use,
        }
    }

    /// Each chunk of a context: precision, where it is, its density.
    pub fn chunks(&self, app: &str, id: &str) -> Result<Vec<ChunkInfo>> {
        let (a, c) = self.lookup(app, id)?;
        let app_ = &self.apps[a];
        let ctx = &app_.contexts[&c];
        let mut out = Vec::new();
        for (i, cid) in ctx.chunks.iter().enumerate() {
            if let Some(e) = app_.chunks.get(cid) {
                out.push(ChunkInfo {
                    index: i,
                    tokens: CHUNK_TOKENS,
                    precision: e.precision.name().to_string(),
                    resident: e.resident.is_some(),
                    on_disk: e.file.is_some() || ctx.whole.is_some(),
                    density: e.density.mean(),
                    observations: e.density.observations,
                    shared_by: e.refs,
                    last_use_unix: e.last_use,
                });
            }
        }
        let rest = ctx.tokens.len() % CHUNK_TOKENS;
        if rest != 0 {
            out.push(ChunkInfo {
                index: ctx.chunks.len(),
                tokens: rest,
                precision: "f32".into(),
                resident: ctx.tail.staged.is_some(),
                on_disk: ctx.tail.file.is_some(),
                density: 0.0,
                observations: 0,
                shared_by: 1,
                last_use_unix: ctx.last_use,
            });
        }
        Ok(out)
    }

    pub fn delete(&mut self, app: &str, id: &str) -> Result<()> {
        let (a, c) = self.lookup(app, id)?;
        if self.pinned.contains(&(a, c)) {
            return Err(StoreError::InvalidRequest(format!(
                "context {id} is in use by a running call"
            )));
        }
        let ctx = self.apps[a].contexts.remove(&c);
        if let Some(ctx) = ctx {
            self.release_tail(a, c, &ctx.tail);
            self.queue.remove((a as u32, EK_WHOLE, c));
            for id in ctx.chunks {
                self.release_chunk(a, id);
            }
        }
        self.write_manifest(a);
        Ok(())
    }

    fn release_tail(&mut self, a: usize, c: u64, tail: &Tail) {
        if tail.staged.is_some() {
            self.resident_bytes -= staged_bytes(self.shape) as u64;
        }
        self.queue.remove((a as u32, EK_TAIL, c));
    }

    fn release_chunk(&mut self, a: usize, id: u64) {
        let app = &mut self.apps[a];
        let Some(e) = app.chunks.get_mut(&id) else {
            return;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return;
        }
        if let Some(e) = app.chunks.remove(&id) {
            if let Some(r) = &e.resident {
                self.resident_bytes -= r.resident_bytes() as u64;
            }
            self.queue.remove((a as u32, EK_CHUNK, id));
        }
    }

    /// A new context sharing every chunk of `id` (copy-on-write: chunks are immutable).
    pub fn fork(&mut self, app: &str, id: &str) -> Result<String> {
        let (a, c) = self.lookup(app, id)?;
        let mut new_id = self.next_rand();
        while self.apps[a].contexts.contains_key(&new_id) {
            new_id = self.next_rand();
        }
        let app_ = &mut self.apps[a];
        let src = &app_.contexts[&c];
        let chunks = src.chunks.clone();
        let tokens = src.tokens.clone();
        let tail_staged = src.tail.staged.clone();
        for cid in &chunks {
            if let Some(e) = app_.chunks.get_mut(cid) {
                e.refs += 1;
            }
        }
        let now = now_unix();
        let has_tail = tail_staged.is_some();
        app_.contexts.insert(
            new_id,
            Context {
                tokens,
                chunks,
                // The tail file belongs to its context; the fork keeps a resident copy or
                // recomputes its (at most 15) tail tokens.
                tail: Tail {
                    staged: tail_staged,
                    file: None,
                },
                whole: None,
                created: now,
                last_use: now,
            },
        );
        if has_tail {
            self.resident_bytes += staged_bytes(self.shape) as u64;
            self.queue.touch((a as u32, EK_TAIL, new_id), 32);
            self.write_tail(a, new_id);
        }
        self.note_peak();
        self.write_manifest(a);
        self.enforce_budget()?;
        Ok(format_id(new_id))
    }

    /// Keeps the first `len` tokens of a context.
    pub fn truncate(&mut self, app: &str, id: &str, len: usize) -> Result<()> {
        let (a, c) = self.lookup(app, id)?;
        if self.pinned.contains(&(a, c)) {
            return Err(StoreError::InvalidRequest(format!(
                "context {id} is in use by a running call"
            )));
        }
        let cur = self.apps[a].contexts[&c].tokens.len();
        if len > cur {
            return Err(StoreError::InvalidRequest(format!(
                "cannot truncate context {id} of {cur} tokens to {len}"
            )));
        }
        if len == cur {
            return Ok(());
        }
        let keep_chunks = len / CHUNK_TOKENS;
        let ctx = self.apps[a].contexts.get_mut(&c);
        let Some(ctx) = ctx else {
            return Err(StoreError::NotFound(id.to_string()));
        };
        ctx.tokens.truncate(len);
        let dropped: Vec<u64> = ctx.chunks.drain(keep_chunks..).collect();
        let tail = std::mem::take(&mut ctx.tail);
        ctx.whole = None;
        self.release_tail(a, c, &tail);
        // The new tail's KV is recomputed from its tokens on next use (at most 15 tokens):
        // cutting a quantized chunk would keep a lossy copy as the open, full-precision tail.
        for id in dropped {
            self.release_chunk(a, id);
        }
        self.queue.remove((a as u32, EK_WHOLE, c));
        self.write_manifest(a);
        Ok(())
    }

    fn check_length(&self, len: usize) -> Result<()> {
        if len > self.cfg.max_context_tokens {
            return Err(StoreError::ContextWindowExceeded(format!(
                "context would hold {len} tokens; the limit is {}",
                self.cfg.max_context_tokens
            )));
        }
        Ok(())
    }

    // ---- sessions ----

    /// Bytes a context will hold resident after `extra` more tokens, sealed as the policy seals.
    fn session_need(&self, a: usize, c: u64, extra: usize) -> u64 {
        let app = &self.apps[a];
        let ctx = &app.contexts[&c];
        let mut need = 0u64;
        for id in &ctx.chunks {
            if let Some(e) = app.chunks.get(id) {
                need += chunk_bytes(self.shape, e.precision) as u64;
            }
        }
        let total = ctx.tokens.len() + extra;
        let new_chunks = (total / CHUNK_TOKENS).saturating_sub(ctx.chunks.len());
        need +=
            new_chunks as u64 * chunk_bytes(self.shape, self.cfg.policy.seal_precision()) as u64;
        // The open tail plus the staged chunks of one prefill slice.
        let staged = 1 + self.cfg.prefill_slice.min(extra).div_ceil(CHUNK_TOKENS);
        need + staged as u64 * staged_bytes(self.shape) as u64
    }

    /// KV bytes a call on the context that may add `extra` tokens needs resident (what
    /// [`Self::open_session`] holds against the budget).
    pub fn call_need(&self, app: &str, id: &str, extra: usize) -> Result<u64> {
        let (a, c) = self.lookup(app, id)?;
        Ok(self.session_need(a, c, extra))
    }

    /// Makes a context resident for a call that may add up to `reserve` tokens, evicting
    /// others as needed. The context stays pinned until [`Self::close_session`].
    pub fn open_session(&mut self, app: &str, id: &str, reserve: usize) -> Result<Session> {
        let t0 = Instant::now();
        self.drain_io();
        let (a, c) = self.lookup(app, id)?;
        if self.pinned.contains(&(a, c)) {
            return Err(StoreError::InvalidRequest(format!(
                "context {id} is in use by a running call"
            )));
        }
        let cur = self.apps[a].contexts[&c].tokens.len();
        self.check_length(cur + reserve)?;
        let need = self.session_need(a, c, reserve);
        if need > self.cfg.kv_budget_bytes {
            return Err(StoreError::ContextWindowExceeded(format!(
                "context {id} needs {:.1} MiB of KV for {} tokens; the KV budget is {:.1} MiB",
                need as f64 / 1048576.0,
                cur + reserve,
                self.cfg.kv_budget_bytes as f64 / 1048576.0
            )));
        }
        // Pin: nothing of this context may be evicted while we make room for it.
        self.pinned.insert((a, c));
        self.unqueue_context(a, c);
        let resident_now = self.context_resident_bytes(a, c);
        self.spare = Some(SpareBuffers::default());
        while self.resident_bytes - resident_now + need > self.budget {
            if !self.evict_one()? {
                break;
            }
        }
        // Under memory pressure the budget in force may be below what calls in use need:
        // they may still run within the configured budget once nothing else is resident.
        if self.resident_bytes - resident_now + need > self.cfg.kv_budget_bytes {
            // Everything else is pinned by running calls.
            self.spare = None;
            self.pinned.remove(&(a, c));
            self.requeue_context(a, c);
            return Err(StoreError::NoRoomNow(format!(
                "no room in the KV budget for context {id}: other contexts in use hold it"
            )));
        }
        let t_evicted = t0.elapsed();
        let result = self.restore(a, c);
        self.spare = None;
        tracing::debug!(
            evict_ms = t_evicted.as_secs_f64() * 1e3,
            restore_ms = (t0.elapsed() - t_evicted).as_secs_f64() * 1e3,
            "session opened"
        );
        match result {
            Ok(mut restore) => {
                restore.elapsed_s = t0.elapsed().as_secs_f64();
                let slots = self.take_slots(a, c);
                let len = self.apps[a].contexts[&c].tokens.len();
                let cap = self.cfg.max_context_tokens;
                match ChunkedKv::from_slots(self.shape, cap, slots, len) {
                    Ok(mut kv) => {
                        kv.set_density_layers(self.cfg.density_every_nth_layer.max(1));
                        let tail_before = match kv.slots().last() {
                            Some(ChunkSlot::Staged(t)) => Some(t.clone()),
                            _ => None,
                        };
                        Ok(Session {
                            app: a,
                            ctx: c,
                            kv,
                            appended: Vec::new(),
                            tail_before,
                            masters: HashMap::new(),
                            restore,
                        })
                    }
                    Err(e) => {
                        self.pinned.remove(&(a, c));
                        self.requeue_context(a, c);
                        Err(e.into())
                    }
                }
            }
            Err(e) => {
                self.pinned.remove(&(a, c));
                self.requeue_context(a, c);
                Err(e)
            }
        }
    }

    fn context_resident_bytes(&self, a: usize, c: u64) -> u64 {
        let app = &self.apps[a];
        let ctx = &app.contexts[&c];
        let mut b: u64 = ctx
            .chunks
            .iter()
            .filter_map(|id| app.chunks.get(id))
            .filter_map(|e| e.resident.as_ref())
            .map(|r| r.resident_bytes() as u64)
            .sum();
        if ctx.tail.staged.is_some() {
            b += staged_bytes(self.shape) as u64;
        }
        b
    }

    fn unqueue_context(&mut self, a: usize, c: u64) {
        let ctx = &self.apps[a].contexts[&c];
        for &id in &ctx.chunks {
            self.queue.remove((a as u32, EK_CHUNK, id));
        }
        self.queue.remove((a as u32, EK_TAIL, c));
        self.queue.remove((a as u32, EK_WHOLE, c));
    }

    /// Files a context's resident parts in the eviction queues as used now.
    fn requeue_context(&mut self, a: usize, c: u64) {
        let now = now_unix();
        let whole = self.cfg.policy == Policy::SwapWhole;
        let app = &mut self.apps[a];
        let Some(ctx) = app.contexts.get_mut(&c) else {
            return;
        };
        ctx.last_use = now;
        if whole {
            self.queue.touch((a as u32, EK_WHOLE, c), 16);
            return;
        }
        let has_tail = ctx.tail.staged.is_some();
        let mut resident = Vec::new();
        for &id in &ctx.chunks {
            if let Some(e) = app.chunks.get_mut(&id) {
                e.last_use = now;
                if e.resident.is_some() {
                    resident.push((id, e.precision.bits()));
                }
            }
        }
        for (id, bits) in resident {
            // A chunk shared with a context in use stays out of the queues.
            if !self.pinned_chunk(a, id) {
                self.queue.touch((a as u32, EK_CHUNK, id), bits);
            }
        }
        if has_tail {
            self.queue.touch((a as u32, EK_TAIL, c), 32);
        }
    }

    /// Whether a (possibly shared) chunk belongs to a pinned context.
    fn pinned_chunk(&self, a: usize, id: u64) -> bool {
        self.pinned.iter().any(|&(pa, pc)| {
            pa == a
                && self.apps[pa]
                    .contexts
                    .get(&pc)
                    .is_some_and(|ctx| ctx.chunks.contains(&id))
        })
    }

    /// Evicts the next LCTRU victim. Returns false when nothing can be evicted.
    fn evict_one(&mut self) -> Result<bool> {
        // Prefer a victim whose swap file is already on disk: waiting for the I/O thread
        // would put the swap-out on this call's path.
        self.drain_io();
        let key = {
            let (apps, in_flight) = (&self.apps, &self.in_flight);
            self.queue
                .pop_victim_where(|k| !key_in_flight(apps, in_flight, k))
        };
        let Some(key) = key.or_else(|| self.queue.pop_victim()) else {
            return Ok(false);
        };
        let (a, kind, id) = (key.0 as usize, key.1, key.2);
        match kind {
            EK_CHUNK => {
                if self.pinned_chunk(a, id) {
                    return Ok(true);
                }
                self.wait_file_of_chunk(a, id);
                if let Some(e) = self.apps[a].chunks.get_mut(&id) {
                    if let Some(r) = e.resident.take() {
                        self.resident_bytes -= r.resident_bytes() as u64;
                        if let Some(spare) = self.spare.as_mut() {
                            spare.put(r);
                        }
                    }
                }
            }
            EK_TAIL => {
                let f = self.apps[a].contexts.get(&id).and_then(|c| c.tail.file);
                if let Some(f) = f {
                    self.wait_file(a, f.num);
                }
                if let Some(ctx) = self.apps[a].contexts.get_mut(&id) {
                    if ctx.tail.staged.take().is_some() {
                        self.resident_bytes -= staged_bytes(self.shape) as u64;
                    }
                }
            }
            _ => {
                let f = self.apps[a].contexts.get(&id).and_then(|c| c.whole);
                if let Some(f) = f {
                    self.wait_file(a, f.num);
                }
                let app = &mut self.apps[a];
                if let Some(ctx) = app.contexts.get_mut(&id) {
                    if ctx.tail.staged.take().is_some() {
                        self.resident_bytes -= staged_bytes(self.shape) as u64;
                    }
                    for cid in &ctx.chunks {
                        if let Some(r) = app.chunks.get_mut(cid).and_then(|e| e.resident.take()) {
                            self.resident_bytes -= r.resident_bytes() as u64;
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn wait_file_of_chunk(&mut self, a: usize, id: u64) {
        let f = self.apps[a].chunks.get(&id).and_then(|e| e.file);
        if let Some(f) = f {
            self.wait_file(a, f.num);
        }
    }

    /// Waits for a queued swap file before its memory copy is dropped (or it is read).
    fn wait_file(&mut self, a: usize, num: u64) {
        self.wait_files(a, &[num]);
    }

    /// Waits until the segments `nums` of app `a` are on disk (or failed), queueing the one
    /// being filled first if it is among them.
    fn wait_files(&mut self, a: usize, nums: &[u64]) {
        let pending = self.apps[a].pending.as_ref().map(|p| p.num);
        if pending.is_some_and(|p| nums.contains(&p)) {
            self.submit_segment(a);
        }
        if nums.iter().any(|&n| self.in_flight.contains(&(a, n))) {
            self.io.flush();
            self.drain_io();
        }
    }

    /// Applies the I/O thread's results: failed writes are forgotten (those chunks will be
    /// recomputed from their tokens if evicted).
    fn drain_io(&mut self) {
        for Done { tag, result } in self.io.take_done() {
            let (a, num) = ((tag >> 48) as usize, tag & ((1 << 48) - 1));
            self.in_flight.remove(&(a, num));
            if result.is_ok() {
                // The job already dropped the segment's in-memory copy.
                self.failed_writes.remove(&(a, num));
                continue;
            }
            self.io_failures += 1;
            self.close_file(a, num);
            if self.unwritten_map().contains_key(&(a, num)) {
                // Kept in memory and written again with the next manifest.
                self.failed_writes.insert((a, num));
                continue;
            }
            let Some(app) = self.apps.get_mut(a) else {
                continue;
            };
            for e in app.chunks.values_mut() {
                if e.file.is_some_and(|f| f.num == num) {
                    e.file = None;
                }
                if e.master.is_some_and(|f| f.num == num) {
                    e.master = None;
                }
            }
            for ctx in app.contexts.values_mut() {
                if ctx.tail.file.is_some_and(|f| f.num == num) {
                    ctx.tail.file = None;
                }
                if ctx.whole.is_some_and(|f| f.num == num) {
                    ctx.whole = None;
                }
            }
        }
    }

    fn file_path(&self, a: usize, num: u64) -> PathBuf {
        self.apps[a].dir.join(format!("f{num}.kv"))
    }

    /// Adds an item to the segment app `a` is filling (starting one if need be); returns
    /// where it will be. The segment is queued when the call closes (see
    /// [`Self::write_manifest`]), or now if it has grown large.
    fn add_item(&mut self, a: usize, item: PendingItem, raw_bytes: u64) -> FileRef {
        self.bytes_written += raw_bytes;
        let app = &mut self.apps[a];
        let seg = match &mut app.pending {
            Some(seg) => seg,
            slot @ None => {
                let num = app.next_file;
                app.next_file += 1;
                app.segments.insert(num);
                self.in_flight.insert((a, num));
                slot.insert(PendingSegment {
                    num,
                    items: Vec::new(),
                    raw_bytes: 0,
                })
            }
        };
        let f = FileRef {
            num: seg.num,
            item: seg.items.len() as u32,
            bytes: raw_bytes,
        };
        seg.items.push(item);
        seg.raw_bytes += raw_bytes;
        if seg.raw_bytes >= SEGMENT_MAX_BYTES {
            self.submit_segment(a);
        }
        f
    }

    /// Queues the segment app `a` is filling for writing on the I/O thread.
    fn submit_segment(&mut self, a: usize) {
        let Some(seg) = self.apps[a].pending.take() else {
            return;
        };
        let items = Arc::new(seg.items);
        self.unwritten_map()
            .insert((a, seg.num), Arc::clone(&items));
        self.write_segment(a, seg.num, items);
    }

    /// Queues the write of segment `num` of app `a`.
    fn write_segment(&mut self, a: usize, num: u64, items: Arc<Vec<PendingItem>>) {
        self.files_written += 1;
        let path = self.file_path(a, num);
        let tag = ((a as u64) << 48) | num;
        let hash = shape_hash(self.shape);
        let n_layers = self.shape.n_layers;
        let delay = self.io.fault_delay();
        let unwritten = Arc::clone(&self.unwritten);
        let hold = Arc::clone(self.io.hold());
        self.io.submit(move || {
            let result = write_segment_items(&path, hash, n_layers, &items, delay, &hold)
                .map_err(|e| e.to_string());
            if result.is_ok() {
                unwritten
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&(a, num));
            }
            Some(Done { tag, result })
        });
    }

    /// Queues again the segments of app `a` whose write failed.
    fn retry_failed_writes(&mut self, a: usize) {
        let failed: Vec<u64> = self
            .failed_writes
            .range((a, 0)..=(a, u64::MAX))
            .map(|&(_, num)| num)
            .collect();
        for num in failed {
            self.failed_writes.remove(&(a, num));
            let items = self.unwritten_segment(a, num);
            if let Some(items) = items {
                self.in_flight.insert((a, num));
                self.write_segment(a, num, items);
            }
        }
    }

    /// A sealed chunk of a segment not confirmed on disk yet, from memory.
    fn unwritten_map(&self) -> std::sync::MutexGuard<'_, UnwrittenSegments> {
        self.unwritten.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A segment not confirmed on disk yet (being written, or its write failed).
    fn unwritten_segment(&self, a: usize, num: u64) -> Option<Arc<Vec<PendingItem>>> {
        self.unwritten_map().get(&(a, num)).cloned()
    }

    fn unwritten_sealed(&self, a: usize, f: FileRef) -> Option<Arc<SealedChunk>> {
        match self.unwritten_segment(a, f.num)?.get(f.item as usize)? {
            PendingItem::Sealed(ch) => Some(Arc::clone(ch)),
            _ => None,
        }
    }

    fn queue_sealed(&mut self, a: usize, chunk: &Arc<SealedChunk>) -> FileRef {
        let bytes = chunk.resident_bytes() as u64;
        self.add_item(a, PendingItem::Sealed(Arc::clone(chunk)), bytes)
    }

    fn write_tail(&mut self, a: usize, c: u64) {
        let Some(ctx) = self.apps[a].contexts.get(&c) else {
            return;
        };
        let Some(staged) = &ctx.tail.staged else {
            return;
        };
        let bytes = staged.to_bytes();
        let n_tokens = staged.n_tokens();
        let len = bytes.len() as u64;
        let f = self.add_item(a, PendingItem::Tail { n_tokens, bytes }, len);
        if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
            ctx.tail.file = Some(f);
        }
    }

    /// Queues the segment app `a` is filling, then its manifest, then the deletion of the
    /// segments nothing refers to any more (only once the manifest without them is durable).
    fn write_manifest(&mut self, a: usize) {
        self.retry_failed_writes(a);
        self.submit_segment(a);
        let live = self.live_segments(a);
        let app = &mut self.apps[a];
        let dead: Vec<u64> = app
            .segments
            .iter()
            .copied()
            .filter(|n| !live.contains(n))
            .collect();
        for n in &dead {
            app.segments.remove(n);
        }
        for &n in &dead {
            self.close_file(a, n);
            self.unwritten_map().remove(&(a, n));
            self.failed_writes.remove(&(a, n));
        }
        let app = &self.apps[a];
        let manifest = AppManifest {
            app: app.name.clone(),
            model: self.fingerprint.clone(),
            next_file: app.next_file,
            next_chunk: app.next_chunk,
            contexts: app
                .contexts
                .iter()
                .map(|(&id, c)| CtxRecord {
                    id,
                    tokens: c.tokens.clone(),
                    chunks: c.chunks.clone(),
                    tail_file: tref(c.tail.file),
                    whole_file: tref(c.whole),
                    created: c.created,
                    last_use: c.last_use,
                })
                .collect(),
            chunks: app
                .chunks
                .iter()
                .map(|(&id, e)| ChunkRecord {
                    id,
                    precision: e.precision,
                    file: tref(e.file),
                    master: tref(e.master),
                    mass: e.density.mass,
                    observations: e.density.observations,
                    last_use: e.last_use,
                })
                .collect(),
        };
        let dir = app.dir.clone();
        let paths: Vec<PathBuf> = dead.iter().map(|&n| self.file_path(a, n)).collect();
        self.io.submit(move || {
            let result = durable::sync_dir(&dir)
                .and_then(|()| durable::write_json_atomic(&dir.join("manifest.json"), &manifest));
            match result {
                Ok(()) => {
                    for p in paths {
                        let _ = std::fs::remove_file(p);
                    }
                }
                Err(e) => tracing::error!("writing manifest in {}: {e}", dir.display()),
            }
            None
        });
    }

    /// Moves the context's resident chunks and tail into slots for a ChunkedKv.
    fn take_slots(&mut self, a: usize, c: u64) -> Vec<ChunkSlot> {
        let app = &mut self.apps[a];
        let Some(ctx) = app.contexts.get_mut(&c) else {
            return Vec::new();
        };
        let mut slots = Vec::with_capacity(ctx.chunks.len() + 1);
        for id in &ctx.chunks {
            if let Some(r) = app.chunks.get(id).and_then(|e| e.resident.clone()) {
                slots.push(ChunkSlot::Sealed(r));
            }
        }
        if let Some(t) = ctx.tail.staged.take() {
            // The session's staged tail is counted again when the session closes.
            self.resident_bytes -= staged_bytes(self.shape) as u64;
            slots.push(ChunkSlot::Staged(t));
        }
        slots
    }

    /// Reads and recomputes whatever of the context is not resident.
    fn restore(&mut self, a: usize, c: u64) -> Result<RestoreReport> {
        let t_start = Instant::now();
        let mut report = RestoreReport::default();
        let shape = self.shape;
        let policy = self.cfg.policy;
        let (n_chunks, n_tokens, tail_resident, tail_file, whole) = {
            let ctx = &self.apps[a].contexts[&c];
            (
                ctx.chunks.len(),
                ctx.tokens.len(),
                ctx.tail.staged.is_some(),
                ctx.tail.file,
                ctx.whole,
            )
        };
        let has_tail = n_tokens % CHUNK_TOKENS != 0;
        if policy.uses_chunk_files() && !self.unwritten_map().is_empty() {
            // Copies not confirmed on disk yet (being written, or their write failed).
            for i in 0..n_chunks {
                let id = self.apps[a].contexts[&c].chunks[i];
                let file = self.apps[a].chunks.get(&id).and_then(|e| e.file);
                if !self.chunk_resident(a, c, i) {
                    if let Some(ch) = file.and_then(|f| self.unwritten_sealed(a, f)) {
                        self.set_resident(a, id, ch);
                    }
                }
            }
        }
        let missing: Vec<usize> = (0..n_chunks)
            .filter(|&i| !self.chunk_resident(a, c, i))
            .collect();
        let tail_missing = has_tail && !tail_resident;
        if missing.is_empty() && !tail_missing {
            report.was_resident = true;
            return Ok(report);
        }
        // What could be read: missing chunks with a swap copy, the tail, the whole context.
        let wanted: Vec<(usize, Precision, FileRef)> = if policy.uses_chunk_files() {
            missing
                .iter()
                .filter_map(|&i| {
                    let id = self.apps[a].contexts[&c].chunks[i];
                    let e = self.apps[a].chunks.get(&id)?;
                    Some((i, e.precision, e.file?))
                })
                .collect()
        } else {
            Vec::new()
        };
        let tail_ref = tail_file.filter(|_| tail_missing && policy != Policy::Recompute);
        let whole_ref = whole.filter(|_| policy == Policy::SwapWhole);
        // Every segment that will be read must be on disk first; each is opened once.
        let mut nums: Vec<u64> = wanted
            .iter()
            .map(|w| w.2.num)
            .chain(tail_ref.map(|f| f.num))
            .chain(whole_ref.map(|f| f.num))
            .collect();
        nums.sort_unstable();
        nums.dedup();
        self.wait_files(a, &nums);
        let mut files: HashMap<u64, Arc<SwapFile>> = HashMap::with_capacity(nums.len());
        for &num in &nums {
            match self.open_file(a, num) {
                Ok(f) => {
                    files.insert(num, f);
                }
                Err(e) => tracing::warn!("swap file f{num} unusable, recomputing from it: {e}"),
            }
        }
        let item_of = |f: &FileRef, kind: u8, p: Precision, sections: Option<(usize, usize)>| {
            let file = files.get(&f.num)?;
            match check_item(file, f.item as usize, kind, p, sections) {
                Ok(bytes) => Some(Src {
                    file: Arc::clone(file),
                    item: f.item as usize,
                    bytes,
                }),
                Err(e) => {
                    tracing::warn!("f{} item {} unusable, recomputing: {e}", f.num, f.item);
                    None
                }
            }
        };
        let mut readable: Vec<(usize, Precision, Src)> = wanted
            .iter()
            .filter_map(|&(i, p, f)| {
                let sections = (shape.n_layers, layer_bytes(shape, p));
                Some((i, p, item_of(&f, KIND_SEALED, p, Some(sections))?))
            })
            .collect();

        let mut tail_staged: Option<Box<StagedChunk>> = None;
        let tail_in_memory = tail_ref.and_then(|f| {
            match self.unwritten_segment(a, f.num)?.get(f.item as usize)? {
                PendingItem::Tail { bytes, .. } => StagedChunk::from_bytes(shape, bytes).ok(),
                _ => None,
            }
        });
        if let Some(s) = tail_in_memory.filter(|s| s.n_tokens() == n_tokens % CHUNK_TOKENS) {
            tail_staged = Some(Box::new(s));
        } else if let Some(src) =
            tail_ref.and_then(|f| item_of(&f, KIND_TAIL, Precision::F16, None))
        {
            match src
                .file
                .read_section(src.item, 0)
                .map_err(|e| e.to_string())
                .and_then(|b| StagedChunk::from_bytes(shape, &b).map_err(|e| e.to_string()))
            {
                Ok(s) if s.n_tokens() == n_tokens % CHUNK_TOKENS => {
                    report.bytes_read += src.bytes;
                    tail_staged = Some(Box::new(s));
                }
                Ok(_) => tracing::warn!("tail has the wrong length, recomputing it"),
                Err(e) => tracing::warn!("tail unusable, recomputing it: {e}"),
            }
        }

        // swap-whole: one item with a section per chunk (all layers) and the tail last.
        if let Some(src) = whole_ref.and_then(|f| item_of(&f, KIND_WHOLE, Precision::F16, None)) {
            let mut ok = true;
            let mut loaded = Vec::new();
            for &i in &missing {
                let id = self.apps[a].contexts[&c].chunks[i];
                let blob = src
                    .file
                    .read_section(src.item, i)
                    .map_err(|e| e.to_string());
                let chunk = blob.and_then(|b| {
                    sealed_from_concat(shape, Precision::F16, &b).map_err(|e| e.to_string())
                });
                match chunk {
                    Ok(ch) => loaded.push((id, Arc::new(ch))),
                    Err(e) => {
                        tracing::warn!("whole-context file damaged, recomputing: {e}");
                        ok = false;
                        break;
                    }
                }
            }
            if ok && tail_missing {
                match src
                    .file
                    .read_section(src.item, n_chunks)
                    .map_err(|e| e.to_string())
                    .and_then(|b| StagedChunk::from_bytes(shape, &b).map_err(|e| e.to_string()))
                {
                    Ok(s) => tail_staged = Some(Box::new(s)),
                    Err(e) => tracing::warn!("whole-context tail damaged, recomputing: {e}"),
                }
            }
            if ok {
                report.bytes_read += src.bytes;
                report.chunks_read += loaded.len();
                for (id, ch) in loaded {
                    self.set_resident(a, id, ch);
                }
            }
        }
        drop(files);

        // Plan: which missing chunks to recompute (the rest are read), pipelined.
        let still_missing: Vec<usize> = missing
            .iter()
            .copied()
            .filter(|&i| !self.chunk_resident(a, c, i))
            .collect();
        let mut recompute: Vec<bool> = vec![true; still_missing.len()];
        if policy == Policy::Llms {
            let items: Vec<Missing> = still_missing
                .iter()
                .map(|&i| Missing {
                    tokens: CHUNK_TOKENS,
                    disk_bytes: readable.iter().find(|r| r.0 == i).map(|r| r.2.bytes),
                })
                .collect();
            let p = plan::plan(&items, &self.costs);
            report.predicted_s = p.predicted_s();
            recompute = p.recompute;
        } else {
            for (k, &i) in still_missing.iter().enumerate() {
                recompute[k] = !readable.iter().any(|r| r.0 == i);
            }
        }
        let mut to_read: Vec<(usize, Precision, Src)> = Vec::new();
        for (k, &i) in still_missing.iter().enumerate() {
            if !recompute[k] {
                if let Some(pos) = readable.iter().position(|r| r.0 == i) {
                    to_read.push(readable.swap_remove(pos));
                }
            }
        }
        let mut recompute_set: Vec<usize> = still_missing
            .iter()
            .zip(&recompute)
            .filter(|(_, &r)| r)
            .map(|(&i, _)| i)
            .collect();

        tracing::debug!(
            prepare_ms = t_start.elapsed().as_secs_f64() * 1e3,
            reads = to_read.len(),
            segments = nums.len(),
            "restore planned"
        );
        // At most two rounds: a read that fails its checksum is recomputed in the second.
        for _round in 0..2 {
            let t_round = Instant::now();
            let outcome =
                self.read_and_recompute(a, c, &to_read, &recompute_set, tail_staged.take())?;
            tracing::debug!(
                ms = t_round.elapsed().as_secs_f64() * 1e3,
                "restore read and recompute"
            );
            report.bytes_read += outcome.bytes_read;
            report.chunks_read += outcome.read_ok;
            report.chunks_recomputed += outcome.recomputed;
            if outcome.failed_reads.is_empty() {
                return Ok(report);
            }
            to_read.clear();
            recompute_set = outcome.failed_reads;
        }
        Err(StoreError::Internal(
            "restore did not converge after recomputing damaged chunks".into(),
        ))
    }

    /// Whether chunk `i` of context `c` is in memory.
    fn chunk_resident(&self, a: usize, c: u64, i: usize) -> bool {
        let app = &self.apps[a];
        app.contexts[&c]
            .chunks
            .get(i)
            .and_then(|id| app.chunks.get(id))
            .is_some_and(|e| e.resident.is_some())
    }

    /// Segment `num` of app `a`, open (kept open for the next restores that read it).
    fn open_file(&mut self, a: usize, num: u64) -> Result<Arc<SwapFile>, swapfile::SwapError> {
        self.open_clock += 1;
        if let Some((f, used)) = self.open_segments.get_mut(&(a, num)) {
            *used = self.open_clock;
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(SwapFile::open_for_shape(
            &self.file_path(a, num),
            shape_hash(self.shape),
        )?);
        if self.open_segments.len() >= OPEN_SEGMENTS {
            let oldest = self
                .open_segments
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k);
            if let Some(k) = oldest {
                self.open_segments.remove(&k);
            }
        }
        self.open_segments
            .insert((a, num), (Arc::clone(&f), self.open_clock));
        Ok(f)
    }

    /// Forgets an open segment (deleted, failed to write, or failed a read).
    fn close_file(&mut self, a: usize, num: u64) {
        self.open_segments.remove(&(a, num));
    }

    fn set_resident(&mut self, a: usize, id: u64, chunk: Arc<SealedChunk>) {
        if let Some(e) = self.apps[a].chunks.get_mut(&id) {
            if let Some(old) = e.resident.replace(Arc::clone(&chunk)) {
                self.resident_bytes -= old.resident_bytes() as u64;
            }
            e.precision = chunk.precision();
            self.resident_bytes += chunk.resident_bytes() as u64;
        }
        self.note_peak();
    }

    fn note_peak(&mut self) {
        self.resident_peak = self.resident_peak.max(self.resident_bytes);
    }

    /// Reads `to_read` layer by layer on a loader thread while the engine recomputes
    /// `recompute` (chunk indices) from tokens; the recompute waits for a layer only when it
    /// attends to a chunk still being read. With nothing to recompute, the engine's (idle)
    /// threads read, a chunk per task.
    fn read_and_recompute(
        &mut self,
        a: usize,
        c: u64,
        to_read: &[(usize, Precision, Src)],
        recompute: &[usize],
        tail_staged: Option<Box<StagedChunk>>,
    ) -> Result<RoundOutcome> {
        let shape = self.shape;
        let n_layers = shape.n_layers;
        let mut out = RoundOutcome::default();
        let (tokens, chunk_ids) = {
            let ctx = &self.apps[a].contexts[&c];
            (ctx.tokens.clone(), ctx.chunks.clone())
        };
        let n_chunks = chunk_ids.len();
        let has_tail = tokens.len() % CHUNK_TOKENS != 0;
        // Chunks being read: empty sealed chunks the loader fills.
        let pending: Vec<(usize, Arc<SealedChunk>)> = to_read
            .iter()
            .map(|(i, p, _)| (*i, Arc::new(SealedChunk::empty(shape, *p))))
            .collect();
        let gate = Arc::new(LayerGate::new());
        if pending.is_empty() {
            gate.advance(n_layers);
        }
        // Slot list in position order: resident, pending, or None (recompute).
        let mut pending_at: Vec<Option<usize>> = vec![None; n_chunks];
        for (k, (i, _)) in pending.iter().enumerate() {
            if let Some(slot) = pending_at.get_mut(*i) {
                *slot = Some(k);
            }
        }
        let mut layout: Vec<Option<ChunkSlot>> = Vec::with_capacity(n_chunks + 1);
        for (i, id) in chunk_ids.iter().enumerate() {
            if let Some(k) = pending_at[i] {
                layout.push(Some(ChunkSlot::Sealed(Arc::clone(&pending[k].1))));
            } else if recompute.contains(&i) {
                layout.push(None);
            } else {
                let r = self.apps[a].chunks.get(id).and_then(|e| e.resident.clone());
                match r {
                    Some(r) => layout.push(Some(ChunkSlot::Sealed(r))),
                    None => layout.push(None),
                }
            }
        }
        if has_tail {
            layout.push(tail_staged.map(ChunkSlot::Staged));
        }
        let files: Vec<&Src> = to_read.iter().map(|(_, _, f)| f).collect();
        let any_recompute = layout.iter().any(Option::is_none);
        let read_chunk = |k: usize, l: usize| -> Result<(), String> {
            let (src, chunk) = (files[k], &pending[k].1);
            let b = src
                .file
                .read_section(src.item, l)
                .map_err(|e| e.to_string())?;
            chunk.set_layer(l, b).map_err(|e| e.to_string())
        };
        if !any_recompute {
            let failed = Mutex::new(Vec::new());
            let spare = Mutex::new(self.spare.take().unwrap_or_default());
            // Both cores for the read: the I/O thread waits at its next yield point.
            let _hold = self.io.hold().hold();
            self.pool.run_tasks(pending.len(), &|k, _| {
                let (src, (idx, chunk)) = (files[k], &pending[k]);
                let loaded = src
                    .file
                    .read_item_with(src.item, |len| SpareBuffers::take(&spare, len))
                    .map_err(|e| e.to_string());
                let set = loaded.and_then(|layers| {
                    layers
                        .into_iter()
                        .enumerate()
                        .try_for_each(|(l, b)| chunk.set_layer(l, b).map_err(|e| e.to_string()))
                });
                if let Err(e) = set {
                    tracing::warn!("chunk {idx} unreadable: {e}");
                    failed.lock().unwrap_or_else(|e| e.into_inner()).push(*idx);
                }
            });
            out.failed_reads = failed.into_inner().unwrap_or_else(|e| e.into_inner());
            let slots = layout.into_iter().flatten().collect();
            return self.adopt(a, c, out, (slots, 0), &pending, to_read);
        }
        let n_loaders = 1;
        let progress: Vec<std::sync::atomic::AtomicUsize> =
            (0..n_loaders).map(|_| Default::default()).collect();
        let model = Arc::clone(&self.model);
        let pool = Arc::clone(&self.pool);
        let cap = self.cfg.max_context_tokens;
        let scratch = &mut self.scratch;
        let result: Result<(Vec<ChunkSlot>, usize), StoreError> = std::thread::scope(|scope| {
            let loader_gate = Arc::clone(&gate);
            let progress = &progress;
            let loaders: Vec<_> = (0..n_loaders)
                .filter(|_| !pending.is_empty())
                .map(|t| {
                    let (pending, gate, read_chunk) =
                        (&pending, Arc::clone(&loader_gate), &read_chunk);
                    scope.spawn(move || -> Vec<usize> {
                        // A chunk that fails is skipped from then on; the others are still
                        // read to the end, so a second round only recomputes what failed.
                        let mut failed = Vec::new();
                        for l in 0..n_layers {
                            let mine = pending.iter().enumerate().skip(t).step_by(n_loaders);
                            for (k, (idx, _)) in mine {
                                if failed.contains(idx) {
                                    continue;
                                }
                                if let Err(e) = read_chunk(k, l) {
                                    tracing::warn!("chunk {idx}: layer {l} unreadable: {e}");
                                    failed.push(*idx);
                                    gate.fail(format!("chunk {idx} failed to load: {e}"));
                                }
                            }
                            if failed.is_empty() {
                                use std::sync::atomic::Ordering;
                                progress[t].store(l + 1, Ordering::Release);
                                let ready = progress
                                    .iter()
                                    .map(|p| p.load(Ordering::Acquire))
                                    .min()
                                    .unwrap_or(0);
                                gate.advance(ready);
                            }
                        }
                        failed
                    })
                })
                .collect();
            // Recompute runs in position order; each sees every slot before it.
            let mut slots: Vec<ChunkSlot> = Vec::with_capacity(layout.len());
            let mut recomputed = 0;
            let mut i = 0;
            let mut run_result = Ok(());
            let mut layout_iter: Vec<Option<ChunkSlot>> = layout;
            while i < layout_iter.len() {
                if let Some(slot) = layout_iter[i].take() {
                    slots.push(slot);
                    i += 1;
                    continue;
                }
                let mut j = i;
                while j < layout_iter.len() && layout_iter[j].is_none() {
                    j += 1;
                }
                let start = i * CHUNK_TOKENS;
                let end = (j * CHUNK_TOKENS).min(tokens.len());
                let kv = ChunkedKv::from_slots(shape, cap, std::mem::take(&mut slots), start);
                let mut kv = match kv {
                    Ok(kv) => kv,
                    Err(e) => {
                        run_result = Err(StoreError::from(e));
                        break;
                    }
                };
                kv.set_gate(Some(Arc::clone(&gate)));
                let r = model.forward(
                    &pool,
                    &mut [SeqBatch {
                        tokens: &tokens[start..end],
                        start_pos: start,
                        kv: &mut kv,
                        logits: Logits::None,
                    }],
                    scratch,
                );
                kv.set_gate(None);
                slots = kv.into_slots();
                if let Err(e) = r {
                    run_result = Err(e.into());
                    break;
                }
                recomputed += j.min(n_chunks) - i.min(n_chunks);
                i = j;
            }
            let mut failed = Vec::new();
            for h in loaders {
                failed.extend(h.join().unwrap_or_default());
            }
            out.failed_reads = failed;
            run_result.map(|()| (slots, recomputed))
        });
        let failed_reads = std::mem::take(&mut out.failed_reads);
        let done = match result {
            Ok(v) => v,
            // A recompute that waited on a failed read: keep every chunk that did load and
            // recompute the rest in the next round.
            Err(StoreError::Model(ModelError::Kv(_))) if !failed_reads.is_empty() => {
                for (k, (i, ch)) in pending.iter().enumerate() {
                    if ch.is_complete() && !failed_reads.contains(i) {
                        out.read_ok += 1;
                        out.bytes_read += to_read[k].2.bytes;
                        self.set_resident(a, chunk_ids[*i], Arc::clone(ch));
                    }
                }
                out.failed_reads = failed_reads;
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        out.failed_reads = failed_reads;
        self.adopt(a, c, out, done, &pending, to_read)
    }

    /// Makes what a round read and recomputed resident: `slots` in position order (the
    /// context's chunks, then its tail), `recomputed` chunks of them recomputed.
    fn adopt(
        &mut self,
        a: usize,
        c: u64,
        mut out: RoundOutcome,
        (slots, recomputed): (Vec<ChunkSlot>, usize),
        pending: &[(usize, Arc<SealedChunk>)],
        to_read: &[(usize, Precision, Src)],
    ) -> Result<RoundOutcome> {
        let shape = self.shape;
        let chunk_ids = self.apps[a].contexts[&c].chunks.clone();
        let n_chunks = chunk_ids.len();
        // Bytes of each chunk read in this round, by position.
        let mut read_bytes: Vec<Option<u64>> = vec![None; n_chunks];
        for (k, (i, _)) in pending.iter().enumerate() {
            if let Some(b) = read_bytes.get_mut(*i) {
                *b = Some(to_read[k].2.bytes);
            }
        }
        for (i, slot) in slots.into_iter().enumerate() {
            if i < n_chunks {
                let id = chunk_ids[i];
                match slot {
                    ChunkSlot::Sealed(ch) => {
                        if ch.is_complete() && !out.failed_reads.contains(&i) {
                            let was = self.apps[a]
                                .chunks
                                .get(&id)
                                .and_then(|e| e.resident.clone());
                            if was.is_none() {
                                if let Some(b) = read_bytes[i] {
                                    out.read_ok += 1;
                                    out.bytes_read += b;
                                }
                                self.set_resident(a, id, ch);
                            }
                        }
                    }
                    ChunkSlot::Staged(st) => {
                        let p = self.apps[a]
                            .chunks
                            .get(&id)
                            .map_or(self.cfg.policy.seal_precision(), |e| e.precision);
                        // The way the uninterrupted run sealed it (llms: through its f16
                        // master), so values equal up to float noise give the same codes.
                        let sealed = if self.cfg.policy == Policy::Llms && p != Precision::F16 {
                            let master = SealedChunk::quantize(&st, Precision::F16)?;
                            SealedChunk::quantize(&master.dequantize()?, p)?
                        } else {
                            SealedChunk::quantize(&st, p)?
                        };
                        self.set_resident(a, id, Arc::new(sealed));
                    }
                }
            } else if let ChunkSlot::Staged(st) = slot {
                if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
                    ctx.tail.staged = Some(st);
                    self.resident_bytes += staged_bytes(shape) as u64;
                }
            }
        }
        out.recomputed = recomputed;
        self.note_peak();
        Ok(out)
    }

    /// Runs the model over `tokens` appended to the session's context, in prefill slices,
    /// sealing chunks as they fill. Returns the logits asked for.
    pub fn forward(&mut self, s: &mut Session, tokens: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let total = s.kv.len() + tokens.len();
        self.check_length(total)?;
        let mut out = Vec::new();
        let slice = self.cfg.prefill_slice;
        let n_slices = tokens.len().div_ceil(slice);
        for (k, part) in tokens.chunks(slice).enumerate() {
            let want = match logits {
                Logits::All => Logits::All,
                Logits::Last if k + 1 == n_slices => Logits::Last,
                _ => Logits::None,
            };
            let start = s.kv.len();
            let r = self.model.forward(
                &self.pool,
                &mut [SeqBatch {
                    tokens: part,
                    start_pos: start,
                    kv: &mut s.kv,
                    logits: want,
                }],
                &mut self.scratch,
            )?;
            out.extend_from_slice(r);
            s.appended.extend_from_slice(part);
            self.seal_full_slots(s)?;
        }
        Ok(out)
    }

    /// One batched step over many sessions (decode tokens and prefill slices mixed): the
    /// weights are read once for all of them. Returns the logits asked for, `vocab` per row,
    /// in the order of `steps`.
    pub fn forward_sessions(&mut self, steps: &mut [SessionStep<'_>]) -> Result<Vec<f32>> {
        for st in steps.iter() {
            self.check_length(st.session.kv.len() + st.tokens.len())?;
        }
        let out = {
            let mut batch: Vec<SeqBatch<'_>> = steps
                .iter_mut()
                .map(|st| SeqBatch {
                    tokens: st.tokens,
                    start_pos: st.session.kv.len(),
                    kv: &mut st.session.kv,
                    logits: st.logits,
                })
                .collect();
            self.model
                .forward(&self.pool, &mut batch, &mut self.scratch)?
                .to_vec()
        };
        for st in steps.iter_mut() {
            self.after_forward(st.session, st.tokens)?;
        }
        Ok(out)
    }

    /// Records tokens the caller forwarded itself (batched across sessions) and seals the
    /// chunks they filled.
    pub fn after_forward(&mut self, s: &mut Session, tokens: &[u32]) -> Result<()> {
        s.appended.extend_from_slice(tokens);
        self.seal_full_slots(s)
    }

    /// Seals full staged slots at the policy's sealing precision, so a long prefill holds
    /// at most one slice in f32.
    fn seal_full_slots(&mut self, s: &mut Session) -> Result<()> {
        let full = s.kv.len() / CHUNK_TOKENS;
        let p = self.cfg.policy.seal_precision();
        for i in 0..full {
            let Some(ChunkSlot::Staged(st)) = s.kv.slot_mut(i) else {
                continue;
            };
            let sealed = if self.cfg.policy == Policy::Llms {
                // The f16 master is what every later precision is quantized from.
                let master = Arc::new(SealedChunk::quantize(st, Precision::F16)?);
                let q = SealedChunk::quantize(&master.dequantize()?, p)?;
                let f = self.queue_sealed(s.app, &master);
                s.masters.insert(i, f);
                q
            } else {
                SealedChunk::quantize(st, p)?
            };
            if let Some(slot) = s.kv.slot_mut(i) {
                *slot = ChunkSlot::Sealed(Arc::new(sealed));
            }
        }
        Ok(())
    }

    /// Ends a call: the context takes its new tokens and chunks, densities are added,
    /// precisions rebalanced, the changes swapped out ahead of time, and the budget enforced.
    pub fn close_session(&mut self, mut s: Session) -> Result<()> {
        self.drain_io();
        if let Err(e) = self.seal_full_slots(&mut s) {
            self.abort_session(s);
            return Err(e);
        }
        let Session {
            app: a,
            ctx: c,
            kv,
            appended,
            masters,
            ..
        } = s;
        let densities = kv.densities();
        let slots = kv.into_slots();
        let shape = self.shape;
        let policy = self.cfg.policy;
        let mut changed: Vec<u64> = Vec::new();
        let Some(ctx) = self.apps[a].contexts.get_mut(&c) else {
            self.pinned.remove(&(a, c));
            return Err(StoreError::Internal("session of a vanished context".into()));
        };
        ctx.tokens.extend_from_slice(&appended);
        let n_tokens = ctx.tokens.len();
        let n_full = n_tokens / CHUNK_TOKENS;
        let old_chunks = ctx.chunks.len();
        // Old tail is superseded when tokens were added.
        if !appended.is_empty() {
            ctx.tail.file = None;
        }
        let mut tail: Option<Box<StagedChunk>> = None;
        let now = now_unix();
        for (i, slot) in slots.into_iter().enumerate() {
            if i >= n_full {
                if let ChunkSlot::Staged(st) = slot {
                    tail = Some(st);
                }
                continue;
            }
            let sealed = match slot {
                ChunkSlot::Sealed(ch) => ch,
                ChunkSlot::Staged(st) => {
                    Arc::new(SealedChunk::quantize(&st, policy.seal_precision())?)
                }
            };
            let app = &mut self.apps[a];
            if i >= old_chunks {
                let id = app.next_chunk;
                app.next_chunk += 1;
                let mut e = new_entry(sealed.precision());
                e.refs = 1;
                e.last_use = now;
                e.master = masters.get(&i).copied();
                app.chunks.insert(id, e);
                if let Some(ctx) = app.contexts.get_mut(&c) {
                    ctx.chunks.push(id);
                }
                self.resident_bytes += sealed.resident_bytes() as u64;
                if let Some(e) = self.apps[a].chunks.get_mut(&id) {
                    e.resident = Some(sealed);
                }
                changed.push(id);
            }
        }
        // Densities observed during the call.
        {
            let app = &mut self.apps[a];
            if let Some(ctx) = app.contexts.get(&c) {
                for (i, d) in densities.iter().enumerate().take(ctx.chunks.len()) {
                    if let Some(e) = app.chunks.get_mut(&ctx.chunks[i]) {
                        e.density.mass += d.mass;
                        e.density.observations += d.observations;
                        e.last_use = now;
                    }
                }
            }
        }
        if let Some(t) = tail {
            self.resident_bytes += staged_bytes(shape) as u64;
            if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
                ctx.tail.staged = Some(t);
            }
        } else if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
            if ctx.tail.staged.take().is_some() {
                self.resident_bytes -= staged_bytes(shape) as u64;
            }
        }
        self.note_peak();

        // Swap-out, ahead of time.
        match policy {
            Policy::Recompute => {}
            Policy::SwapWhole => {
                if !appended.is_empty() || self.apps[a].contexts[&c].whole.is_none() {
                    if let Some(x) = self.apps[a].contexts.get_mut(&c) {
                        x.whole = None;
                    }
                    self.write_whole(a, c);
                }
            }
            Policy::Paged | Policy::PagedInt8 => {
                for id in &changed {
                    if let Some(r) = self.apps[a].chunks.get(id).and_then(|e| e.resident.clone()) {
                        let f = self.queue_sealed(a, &r);
                        if let Some(e) = self.apps[a].chunks.get_mut(id) {
                            e.file = Some(f);
                        }
                    }
                }
            }
            Policy::Llms => self.rebalance(a, c)?,
        }
        let tail_stale = !appended.is_empty() || self.apps[a].contexts[&c].tail.file.is_none();
        if !matches!(policy, Policy::SwapWhole | Policy::Recompute) && tail_stale {
            self.write_tail(a, c);
        }
        self.write_manifest(a);
        self.pinned.remove(&(a, c));
        self.requeue_context(a, c);
        self.enforce_budget()
    }

    /// Ends a call without keeping anything it computed (cancelled or failed): the context is
    /// as it was before the session.
    pub fn abort_session(&mut self, s: Session) {
        let Session {
            app: a,
            ctx: c,
            kv,
            tail_before,
            ..
        } = s;
        drop(kv);
        if let Some(t) = tail_before {
            if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
                ctx.tail.staged = Some(t);
                self.resident_bytes += staged_bytes(self.shape) as u64;
            }
        }
        self.pinned.remove(&(a, c));
        self.requeue_context(a, c);
    }

    /// `llms`: chooses every chunk's precision under the ratio and re-quantizes this
    /// context's chunks whose level changed, always from their f16 master.
    fn rebalance(&mut self, a: usize, c: u64) -> Result<()> {
        let target = self.precision_targets();
        self.apply_precisions(a, c, &target).map(|_| ())
    }

    /// The precision every chunk of every app earns now (global ranking by density).
    fn precision_targets(&self) -> HashMap<(usize, u64), Precision> {
        let mut keys = Vec::new();
        let mut dens = Vec::new();
        for (ai, app) in self.apps.iter().enumerate() {
            for (&id, e) in &app.chunks {
                keys.push((ai, id));
                dens.push(e.density.mean());
            }
        }
        let levels: Vec<u32> = LLMS_LEVELS.iter().map(|p| p.bits()).collect();
        let chosen = assign_levels(&dens, &levels, self.cfg.avg_bits);
        keys.into_iter()
            .zip(chosen)
            .map(|(k, l)| (k, LLMS_LEVELS[l]))
            .collect()
    }

    /// Re-quantizes the chunks of one context whose level in `target` changed, always from
    /// their f16 master; returns how many changed.
    fn apply_precisions(
        &mut self,
        a: usize,
        c: u64,
        target: &HashMap<(usize, u64), Precision>,
    ) -> Result<u64> {
        /// What happens to one chunk of the context, in chunk order.
        enum Step {
            /// Already at its level: only its swap file, if it has none yet.
            Keep(u64),
            /// Re-quantized from its f16 master (job `k`).
            Requantize(u64, usize),
        }
        let ids: Vec<u64> = self.apps[a].contexts[&c].chunks.clone();
        let mut steps = Vec::new();
        let mut masters: Vec<(Arc<SealedChunk>, Precision)> = Vec::new();
        for id in ids {
            let Some(&want) = target.get(&(a, id)) else {
                continue;
            };
            let Some(cur) = self.apps[a].chunks.get(&id).map(|e| e.precision) else {
                continue;
            };
            if cur == want {
                steps.push(Step::Keep(id));
                continue;
            }
            // Always from the f16 master, never from the current lossy copy.
            let Some(master) = self.read_master(a, id) else {
                tracing::warn!("chunk without a readable f16 master keeps its precision");
                continue;
            };
            steps.push(Step::Requantize(id, masters.len()));
            masters.push((master, want));
        }
        // The quantizing is the costly part (about 0.5 ms a chunk): every pool thread takes
        // chunks, so a call's close holds up the other apps' next tokens for less.
        type Quantized = Option<Result<Arc<SealedChunk>>>;
        let quantized: Vec<Mutex<Quantized>> = masters.iter().map(|_| Mutex::new(None)).collect();
        self.pool.run_tasks(masters.len(), &|k, _| {
            let (master, want) = &masters[k];
            // A master that does not decode is skipped below, as a missing one is.
            let q = master.dequantize().ok().map(|m| {
                SealedChunk::quantize(&m, *want)
                    .map(Arc::new)
                    .map_err(StoreError::from)
            });
            *quantized[k].lock().unwrap_or_else(|e| e.into_inner()) = q;
        });
        let mut quantized: Vec<Quantized> = quantized
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let mut changed = 0;
        for step in steps {
            match step {
                Step::Keep(id) => {
                    let (has_file, resident) = match self.apps[a].chunks.get(&id) {
                        Some(e) => (e.file.is_some(), e.resident.clone()),
                        None => continue,
                    };
                    // A new chunk already at its level only needs its swap file.
                    if let (false, Some(r)) = (has_file, resident) {
                        let f = self.queue_sealed(a, &r);
                        if let Some(e) = self.apps[a].chunks.get_mut(&id) {
                            e.file = Some(f);
                        }
                    }
                }
                Step::Requantize(id, k) => {
                    let Some(q) = quantized.get_mut(k).and_then(Option::take) else {
                        tracing::warn!("chunk without a readable f16 master keeps its precision");
                        continue;
                    };
                    let q = q?;
                    let f = self.queue_sealed(a, &q);
                    let was_resident = self.apps[a]
                        .chunks
                        .get(&id)
                        .is_some_and(|e| e.resident.is_some());
                    if let Some(e) = self.apps[a].chunks.get_mut(&id) {
                        e.file = Some(f);
                        e.precision = q.precision();
                    }
                    if was_resident {
                        self.set_resident(a, id, q);
                    }
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    /// A chunk's f16 master: from the segment being built or written, else from its file.
    fn read_master(&mut self, a: usize, id: u64) -> Option<Arc<SealedChunk>> {
        let f = self.apps[a].chunks.get(&id)?.master?;
        if let Some(seg) = self.apps[a].pending.as_ref().filter(|p| p.num == f.num) {
            return match seg.items.get(f.item as usize) {
                Some(PendingItem::Sealed(ch)) => Some(Arc::clone(ch)),
                _ => None,
            };
        }
        if let Some(ch) = self.unwritten_sealed(a, f) {
            return Some(ch);
        }
        self.wait_file(a, f.num);
        let file = self.open_file(a, f.num).ok()?;
        let (shape, p) = (self.shape, Precision::F16);
        let item = f.item as usize;
        let sections = Some((shape.n_layers, layer_bytes(shape, p)));
        check_item(&file, item, KIND_SEALED, p, sections).ok()?;
        let chunk = SealedChunk::empty(shape, p);
        for (l, b) in file.read_item(item).ok()?.into_iter().enumerate() {
            chunk.set_layer(l, b).ok()?;
        }
        Some(Arc::new(chunk))
    }

    fn write_whole(&mut self, a: usize, c: u64) {
        let Some(ctx) = self.apps[a].contexts.get(&c) else {
            return;
        };
        let chunks: Vec<Arc<SealedChunk>> = ctx
            .chunks
            .iter()
            .filter_map(|id| self.apps[a].chunks.get(id).and_then(|e| e.resident.clone()))
            .collect();
        if chunks.len() != ctx.chunks.len() {
            return;
        }
        let tail = ctx.tail.staged.as_ref().map(|t| t.to_bytes());
        let n_tokens = ctx.tokens.len();
        let bytes: u64 = chunks
            .iter()
            .map(|c| c.resident_bytes() as u64)
            .sum::<u64>()
            + tail.as_ref().map_or(0, |t| t.len() as u64);
        let item = PendingItem::Whole {
            n_tokens,
            chunks,
            tail,
        };
        let f = self.add_item(a, item, bytes);
        if let Some(ctx) = self.apps[a].contexts.get_mut(&c) {
            ctx.whole = Some(f);
        }
    }

    /// Evicts LCTRU victims until the resident bytes fit the budget.
    fn enforce_budget(&mut self) -> Result<()> {
        while self.resident_bytes > self.budget {
            if !self.evict_one()? {
                break;
            }
        }
        Ok(())
    }

    /// Drops every resident part of a context (it stays on disk or recomputable).
    pub fn evict_context(&mut self, app: &str, id: &str) -> Result<()> {
        let (a, c) = self.lookup(app, id)?;
        if self.pinned.contains(&(a, c)) {
            return Err(StoreError::InvalidRequest(format!(
                "context {id} is in use by a running call"
            )));
        }
        self.io.flush();
        self.drain_io();
        self.unqueue_context(a, c);
        let app_ = &mut self.apps[a];
        let Some(ctx) = app_.contexts.get_mut(&c) else {
            return Ok(());
        };
        if ctx.tail.staged.take().is_some() {
            self.resident_bytes -= staged_bytes(self.shape) as u64;
        }
        let chunks = ctx.chunks.clone();
        for cid in chunks {
            // A chunk shared with a fork in use stays.
            if self.pinned_chunk(a, cid) {
                continue;
            }
            if let Some(r) = self.apps[a]
                .chunks
                .get_mut(&cid)
                .and_then(|e| e.resident.take())
            {
                self.resident_bytes -= r.resident_bytes() as u64;
                self.queue.remove((a as u32, EK_CHUNK, cid));
            }
        }
        Ok(())
    }

    /// Sets the KV budget in force (capped at the configured one) and evicts, LCTRU first,
    /// down to it. Chunks of contexts in use stay: the resident bytes may remain above a
    /// budget lowered below what running calls hold, until they end.
    pub fn set_budget(&mut self, bytes: u64) -> Result<()> {
        self.budget = bytes.min(self.cfg.kv_budget_bytes);
        self.enforce_budget()
    }

    /// A new configured KV budget (configuration reload): the budget in force follows it,
    /// staying lowered where memory pressure lowered it.
    pub fn set_configured_budget(&mut self, bytes: u64) -> Result<()> {
        let pressed = self.budget < self.cfg.kv_budget_bytes;
        self.cfg.kv_budget_bytes = bytes;
        self.budget = if pressed {
            self.budget.min(bytes)
        } else {
            bytes
        };
        self.enforce_budget()
    }

    /// The KV budget in force.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// KV bytes in memory now.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// Whether a running call holds the context.
    pub fn in_use(&self, app: &str, id: &str) -> bool {
        self.lookup(app, id)
            .is_ok_and(|(a, c)| self.pinned.contains(&(a, c)))
    }

    /// Admin maintenance of every app with no call in flight (the others are left for the
    /// next time): re-places its chunks at the precision the current density ranking gives
    /// (`llms`; re-quantized from their f16 masters), evicts its contexts (their swap-out is
    /// on disk first), and removes its swap files nothing refers to.
    pub fn compact(&mut self) -> Result<CompactStats> {
        self.flush();
        let before = self.resident_bytes;
        let mut stats = CompactStats::default();
        let busy_apps: HashSet<usize> = self.pinned.iter().map(|&(a, _)| a).collect();
        let idle_apps: Vec<usize> = (0..self.apps.len())
            .filter(|a| !busy_apps.contains(a))
            .collect();
        let idle: Vec<(usize, u64)> = idle_apps
            .iter()
            .flat_map(|&a| self.apps[a].contexts.keys().map(move |&c| (a, c)))
            .collect();
        if self.cfg.policy == Policy::Llms {
            let target = self.precision_targets();
            for &(a, c) in &idle {
                stats.requantized_chunks += self.apply_precisions(a, c, &target)?;
            }
        }
        for &a in &idle_apps {
            self.write_manifest(a);
        }
        self.flush();
        for &(a, c) in &idle {
            let name = format_id(c);
            let app = self.apps[a].name.clone();
            if self.context_resident_bytes(a, c) > 0 {
                self.evict_context(&app, &name)?;
                stats.evicted_contexts += 1;
            }
        }
        for &a in &idle_apps {
            stats.files_removed += self.collect_garbage(a);
        }
        stats.freed_bytes = before.saturating_sub(self.resident_bytes);
        Ok(stats)
    }

    /// A mark covering every write queued so far (swap files, manifests). Once
    /// [`Self::is_written`] says so, all the store has changed up to now is on disk (or its
    /// write failed, and is kept in memory and retried).
    pub fn write_mark(&self) -> u64 {
        self.io.submitted()
    }

    /// Runs `write` on the store's I/O thread after every write queued so far; it counts in
    /// [`Self::write_mark`] like them (a file of the caller's that a reply must wait for).
    pub fn submit_write(&self, write: impl FnOnce() + Send + 'static) {
        self.io.submit(move || {
            write();
            None
        });
    }

    /// Whether every write up to `mark` has run; never blocks.
    pub fn is_written(&self, mark: u64) -> bool {
        self.io.completed() >= mark
    }

    /// Waits until every queued swap file and manifest is on disk.
    pub fn flush(&mut self) {
        self.io.flush();
        self.drain_io();
    }

    pub fn stats(&self) -> StoreStats {
        let mut disk = 0;
        let mut chunks = 0;
        let mut contexts = 0;
        for app in &self.apps {
            contexts += app.contexts.len();
            chunks += app.chunks.len();
            for e in app.chunks.values() {
                disk += e.file.map_or(0, |f| f.bytes) + e.master.map_or(0, |f| f.bytes);
            }
            for c in app.contexts.values() {
                disk += c.tail.file.map_or(0, |f| f.bytes) + c.whole.map_or(0, |f| f.bytes);
            }
        }
        StoreStats {
            policy: self.cfg.policy.name().to_string(),
            kv_budget_bytes: self.budget,
            kv_budget_max_bytes: self.cfg.kv_budget_bytes,
            kv_resident_bytes: self.resident_bytes,
            kv_resident_peak_bytes: self.resident_peak,
            kv_disk_bytes: disk,
            contexts,
            chunks,
            io_failures: self.io_failures,
            files_written: self.files_written,
            bytes_written: self.bytes_written,
        }
    }

    /// The resident chunks of a context, in order (tests compare restored chunks with these).
    #[cfg(test)]
    pub fn resident_chunks(&self, app: &str, id: &str) -> Vec<Option<Arc<SealedChunk>>> {
        let Ok((a, c)) = self.lookup(app, id) else {
            return Vec::new();
        };
        let app = &self.apps[a];
        app.contexts[&c]
            .chunks
            .iter()
            .map(|cid| app.chunks.get(cid).and_then(|e| e.resident.clone()))
            .collect()
    }

    pub fn reset_peak(&mut self) {
        self.resident_peak = self.resident_bytes;
    }

    /// The cost models fitted by an earlier start with the same model, else fitted now and
    /// kept in `costs.json` of the cache directory (the state directory unless configured).
    fn cached_or_fitted_costs(&mut self) -> Result<RestoreCosts> {
        #[derive(Serialize, Deserialize)]
        struct Cached {
            model: String,
            threads: usize,
            costs: RestoreCosts,
        }
        let dir = self.cfg.cache_dir.as_ref().unwrap_or(&self.cfg.state_dir);
        if let Err(e) = durable::ensure_private_dir(dir) {
            tracing::warn!("cache directory {}: {e}", dir.display());
        }
        let path = dir.join("costs.json");
        let threads = self.pool.n_threads();
        if let Ok(Some(c)) = durable::read_json::<Cached>(&path) {
            if c.model == self.fingerprint && c.threads == threads {
                return Ok(c.costs);
            }
        }
        let costs = self.fit_costs()?;
        let cached = Cached {
            model: self.fingerprint.clone(),
            threads,
            costs,
        };
        if let Err(e) = durable::write_json_atomic(&path, &cached) {
            tracing::warn!("could not keep the fitted cost models: {e}");
        }
        Ok(costs)
    }

    /// Fits the restore cost models: recompute of 16 and 64 tokens, reads of int4 files.
    fn fit_costs(&mut self) -> Result<RestoreCosts> {
        let shape = self.shape;
        let mut rc = Vec::new();
        let tokens: Vec<u32> = (0..64u32).map(|i| 100 + i).collect();
        for &n in &[16usize, 64, 16, 64] {
            let mut kv = ChunkedKv::new(shape, 64);
            let t = Instant::now();
            self.model.forward(
                &self.pool,
                &mut [SeqBatch {
                    tokens: &tokens[..n],
                    start_pos: 0,
                    kv: &mut kv,
                    logits: Logits::None,
                }],
                &mut self.scratch,
            )?;
            rc.push((n as f64, t.elapsed().as_secs_f64()));
        }
        let dir = self.cfg.state_dir.join("calibrate");
        durable::ensure_private_dir(&dir)?;
        let mut staged = StagedChunk::new(shape);
        let mut x = 0x1234_5678u32;
        let kw = shape.n_kv_heads * shape.head_dim;
        let vw = shape.n_kv_heads * shape.v_head_dim;
        for l in 0..shape.n_layers {
            for t in 0..CHUNK_TOKENS {
                let mut next = || {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32) - 0.5
                };
                let k: Vec<f32> = (0..kw).map(|_| next()).collect();
                let v: Vec<f32> = (0..vw).map(|_| next()).collect();
                staged.write(l, t, &k, &v);
            }
        }
        staged.set_tokens(CHUNK_TOKENS);
        let chunk = SealedChunk::quantize(&staged, Precision::Int4)?;
        let mut io = Vec::new();
        let internal = |e: swapfile::SwapError| StoreError::Internal(e.to_string());
        let layers: Vec<&[u8]> = (0..shape.n_layers)
            .map(|l| chunk.layer(l).unwrap_or_default())
            .collect();
        for &n in &[1usize, 8, 1, 8] {
            // A segment of n chunks, read back whole (as a restore reads a call's chunks).
            let p = dir.join(format!("s{n}.kv"));
            let item = ItemSpec {
                precision: Precision::Int4.code(),
                kind: KIND_SEALED,
                n_tokens: CHUNK_TOKENS as u16,
                sections: layers.clone(),
            };
            let items = vec![item; n];
            let w = swapfile::write_segment(&p, shape_hash(shape), &items, &mut |_, _| {})
                .map_err(internal)?;
            let t = Instant::now();
            let file = SwapFile::open(&p).map_err(internal)?;
            for i in 0..n {
                let target = SealedChunk::empty(shape, Precision::Int4);
                for l in 0..shape.n_layers {
                    target.set_layer(l, file.read_section(i, l).map_err(internal)?)?;
                }
            }
            io.push((
                w.item_bytes.iter().sum::<u64>() as f64,
                t.elapsed().as_secs_f64(),
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let costs = RestoreCosts {
            io: LinearCost::fit(&io),
            recompute: LinearCost::fit(&rc),
        };
        tracing::info!(?costs, "KV restore cost models fitted");
        Ok(costs)
    }
}

/// Writes a segment's items (on the I/O thread): a sealed chunk is one section per layer, a
/// tail one section, a whole context one section per chunk (its layers back to back) and
/// one for its tail. `delay` (fault injection) slows each item after the first down, so a
/// crash test can kill the process while the segment is being written.
fn write_segment_items(
    path: &Path,
    hash: u64,
    n_layers: usize,
    items: &[PendingItem],
    delay: Option<Duration>,
    hold: &IoHold,
) -> Result<u64, swapfile::SwapError> {
    let concat = |ch: &SealedChunk| -> Vec<u8> {
        (0..n_layers)
            .flat_map(|l| ch.layer(l).unwrap_or_default().iter().copied())
            .collect()
    };
    let wholes: Vec<Vec<Vec<u8>>> = items
        .iter()
        .map(|it| match it {
            PendingItem::Whole { chunks, .. } => chunks.iter().map(|c| concat(c)).collect(),
            _ => Vec::new(),
        })
        .collect();
    let specs: Vec<ItemSpec> = items
        .iter()
        .zip(&wholes)
        .map(|(it, blobs)| match it {
            PendingItem::Sealed(ch) => ItemSpec {
                precision: ch.precision().code(),
                kind: KIND_SEALED,
                n_tokens: CHUNK_TOKENS as u16,
                sections: (0..n_layers)
                    .map(|l| ch.layer(l).unwrap_or_default())
                    .collect(),
            },
            PendingItem::Tail { n_tokens, bytes } => ItemSpec {
                precision: Precision::F16.code(),
                kind: KIND_TAIL,
                n_tokens: (*n_tokens).min(u16::MAX as usize) as u16,
                sections: vec![bytes.as_slice()],
            },
            PendingItem::Whole { n_tokens, tail, .. } => ItemSpec {
                precision: Precision::F16.code(),
                kind: KIND_WHOLE,
                n_tokens: (*n_tokens).min(u16::MAX as usize) as u16,
                sections: blobs
                    .iter()
                    .map(Vec::as_slice)
                    .chain(tail.as_deref())
                    .collect(),
            },
        })
        .collect();
    let mut pace = |i: usize, section: usize| {
        if let Some(d) = delay.filter(|_| i > 0 && section == 0) {
            std::thread::sleep(d);
        }
        hold.yield_point();
    };
    Ok(swapfile::write_segment(path, hash, &specs, &mut pace)?.file_bytes)
}

/// Whether an eviction unit's swap file is still queued.
fn key_in_flight(apps: &[App], in_flight: &HashSet<(usize, u64)>, key: EvictKey) -> bool {
    if in_flight.is_empty() {
        return false;
    }
    let (a, kind, id) = (key.0 as usize, key.1, key.2);
    let Some(app) = apps.get(a) else {
        return false;
    };
    let file = match kind {
        EK_CHUNK => app.chunks.get(&id).and_then(|e| e.file),
        EK_TAIL => app.contexts.get(&id).and_then(|c| c.tail.file),
        _ => app.contexts.get(&id).and_then(|c| c.whole),
    };
    file.is_some_and(|f| in_flight.contains(&(a, f.num)))
}

/// An item to read: its open segment, its index there, its bytes on disk.
struct Src {
    file: Arc<SwapFile>,
    item: usize,
    bytes: u64,
}

/// Checks that item `item` of `file` is what the store expects (its kind, its precision and,
/// for a chunk, `n` sections of `len` bytes each); returns its bytes on disk.
fn check_item(
    file: &SwapFile,
    item: usize,
    kind: u8,
    p: Precision,
    sections: Option<(usize, usize)>,
) -> Result<u64, String> {
    let h = file.item(item).map_err(|e| e.to_string())?;
    if h.kind != kind || h.precision != p.code() {
        return Err(format!(
            "item is kind {} at precision {}, expected kind {kind} at {}",
            h.kind,
            h.precision,
            p.code()
        ));
    }
    if let Some((n, len)) = sections {
        let ok = h.n_sections as usize == n
            && (0..n).all(|s| file.section_raw_len(item, s) == Some(len));
        if !ok {
            return Err(format!(
                "item does not have {n} sections of {len} bytes (it has {})",
                h.n_sections
            ));
        }
    }
    file.item_bytes(item).map_err(|e| e.to_string())
}

#[derive(Default)]
struct RoundOutcome {
    read_ok: usize,
    recomputed: usize,
    bytes_read: u64,
    failed_reads: Vec<usize>,
}

fn new_entry(p: Precision) -> ChunkEntry {
    ChunkEntry {
        precision: p,
        resident: None,
        file: None,
        master: None,
        density: Density::default(),
        refs: 0,
        last_use: now_unix(),
    }
}

/// Cost models used until (or instead of) fitting: 1 GB/s reads, 4 ms per recomputed token.
fn default_costs() -> RestoreCosts {
    RestoreCosts {
        io: LinearCost {
            fixed: 2e-4,
            per_unit: 1e-9,
        },
        recompute: LinearCost {
            fixed: 5e-3,
            per_unit: 4e-3,
        },
    }
}

/// A sealed chunk from its layers concatenated (the swap-whole file's blob per chunk).
fn sealed_from_concat(
    shape: KvShape,
    p: Precision,
    bytes: &[u8],
) -> Result<SealedChunk, ChunkError> {
    let chunk = SealedChunk::empty(shape, p);
    let per = llmsd_engine::kvchunk::layer_bytes(shape, p);
    if bytes.len() != per * shape.n_layers {
        return Err(ChunkError::ByteLength {
            expected: per * shape.n_layers,
            found: bytes.len(),
        });
    }
    for (l, part) in bytes.chunks_exact(per).enumerate() {
        chunk.set_layer(l, part.into())?;
    }
    Ok(chunk)
}

#[cfg(test)]
mod id_tests {
    use super::{format_id, parse_id};

    #[test]
    fn only_the_issued_spelling_of_an_id_parses() {
        let id = 0x00ab_cdef_0123_4567;
        assert_eq!(parse_id(&format_id(id)), Some(id));
        for alias in [
            "ctx-00ABCDEF01234567",
            "ctx-+0abcdef01234567",
            "CTX-00abcdef01234567",
            "ctx-0abcdef01234567",
            "ctx-000abcdef01234567",
            "ctx-../../etc/passwd",
            "ctx-\u{ff10}abcdef0123456",
        ] {
            assert_eq!(parse_id(alias), None, "{alias:?}");
        }
    }
}
