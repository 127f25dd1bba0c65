//! OpenAI's request and response JSON for `/v1/chat/completions` and `/v1/completions`,
//! mapped to and from the service's [`PromptRequest`] and [`Completion`].
//!
//! Unknown request fields are ignored, as OpenAI does. llmsd extras in requests: `top_k`,
//! `min_p`, `repetition_penalty`, `context` (a persistent context to continue), `priority`
//! (`"background"` lowers the call's priority) and `ignore_eos` (vLLM's); in responses:
//! `context`, `timings` and `usage.energy_j`.

use llmsd_ipc::{
    ChatMessage, Completion, GenerationParams, Priority, PromptInput, PromptRequest,
    ResponseFormat, TokenLogprob, Usage,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::HttpError;

/// OpenAI's default sampling temperature (the service's own default is greedy).
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ResponseFormatIn {
    #[serde(rename = "type")]
    pub kind: String,
}

/// Fields chat and text completions share.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    /// Accepted whatever it names; responses carry the loaded model's id.
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub response_format: Option<ResponseFormatIn>,
    /// llmsd extras.
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// A persistent context to continue (llmsd extension).
    pub context: Option<String>,
    /// `background` lowers the call's priority (llmsd extension; raising is the owner's).
    pub priority: Option<Priority>,
    /// Generate `max_tokens` tokens whatever the model says (as vLLM's extension).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<MessageIn>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt` of a text completion: one string (a list of one string is accepted too).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: PromptIn,
    pub echo: Option<bool>,
    pub logprobs: Option<u32>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// How a call's response is shaped, besides the prompt itself.
#[derive(Clone, Debug, Default)]
pub struct Shape {
    pub stream: bool,
    pub include_usage: bool,
    /// Chat: per-token log-probabilities asked for.
    pub logprobs: bool,
    /// Text completions: the prompt to echo before the completion.
    pub echo: Option<String>,
}

impl Sampling {
    fn params(&self, max_tokens: Option<u32>) -> Result<GenerationParams, HttpError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(HttpError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
        if let Some(n) = self.best_of.filter(|&n| n != 1) {
            return Err(HttpError::invalid(
                "best_of",
                format!("only best_of = 1 is supported, got {n}"),
            ));
        }
        let defaults = GenerationParams::default();
        let response_format = match self.response_format.as_ref().map(|f| f.kind.as_str()) {
            None | Some("text") => ResponseFormat::Text,
            Some("json_object") => ResponseFormat::JsonObject,
            Some("json_schema") => {
                return Err(HttpError::invalid(
                    "response_format",
                    "response_format json_schema is not supported; use json_object",
                )
                .with_code("unsupported_value"))
            }
            Some(other) => {
                return Err(HttpError::invalid(
                    "response_format",
                    format!("unknown response_format type {other:?}"),
                ))
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        Ok(GenerationParams {
            max_tokens: max_tokens.unwrap_or(defaults.max_tokens),
            temperature: self.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            seed: self.seed,
            stop,
            response_format,
            priority: self.priority.unwrap_or(defaults.priority),
            ignore_eos: self.ignore_eos.unwrap_or(defaults.ignore_eos),
            ..defaults
        })
    }

    /// The context named by the body and/or the `X-Llmsd-Context` header (they must agree).
    fn context(&self, header: Option<&str>) -> Result<Option<String>, HttpError> {
        match (self.context.as_deref(), header) {
            (Some(b), Some(h)) if b != h => Err(HttpError::invalid(
                "context",
                "the context field and the X-Llmsd-Context header name different contexts",
            )),
            (Some(c), _) | (None, Some(c)) if c.is_empty() => {
                Err(HttpError::invalid("context", "the context id is empty"))
            }
            (b, h) => Ok(b.or(h).map(str::to_string)),
        }
    }

    fn shape(&self) -> Shape {
        let stream = self.stream.unwrap_or(false);
        Shape {
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .is_some_and(|o| o.include_usage),
            ..Shape::default()
        }
    }
}

fn message_text(i: usize, content: Option<MessageContent>) -> Result<String, HttpError> {
    match content {
        None => Ok(String::new()),
        Some(MessageContent::Text(t)) => Ok(t),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for p in parts {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    (kind, _) => {
                        return Err(HttpError::invalid(
                            "messages",
                            format!(
                                "messages[{i}]: content part of type {kind:?} is not supported \
                                 (only text)"
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

impl ChatCompletionRequest {
    pub fn into_prompt(
        self,
        header_context: Option<&str>,
    ) -> Result<(PromptRequest, Shape), HttpError> {
        let s = &self.sampling;
        let mut params = s.params(self.max_completion_tokens.or(s.max_tokens))?;
        match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (true, n) => params.logprobs = Some(n.unwrap_or(0)),
            (false, Some(n)) if n > 0 => {
                return Err(HttpError::invalid(
                    "top_logprobs",
                    "top_logprobs requires logprobs = true",
                ))
            }
            (false, _) => {}
        }
        let mut shape = s.shape();
        shape.logprobs = params.logprobs.is_some();
        let context = s.context(header_context)?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            // OpenAI's newer name for the system role.
            let role = if m.role == "developer" {
                "system".to_string()
            } else {
                m.role
            };
            messages.push(ChatMessage {
                role,
                content: message_text(i, m.content)?,
            });
        }
        if messages.is_empty() {
            return Err(HttpError::invalid("messages", "messages must not be empty"));
        }
        let req = PromptRequest {
            context,
            input: PromptInput::Messages(messages),
            params,
            stream: shape.stream,
        };
        Ok((req, shape))
    }
}

impl CompletionRequest {
    pub fn into_prompt(
        self,
        header_context: Option<&str>,
    ) -> Result<(PromptRequest, Shape), HttpError> {
        let s = &self.sampling;
        let mut params = s.params(s.max_tokens)?;
        params.logprobs = self.logprobs;
        if self.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
            return Err(HttpError::invalid("suffix", "suffix is not supported"));
        }
        let prompt = match self.prompt {
            PromptIn::Text(t) => t,
            PromptIn::Texts(mut v) if v.len() == 1 => v.remove(0),
            PromptIn::Texts(_) => {
                return Err(HttpError::invalid(
                    "prompt",
                    "only one prompt per request is supported",
                ))
            }
            PromptIn::Tokens(_) | PromptIn::TokenLists(_) => {
                return Err(HttpError::invalid(
                    "prompt",
                    "token-id prompts are not supported; send text",
                ))
            }
        };
        let mut shape = s.shape();
        shape.logprobs = params.logprobs.is_some();
        if self.echo.unwrap_or(false) {
            // Prompt log-probabilities come with the completion, so a stream echoes the
            // prompt's text only.
            params.prompt_logprobs = params.logprobs.is_some() && !shape.stream;
            shape.echo = Some(prompt.clone());
        }
        let req = PromptRequest {
            context: s.context(header_context)?,
            input: PromptInput::Text(prompt),
            params,
            stream: shape.stream,
        };
        Ok((req, shape))
    }
}

/// What every response object carries.
#[derive(Clone, Debug)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub fn system_fingerprint() -> String {
    format!("llmsd-{}", env!("CARGO_PKG_VERSION"))
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "energy_j": u.energy_j,
    })
}

/// One entry of a chat response's `logprobs.content`.
pub fn chat_logprob(lp: &TokenLogprob) -> Value {
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes}))
        .collect();
    json!({
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": lp.bytes,
        "top_logprobs": top,
    })
}

pub fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    json!({
        "content": lps.iter().map(chat_logprob).collect::<Vec<_>>(),
        "refusal": null,
    })
}

