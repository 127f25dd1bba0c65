//! Requests, responses and stream events. Every door carries the same values: the socket as
//! JSON frames, D-Bus as method arguments and signals, HTTP mapped to OpenAI's shapes.

use serde::{Deserialize, Serialize};

/// The interface a caller came through (quotas can allow or refuse each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Door {
    Socket,
    Dbus,
    Http,
}

impl Door {
    pub const ALL: [Door; 3] = [Door::Socket, Door::Dbus, Door::Http];

    pub fn name(self) -> &'static str {
        match self {
            Door::Socket => "socket",
            Door::Dbus => "dbus",
            Door::Http => "http",
        }
    }
}

impl std::fmt::Display for Door {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Door {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Door::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| format!("door must be socket, dbus or http, got {s:?}"))
    }
}

/// A method call on the socket door.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Request {
    /// New context, optionally opened with a system prompt. → [`Response::Context`]
    CreateContext(CreateContext),
    /// The caller's contexts. → [`Response::Contexts`]
    ListContexts,
    /// One context. → [`Response::Context`]
    GetContext { context: String },
    /// → [`Response::Ok`]
    DeleteContext { context: String },
    /// Copy-on-write copy of a context (shares its chunks). → [`Response::Context`]
    ForkContext { context: String },
    /// Generation: [`crate::ServerFrame::Event`]s with tokens, then [`Response::Completion`].
    Prompt(PromptRequest),
    /// Cancels one of this connection's running prompts (by its request id). → [`Response::Ok`]
    Cancel { request: u64 },
    /// Token ids of a text. → [`Response::Tokens`]
    Tokenize(TokenizeRequest),
    /// → [`Response::Model`]
    ModelInfo,
    /// → [`Response::Health`]
    Health,
    /// An app's quota and usage (admins: any app; others: the app they connected as).
    /// → [`Response::Quota`]
    QuotaGet { app: String },
    /// Sets or clears keys of an app's quota (admins only; persisted). → [`Response::Quota`]
    QuotaSet(QuotaSet),
    /// The daemon's memory, KV store and queue (every caller). → [`Response::Status`]
    Status,
    /// Apps with contexts, scoped: admins see every owner, others the apps of their own uid.
    /// → [`Response::Apps`]
    Apps,
    /// Contexts across apps, with their owners (scoped as `apps`); `app` narrows it to one
    /// app name or one owner (`u1000:notes`). → [`Response::OwnedContexts`]
    Contexts {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app: Option<String>,
    },
    /// Each chunk of a context. `owner` (default: the caller's app) addresses another app's
    /// context: any owner for admins, the caller's own uid's apps otherwise. → [`Response::Chunks`]
    Chunks {
        context: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Moves a context (`context`, with `owner` as in `chunks`) or every context of `app` out
    /// of memory; its KV stays on disk (written before it is dropped) or is recomputed from
    /// its tokens: nothing is lost. → [`Response::Evicted`]
    Evict {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        app: Option<String>,
    },
    /// Admin only: re-places every idle context's chunks at the precision the current
    /// densities give, evicts everything not in use, and removes swap files nothing refers
    /// to. → [`Response::Compacted`]
    Compact,
    /// Deletes a context of `owner` (admins: any owner; others: their own uid's apps).
    /// → [`Response::Ok`]
    DeleteContextOf { owner: String, context: String },
}

