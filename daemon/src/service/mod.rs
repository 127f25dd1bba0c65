//! The service: the one API all three doors call (socket, D-Bus, HTTP).
//!
//! [`Service`] validates a call, scopes it to the caller's app and hands it to the engine
//! thread ([`scheduler`]), which owns the model, the KV store and every context; results come
//! back through channels. Nothing here blocks a tokio worker on inference.

pub mod admin;
pub mod drr;
pub mod energy;
pub mod generation;
pub mod identity;
pub mod json_constraint;
pub mod metrics;
pub mod quota;
pub mod scheduler;
pub mod transcript;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use llmsd_engine::chat::ChatTemplate;
use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{
    ApiError, Completion, ContextInfo, CreateContext, ErrorCode, Health, ModelInfo, Priority,
    PromptRequest, QuotaReport, QuotaSet, Response, TokenEvent, TokenizeRequest,
};
use tokio::sync::{mpsc as tmpsc, oneshot};

pub use identity::Caller;
pub use metrics::Metrics;

use crate::kvstore::{KvStore, StoreConfig, StoreError};
use scheduler::{Command, Op, PromptJob};

/// Tuning of the scheduler and the queue.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Requests generating at once (their decode steps are batched).
    pub max_running: usize,
    /// Requests waiting beyond the running ones before callers get `Busy`.
    pub max_queued: usize,
    /// Most prompt tokens prefilled per step while others decode.
    pub step_prefill_tokens: usize,
    /// While others decode, a step's prompt slice may cost at most this many times a
    /// decode-only step (measured as it runs): with 1.0, a long prompt at most doubles the
    /// others' inter-token latency. 0.7 by default: with 1.0 the host's scatter put the worst
    /// app's p99 above 3× its median in most serving runs (README, Serving benchmark).
    pub prefill_latency_factor: f64,
    /// Prompt tokens per step when nothing else is decoding.
    pub alone_prefill_tokens: usize,
    /// DRR quantum, in tokens.
    pub quantum_tokens: usize,
    /// Apps the owner marked (by app name, any uid or door).
    pub app_priority: HashMap<String, Priority>,
    /// Largest prompt text accepted, in bytes.
    pub max_prompt_bytes: usize,
    /// Who may use admin verbs.
    pub admin: identity::AdminPolicy,
    /// Quota defaults per app and how energy is measured.
    pub quota: quota::QuotaConfig,
    /// How long a streaming request may wait on a client that does not read before it is
    /// cancelled (its context left as before the request).
    pub slow_client_timeout: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_queued: 64,
            step_prefill_tokens: 64,
            prefill_latency_factor: 0.7,
            alone_prefill_tokens: 256,
            quantum_tokens: 64,
            app_priority: HashMap::new(),
            max_prompt_bytes: 1 << 20,
            admin: identity::AdminPolicy::default(),
            quota: quota::QuotaConfig::default(),
            slow_client_timeout: DEFAULT_SLOW_CLIENT_TIMEOUT,
        }
    }
}

/// [`ServiceConfig::slow_client_timeout`] by default.
pub const DEFAULT_SLOW_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a running prompt sends back.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamItem {
    Token(TokenEvent),
    Done(Box<Completion>),
    Failed(ApiError),
}

/// The receiving end of one prompt. Dropping it cancels the prompt (the caller is gone).
/// It holds at most [`scheduler::STREAM_CAPACITY`] items: the engine does not run a request
/// whose consumer is that far behind.
pub struct PromptStream {
    pub request: u64,
    rx: tmpsc::Receiver<StreamItem>,
    cancel: Arc<AtomicBool>,
}

impl PromptStream {
    /// The next token, then exactly one `Done` or `Failed`; `None` after that.
    pub async fn next(&mut self) -> Option<StreamItem> {
        self.rx.recv().await
    }

