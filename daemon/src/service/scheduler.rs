//! The engine thread: one loop serving every app with continuous batching.
//!
//! Each step runs one batched forward pass holding one decode token of every generating
//! request plus a bounded slice of prompt tokens, so a long prompt delays others' next token
//! by at most one slice. Waiting requests are admitted, and prompt slices handed out, by
//! priority first and then by deficit round robin over apps (by tokens). Cancellation is
//! checked before every step. Context operations run between steps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use llmsd_engine::chat::ChatTemplate;
use llmsd_engine::model::Logits;
use llmsd_engine::sampling::Sampler;
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{
    ApiError, Completion, ContextInfo, ErrorCode, FinishReason, Priority, PromptRequest, Response,
    Timings, TokenLogprob, Usage,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

use super::admin::{self, OwnerScope};
use super::drr::Drr;
use super::energy::EnergyMeter;
use super::generation::{self, Generation, Step};
use super::metrics::Metrics;
use super::quota::{app_of, Charge, QuotaBook, QuotaSlot};
use super::transcript::{Renderer, Transcript, TranscriptStore};
use super::{api_error, ServiceConfig, StreamItem};
use crate::kvstore::{KvStore, Session, SessionStep};

/// Items one request's stream holds before the engine stops running the request: a client
/// that does not read costs at most this much memory per request.
pub const STREAM_CAPACITY: usize = 64;

/// Room a request's stream must have for it to join a step: the step's token, the tail of
/// text held back when it ends at the context limit, and its `Done`. Whatever a step left,
/// a `Failed` (cancel, error) always fits.
const STREAM_HEADROOM: usize = 3;

/// How long the engine waits for commands when every running request is stalled on its
/// client: short, so a client that reads again resumes at once.
const STALL_POLL: Duration = Duration::from_millis(5);

pub(crate) enum Op {
    Create {
        owner: String,
        system: Option<String>,
    },
    List {
        owner: String,
    },
    Get {
        owner: String,
        id: String,
    },
    Delete {
        owner: String,
        id: String,
    },
    Fork {
        owner: String,
        id: String,
    },
    /// A round trip through the engine thread: the watchdog's proof that it is alive.
    Ping,
    /// An app's quota report (the store counts its contexts).
    Quota {
        app: String,
    },
    /// Owners in scope with their totals. → `Response::Apps`
    Apps {
        scope: OwnerScope,
    },
    /// Contexts of the owners in scope. → `Response::OwnedContexts`
    Contexts {
        scope: OwnerScope,
    },
    Chunks {
        owner: String,
        id: String,
    },
    /// → `Response::Evicted`
    Evict {
        owner: String,
        id: String,
    },
    EvictScope {
        scope: OwnerScope,
    },
    /// → `Response::Compacted`
    Compact,
    /// The KV budget in force (memory pressure). → `Response::Ok`
    SetBudget {
        bytes: u64,
    },
    /// A new configured KV budget (reload). → `Response::Ok`
    SetBudgetMax {
        bytes: u64,
    },
}

impl Op {
    /// Whether the operation creates or deletes contexts: its reply waits until that is on
    /// disk.
    fn changes_contexts(&self) -> bool {
        matches!(
            self,
            Op::Create { .. } | Op::Delete { .. } | Op::Fork { .. }
        )
    }
}

pub(crate) enum Command {
    Op(Op, oneshot::Sender<Result<Response, ApiError>>),
    Prompt(Box<PromptJob>),
    Shutdown,
}

pub(crate) struct PromptJob {
    pub request: u64,
    pub owner: String,
    pub priority: Priority,
    pub req: PromptRequest,
    pub events: tmpsc::Sender<StreamItem>,
    pub cancel: Arc<AtomicBool>,
    pub enqueued: Instant,
    /// The app's place in its `max_concurrent`, held (never read) until the job is dropped.
    #[allow(dead_code)]
    pub quota_slot: QuotaSlot,
}

impl PromptJob {
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.events.is_closed()
    }

    /// The client has not read enough of the stream for the request to run another step.
    fn stalled(&self) -> bool {
        self.events.capacity() < STREAM_HEADROOM
    }
}

enum Phase {
    /// Prompt tokens still to run through the model.
    Prefill { pending: VecDeque<u32> },
    /// The last sampled token, the next input.
    Decode { next: u32 },
}

struct Running {
    job: Box<PromptJob>,
    ctx: String,
    /// A one-off call's context, deleted at the end.
    ephemeral: bool,
    session: Option<Session>,
    phase: Phase,
    gen: Generation,
    /// The conversation after this call's input (persistent contexts).
    transcript: Transcript,
    prompt: Vec<u32>,
    cached: usize,
    /// Prompt positions prefilled so far (for prompt log-probabilities).
    prefilled: usize,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    top_logprobs: usize,
    admitted: Instant,
    restore_ms: f64,
    prefill_started: Option<Instant>,
    prefill_ms: f64,
    first_token: Option<Instant>,
    /// Tokens the context may reach: the store's limit or the app's `max_context_tokens`.
    ctx_limit: usize,
    /// Joules charged to this call so far.
    energy_j: f64,
    /// Since when the request's client has been too far behind to run it.
    stalled_since: Option<Instant>,
    /// Prompt positions and generated tokens already charged to the app's tokens window.
    charged_prefilled: usize,
    charged_generated: usize,
}

impl Running {
    fn key(&self) -> (String, String) {
        (self.job.owner.clone(), self.ctx.clone())
    }
}

pub(crate) type Forget = Box<dyn Fn(u64) + Send>;

/// What the engine thread charges work to: the quota book and the energy meter.
pub(crate) struct Accounting {
    pub quotas: Arc<QuotaBook>,
    pub meter: EnergyMeter,
}

