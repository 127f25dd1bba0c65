//! Streamed completions as server-sent events: `data: {chunk}\n\n` per token, a final chunk
//! with `finish_reason` (and llmsd's `context` and `timings`), an optional usage chunk, then
//! `data: [DONE]\n\n`. A failure after the stream started is one `data: {"error":...}` event
//! and no `[DONE]`. When the client goes away the body is dropped, and with it the
//! [`PromptStream`], which cancels the request.
//!
//! Nothing here buffers beyond the next item: the body is pulled as the connection can take
//! it (hyper polls it only when its write buffer has room, and the connection's kernel send
//! buffer is fixed, see `SEND_BUFFER_BYTES`), so a client that stops reading stalls its
//! stream, and the engine cancels the call after the slow-client timeout.

use std::collections::VecDeque;
use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use llmsd_ipc::{ApiError, Completion, TokenEvent};
use serde_json::{json, Value};

use super::error::HttpError;
use super::openai::{self, LegacyLogprobs, Meta, Shape};
use crate::service::{PromptStream, StreamItem};

/// Chat or text completion chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

struct State {
    meta: Meta,
    kind: Kind,
    shape: Shape,
    stream: PromptStream,
    pending: VecDeque<String>,
    finished: bool,
    /// Character offset of the next token (text completions' `text_offset`).
    offset: usize,
}

impl State {
    fn emit(&mut self, v: Value) {
        self.pending.push_back(v.to_string());
    }

    fn opening(&mut self) {
        match self.kind {
            Kind::Chat => {
                let c = openai::chat_chunk(
                    &self.meta,
                    json!({"role": "assistant", "content": ""}),
                    Value::Null,
                    None,
                );
                self.emit_chunk(c);
            }
            Kind::Text => {
                if let Some(p) = self.shape.echo.clone() {
                    self.offset = p.chars().count();
                    let c = openai::text_chunk(&self.meta, &p, Value::Null, None);
                    self.emit_chunk(c);
                }
            }
        }
    }

    /// A chunk of choices; with `include_usage` every one of them says `"usage": null`.
    fn emit_chunk(&mut self, mut v: Value) {
        if self.shape.include_usage {
            if let Some(o) = v.as_object_mut() {
                o.insert("usage".into(), Value::Null);
            }
        }
        self.emit(v);
    }

    fn token(&mut self, ev: TokenEvent) {
        let lp = ev.logprob.as_ref().filter(|_| self.shape.logprobs);
        if ev.text.is_empty() && lp.is_none() {
            return;
        }
        let chunk = match self.kind {
            Kind::Chat => {
                let lps = lp.map_or(
                    Value::Null,
                    |l| json!({"content": [openai::chat_logprob(l)], "refusal": null}),
                );
                openai::chat_chunk(&self.meta, json!({"content": ev.text}), lps, None)
            }
            Kind::Text => {
                let lps = lp.map_or(Value::Null, |l| {
                    let mut out = LegacyLogprobs::starting_at(self.offset);
                    out.push_logprob(l);
                    out.json()
                });
                self.offset += ev.text.chars().count();
                openai::text_chunk(&self.meta, &ev.text, lps, None)
            }
        };
        self.emit_chunk(chunk);
    }

    fn done(&mut self, c: &Completion) {
        let reason = Some(c.finish_reason.as_str());
        let mut last = match self.kind {
            Kind::Chat => openai::chat_chunk(&self.meta, json!({}), Value::Null, reason),
            Kind::Text => openai::text_chunk(&self.meta, "", Value::Null, reason),
        };
        openai::add_context(&mut last, c.context.as_deref());
        if let Some(o) = last.as_object_mut() {
            o.insert("timings".into(), json!(c.timings));
        }
        self.emit_chunk(last);
        if self.shape.include_usage {
            let object = match self.kind {
                Kind::Chat => "chat.completion.chunk",
                Kind::Text => "text_completion",
            };
            let mut usage = json!({
                "id": self.meta.id,
                "object": object,
                "created": self.meta.created,
                "model": self.meta.model,
                "system_fingerprint": openai::system_fingerprint(),
                "choices": [],
                "usage": openai::usage_json(&c.usage),
                "timings": c.timings,
            });
            openai::add_context(&mut usage, c.context.as_deref());
            self.emit(usage);
        }
        self.pending.push_back("[DONE]".into());
        self.finished = true;
    }

    fn failed(&mut self, e: ApiError) {
        tracing::debug!(error = %e, id = self.meta.id, "stream failed");
        let body = HttpError::from(e).body();
        self.emit(body);
        self.finished = true;
    }

    fn push(&mut self, item: Option<StreamItem>) {
        match item {
            Some(StreamItem::Token(ev)) => self.token(ev),
            Some(StreamItem::Done(c)) => self.done(&c),
            Some(StreamItem::Failed(e)) => self.failed(e),
            None => self.failed(ApiError::internal("the engine dropped the request")),
        }
    }
}

/// The SSE response of a prompt whose first item (`first`, not a failure) has arrived.
pub fn response(
    meta: Meta,
    kind: Kind,
    shape: Shape,
    first: StreamItem,
    stream: PromptStream,
) -> Response {
    let mut st = State {
        meta,
        kind,
        shape,
        stream,
        pending: VecDeque::new(),
        finished: false,
        offset: 0,
    };
    st.opening();
    st.push(Some(first));
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), st));
            }
            if st.finished {
                return None;
            }
            let item = st.stream.next().await;
            st.push(item);
        }
    });
    Sse::new(events).into_response()
}