    /// Collects the whole completion (tokens are dropped).
    pub async fn completion(mut self) -> Result<Completion, ApiError> {
        while let Some(item) = self.next().await {
            match item {
                StreamItem::Token(_) => {}
                StreamItem::Done(c) => return Ok(*c),
                StreamItem::Failed(e) => return Err(e),
            }
        }
        Err(ApiError::internal("the engine dropped the request"))
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl Drop for PromptStream {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

struct RequestEntry {
    owner: String,
    cancel: Arc<AtomicBool>,
}

struct Inner {
    tx: mpsc::SyncSender<Command>,
    tokenizer: Arc<Tokenizer>,
    model_info: ModelInfo,
    cfg: ServiceConfig,
    next_request: AtomicU64,
    requests: Arc<Mutex<HashMap<u64, RequestEntry>>>,
    metrics: Arc<Metrics>,
    started: Instant,
    quotas: Arc<quota::QuotaBook>,
    /// Who may use admin verbs (replaced on reload).
    admin: std::sync::RwLock<identity::AdminPolicy>,
}

/// What a configuration reload (SIGHUP) changes while contexts and calls carry on.
pub struct Reload {
    pub quota: quota::QuotaConfig,
    pub app_priority: HashMap<String, Priority>,
    pub admin: identity::AdminPolicy,
}

/// The service every door calls. Cheap to clone.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

/// What [`Service::start`] needs: the loaded model and where contexts live.
pub struct ServiceParts {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub pool: Arc<ThreadPool>,
    pub model_id: String,
    pub store: StoreConfig,
    pub service: ServiceConfig,
}

impl Service {
    /// Opens the KV store and starts the engine thread.
    pub fn start(
        parts: ServiceParts,
    ) -> Result<(Service, std::thread::JoinHandle<()>), StoreError> {
        let ServiceParts {
            model,
            tokenizer,
            pool,
            model_id,
            store,
            service: cfg,
        } = parts;
        let template = ChatTemplate::from_gguf(model.file()).ok();
        let store = KvStore::open(model.clone(), pool, store)?;
        let model_info = ModelInfo {
            id: model_id,
            architecture: model.config.arch.name().to_string(),
            file_bytes: model.file().bytes().len() as u64,
            parameters: model
                .file()
                .tensors
                .iter()
                .map(|t| t.n_elements() as u64)
                .sum(),
            context_length: model.config.context_length as u64,
            max_context_tokens: store.config().max_context_tokens as u64,
            vocab_size: model.config.vocab_size as u64,
            chat_template: template.is_some(),
            kv_policy: store.config().policy.name().to_string(),
        };
        let tokenizer = Arc::new(tokenizer);
        let meter = energy::EnergyMeter::open(&cfg.quota.energy)
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        tracing::info!(source = %meter.describe(), "energy meter");
        let quotas = Arc::new(
            quota::QuotaBook::open(
                &store.config().state_dir,
                cfg.quota.clone().with_priorities(&cfg.app_priority),
                meter.source_name(),
            )
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?,
        );
        let metrics = Arc::new(Metrics::new(store.config().kv_budget_bytes));
        let requests: Arc<Mutex<HashMap<u64, RequestEntry>>> = Arc::default();
        // Room for the queue plus context operations; beyond it callers get Busy.
        let (tx, rx) = mpsc::sync_channel(cfg.max_queued + 64);
        let engine = scheduler::Scheduler::new(
            store,
            tokenizer.clone(),
            template,
            cfg.clone(),
            metrics.clone(),
            scheduler::Accounting {
                quotas: quotas.clone(),
                meter,
            },
            {
                let requests = requests.clone();
                Box::new(move |id| {
                    if let Ok(mut r) = requests.lock() {
                        r.remove(&id);
                    }
                })
            },
        );
        let handle = std::thread::Builder::new()
            .name("llmsd-engine".into())
            .spawn(move || engine.run(rx))
            .map_err(StoreError::Io)?;
        let svc = Service {
            inner: Arc::new(Inner {
                tx,
                tokenizer,
                model_info,
                admin: std::sync::RwLock::new(cfg.admin.clone()),
                cfg,
                next_request: AtomicU64::new(1),
                requests,
                metrics,
                started: Instant::now(),
                quotas,
            }),
        };
        Ok((svc, handle))
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How long a door may wait to hand a client its data before giving up on the client.
    pub fn slow_client_timeout(&self) -> Duration {
        self.inner.cfg.slow_client_timeout
    }

    /// Whether a local caller (by its uid and primary gid) may use admin verbs.
    pub fn is_admin(&self, uid: u32, gid: u32) -> bool {
        self.inner
            .admin
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_admin(uid, gid)
    }

    /// Applies a reloaded configuration: quotas (defaults, per app, priorities, battery
    /// settings) and the admin group. Contexts, running calls and what admins set at run
    /// time are untouched.
    pub fn reload(&self, r: Reload) {
        self.inner
            .quotas
            .reload(r.quota.with_priorities(&r.app_priority));
        *self.inner.admin.write().unwrap_or_else(|p| p.into_inner()) = r.admin;
    }

    pub fn model_info(&self) -> ModelInfo {
        self.inner.model_info.clone()
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn health(&self) -> Health {
        let m = &self.inner.metrics;
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            model: self.inner.model_info.id.clone(),
            uptime_s: self.inner.started.elapsed().as_secs_f64(),
            running: m.running.load(Ordering::Relaxed),
            queued: m.queued.load(Ordering::Relaxed),
            energy_source: self.inner.quotas.energy_source().to_string(),
            on_battery: self.inner.quotas.on_battery(),
        }
    }

    /// A round trip through the engine thread, answered between two engine steps: fails when
    /// the engine has stopped, and never answers while a step hangs.
    pub async fn ping_engine(&self) -> Result<(), ApiError> {
        self.op(Op::Ping).await.map(|_| ())
    }

    pub fn tokenize(&self, req: &TokenizeRequest) -> Result<Vec<u32>, ApiError> {
        self.check_size("text", req.text.len())?;
        Ok(self.inner.tokenizer.encode(&req.text, false, req.special))
    }

    async fn op(&self, op: Op) -> Result<Response, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Op(op, reply))?;
        rx.await
            .map_err(|_| ApiError::new(ErrorCode::ModelUnavailable, "the engine has stopped"))?
    }

    fn send(&self, cmd: Command) -> Result<(), ApiError> {
        self.inner.tx.try_send(cmd).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => {
                self.inner.metrics.note_error(ErrorCode::Busy);
                ApiError::busy(500, "the daemon's queue is full")
            }
            mpsc::TrySendError::Disconnected(_) => {
                ApiError::new(ErrorCode::ModelUnavailable, "the engine has stopped")
            }
        })
    }