pub(crate) struct Scheduler {
    store: KvStore,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    transcripts: Arc<TranscriptStore>,
    cfg: ServiceConfig,
    metrics: Arc<Metrics>,
    /// Removes a finished request from the service's table of cancellable requests.
    forget: Forget,
    waiting: HashMap<String, VecDeque<Box<PromptJob>>>,
    running: Vec<Running>,
    admit_drr: Drr,
    prefill_drr: Drr,
    cost: StepCost,
    shutdown: bool,
    quotas: Arc<QuotaBook>,
    meter: EnergyMeter,
    /// Replies held back until the KV store's writes up to a mark are on disk, oldest first:
    /// a caller hears that a turn (or a new, forked or deleted context) is done only once a
    /// crash can no longer undo it.
    held_replies: VecDeque<(u64, HeldReply)>,
}

/// Sends a reply that was held back.
type HeldReply = Box<dyn FnOnce() + Send>;

/// How often an idle scheduler looks whether held replies' writes are done.
const HELD_REPLY_POLL: Duration = Duration::from_millis(2);

/// What a step costs, to size prompt slices while others decode.
///
/// A decode-only step is modelled as a line in the number of decoders, `fixed + per_decode ·
/// decoders` (the weights are read once, then each token costs about the same), fitted by
/// least squares with exponential forgetting over decode-only steps. A prompt token's cost is
/// what mixed steps took beyond that line, averaged over recent mixed steps and divided by the
/// prompt tokens they carried (ratio of means, so a step slowed by something else counts for
/// its time, not for its time divided by one token). Prompt tokens get dearer as a long prompt
/// advances (each attends over everything prefilled before it), hence the short memory.
///
/// The earlier estimate compared mixed steps with the last decode-only step whatever the
/// number of decoders then, and averaged per-step ratios; during a long prefill that pinned
/// slices at one token, and a 2048-token prompt took 30–54 s beside 8 decoding apps.
#[derive(Debug, Default)]
struct StepCost {
    /// Decode-only steps: weighted means of decoders, seconds, decoders², decoders·seconds,
    /// and the weight so far.
    d: f64,
    s: f64,
    dd: f64,
    ds: f64,
    w: f64,
    /// Mixed steps: seconds beyond the decode line, and prompt tokens carried.
    extra_secs: Option<f64>,
    prompt_tokens: Option<f64>,
}

impl StepCost {
    /// Weight of the newest decode-only step.
    const DECODE_ALPHA: f64 = 0.05;
    /// Weight of the newest mixed step.
    const PROMPT_ALPHA: f64 = 0.2;

    fn observe(&mut self, secs: f64, decoders: usize, prompt: usize) {
        if decoders == 0 || !secs.is_finite() {
            return;
        }
        if prompt == 0 {
            let d = decoders as f64;
            // Until the weights add up to one, average evenly (no bias towards zero).
            self.w = (self.w + 1.0).min(1.0 / Self::DECODE_ALPHA);
            let a = 1.0 / self.w;
            let mix = |m: &mut f64, x: f64| *m += a * (x - *m);
            mix(&mut self.d, d);
            mix(&mut self.s, secs);
            mix(&mut self.dd, d * d);
            mix(&mut self.ds, d * secs);
            return;
        }
        let Some(decode) = self.decode_step(decoders) else {
            return;
        };
        let ema = |v: &mut Option<f64>, x: f64| {
            *v = Some(v.map_or(x, |old| old + Self::PROMPT_ALPHA * (x - old)));
        };
        ema(&mut self.extra_secs, (secs - decode).max(0.0));
        ema(&mut self.prompt_tokens, prompt as f64);
    }

    /// Estimated seconds of a decode-only step with `decoders` decoders.
    fn decode_step(&self, decoders: usize) -> Option<f64> {
        if self.w < 1.0 || self.d <= 0.0 {
            return None;
        }
        let d = decoders as f64;
        let var = self.dd - self.d * self.d;
        if var >= 0.5 {
            let slope = (self.ds - self.d * self.s) / var;
            if slope > 0.0 {
                let fixed = (self.s - slope * self.d).max(0.0);
                return Some(fixed + slope * d);
            }
        }
        // One batch size seen so far: proportional (errs low for fewer decoders).
        Some(self.s * d / self.d)
    }

    /// Extra seconds per prompt token in a mixed step.
    fn per_prompt_token(&self) -> Option<f64> {
        match (self.extra_secs, self.prompt_tokens) {
            (Some(e), Some(k)) if k > 0.0 && e > 0.0 => Some(e / k),
            _ => None,
        }
    }

    /// Prompt tokens a step with `decoders` decode tokens may carry so it costs at most
    /// `(1 + factor)` times a decode-only step.
    fn budget(&self, decoders: usize, factor: f64, max: usize) -> usize {
        match (self.decode_step(decoders), self.per_prompt_token()) {
            (Some(d), Some(c)) => ((factor * d / c) as usize).clamp(1, max),
            // Until measured: a small slice.
            _ => 4.min(max),
        }
    }
}