/// Log-probabilities of a text completion, in the legacy column shape.
#[derive(Debug, Default)]
pub struct LegacyLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    /// Offset of the next token, in characters.
    offset: usize,
}

impl LegacyLogprobs {
    pub fn starting_at(offset: usize) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }

    pub fn push(&mut self, token: &str, lp: Option<&TokenLogprob>) {
        self.tokens.push(token.to_string());
        self.token_logprobs.push(lp.map(|l| l.logprob));
        self.top_logprobs.push(lp.map(|l| {
            l.top
                .iter()
                .map(|t| (t.token.clone(), json!(t.logprob)))
                .collect()
        }));
        self.text_offset.push(self.offset);
        self.offset += token.chars().count();
    }

    pub fn push_logprob(&mut self, lp: &TokenLogprob) {
        self.push(&lp.token, Some(lp));
    }

    pub fn json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// Non-streamed `chat.completion`.
pub fn chat_response(meta: &Meta, c: &Completion, shape: &Shape) -> Value {
    let logprobs = match (&c.logprobs, shape.logprobs) {
        (Some(l), true) => chat_logprobs(l),
        _ => Value::Null,
    };
    let mut v = json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": system_fingerprint(),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.text, "refusal": null},
            "logprobs": logprobs,
            "finish_reason": c.finish_reason.as_str(),
        }],
        "usage": usage_json(&c.usage),
        "timings": c.timings,
    });
    add_context(&mut v, c.context.as_deref());
    v
}