impl Request {
    /// The method name as it appears on the wire.
    pub fn method(&self) -> &'static str {
        match self {
            Request::CreateContext(_) => "create_context",
            Request::ListContexts => "list_contexts",
            Request::GetContext { .. } => "get_context",
            Request::DeleteContext { .. } => "delete_context",
            Request::ForkContext { .. } => "fork_context",
            Request::Prompt(_) => "prompt",
            Request::Cancel { .. } => "cancel",
            Request::Tokenize(_) => "tokenize",
            Request::ModelInfo => "model_info",
            Request::Health => "health",
            Request::QuotaGet { .. } => "quota_get",
            Request::QuotaSet(_) => "quota_set",
            Request::Status => "status",
            Request::Apps => "apps",
            Request::Contexts { .. } => "contexts",
            Request::Chunks { .. } => "chunks",
            Request::Evict { .. } => "evict",
            Request::Compact => "compact",
            Request::DeleteContextOf { .. } => "delete_context_of",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContext {
    /// System prompt of a chat context (rendered by the model's chat template).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub text: String,
    /// Parse special tokens such as `<|im_start|>` (otherwise they are plain text).
    #[serde(default)]
    pub special: bool,
}

/// What to generate from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptInput {
    /// Raw text appended to the context (or the whole prompt without one). Special-token
    /// text in it is plain text.
    Text(String),
    /// Chat messages: with a context, the new turn(s) appended to its conversation; without,
    /// the whole conversation. Rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptRequest {
    /// A persistent context to continue (only the new tokens are prefilled); none = a
    /// one-off call whose state is dropped at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    pub input: PromptInput,
    #[serde(default)]
    pub params: GenerationParams,
    /// Send a token event per token (otherwise only the completion).
    #[serde(default = "yes")]
    pub stream: bool,
}

fn yes() -> bool {
    true
}

/// Output format constraint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    #[default]
    Text,
    /// The output is one JSON object (generation is constrained to valid JSON).
    JsonObject,
}

/// How the scheduler treats a request relative to other apps' work.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Yields to everything else.
    Background,
    #[default]
    Normal,
    /// Goes first (an app the owner marked foreground).
    Foreground,
}

/// Sampling and limits of one generation. Defaults: greedy, 256 tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 = off.
    pub top_k: u32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: Option<u64>,
    /// Generation ends before any of these strings (at most 4, each 1-256 bytes).
    pub stop: Vec<String>,
    /// Return the log-probability of each generated token and this many alternatives
    /// (0-20); `None` = no log-probabilities.
    pub logprobs: Option<u32>,
    /// Also return log-probabilities of the prompt tokens (completions' `echo`).
    pub prompt_logprobs: bool,
    pub response_format: ResponseFormat,
    /// Ask for background treatment (an app cannot raise its own priority).
    pub priority: Priority,
    /// Never stop at end-of-generation tokens (benchmarks: a fixed number of tokens).
    pub ignore_eos: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            logprobs: None,
            prompt_logprobs: false,
            response_format: ResponseFormat::Text,
            priority: Priority::Normal,
            ignore_eos: false,
        }
    }
}

/// A successful reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Context(ContextInfo),
    Contexts(Vec<ContextInfo>),
    Completion(Completion),
    Tokens(Vec<u32>),
    Model(ModelInfo),
    Health(Health),
    Quota(Box<QuotaReport>),
    Status(Status),
    Apps(Vec<AppInfo>),
    OwnedContexts(Vec<OwnedContext>),
    Chunks(Vec<ChunkInfo>),
    Evicted(EvictReport),
    Compacted(CompactReport),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextInfo {
    pub id: String,
    /// Tokens the context holds (its KV covers all of them).
    pub tokens: u64,
    /// Messages of its conversation so far (chat contexts).
    pub messages: u64,
    pub resident_bytes: u64,
    pub disk_bytes: u64,
    pub created_unix: u64,
    pub last_use_unix: u64,
    /// Energy spent on this context's calls so far, in joules.
    #[serde(default)]
    pub energy_j: f64,
}