impl Scheduler {
    pub(crate) fn new(
        store: KvStore,
        tokenizer: Arc<Tokenizer>,
        template: Option<ChatTemplate>,
        cfg: ServiceConfig,
        metrics: Arc<Metrics>,
        accounting: Accounting,
        forget: Forget,
    ) -> Self {
        let Accounting { quotas, meter } = accounting;
        let transcripts = Arc::new(TranscriptStore::new(&store.config().state_dir));
        let quantum = cfg.quantum_tokens as u64;
        let s = Self {
            store,
            tokenizer,
            template,
            transcripts,
            cfg,
            metrics,
            forget,
            waiting: HashMap::new(),
            running: Vec::new(),
            admit_drr: Drr::new(1),
            prefill_drr: Drr::new(quantum),
            cost: StepCost::default(),
            shutdown: false,
            quotas,
            meter,
            held_replies: VecDeque::new(),
        };
        s.update_gauges();
        s
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            self.release_held_replies();
            if self.running.is_empty() && self.waiting_len() == 0 {
                if self.held_replies.is_empty() {
                    match rx.recv() {
                        Ok(c) => self.handle(c),
                        Err(_) => break,
                    }
                } else {
                    match rx.recv_timeout(HELD_REPLY_POLL) {
                        Ok(c) => self.handle(c),
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            if self.shutdown {
                break;
            }
            let t_admit = Instant::now();
            self.reap_cancelled();
            self.reap_stalled();
            self.admit();
            let admit_ms = t_admit.elapsed().as_secs_f64() * 1e3;
            if admit_ms > 1.0 {
                tracing::debug!(admit_ms, "admitted requests");
            }
            if !self.running.is_empty() && !self.step() {
                // Every running request waits on its client: wait for a command instead of
                // spinning, and look again soon.
                match rx.recv_timeout(STALL_POLL) {
                    Ok(c) => self.handle(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        self.stop_all();
    }

    /// Sends `reply` once everything the store has queued so far is written.
    fn reply_when_written(&mut self, reply: HeldReply) {
        let mark = self.store.write_mark();
        if self.held_replies.is_empty() && self.store.is_written(mark) {
            reply();
        } else {
            self.held_replies.push_back((mark, reply));
        }
    }

    /// Sends the held replies whose writes are done (in order: marks only grow).
    fn release_held_replies(&mut self) {
        while let Some((mark, _)) = self.held_replies.front() {
            if !self.store.is_written(*mark) {
                break;
            }
            if let Some((_, reply)) = self.held_replies.pop_front() {
                reply();
            }
        }
    }

    fn waiting_len(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        m.queued.store(self.waiting_len() as u64, Ordering::Relaxed);
    }

    fn update_store_gauges(&self) {
        let st = self.store.stats();
        self.metrics
            .kv_resident_bytes
            .store(st.kv_resident_bytes, Ordering::Relaxed);
        self.metrics
            .contexts
            .store(st.contexts as u64, Ordering::Relaxed);
        let m = &self.metrics;
        m.kv_budget_bytes
            .store(st.kv_budget_bytes, Ordering::Relaxed);
        m.kv_budget_max_bytes
            .store(st.kv_budget_max_bytes, Ordering::Relaxed);
        m.kv_disk_bytes.store(st.kv_disk_bytes, Ordering::Relaxed);
        m.apps
            .store(self.store.apps().len() as u64, Ordering::Relaxed);
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Op(op, reply) => {
                let durable = op.changes_contexts();
                let r = self.op(op);
                if let Err(e) = &r {
                    self.metrics.note_error(e.code);
                }
                if durable && r.is_ok() {
                    self.reply_when_written(Box::new(move || {
                        let _ = reply.send(r);
                    }));
                } else {
                    let _ = reply.send(r);
                }
                self.update_store_gauges();
            }
            Command::Prompt(job) => {
                Metrics::add(&self.metrics.prompts_total, 1);
                self.admit_drr.join(&job.owner);
                self.waiting
                    .entry(job.owner.clone())
                    .or_default()
                    .push_back(job);
            }
            Command::Shutdown => self.shutdown = true,
        }
    }

    fn info(&self, owner: &str, c: crate::kvstore::ContextInfo) -> ContextInfo {
        ContextInfo {
            messages: self.transcripts.load(owner, &c.id).messages() as u64,
            energy_j: self.quotas.context_energy(owner, &c.id),
            id: c.id,
            tokens: c.tokens as u64,
            resident_bytes: c.resident_bytes,
            disk_bytes: c.disk_bytes,
            created_unix: c.created_unix,
            last_use_unix: c.last_use_unix,
        }
    }

    /// Persistent contexts of `app` under every owner (one-off calls' contexts excluded).
    fn app_contexts(&self, app: &str) -> usize {
        let ephemeral = self
            .running
            .iter()
            .filter(|r| r.ephemeral && app_of(&r.job.owner) == app)
            .count();
        let held: usize = self
            .store
            .apps()
            .iter()
            .filter(|o| app_of(o) == app)
            .map(|o| self.store.list(o).len())
            .sum();
        held.saturating_sub(ephemeral)
    }

    fn in_use(&self, owner: &str, id: &str) -> bool {
        self.running
            .iter()
            .any(|r| r.job.owner == owner && r.ctx == id)
    }

    fn op(&mut self, op: Op) -> Result<Response, ApiError> {
        match op {
            Op::Create { owner, system } => {
                let app = app_of(&owner);
                self.quotas.check_contexts(app, || self.app_contexts(app))?;
                let id = self.store.create_context(&owner, &[]).map_err(api_error)?;
                if let Some(system) = system {
                    let t = Transcript::Chat {
                        messages: vec![llmsd_ipc::ChatMessage::new("system", system)],
                    };
                    if let Err(e) = self.transcripts.save(&owner, &id, &t) {
                        let _ = self.store.delete(&owner, &id);
                        return Err(ApiError::internal(format!("saving the transcript: {e}")));
                    }
                }
                let c = self.store.info(&owner, &id).map_err(api_error)?;
                Ok(Response::Context(self.info(&owner, c)))
            }
            Op::List { owner } => {
                let list = self.store.list(&owner);
                Ok(Response::Contexts(
                    list.into_iter().map(|c| self.info(&owner, c)).collect(),
                ))
            }
            Op::Get { owner, id } => {
                let c = self.store.info(&owner, &id).map_err(api_error)?;
                Ok(Response::Context(self.info(&owner, c)))
            }
            Op::Delete { owner, id } => {
                if self.in_use(&owner, &id) {
                    return Err(ApiError::invalid(format!(
                        "context {id} is in use by a running prompt; cancel it first"
                    )));
                }
                self.store.delete(&owner, &id).map_err(api_error)?;
                self.store
                    .submit_write(self.transcripts.delete_later(&owner, &id));
                self.quotas.forget_context(&owner, &id);
                Ok(Response::Ok)
            }
            Op::Fork { owner, id } => {
                let app = app_of(&owner);
                self.quotas.check_contexts(app, || self.app_contexts(app))?;
                let new = self.store.fork(&owner, &id).map_err(api_error)?;
                let t = self.transcripts.load(&owner, &id);
                if t != Transcript::Empty {
                    if let Err(e) = self.transcripts.save(&owner, &new, &t) {
                        let _ = self.store.delete(&owner, &new);
                        return Err(ApiError::internal(format!("saving the transcript: {e}")));
                    }
                }
                let c = self.store.info(&owner, &new).map_err(api_error)?;
                Ok(Response::Context(self.info(&owner, c)))
            }
            Op::Ping => Ok(Response::Ok),
            Op::Quota { app } => {
                let held = self.app_contexts(&app) as u64;
                Ok(Response::Quota(Box::new(self.quotas.report(&app, held))))
            }
            Op::Apps { scope } => Ok(Response::Apps(self.apps(&scope))),
            Op::Contexts { scope } => {
                let mut out = Vec::new();
                for owner in self.owners(&scope) {
                    for c in self.store.list(&owner) {
                        out.push(llmsd_ipc::OwnedContext {
                            owner: owner.clone(),
                            context: self.info(&owner, c),
                        });
                    }
                }
                Ok(Response::OwnedContexts(out))
            }
            Op::Chunks { owner, id } => {
                let chunks = self.store.chunks(&owner, &id).map_err(api_error)?;
                Ok(Response::Chunks(
                    chunks.into_iter().map(admin::chunk_info).collect(),
                ))
            }
            Op::Evict { owner, id } => {
                let mut report = llmsd_ipc::EvictReport::default();
                self.store.info(&owner, &id).map_err(api_error)?;
                self.evict(&owner, &id, &mut report)?;
                Ok(Response::Evicted(report))
            }
            Op::EvictScope { scope } => {
                let mut report = llmsd_ipc::EvictReport::default();
                for owner in self.owners(&scope) {
                    for c in self.store.list(&owner) {
                        self.evict(&owner, &c.id, &mut report)?;
                    }
                }
                Ok(Response::Evicted(report))
            }
            Op::Compact => {
                let st = self.store.compact().map_err(api_error)?;
                let after = self.store.stats();
                Ok(Response::Compacted(llmsd_ipc::CompactReport {
                    requantized_chunks: st.requantized_chunks,
                    evicted_contexts: st.evicted_contexts,
                    freed_bytes: st.freed_bytes,
                    files_removed: st.files_removed,
                    kv_resident_bytes: after.kv_resident_bytes,
                    kv_disk_bytes: after.kv_disk_bytes,
                }))
            }
            Op::SetBudget { bytes } => {
                self.store.set_budget(bytes).map_err(api_error)?;
                Ok(Response::Ok)
            }
            Op::SetBudgetMax { bytes } => {
                self.store.set_configured_budget(bytes).map_err(api_error)?;
                Ok(Response::Ok)
            }
        }
    }

    /// The store's owners in `scope`, and those with prompts in flight.
    fn owners(&self, scope: &OwnerScope) -> Vec<String> {
        let mut owners: Vec<String> = self
            .store
            .apps()
            .into_iter()
            .chain(self.running.iter().map(|r| r.job.owner.clone()))
            .chain(self.waiting.keys().cloned())
            .filter(|o| scope.matches(o))
            .collect();
        owners.sort();
        owners.dedup();
        owners
    }

    fn apps(&self, scope: &OwnerScope) -> Vec<llmsd_ipc::AppInfo> {
        self.owners(scope)
            .into_iter()
            .map(|owner| {
                let mut a = admin::app_info(&owner);
                for c in self.store.list(&owner) {
                    a.contexts += 1;
                    a.tokens += c.tokens as u64;
                    a.resident_bytes += c.resident_bytes;
                    a.disk_bytes += c.disk_bytes;
                    a.last_use_unix = a.last_use_unix.max(c.last_use_unix);
                }
                a.running = self.running.iter().filter(|r| r.job.owner == owner).count() as u64;
                a.queued = self.waiting.get(&owner).map_or(0, |q| q.len() as u64);
                a
            })
            .collect()
    }

    /// Drops a context's resident KV (on disk already, or recomputable from its tokens); a
    /// context a running prompt holds is noted and left.
    fn evict(
        &mut self,
        owner: &str,
        id: &str,
        report: &mut llmsd_ipc::EvictReport,
    ) -> Result<(), ApiError> {
        if self.in_use(owner, id) || self.store.in_use(owner, id) {
            report.in_use.push(id.to_string());
            return Ok(());
        }
        let before = self.store.resident_bytes();
        self.store.evict_context(owner, id).map_err(api_error)?;
        let after = self.store.resident_bytes();
        report.contexts += 1;
        report.freed_bytes += before.saturating_sub(after);
        Ok(())
    }

    fn fail_job(&self, job: &PromptJob, e: ApiError) {
        self.metrics.note_error(e.code);
        let _ = job.events.try_send(StreamItem::Failed(e));
        (self.forget)(job.request);
    }

    /// Drops cancelled requests, waiting or running; a running one's context is left as it
    /// was before the call.
    fn reap_cancelled(&mut self) {
        let mut cancelled = Vec::new();
        for q in self.waiting.values_mut() {
            let mut keep = VecDeque::new();
            while let Some(j) = q.pop_front() {
                if j.cancelled() {
                    cancelled.push(j);
                } else {
                    keep.push_back(j);
                }
            }
            *q = keep;
        }
        for j in cancelled {
            self.fail_job(&j, ApiError::cancelled());
        }
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.cancelled() {
                let r = self.running.swap_remove(i);
                self.abort(r, ApiError::cancelled());
            } else {
                i += 1;
            }
        }
        self.update_gauges();
    }

    /// Cancels running requests whose client has not read their stream for the slow-client
    /// timeout: their contexts are left as before the call. The engine never waits on a
    /// client; a stalled request only sits out steps until then.
    fn reap_stalled(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.slow_client_timeout;
        let mut i = 0;
        while i < self.running.len() {
            let r = &mut self.running[i];
            if !r.job.stalled() {
                r.stalled_since = None;
                i += 1;
                continue;
            }
            let since = *r.stalled_since.get_or_insert(now);
            if now - since < timeout {
                i += 1;
                continue;
            }
            let r = self.running.swap_remove(i);
            tracing::warn!(
                owner = r.job.owner,
                request = r.job.request,
                timeout_ms = timeout.as_millis() as u64,
                "cancelling a request whose client does not read its stream"
            );
            Metrics::add(&self.metrics.slow_client_cancels_total, 1);
            let e = ApiError::new(
                ErrorCode::Cancelled,
                format!(
                    "cancelled: the client did not read its stream for {} ms",
                    timeout.as_millis()
                ),
            );
            self.abort(r, e);
        }
        self.update_gauges();
    }

    /// Moves waiting requests into the running set: foreground first, background last, and
    /// round robin between apps within a priority.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_running {
            let busy: HashSet<(String, String)> = self.running.iter().map(Running::key).collect();
            let runnable = |j: &PromptJob| match &j.req.context {
                Some(c) => !busy.contains(&(j.owner.clone(), c.clone())),
                None => true,
            };
            // The best priority among requests that can start now.
            let Some(top) = self
                .waiting
                .values()
                .flat_map(|q| q.iter())
                .filter(|j| runnable(j))
                .map(|j| j.priority)
                .max()
            else {
                break;
            };
            let has = |owner: &str| {
                self.waiting
                    .get(owner)
                    .is_some_and(|q| q.iter().any(|j| j.priority == top && runnable(j)))
            };
            let Some(owner) = self.admit_drr.pick(has, |_| 1) else {
                break;
            };
            let Some(q) = self.waiting.get_mut(&owner) else {
                break;
            };
            let Some(pos) = q.iter().position(|j| j.priority == top && runnable(j)) else {
                break;
            };
            let Some(job) = q.remove(pos) else { break };
            if q.is_empty() {
                self.waiting.remove(&owner);
            }
            // Restoring a context (load, recompute) is charged to the call that needs it.
            let e0 = self.meter.read();
            let started = self.start(job);
            let spent = self.meter.read() - e0;
            let (owner, ctx) = match &started {
                Ok(r) => (&r.job.owner, (!r.ephemeral).then_some(r.ctx.as_str())),
                Err((job, _)) => (&job.owner, None),
            };
            self.quotas.record(
                &[Charge {
                    owner,
                    context: ctx,
                    tokens: 0,
                    joules: spent,
                }],
                spent,
            );
            match started {
                Ok(mut r) => {
                    r.energy_j += spent;
                    self.prefill_drr.join(&r.job.owner);
                    self.running.push(r);
                }
                // The KV budget is held by running calls: wait for one to end (at the head
                // of its app's queue) rather than refuse what will fit then.
                Err((job, e)) if e.code == ErrorCode::Busy && !self.running.is_empty() => {
                    self.waiting
                        .entry(job.owner.clone())
                        .or_default()
                        .push_front(job);
                    break;
                }
                Err((job, e)) => self.fail_job(&job, e),
            }
        }
        // Apps with nothing left leave the admission ring.
        let idle: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, q)| q.is_empty())
            .map(|(o, _)| o.clone())
            .collect();
        for o in idle {
            self.waiting.remove(&o);
        }
        self.update_gauges();
    }