/// Non-streamed `text_completion`. `prompt_tokens` are the echoed prompt's tokens (for
/// their text where the service has no log-probability).
pub fn completion_response(
    meta: &Meta,
    c: &Completion,
    shape: &Shape,
    prompt_tokens: &[String],
) -> Value {
    let echo = shape.echo.as_deref();
    let text = match echo {
        Some(p) => format!("{p}{}", c.text),
        None => c.text.clone(),
    };
    let logprobs = match (&c.logprobs, shape.logprobs) {
        (Some(l), true) => {
            let mut out = match echo {
                Some(_) => {
                    let mut out = LegacyLogprobs::starting_at(0);
                    echo_prompt_logprobs(&mut out, c.prompt_logprobs.as_deref(), prompt_tokens);
                    out
                }
                None => LegacyLogprobs::starting_at(0),
            };
            for lp in l {
                out.push_logprob(lp);
            }
            out.json()
        }
        _ => Value::Null,
    };
    let mut v = json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": system_fingerprint(),
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason.as_str(),
        }],
        "usage": usage_json(&c.usage),
        "timings": c.timings,
    });
    add_context(&mut v, c.context.as_deref());
    v
}

/// The echoed prompt's tokens: the service's prompt log-probabilities cover the whole
/// prompt it ran (a BOS, a context's earlier text); the echo shows the last
/// `prompt_tokens.len()` of them, with the tokenizer's text where there is no entry.
fn echo_prompt_logprobs(
    out: &mut LegacyLogprobs,
    prompt_lps: Option<&[Option<TokenLogprob>]>,
    prompt_tokens: &[String],
) {
    let lps = prompt_lps.unwrap_or(&[]);
    let n = prompt_tokens.len();
    let skip = lps.len().saturating_sub(n);
    let lps = &lps[skip..];
    // If the service ran fewer tokens than the tokenizer gives, the first ones have none.
    let missing = n - lps.len();
    for (i, tok) in prompt_tokens.iter().enumerate() {
        let lp = i.checked_sub(missing).and_then(|j| lps[j].as_ref());
        match lp {
            Some(l) => out.push(&l.token, Some(l)),
            None => out.push(tok, None),
        }
    }
}

pub fn add_context(v: &mut Value, context: Option<&str>) {
    if let (Some(c), Some(obj)) = (context, v.as_object_mut()) {
        obj.insert("context".into(), json!(c));
    }
}

/// One `chat.completion.chunk`.
pub fn chat_chunk(meta: &Meta, delta: Value, logprobs: Value, finish: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": system_fingerprint(),
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }],
    })
}

