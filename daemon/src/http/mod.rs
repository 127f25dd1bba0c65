//! The OpenAI-compatible HTTP door (axum), 127.0.0.1:8460 by default.
//!
//! - `GET /v1/models`, `GET /v1/models/{id}`: the one loaded model.
//! - `POST /v1/chat/completions`, `POST /v1/completions`: OpenAI's requests and responses,
//!   streamed as server-sent events with `"stream": true` (see [`openai`] for the fields).
//!   Defaults follow OpenAI (temperature 1); `max_tokens` defaults to the service's 256.
//! - Stateful extension: `"context": "<id>"` in the body (or an `X-Llmsd-Context` header)
//!   continues a persistent context: `messages` (or `prompt`) are the new turn only, and only
//!   its tokens are prefilled. Responses then carry `"context"` and an `X-Llmsd-Context`
//!   header; every completion carries llmsd's `"timings"`.
//! - `POST /v1/contexts` (`{"system": ...}` optional), `GET /v1/contexts`,
//!   `GET|DELETE /v1/contexts/{id}`, `POST /v1/contexts/{id}/fork`: the caller's contexts.
//! - `GET /health` (JSON), `GET /metrics` (Prometheus text).
//!
//! Callers are apps: `Authorization: Bearer <key>` maps to an app through
//! [`HttpOptions::api_keys`]; without a key the caller is the `anonymous` app. Errors are
//! OpenAI's `{"error":{"message","type","param","code"}}` with the status of the service's
//! error code (and `Retry-After` when a retry may succeed).

pub mod auth;
pub mod error;
pub mod openai;
pub mod sse;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llmsd_ipc::{CreateContext, PromptRequest};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::service::{Caller, Service, StreamItem};
use auth::{AppCaller, Keys};
use error::{Body, HttpError};
use openai::{ChatCompletionRequest, CompletionRequest, Meta, Shape};

/// Request and response header naming a persistent context.
pub const CONTEXT_HEADER: &str = "x-llmsd-context";

/// Configuration of the HTTP door.
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// Bearer key → app name.
    pub api_keys: HashMap<String, String>,
    /// Callers without a key are the `anonymous` app (otherwise 401).
    pub allow_anonymous: bool,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// `/metrics` (every app's name and usage) needs a valid key, as on a door reachable
    /// from other machines (set by [`serve`] for non-loopback addresses).
    pub keyed_metrics: bool,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            api_keys: HashMap::new(),
            allow_anonymous: true,
            max_body_bytes: 1 << 20,
            keyed_metrics: false,
        }
    }
}

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    service: Service,
    keys: Arc<Keys>,
    max_body_bytes: usize,
    keyed_metrics: bool,
    started_unix: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The door's routes over `service`.
pub fn router(service: Service, opts: HttpOptions) -> Router {
    let state = AppState {
        service,
        keys: Arc::new(Keys::new(&opts)),
        max_body_bytes: opts.max_body_bytes,
        keyed_metrics: opts.keyed_metrics,
        started_unix: unix_now(),
    };
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/contexts", post(create_context).get(list_contexts))
        .route("/v1/contexts/{id}", get(get_context).delete(delete_context))
        .route("/v1/contexts/{id}/fork", post(fork_context))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .with_state(state)
}

/// How long a client has to send a whole request once it has started one: the header block
/// (hyper's header timeout), and the body after it. Slow-loris clients are cut off after it.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Each HTTP connection's kernel send buffer. Fixed rather than autotuned (up to megabytes):
/// a client that stops reading a stream then stalls it after about this much, so the
/// slow-client timeout cancels the call; ample for streams of tokens.
const SEND_BUFFER_BYTES: usize = 64 << 10;

/// Serves the door on `listener` until `shutdown` resolves (then finishes open requests).
///
/// Connections are served with hyper directly rather than `axum::serve`, which sets no header
/// read timeout: a client trickling its headers would hold a connection forever.
pub async fn serve(
    service: Service,
    listener: tokio::net::TcpListener,
    opts: HttpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "HTTP door listening");
    let opts = HttpOptions {
        keyed_metrics: opts.keyed_metrics || !addr.ip().is_loopback(),
        ..opts
    };
    let app = router(service, opts);
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streamed tokens go out as they come.
        let _ = stream.set_nodelay(true);
        if let Err(e) = nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::SndBuf,
            &SEND_BUFFER_BYTES,
        ) {
            tracing::debug!(error = %e, "cannot size an HTTP connection's send buffer");
        }
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}

async fn not_found() -> HttpError {
    HttpError::not_found("unknown URL; see /v1/models, /v1/chat/completions, /v1/completions")
}

async fn method_not_allowed() -> HttpError {
    HttpError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this URL",
    )
    .with_code("method_not_allowed")
}

async fn health(State(st): State<AppState>) -> Json<llmsd_ipc::Health> {
    Json(st.service.health())
}