    /// Resolves a request's tokens against its context and makes the context resident.
    #[allow(clippy::result_large_err)]
    fn start(&mut self, job: Box<PromptJob>) -> Result<Running, (Box<PromptJob>, ApiError)> {
        let admitted = Instant::now();
        let owner = job.owner.clone();
        let renderer = Renderer {
            tokenizer: &self.tokenizer,
            template: self.template.as_ref(),
        };
        let (ctx, ephemeral, transcript) = match &job.req.context {
            Some(id) => {
                if let Err(e) = self.store.info(&owner, id) {
                    return Err((job, api_error(e)));
                }
                let t = match self.transcripts.load(&owner, id).extended(&job.req.input) {
                    Ok(t) => t,
                    Err(e) => return Err((job, e)),
                };
                (id.clone(), false, t)
            }
            None => {
                let t = match Transcript::Empty.extended(&job.req.input) {
                    Ok(t) => t,
                    Err(e) => return Err((job, e)),
                };
                match self.store.create_context(&owner, &[]) {
                    Ok(id) => (id, true, t),
                    Err(e) => return Err((job, api_error(e))),
                }
            }
        };
        let cleanup = |s: &mut Self| {
            if ephemeral {
                let _ = s.store.delete(&owner, &ctx);
            }
        };
        let prompt = match renderer.tokens(&transcript) {
            Ok(p) => p,
            Err(e) => {
                cleanup(self);
                return Err((job, e));
            }
        };
        let max_ctx = self.store.config().max_context_tokens;
        if prompt.len() >= max_ctx {
            cleanup(self);
            let e = ApiError::new(
                ErrorCode::ContextWindowExceeded,
                format!(
                    "the prompt has {} tokens; the context limit is {max_ctx}",
                    prompt.len()
                ),
            );
            return Err((job, e));
        }
        let max_ctx = match self.quotas.context_limit(app_of(&owner)) {
            Some(limit) if prompt.len() >= limit => {
                cleanup(self);
                let e = self
                    .quotas
                    .refuse_context_tokens(app_of(&owner), prompt.len(), limit);
                return Err((job, e));
            }
            Some(limit) => limit.min(max_ctx),
            None => max_ctx,
        };
        if prompt.is_empty() {
            cleanup(self);
            return Err((job, ApiError::invalid("the prompt has no tokens")));
        }
        // Keep what the context already holds of this prompt; at least one token is run to
        // get logits, and prompt log-probabilities need every position run.
        let held = match self.store.tokens(&owner, &ctx) {
            Ok(t) => t.to_vec(),
            Err(e) => {
                cleanup(self);
                return Err((job, api_error(e)));
            }
        };
        let mut cached = held
            .iter()
            .zip(&prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        if job.req.params.prompt_logprobs {
            cached = 0;
        }
        if cached < held.len() {
            if let Err(e) = self.store.truncate(&owner, &ctx, cached) {
                cleanup(self);
                return Err((job, api_error(e)));
            }
        }
        let room = max_ctx - prompt.len();
        let reserve = prompt.len() - cached + (job.req.params.max_tokens as usize).min(room);
        let t0 = Instant::now();
        let session = match self.store.open_session(&owner, &ctx, reserve) {
            Ok(s) => s,
            Err(e) => {
                cleanup(self);
                return Err((job, api_error(e)));
            }
        };
        let restore_ms = t0.elapsed().as_secs_f64() * 1e3;
        Metrics::add(&self.metrics.restore_us_total, (restore_ms * 1e3) as u64);
        let gen = match Generation::new(&job.req.params, &prompt) {
            Ok(g) => g,
            Err(e) => {
                self.store.abort_session(session);
                cleanup(self);
                return Err((job, e));
            }
        };
        let prompt_logprobs = job.req.params.prompt_logprobs.then(|| vec![None]);
        let top_logprobs = job.req.params.logprobs.unwrap_or(0) as usize;
        Ok(Running {
            ctx,
            ephemeral,
            session: Some(session),
            phase: Phase::Prefill {
                pending: prompt[cached..].iter().copied().collect(),
            },
            gen,
            transcript,
            prompt,
            cached,
            prefilled: cached,
            prompt_logprobs,
            top_logprobs,
            admitted,
            restore_ms,
            prefill_started: None,
            prefill_ms: 0.0,
            first_token: None,
            ctx_limit: max_ctx,
            energy_j: 0.0,
            stalled_since: None,
            charged_prefilled: cached,
            charged_generated: 0,
            job,
        })
    }

    /// One batched forward pass and what follows from it; false when no request could run
    /// (all stalled on their clients).
    fn step(&mut self) -> bool {
        let t0 = Instant::now();
        let e0 = self.meter.read();
        let n = self.running.len();
        let prefilling = |r: &Running| matches!(r.phase, Phase::Prefill { .. });
        let fg_prefill = self
            .running
            .iter()
            .any(|r| prefilling(r) && r.job.priority > Priority::Background);
        // Decoders: everyone past the prompt whose client keeps up; background work yields to
        // others' prompts.
        let mut plan: Vec<(usize, Vec<u32>, Logits)> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if let Phase::Decode { next } = r.phase {
                if r.job.stalled() || (r.job.priority == Priority::Background && fg_prefill) {
                    continue;
                }
                plan.push((i, vec![next], Logits::Last));
            }
        }
        let decoders = plan.len();
        let mut budget = if decoders == 0 {
            self.cfg.alone_prefill_tokens
        } else {
            self.cost.budget(
                decoders,
                self.cfg.prefill_latency_factor,
                self.cfg.step_prefill_tokens,
            )
        };
        let full_budget = budget;
        // Prompt slices: best priority first, DRR by tokens between apps.
        let mut taken: HashSet<usize> = HashSet::new();
        while budget > 0 {
            let candidates: Vec<usize> = (0..n)
                .filter(|&i| {
                    let r = &self.running[i];
                    prefilling(r) && !r.job.stalled() && !taken.contains(&i)
                })
                .collect();
            let Some(top) = candidates
                .iter()
                .map(|&i| self.running[i].job.priority)
                .max()
            else {
                break;
            };
            if top == Priority::Background && fg_prefill {
                break;
            }
            let pending_of = |i: usize| match &self.running[i].phase {
                Phase::Prefill { pending } => pending.len(),
                Phase::Decode { .. } => 0,
            };
            let first_of = |owner: &str| {
                candidates.iter().copied().find(|&i| {
                    self.running[i].job.owner == owner && self.running[i].job.priority == top
                })
            };
            let Some(owner) = self.prefill_drr.pick(
                |o| first_of(o).is_some(),
                |o| first_of(o).map_or(1, |i| pending_of(i).min(budget) as u64),
            ) else {
                break;
            };
            let Some(i) = first_of(&owner) else { break };
            let k = pending_of(i).min(budget);
            let r = &mut self.running[i];
            let Phase::Prefill { pending } = &mut r.phase else {
                break;
            };
            let tokens: Vec<u32> = pending.iter().take(k).copied().collect();
            let last = k == pending.len();
            let logits = if r.prompt_logprobs.is_some() {
                Logits::All
            } else if last {
                Logits::Last
            } else {
                Logits::None
            };
            r.prefill_started.get_or_insert(t0);
            plan.push((i, tokens, logits));
            taken.insert(i);
            budget -= k;
        }
        if plan.is_empty() {
            return false;
        }
        // Check the sessions out of their requests for the batched call.
        let mut sessions: Vec<Session> = Vec::with_capacity(plan.len());
        for (i, _, _) in &plan {
            match self.running[*i].session.take() {
                Some(s) => sessions.push(s),
                None => {
                    // Cannot happen: every running request holds its session.
                    tracing::error!("running request without a session");
                    return true;
                }
            }
        }
        let t_forward = Instant::now();
        let result = {
            let mut steps: Vec<SessionStep<'_>> = sessions
                .iter_mut()
                .zip(&plan)
                .map(|(s, (_, tokens, logits))| SessionStep {
                    session: s,
                    tokens,
                    logits: *logits,
                })
                .collect();
            self.store.forward_sessions(&mut steps)
        };
        for ((i, _, _), s) in plan.iter().zip(sessions) {
            self.running[*i].session = Some(s);
        }
        Metrics::add(&self.metrics.engine_steps_total, 1);
        let forward_ms = t_forward.elapsed().as_secs_f64() * 1e3;
        let prompt_tokens = full_budget - budget;
        self.cost
            .observe(t0.elapsed().as_secs_f64(), decoders, prompt_tokens);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // A failed step leaves these requests' caches unusable: end them, contexts
                // as they were.
                let e = api_error(e);
                // Measured, but charged to no app: the calls end without a result.
                let spent = self.meter.read() - e0;
                self.quotas.record(&[], spent);
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in idx {
                    let r = self.running.swap_remove(i);
                    self.abort(r, e.clone());
                }
                self.update_gauges();
                return true;
            }
        };
        let vocab = self.store.model().config.vocab_size;
        let mut offset = 0;
        let mut done: Vec<(usize, FinishReason)> = Vec::new();
        for (i, tokens, kind) in &plan {
            let rows = match kind {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => tokens.len(),
            };
            let mut block = logits[offset..offset + rows * vocab].to_vec();
            offset += rows * vocab;
            let r = &mut self.running[*i];
            let ended = match &mut r.phase {
                Phase::Prefill { pending } => {
                    pending.drain(..tokens.len());
                    let finished = pending.is_empty();
                    if let Some(pl) = &mut r.prompt_logprobs {
                        // Row j predicts prompt position prefilled + j + 1.
                        for j in 0..rows {
                            let pos = r.prefilled + j + 1;
                            if let Some(&want) = r.prompt.get(pos) {
                                let row = &block[j * vocab..(j + 1) * vocab];
                                let (lp, top) = Sampler::logprobs(row, want, r.top_logprobs);
                                pl.push(Some(generation::token_logprob(
                                    &self.tokenizer,
                                    want,
                                    lp,
                                    &top,
                                )));
                            }
                        }
                    }
                    r.prefilled += tokens.len();
                    Metrics::add(&self.metrics.prefilled_tokens_total, tokens.len() as u64);
                    if finished {
                        r.prefill_ms = r
                            .prefill_started
                            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
                        let last = block.len().saturating_sub(vocab);
                        let limit = r.ctx_limit;
                        Self::sample(r, &mut block[last..], &self.tokenizer, limit)
                    } else {
                        None
                    }
                }
                Phase::Decode { .. } => {
                    let limit = r.ctx_limit;
                    Self::sample(r, &mut block, &self.tokenizer, limit)
                }
            };
            if let Some(reason) = ended {
                done.push((*i, reason));
            }
        }
        let busy_us = t0.elapsed().as_micros() as u64;
        Metrics::add(&self.metrics.engine_busy_us_total, busy_us);
        let spent = self.meter.read() - e0;
        self.charge_step(&plan, spent);
        let t_finish = Instant::now();
        let finished = done.len();
        // Finish from the back so indices stay valid.
        done.sort_unstable_by_key(|d| std::cmp::Reverse(d.0));
        for (i, reason) in done {
            let r = self.running.swap_remove(i);
            self.finish(r, reason);
        }
        self.update_gauges();
        tracing::debug!(
            decoders,
            prompt_tokens,
            budget = full_budget,
            forward_ms,
            finish_ms = t_finish.elapsed().as_secs_f64() * 1e3,
            finished,
            step_ms = t0.elapsed().as_secs_f64() * 1e3,
            "engine step"
        );
        true
    }

    /// Samples from one request's logits row; returns how it ended, if it did.
    fn sample(
        r: &mut Running,
        row: &mut [f32],
        tok: &Tokenizer,
        max_ctx: usize,
    ) -> Option<FinishReason> {
        if r.first_token.is_none() {
            r.first_token = Some(Instant::now());
        }
        let step = r.gen.step(row, tok);
        let (event, reason) = match step {
            Step::Token(ev) => {
                r.phase = Phase::Decode { next: ev.token_id };
                (Some(ev), None)
            }
            Step::Finish(ev, reason) => (ev, Some(reason)),
        };
        if let Some(ev) = event {
            if r.job.req.stream {
                let _ = r.job.events.try_send(StreamItem::Token(ev));
            }
        }
        if reason.is_some() {
            return reason;
        }
        // The next input must fit in the context.
        let len = r.session.as_ref().map_or(0, Session::len);
        if len + 1 > max_ctx {
            let tail = r.gen.finish_early();
            if !tail.is_empty() && r.job.req.stream {
                let _ = r
                    .job
                    .events
                    .try_send(StreamItem::Token(llmsd_ipc::TokenEvent {
                        index: r.gen.generated.len() as u32,
                        token_id: tok.eos_id().unwrap_or(0),
                        text: tail,
                        logprob: None,
                    }));
            }
            return Some(FinishReason::Length);
        }
        None
    }

    /// Ends a request that completed: its context keeps the call (saved ahead of time), the
    /// conversation takes the reply, and the caller gets the completion.
    fn finish(&mut self, mut r: Running, reason: FinishReason) {
        let Some(session) = r.session.take() else {
            return;
        };
        let owner = r.job.owner.clone();
        let e0 = self.meter.read();
        if r.ephemeral {
            self.store.abort_session(session);
            let _ = self.store.delete(&owner, &r.ctx);
        } else {
            let t_close = Instant::now();
            let closed = self.store.close_session(session);
            let close_ms = t_close.elapsed().as_secs_f64() * 1e3;
            // Saving the context's changed chunks ahead of time is the call's cost too.
            let spent = self.meter.read() - e0;
            r.energy_j += spent;
            self.quotas.record(
                &[Charge {
                    owner: &owner,
                    context: Some(&r.ctx),
                    tokens: 0,
                    joules: spent,
                }],
                spent,
            );
            if let Err(e) = closed {
                let e = api_error(e);
                self.fail_job(&r.job, e);
                return;
            }
            // Written on the I/O thread after the context's chunks, before the reply goes
            // out (`reply_when_written` below); a lost transcript would only cost a recompute
            // of the next turn.
            let t = std::mem::take(&mut r.transcript).with_reply(&r.gen.text);
            self.store
                .submit_write(self.transcripts.save_later(&owner, &r.ctx, t));
            tracing::debug!(close_ms, "closed a call");
        }
        let now = Instant::now();
        let first = r.first_token.unwrap_or(now);
        let generated = r.gen.generated.len() as u64;
        let decode_s = (now - first).as_secs_f64();
        let timings = Timings {
            queued_ms: (r.admitted - r.job.enqueued).as_secs_f64() * 1e3,
            restore_ms: r.restore_ms,
            prefilled_tokens: (r.prompt.len() - r.cached) as u64,
            prefill_ms: r.prefill_ms,
            first_token_ms: (first - r.admitted).as_secs_f64() * 1e3,
            decode_ms: decode_s * 1e3,
            decode_tok_s: if generated > 1 && decode_s > 0.0 {
                (generated - 1) as f64 / decode_s
            } else {
                0.0
            },
        };
        let usage = Usage {
            prompt_tokens: r.prompt.len() as u64,
            cached_tokens: r.cached as u64,
            completion_tokens: generated,
            total_tokens: r.prompt.len() as u64 + generated,
            energy_j: r.energy_j,
        };
        let m = &self.metrics;
        Metrics::add(&m.completed_total, 1);
        Metrics::add(&m.prompt_tokens_total, usage.prompt_tokens);
        Metrics::add(&m.cached_tokens_total, usage.cached_tokens);
        Metrics::add(&m.generated_tokens_total, generated);
        let completion = Completion {
            context: (!r.ephemeral).then(|| r.ctx.clone()),
            text: std::mem::take(&mut r.gen.text),
            finish_reason: reason,
            usage,
            timings,
            logprobs: r
                .job
                .req
                .params
                .logprobs
                .map(|_| std::mem::take(&mut r.gen.logprobs)),
            prompt_logprobs: r.prompt_logprobs.take(),
        };
        let events = r.job.events.clone();
        let done = StreamItem::Done(Box::new(completion));
        if r.ephemeral {
            let _ = events.try_send(done);
        } else {
            self.reply_when_written(Box::new(move || {
                let _ = events.try_send(done);
            }));
        }
        (self.forget)(r.job.request);
        self.update_store_gauges();
        self.quotas.flush(false);
    }

    /// Splits a step's energy among its requests by the tokens each ran through the model,
    /// so what the apps are charged adds up to what was measured; charges each app the
    /// prompt tokens prefilled and the tokens generated since the last charge.
    fn charge_step(&mut self, plan: &[(usize, Vec<u32>, Logits)], spent: f64) {
        let ran: usize = plan.iter().map(|(_, t, _)| t.len()).sum();
        let mut shares: Vec<(usize, u64, f64)> = Vec::with_capacity(plan.len());
        for (i, tokens, _) in plan {
            let Some(r) = self.running.get_mut(*i) else {
                continue;
            };
            let joules = if ran > 0 {
                spent * tokens.len() as f64 / ran as f64
            } else {
                0.0
            };
            let counted =
                (r.prefilled - r.charged_prefilled) + (r.gen.generated.len() - r.charged_generated);
            r.charged_prefilled = r.prefilled;
            r.charged_generated = r.gen.generated.len();
            r.energy_j += joules;
            shares.push((*i, counted as u64, joules));
        }
        let charges: Vec<Charge<'_>> = shares
            .iter()
            .map(|&(i, tokens, joules)| {
                let r = &self.running[i];
                Charge {
                    owner: &r.job.owner,
                    context: (!r.ephemeral).then_some(r.ctx.as_str()),
                    tokens,
                    joules,
                }
            })
            .collect();
        self.quotas.record(&charges, spent);
    }

    /// Ends a request without keeping anything of the call.
    fn abort(&mut self, mut r: Running, e: ApiError) {
        if let Some(s) = r.session.take() {
            self.store.abort_session(s);
        }
        if r.ephemeral {
            let _ = self.store.delete(&r.job.owner, &r.ctx);
        }
        self.fail_job(&r.job, e);
    }

    /// Shutdown: running calls end without changing their contexts; queued ones are refused.
    fn stop_all(&mut self) {
        let e = ApiError::new(ErrorCode::ModelUnavailable, "the daemon is shutting down");
        for r in std::mem::take(&mut self.running) {
            self.abort(r, e.clone());
        }
        for (_, q) in std::mem::take(&mut self.waiting) {
            for j in q {
                self.fail_job(&j, e.clone());
            }
        }
        self.store.flush();
        self.release_held_replies();
        self.quotas.flush(true);
        self.update_gauges();
    }
}