    pub async fn create_context(
        &self,
        caller: &Caller,
        req: CreateContext,
    ) -> Result<ContextInfo, ApiError> {
        if let Some(s) = &req.system {
            self.check_size("prompt", s.len())?;
        }
        self.quota_door(caller)?;
        match self
            .op(Op::Create {
                owner: caller.owner(),
                system: req.system,
            })
            .await?
        {
            Response::Context(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn list_contexts(&self, caller: &Caller) -> Result<Vec<ContextInfo>, ApiError> {
        match self
            .op(Op::List {
                owner: caller.owner(),
            })
            .await?
        {
            Response::Contexts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn get_context(&self, caller: &Caller, id: &str) -> Result<ContextInfo, ApiError> {
        match self
            .op(Op::Get {
                owner: caller.owner(),
                id: id.to_string(),
            })
            .await?
        {
            Response::Context(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn delete_context(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        match self
            .op(Op::Delete {
                owner: caller.owner(),
                id: id.to_string(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    pub async fn fork_context(&self, caller: &Caller, id: &str) -> Result<ContextInfo, ApiError> {
        self.quota_door(caller)?;
        match self
            .op(Op::Fork {
                owner: caller.owner(),
                id: id.to_string(),
            })
            .await?
        {
            Response::Context(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Texts callers send are bounded by `max_prompt_bytes`.
    fn check_size(&self, what: &str, bytes: usize) -> Result<(), ApiError> {
        let limit = self.inner.cfg.max_prompt_bytes;
        if bytes > limit {
            return Err(ApiError::invalid(format!(
                "{what} of {bytes} bytes exceeds the limit of {limit} bytes"
            )));
        }
        Ok(())
    }

    /// Queues a generation. Fails at once on invalid parameters or a full queue; everything
    /// else (unknown context, too long, ...) arrives as the stream's `Failed`.
    pub fn prompt(&self, caller: &Caller, req: PromptRequest) -> Result<PromptStream, ApiError> {
        generation::validate(&req, self.inner.model_info.vocab_size)?;
        let bytes = match &req.input {
            llmsd_ipc::PromptInput::Text(t) => t.len(),
            llmsd_ipc::PromptInput::Messages(m) => m.iter().map(|m| m.content.len()).sum(),
        };
        self.check_size("prompt", bytes)?;
        let m = &self.inner.metrics;
        if m.queued.load(Ordering::Relaxed) as usize >= self.inner.cfg.max_queued {
            m.note_error(ErrorCode::Busy);
            return Err(ApiError::busy(
                1000,
                format!(
                    "{} requests are already waiting; try again later",
                    self.inner.cfg.max_queued
                ),
            ));
        }
        // The owner's mark wins; a request may only lower its own priority. Quotas refuse
        // at once (never queued).
        let (priority, quota_slot) = self
            .inner
            .quotas
            .admit(caller, req.params.priority)
            .inspect_err(|e| m.note_error(e.code))?;
        let id = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let (events, rx) = tmpsc::channel(scheduler::STREAM_CAPACITY);
        if let Ok(mut r) = self.inner.requests.lock() {
            r.insert(
                id,
                RequestEntry {
                    owner: caller.owner(),
                    cancel: cancel.clone(),
                },
            );
        }
        m.queued.fetch_add(1, Ordering::Relaxed);
        let job = PromptJob {
            request: id,
            owner: caller.owner(),
            priority,
            req,
            events,
            cancel: cancel.clone(),
            enqueued: Instant::now(),
            quota_slot,
        };
        if let Err(e) = self.send(Command::Prompt(Box::new(job))) {
            m.queued.fetch_sub(1, Ordering::Relaxed);
            if let Ok(mut r) = self.inner.requests.lock() {
                r.remove(&id);
            }
            return Err(e);
        }
        Ok(PromptStream {
            request: id,
            rx,
            cancel,
        })
    }

    /// Cancels one of the caller's running or queued prompts; it ends with `Cancelled`
    /// within one engine step.
    pub fn cancel(&self, caller: &Caller, request: u64) -> Result<(), ApiError> {
        let owner = caller.owner();
        let r = self
            .inner
            .requests
            .lock()
            .map_err(|_| ApiError::internal("request table poisoned"))?;
        match r.get(&request) {
            Some(e) if e.owner == owner => {
                e.cancel.store(true, Ordering::Relaxed);
                Ok(())
            }
            _ => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no running request {request}"),
            )),
        }
    }

    /// Refuses context operations through a door the app's quota does not allow.
    fn quota_door(&self, caller: &Caller) -> Result<(), ApiError> {
        self.inner.quotas.check_door(caller).inspect_err(|e| {
            self.inner.metrics.note_error(e.code);
        })
    }

    /// An app's quota and usage: admins may ask about any app, others about the app they
    /// are.
    pub async fn quota_get(&self, caller: &Caller, app: &str) -> Result<QuotaReport, ApiError> {
        identity::validate_app(app)?;
        if !caller.admin && caller.app != app {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "only admins may see another app's quota ({} asked for {app})",
                    caller.app
                ),
            ));
        }
        match self
            .op(Op::Quota {
                app: app.to_string(),
            })
            .await?
        {
            Response::Quota(r) => Ok(*r),
            other => Err(unexpected(other)),
        }
    }

    /// Sets or clears keys of an app's quota (admins only); persisted before it applies.
    pub async fn quota_set(&self, caller: &Caller, req: QuotaSet) -> Result<QuotaReport, ApiError> {
        if !caller.admin {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                "setting quotas is for admins (root, the daemon's user or the admin group)",
            ));
        }
        self.inner.quotas.set(&req.app, &req.quota, &req.clear)?;
        tracing::info!(caller = %caller, app = req.app, quota = ?req.quota, clear = ?req.clear,
            "quota changed");
        self.quota_get(caller, &req.app).await
    }

    /// Prometheus text of the service and of app usage and energy.
    pub fn metrics_text(&self) -> String {
        let mut text = self.inner.metrics.render();
        text.push_str(&self.inner.quotas.render_metrics());
        text
    }

    /// Stops the engine after the running requests' current step; contexts are saved.
    pub fn shutdown(&self) {
        let _ = self.inner.tx.send(Command::Shutdown);
    }
}

fn unexpected(r: Response) -> ApiError {
    ApiError::internal(format!("unexpected engine reply {r:?}"))
}

/// Maps a KV store error to what a caller sees.
pub fn api_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(id) => ApiError::not_found(id),
        StoreError::ContextWindowExceeded(m) => ApiError::new(ErrorCode::ContextWindowExceeded, m),
        StoreError::InvalidRequest(m) => ApiError::invalid(m),
        StoreError::NoRoomNow(m) => ApiError::busy(1000, m),
        other => {
            tracing::error!(error = %other, "KV store failure");
            ApiError::internal(other.to_string())
        }
    }
}

#[cfg(test)]
mod tests;