async fn metrics(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if st.keyed_metrics {
        if let Err(e) = st.keys.identify(&headers) {
            return e.into_response();
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        st.service.metrics_text(),
    )
        .into_response()
}

fn model_object(st: &AppState) -> Value {
    let m = st.service.model_info();
    json!({
        "id": m.id,
        "object": "model",
        "created": st.started_unix,
        "owned_by": "llmsd",
        "llmsd": m,
    })
}

async fn models(State(st): State<AppState>, _c: AppCaller) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&st)]}))
}

async fn model(
    State(st): State<AppState>,
    _c: AppCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    if id == st.service.model_info().id {
        Ok(Json(model_object(&st)))
    } else {
        Err(HttpError::not_found(format!("no model {id:?}")).with_code("model_not_found"))
    }
}

/// The `X-Llmsd-Context` request header, if any.
fn header_context(h: &HeaderMap) -> Result<Option<&str>, HttpError> {
    h.get(CONTEXT_HEADER)
        .map(|v| {
            v.to_str()
                .map(str::trim)
                .map_err(|_| HttpError::invalid("context", "X-Llmsd-Context is not ASCII"))
        })
        .transpose()
}

fn with_context_header(mut resp: Response, context: Option<&str>) -> Response {
    if let Some(v) = context.and_then(|c| HeaderValue::from_str(c).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(CONTEXT_HEADER), v);
    }
    resp
}

async fn chat_completions(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let (req, shape) = body
        .json::<ChatCompletionRequest>()?
        .into_prompt(header_context(&headers)?)?;
    run(&st, &caller, req, shape, sse::Kind::Chat).await
}

async fn completions(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, HttpError> {
    let (req, shape) = body
        .json::<CompletionRequest>()?
        .into_prompt(header_context(&headers)?)?;
    run(&st, &caller, req, shape, sse::Kind::Text).await
}

/// Queues a prompt and answers with the whole completion or an SSE stream.
async fn run(
    st: &AppState,
    caller: &Caller,
    req: PromptRequest,
    shape: Shape,
    kind: sse::Kind,
) -> Result<Response, HttpError> {
    let context = req.context.clone();
    let echo_tokens = match (&shape.echo, req.params.prompt_logprobs) {
        (Some(p), true) => {
            let tok = st.service.tokenizer();
            tok.encode(p, false, false)
                .into_iter()
                .map(|id| String::from_utf8_lossy(tok.token_bytes(id)).into_owned())
                .collect()
        }
        _ => Vec::new(),
    };
    let mut stream = st.service.prompt(caller, req)?;
    let prefix = match kind {
        sse::Kind::Chat => "chatcmpl",
        sse::Kind::Text => "cmpl",
    };
    let meta = Meta {
        id: format!("{prefix}-{}", stream.request),
        created: unix_now(),
        model: st.service.model_info().id,
    };
    tracing::debug!(
        app = caller.app,
        id = meta.id,
        context,
        stream = shape.stream,
        "prompt"
    );
    if shape.stream {
        // Wait for the first item so that an early failure (unknown context, too long) is
        // an HTTP error status rather than an error event.
        let first = match stream.next().await {
            Some(StreamItem::Failed(e)) => return Err(e.into()),
            Some(first) => first,
            None => {
                return Err(llmsd_ipc::ApiError::internal("the engine dropped the request").into())
            }
        };
        let resp = sse::response(meta, kind, shape, first, stream);
        return Ok(with_context_header(resp, context.as_deref()));
    }
    let c = stream.completion().await?;
    let body = match kind {
        sse::Kind::Chat => openai::chat_response(&meta, &c, &shape),
        sse::Kind::Text => openai::completion_response(&meta, &c, &shape, &echo_tokens),
    };
    let resp = Json(body).into_response();
    Ok(with_context_header(
        resp,
        c.context.as_deref().or(context.as_deref()),
    ))
}

#[derive(Debug, Default, Deserialize)]
struct CreateContextIn {
    #[serde(default)]
    system: Option<String>,
}

async fn create_context(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    body: Body,
) -> Result<Response, HttpError> {
    let req: CreateContextIn = body.json_or_default()?;
    let info = st
        .service
        .create_context(&caller, CreateContext { system: req.system })
        .await?;
    tracing::debug!(app = caller.app, context = info.id, "context created");
    let id = info.id.clone();
    Ok(with_context_header(Json(info).into_response(), Some(&id)))
}

async fn list_contexts(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
) -> Result<Json<Value>, HttpError> {
    let list = st.service.list_contexts(&caller).await?;
    Ok(Json(json!({"object": "list", "data": list})))
}

async fn get_context(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    Path(id): Path<String>,
) -> Result<Json<llmsd_ipc::ContextInfo>, HttpError> {
    Ok(Json(st.service.get_context(&caller, &id).await?))
}

async fn delete_context(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    st.service.delete_context(&caller, &id).await?;
    Ok(Json(
        json!({"id": id, "object": "context", "deleted": true}),
    ))
}

async fn fork_context(
    State(st): State<AppState>,
    AppCaller(caller): AppCaller,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let info = st.service.fork_context(&caller, &id).await?;
    let new = info.id.clone();
    Ok(with_context_header(Json(info).into_response(), Some(&new)))
}