#[cfg(test)]
mod step_cost_tests {
    use super::StepCost;

    /// 5 ms a step, 1.5 ms a decode token, 6 ms a prompt token.
    fn cost(d: usize, p: usize) -> f64 {
        0.005 + 0.0015 * d as f64 + 0.006 * p as f64
    }

    #[test]
    fn decode_line_and_prompt_cost_are_recovered() {
        let mut c = StepCost::default();
        assert_eq!(c.budget(8, 1.0, 64), 4);
        for d in (1..=8).cycle().take(100) {
            c.observe(cost(d, 0), d, 0);
        }
        let est = c.decode_step(8).unwrap();
        assert!((est - cost(8, 0)).abs() < 1e-9, "{est}");
        // Mixed steps at other batch sizes than the decode-only ones seen.
        for i in 0..50 {
            let (d, p) = (3 + i % 4, 1 + i % 3);
            c.observe(cost(d, p), d, p);
        }
        let per = c.per_prompt_token().unwrap();
        assert!((per - 0.006).abs() < 1e-9, "{per}");
        // 8 decoders cost 17 ms: another 17 ms buys 2 prompt tokens.
        assert_eq!(c.budget(8, 1.0, 64), 2);
        assert_eq!(c.budget(8, 4.0, 64), 11);
        assert_eq!(c.budget(8, 4.0, 6), 6);
        assert_eq!(c.budget(1, 0.1, 64), 1);
    }