/// One generated token, streamed as it is sampled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Token(TokenEvent),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// 0-based index among the generated tokens.
    pub index: u32,
    pub token_id: u32,
    /// Text this token completes (may be empty while a multi-byte character or a possible
    /// stop string is held back; the held text comes with a later token or the completion).
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprob: Option<TokenLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's text (lossy UTF-8 of its bytes).
    pub token: String,
    pub logprob: f32,
    /// Its bytes (a token can be part of a character).
    pub bytes: Vec<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token, a stop string, or a complete JSON object.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The end of a generation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The context the call continued (none for a one-off call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// All generated text (stop string excluded).
    pub text: String,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Log-probabilities of the generated tokens, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Log-probabilities of the prompt tokens (the first has none), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the whole prompt (for a context: everything it held plus the new turn).
    pub prompt_tokens: u64,
    /// Prompt tokens whose KV was already in the context (not prefilled again).
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Energy this call cost, in joules (its share of the engine steps it was in, see
    /// `Health::energy_source`).
    #[serde(default)]
    pub energy_j: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Waiting in the scheduler's queue.
    pub queued_ms: f64,
    /// Making the context's KV resident (load and recompute of evicted chunks).
    pub restore_ms: f64,
    /// Tokens actually run through the model for the prompt (`prompt - cached`).
    pub prefilled_tokens: u64,
    pub prefill_ms: f64,
    /// From admission to the first generated token.
    pub first_token_ms: f64,
    pub decode_ms: f64,
    /// Generated tokens per second of decode.
    pub decode_tok_s: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model's id on every door (file name without `.gguf`).
    pub id: String,
    pub architecture: String,
    pub file_bytes: u64,
    pub parameters: u64,
    pub context_length: u64,
    /// Largest context a caller may build (≤ the model's window).
    pub max_context_tokens: u64,
    pub vocab_size: u64,
    pub chat_template: bool,
    /// The KV policy of the store (`llms`, `paged`, ...).
    pub kv_policy: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub model: String,
    pub uptime_s: f64,
    pub running: u64,
    pub queued: u64,
    /// Where energy figures come from: `rapl` (powercap counters) or `cpu` (CPU time ×
    /// watts per core).
    #[serde(default)]
    pub energy_source: String,
    /// The machine runs on battery (energy quotas are tightened).
    #[serde(default)]
    pub on_battery: bool,
}

/// Limits of one app. `None` = inherited: the app's setting in the owner's config, then the
/// config's `[quotas]` defaults, then unlimited (doors: all; background: allowed; priority:
/// normal).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Quota {
    /// Tokens prefilled plus tokens generated, over the last 60 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_min: Option<u64>,
    /// Joules over the last hour (times the battery factor on battery).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joules_per_hour: Option<f64>,
    /// Persistent contexts the app may hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_contexts: Option<u32>,
    /// Tokens one context may hold (prompt and generation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_context_tokens: Option<u32>,
    /// Prompts queued or running at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Doors the app may use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub doors: Option<Vec<Door>>,
    /// Whether background-priority prompts are accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background_allowed: Option<bool>,
    /// The priority the owner pins the app at (an app may still lower a request to
    /// background).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

impl Quota {
    /// This quota with every key `over` sets replaced by its value.
    pub fn overlaid(&self, over: &Quota) -> Quota {
        Quota {
            tokens_per_min: over.tokens_per_min.or(self.tokens_per_min),
            joules_per_hour: over.joules_per_hour.or(self.joules_per_hour),
            max_contexts: over.max_contexts.or(self.max_contexts),
            max_context_tokens: over.max_context_tokens.or(self.max_context_tokens),
            max_concurrent: over.max_concurrent.or(self.max_concurrent),
            doors: over.doors.clone().or_else(|| self.doors.clone()),
            background_allowed: over.background_allowed.or(self.background_allowed),
            priority: over.priority.or(self.priority),
        }
    }

    /// Unsets one key.
    pub fn clear(&mut self, key: QuotaKey) {
        match key {
            QuotaKey::TokensPerMin => self.tokens_per_min = None,
            QuotaKey::JoulesPerHour => self.joules_per_hour = None,
            QuotaKey::MaxContexts => self.max_contexts = None,
            QuotaKey::MaxContextTokens => self.max_context_tokens = None,
            QuotaKey::MaxConcurrent => self.max_concurrent = None,
            QuotaKey::Doors => self.doors = None,
            QuotaKey::BackgroundAllowed => self.background_allowed = None,
            QuotaKey::Priority => self.priority = None,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Quota::default()
    }

    /// Values no quota may take (the message names the key).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(j) = self.joules_per_hour {
            if !j.is_finite() || j < 0.0 {
                return Err(format!(
                    "joules_per_hour must be a finite number ≥ 0, got {j}"
                ));
            }
        }
        if let Some(d) = &self.doors {
            for (i, door) in d.iter().enumerate() {
                if d[..i].contains(door) {
                    return Err(format!("doors names {door} twice"));
                }
            }
        }
        Ok(())
    }
}

/// The keys of a [`Quota`], by their names (`tokens_per_min`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKey {
    TokensPerMin,
    JoulesPerHour,
    MaxContexts,
    MaxContextTokens,
    MaxConcurrent,
    Doors,
    BackgroundAllowed,
    Priority,
}