/// One streamed `text_completion`.
pub fn text_chunk(meta: &Meta, text: &str, logprobs: Value, finish: Option<&str>) -> Value {
    json!({
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": system_fingerprint(),
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(v: Value) -> Result<(PromptRequest, Shape), HttpError> {
        serde_json::from_value::<ChatCompletionRequest>(v)
            .unwrap()
            .into_prompt(None)
    }

    #[test]
    fn chat_fields_map_to_params() {
        let (req, shape) = chat(json!({
            "model": "whatever",
            "messages": [{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5,
            "seed": 3, "stop": "\n", "n": 1, "logprobs": true, "top_logprobs": 2,
            "response_format": {"type": "json_object"}, "frequency_penalty": 0.5,
            "presence_penalty": 0.25, "user": "u1", "top_k": 4, "min_p": 0.1,
            "repetition_penalty": 1.1, "stream": true, "stream_options": {"include_usage": true},
            "some_future_field": {"x": 1}, "context": "ctx-1"
        }))
        .unwrap();
        let p = &req.params;
        assert_eq!(p.max_tokens, 7);
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_p, 0.5);
        assert_eq!(p.seed, Some(3));
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.logprobs, Some(2));
        assert_eq!(p.response_format, ResponseFormat::JsonObject);
        assert_eq!((p.top_k, p.min_p, p.repetition_penalty), (4, 0.1, 1.1));
        assert_eq!((p.frequency_penalty, p.presence_penalty), (0.5, 0.25));
        assert!(shape.stream && shape.include_usage && shape.logprobs && req.stream);
        assert_eq!(req.context.as_deref(), Some("ctx-1"));
        assert_eq!(
            req.input,
            PromptInput::Messages(vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi")
            ])
        );
    }

    #[test]
    fn openai_defaults() {
        let (req, shape) = chat(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!(req.params.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(req.params.logprobs, None);
        assert!(!shape.stream && !req.stream);
        assert_eq!(req.context, None);
    }

    #[test]
    fn unsupported_values_are_400() {
        let m = json!([{"role": "user", "content": "hi"}]);
        for (body, param) in [
            (json!({"messages": m, "n": 2}), "n"),
            (
                json!({"messages": m, "response_format": {"type": "json_schema"}}),
                "response_format",
            ),
            (json!({"messages": m, "top_logprobs": 3}), "top_logprobs"),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert_eq!(e.param, Some(param));
        }
        let e = serde_json::from_value::<ChatCompletionRequest>(json!({"messages": m}))
            .unwrap()
            .into_prompt(Some("ctx-2"));
        assert_eq!(e.unwrap().0.context.as_deref(), Some("ctx-2"));
        let mut r: ChatCompletionRequest =
            serde_json::from_value(json!({"messages": m, "context": "a"})).unwrap();
        r.sampling.context = Some("a".into());
        assert_eq!(r.into_prompt(Some("b")).unwrap_err().param, Some("context"));
    }

    #[test]
    fn completion_fields() {
        let r: CompletionRequest = serde_json::from_value(json!({
            "prompt": ["Once"], "echo": true, "logprobs": 3, "stop": ["a", "b"]
        }))
        .unwrap();
        let (req, shape) = r.into_prompt(None).unwrap();
        assert_eq!(req.input, PromptInput::Text("Once".into()));
        assert!(req.params.prompt_logprobs);
        assert_eq!(req.params.logprobs, Some(3));
        assert_eq!(shape.echo.as_deref(), Some("Once"));
        for bad in [json!({"prompt": ["a", "b"]}), json!({"prompt": [1, 2]})] {
            let r: CompletionRequest = serde_json::from_value(bad).unwrap();
            assert_eq!(r.into_prompt(None).unwrap_err().param, Some("prompt"));
        }
    }

    #[test]
    fn legacy_logprobs_columns() {
        let lp = |t: &str, l: f32| TokenLogprob {
            id: 1,
            token: t.into(),
            logprob: l,
            bytes: t.as_bytes().to_vec(),
            top: vec![],
        };
        let mut out = LegacyLogprobs::starting_at(0);
        echo_prompt_logprobs(
            &mut out,
            Some(&[None, None, Some(lp("b", -1.0))]),
            &["a".into(), "b".into()],
        );
        out.push_logprob(&lp("cd", -0.5));
        assert_eq!(
            out.json(),
            json!({"tokens": ["a", "b", "cd"], "token_logprobs": [null, -1.0, -0.5],
                   "top_logprobs": [null, {}, {}], "text_offset": [0, 1, 2]})
        );
    }
}