    #[test]
    fn one_slow_mixed_step_does_not_collapse_the_slice() {
        let mut c = StepCost::default();
        for d in (1..=8).cycle().take(100) {
            c.observe(cost(d, 0), d, 0);
        }
        for _ in 0..30 {
            c.observe(cost(8, 4), 8, 4);
        }
        let before = c.budget(8, 2.0, 64);
        assert_eq!(before, 5);
        // A step held up by something else (a call closing) with one prompt token.
        c.observe(cost(8, 1) + 0.04, 8, 1);
        let after = c.budget(8, 2.0, 64);
        assert!(after * 2 >= before, "{before} -> {after}");
    }

    #[test]
    fn prompt_tokens_growing_dearer_shrink_the_slice() {
        let mut c = StepCost::default();
        for _ in 0..50 {
            c.observe(0.020, 8, 0);
        }
        // One batch size: proportional.
        assert!((c.decode_step(4).unwrap() - 0.010).abs() < 1e-9);
        for _ in 0..30 {
            c.observe(0.020 + 4.0 * 0.002, 8, 4);
        }
        let cheap = c.budget(8, 1.0, 64);
        for _ in 0..30 {
            c.observe(0.020 + 4.0 * 0.008, 8, 4);
        }
        let dear = c.budget(8, 1.0, 64);
        assert_eq!((cheap, dear), (10, 2));
    }
}