impl QuotaKey {
    pub const ALL: [QuotaKey; 8] = [
        QuotaKey::TokensPerMin,
        QuotaKey::JoulesPerHour,
        QuotaKey::MaxContexts,
        QuotaKey::MaxContextTokens,
        QuotaKey::MaxConcurrent,
        QuotaKey::Doors,
        QuotaKey::BackgroundAllowed,
        QuotaKey::Priority,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuotaKey::TokensPerMin => "tokens_per_min",
            QuotaKey::JoulesPerHour => "joules_per_hour",
            QuotaKey::MaxContexts => "max_contexts",
            QuotaKey::MaxContextTokens => "max_context_tokens",
            QuotaKey::MaxConcurrent => "max_concurrent",
            QuotaKey::Doors => "doors",
            QuotaKey::BackgroundAllowed => "background_allowed",
            QuotaKey::Priority => "priority",
        }
    }
}

impl std::fmt::Display for QuotaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for QuotaKey {
    type Err = String;
    /// The key's name, with `-` or `_` (`tokens-per-min` = `tokens_per_min`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.replace('-', "_");
        QuotaKey::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = QuotaKey::ALL.iter().map(|k| k.name()).collect();
                format!("unknown quota key {s:?}; keys: {}", names.join(", "))
            })
    }
}

/// `quota_set`: keys of `quota` that are set replace the app's; keys in `clear` go back to
/// inherited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSet {
    pub app: String,
    #[serde(default)]
    pub quota: Quota,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clear: Vec<QuotaKey>,
}

/// An app's quota: what the owner set with `quota_set`, what the config says, what applies
/// now, and what the app used.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuotaReport {
    pub app: String,
    /// Set with `quota_set` (persisted; wins over the config).
    pub set: Quota,
    /// From the config: `[apps.NAME]` over `[quotas]`.
    pub config: Quota,
    /// What is enforced now: `set` over `config`, with `joules_per_hour` times the battery
    /// factor when on battery. Unset keys are unlimited (doors: all; background allowed).
    pub effective: Quota,
    pub on_battery: bool,
    pub usage: QuotaUsage,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaUsage {
    /// Tokens prefilled and generated in the last 60 s.
    pub tokens_last_min: u64,
    pub joules_last_hour: f64,
    /// Persistent contexts the app holds (under every uid and door).
    pub contexts: u64,
    /// Prompts queued or running.
    pub running: u64,
    /// Since the app was first seen (survives restarts).
    pub tokens_total: u64,
    pub energy_j_total: f64,
    /// `energy_j_total / tokens_total` (0 before the first token).
    pub joules_per_token: f64,
}

/// How hard the system is pressed for memory, as the daemon's watcher sees it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPressure {
    #[default]
    None,
    /// The KV budget is halved.
    Moderate,
    /// The KV budget is at its configured minimum.
    Severe,
}

impl MemoryPressure {
    pub fn name(self) -> &'static str {
        match self {
            MemoryPressure::None => "none",
            MemoryPressure::Moderate => "moderate",
            MemoryPressure::Severe => "severe",
        }
    }

    /// 0, 1, 2: the `llmsd_memory_pressure` gauge.
    pub fn level(self) -> u64 {
        self as u64
    }

    pub fn from_level(level: u64) -> Self {
        match level {
            0 => MemoryPressure::None,
            1 => MemoryPressure::Moderate,
            _ => MemoryPressure::Severe,
        }
    }
}

/// The daemon at a glance (`llmsctl status`). Aggregates only: nothing here names an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub model: String,
    pub model_bytes: u64,
    pub kv_policy: String,
    pub uptime_s: f64,
    /// Resident set of the daemon's process (weights it has touched, KV, scratch).
    pub rss_bytes: u64,
    /// The configured total (`[memory] budget_mib`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_bytes: Option<u64>,
    /// The KV budget in force now (lowered under memory pressure).
    pub kv_budget_bytes: u64,
    /// The KV budget without pressure.
    pub kv_budget_max_bytes: u64,
    pub kv_resident_bytes: u64,
    pub kv_disk_bytes: u64,
    pub pressure: MemoryPressure,
    /// Where pressure is read from: `psi`, `meminfo`, or `off`.
    pub pressure_source: String,
    pub apps: u64,
    pub contexts: u64,
    pub running: u64,
    pub queued: u64,
    /// Energy the engine used since the state directory was created, in joules (see
    /// `Health::energy_source`).
    #[serde(default)]
    pub energy_j: f64,
    /// `rapl` or `cpu`.
    #[serde(default)]
    pub energy_source: String,
    /// Whether the caller may use admin verbs.
    pub admin: bool,
}

/// One app (owner) of the KV store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    /// `u<uid>:<app>` for local callers, `http:<app>` for the HTTP door.
    pub owner: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    pub app: String,
    pub contexts: u64,
    pub tokens: u64,
    pub resident_bytes: u64,
    pub disk_bytes: u64,
    /// Prompts of this app generating now, and waiting.
    pub running: u64,
    pub queued: u64,
    pub last_use_unix: u64,
}

/// A context with its owner (`contexts` across apps).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnedContext {
    pub owner: String,
    #[serde(flatten)]
    pub context: ContextInfo,
}

/// Where a chunk's KV is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkLocation {
    Resident,
    Disk,
    Both,
    /// Neither: recomputed from its tokens when next used.
    Recompute,
}

impl ChunkLocation {
    pub fn new(resident: bool, on_disk: bool) -> Self {
        match (resident, on_disk) {
            (true, true) => ChunkLocation::Both,
            (true, false) => ChunkLocation::Resident,
            (false, true) => ChunkLocation::Disk,
            (false, false) => ChunkLocation::Recompute,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChunkLocation::Resident => "resident",
            ChunkLocation::Disk => "disk",
            ChunkLocation::Both => "both",
            ChunkLocation::Recompute => "recompute",
        }
    }
}

/// One 16-token chunk of a context (the last may be a partial, full-precision tail).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub index: u64,
    pub tokens: u64,
    /// `f16`, `int8`, `int4`, `int2` (`f32` for the open tail).
    pub precision: String,
    pub location: ChunkLocation,
    /// Mean attention the chunk received (its information density).
    pub density: f64,
    pub observations: u64,
    /// Contexts sharing the chunk (forks).
    pub shared_by: u32,
    pub last_use_unix: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvictReport {
    /// Contexts moved out of memory.
    pub contexts: u64,
    /// Resident KV bytes released.
    pub freed_bytes: u64,
    /// Contexts left alone because a running prompt uses them.
    pub in_use: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompactReport {
    /// Chunks re-quantized to the precision their density now earns.
    pub requantized_chunks: u64,
    pub evicted_contexts: u64,
    pub freed_bytes: u64,
    /// Swap files that nothing referred to any more, removed.
    pub files_removed: u64,
    pub kv_resident_bytes: u64,
    pub kv_disk_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_forms() {
        let r = Request::GetContext {
            context: "ctx-1".into(),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"method":"get_context","params":{"context":"ctx-1"}})
        );
        let list: Request = serde_json::from_value(json!({"method":"list_contexts"})).unwrap();
        assert_eq!(list, Request::ListContexts);
        let p: Request = serde_json::from_value(json!({
            "method": "prompt",
            "params": {"context": "ctx-1", "input": {"messages": [{"role":"user","content":"hi"}]},
                       "params": {"max_tokens": 8, "stop": ["\n"]}}
        }))
        .unwrap();
        let Request::Prompt(p) = p else {
            panic!("not a prompt: {p:?}")
        };
        assert!(p.stream);
        assert_eq!(p.params.max_tokens, 8);
        assert_eq!(p.params.temperature, 0.0);
        assert_eq!(
            p.input,
            PromptInput::Messages(vec![ChatMessage::new("user", "hi")])
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let bad = serde_json::from_value::<Request>(json!({
            "method": "prompt",
            "params": {"input": {"text": "x"}, "params": {"max_tokenz": 3}}
        }));
        assert!(bad.unwrap_err().to_string().contains("max_tokenz"));
        assert!(serde_json::from_value::<Request>(json!({"method": "reboot"})).is_err());
    }

    #[test]
    fn admin_wire_forms() {
        let r: Request =
            serde_json::from_value(json!({"method":"evict","params":{"app":"notes"}})).unwrap();
        assert_eq!(
            r,
            Request::Evict {
                context: None,
                owner: None,
                app: Some("notes".into())
            }
        );
        assert_eq!(r.method(), "evict");
        let c: Request = serde_json::from_value(json!({"method":"contexts","params":{}})).unwrap();
        assert_eq!(c, Request::Contexts { app: None });
        assert_eq!(
            serde_json::to_value(Request::Chunks {
                context: "ctx-1".into(),
                owner: Some("u1000:notes".into())
            })
            .unwrap(),
            json!({"method":"chunks","params":{"context":"ctx-1","owner":"u1000:notes"}})
        );
        assert_eq!(
            serde_json::from_value::<Request>(json!({"method":"compact"})).unwrap(),
            Request::Compact
        );
        let owned = OwnedContext {
            owner: "u1000:notes".into(),
            context: ContextInfo {
                id: "ctx-1".into(),
                tokens: 38,
                messages: 2,
                resident_bytes: 1,
                disk_bytes: 2,
                created_unix: 3,
                last_use_unix: 4,
                energy_j: 0.5,
            },
        };
        let v = serde_json::to_value(&owned).unwrap();
        assert_eq!(v["owner"], "u1000:notes");
        assert_eq!(v["id"], "ctx-1", "the context's fields are flattened");
        assert_eq!(serde_json::from_value::<OwnedContext>(v).unwrap(), owned);
        assert_eq!(
            serde_json::to_value(ChunkLocation::new(false, true)).unwrap(),
            json!("disk")
        );
        assert_eq!(MemoryPressure::from_level(2), MemoryPressure::Severe);
        assert_eq!(
            serde_json::to_value(MemoryPressure::Moderate).unwrap(),
            json!("moderate")
        );
    }

    #[test]
    fn response_wire_forms() {
        assert_eq!(
            serde_json::to_value(Response::Ok).unwrap(),
            json!({"kind":"ok"})
        );
        assert_eq!(
            serde_json::to_value(Response::Tokens(vec![1, 2])).unwrap(),
            json!({"kind":"tokens","value":[1,2]})
        );
    }

    #[test]
    fn quota_wire_forms_and_layers() {
        let r: Request = serde_json::from_value(json!({
            "method": "quota_set",
            "params": {"app": "notes", "quota": {"tokens_per_min": 10, "joules_per_hour": 50,
                        "doors": ["socket", "http"]}, "clear": ["max_contexts"]}
        }))
        .unwrap();
        let Request::QuotaSet(q) = r else {
            panic!("not quota_set: {r:?}")
        };
        assert_eq!(q.quota.tokens_per_min, Some(10));
        assert_eq!(q.quota.joules_per_hour, Some(50.0));
        assert_eq!(q.quota.doors, Some(vec![Door::Socket, Door::Http]));
        assert_eq!(q.clear, vec![QuotaKey::MaxContexts]);
        assert!(serde_json::from_value::<Quota>(json!({"tokens_per_minute": 1})).is_err());
        assert_eq!(
            serde_json::to_value(Quota {
                max_contexts: Some(4),
                ..Quota::default()
            })
            .unwrap(),
            json!({"max_contexts": 4})
        );
        let base = Quota {
            tokens_per_min: Some(100),
            max_contexts: Some(8),
            ..Quota::default()
        };
        let mut over = Quota {
            tokens_per_min: Some(10),
            background_allowed: Some(false),
            ..Quota::default()
        };
        let both = base.overlaid(&over);
        assert_eq!(both.tokens_per_min, Some(10));
        assert_eq!(both.max_contexts, Some(8));
        assert_eq!(both.background_allowed, Some(false));
        over.clear(QuotaKey::TokensPerMin);
        assert_eq!(base.overlaid(&over).tokens_per_min, Some(100));
        for k in QuotaKey::ALL {
            assert_eq!(k.name().parse::<QuotaKey>(), Ok(k));
            assert_eq!(k.name().replace('_', "-").parse::<QuotaKey>(), Ok(k));
        }
        let bad = Quota {
            joules_per_hour: Some(f64::NAN),
            ..Quota::default()
        };
        assert!(bad.validate().unwrap_err().contains("joules_per_hour"));
        let old: Usage = serde_json::from_value(json!({"prompt_tokens": 1, "cached_tokens": 0,
            "completion_tokens": 2, "total_tokens": 3}))
        .unwrap();
        assert_eq!(old.energy_j, 0.0, "frames without energy_j still parse");
    }
}
