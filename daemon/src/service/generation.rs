//! One request's generation: parameter checks, sampling, stop strings, UTF-8 held back across
//! tokens, log-probabilities and the JSON constraint. The scheduler feeds it logits, one step
//! at a time, for many requests at once.

use llmsd_engine::sampling::{Sampler, SamplingParams, StopMatcher, StopStep};
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{
    ApiError, FinishReason, GenerationParams, PromptInput, PromptRequest, ResponseFormat,
    TokenEvent, TokenLogprob, TopLogprob,
};

use super::json_constraint::JsonPrefix;

/// Most tokens one call may generate.
pub const MAX_GENERATED_TOKENS: u32 = 8192;
/// Most alternatives per position in log-probabilities (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;
const MAX_STOPS: usize = 4;
const MAX_STOP_BYTES: usize = 256;

/// Checks a prompt's parameters before it is queued.
pub fn validate(req: &PromptRequest, _vocab: u64) -> Result<(), ApiError> {
    let p = &req.params;
    if p.max_tokens > MAX_GENERATED_TOKENS {
        return Err(ApiError::invalid(format!(
            "max_tokens = {} exceeds {MAX_GENERATED_TOKENS}",
            p.max_tokens
        )));
    }
    if p.max_tokens == 0 && !p.prompt_logprobs {
        return Err(ApiError::invalid("max_tokens must be at least 1"));
    }
    if p.stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(format!(
            "at most {MAX_STOPS} stop strings, got {}",
            p.stop.len()
        )));
    }
    if let Some(s) = p
        .stop
        .iter()
        .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(ApiError::invalid(format!(
            "stop strings must be 1-{MAX_STOP_BYTES} bytes, got {} bytes",
            s.len()
        )));
    }
    if let Some(n) = p.logprobs {
        if n > MAX_TOP_LOGPROBS {
            return Err(ApiError::invalid(format!(
                "logprobs = {n} exceeds {MAX_TOP_LOGPROBS}"
            )));
        }
    }
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(ApiError::invalid(format!(
            "temperature must be between 0 and 2, got {}",
            p.temperature
        )));
    }
    if !(-2.0..=2.0).contains(&p.frequency_penalty) || !(-2.0..=2.0).contains(&p.presence_penalty) {
        return Err(ApiError::invalid(
            "frequency_penalty and presence_penalty must be between -2 and 2",
        ));
    }
    sampling_params(p)
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    match &req.input {
        PromptInput::Messages(m) => {
            if m.is_empty() {
                return Err(ApiError::invalid("messages must not be empty"));
            }
            if let Some(bad) = m
                .iter()
                .find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
            {
                return Err(ApiError::invalid(format!(
                    "message role must be system, user or assistant, got {:?}",
                    bad.role
                )));
            }
        }
        PromptInput::Text(t) => {
            if t.is_empty() && req.context.is_none() {
                return Err(ApiError::invalid("the prompt is empty"));
            }
        }
    }
    Ok(())
}

pub fn sampling_params(p: &GenerationParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        seed: p.seed,
        ..SamplingParams::default()
    }
}

/// What one step produced.
#[derive(Debug)]
pub enum Step {
    /// A token to stream; it is also the next input.
    Token(TokenEvent),
    /// Generation ended; the event (if any) carries the last text to stream.
    Finish(Option<TokenEvent>, FinishReason),
}

pub struct Generation {
    sampler: Sampler,
    stops: StopMatcher,
    pending_utf8: Vec<u8>,
    pub text: String,
    pub generated: Vec<u32>,
    history: Vec<u32>,
    max_tokens: usize,
    top_logprobs: Option<usize>,
    pub logprobs: Vec<TokenLogprob>,
    json: Option<JsonPrefix>,
    ignore_eos: bool,
}

impl Generation {
    pub fn new(p: &GenerationParams, prompt: &[u32]) -> Result<Self, ApiError> {
        let sampler =
            Sampler::new(sampling_params(p)).map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(Self {
            sampler,
            stops: StopMatcher::new(p.stop.clone()),
            pending_utf8: Vec::new(),
            text: String::new(),
            generated: Vec::new(),
            history: prompt.to_vec(),
            max_tokens: p.max_tokens as usize,
            top_logprobs: p.logprobs.map(|n| n as usize),
            logprobs: Vec::new(),
            json: (p.response_format == ResponseFormat::JsonObject).then(JsonPrefix::default),
            ignore_eos: p.ignore_eos,
        })
    }

    /// Samples the next token from `logits` (modified in place by the JSON constraint).
    pub fn step(&mut self, logits: &mut [f32], tok: &Tokenizer) -> Step {
        if self.max_tokens == 0 {
            return Step::Finish(None, FinishReason::Length);
        }
        if let Some(state) = &self.json {
            mask_json(state, logits, tok);
        } else if self.ignore_eos {
            for id in tok.eog_ids() {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        let id = self.sampler.sample(logits, &self.history);
        let logprob = self.top_logprobs.map(|n| {
            let (lp, top) = Sampler::logprobs(logits, id, n);
            token_logprob(tok, id, lp, &top)
        });
        if tok.is_eog(id) {
            let tail = self.flush();
            self.text.push_str(&tail);
            let ev = (!tail.is_empty()).then_some(TokenEvent {
                index: self.generated.len() as u32,
                token_id: id,
                text: tail,
                logprob: None,
            });
            return Step::Finish(ev, FinishReason::Stop);
        }
        self.generated.push(id);
        self.history.push(id);
        if let Some(lp) = &logprob {
            self.logprobs.push(lp.clone());
        }
        let mut json_done = false;
        if let Some(state) = &mut self.json {
            // Masking guarantees the token continues the object.
            state.feed(tok.token_bytes(id));
            json_done = state.is_complete();
        }
        self.pending_utf8.extend_from_slice(tok.token_bytes(id));
        let piece = take_utf8(&mut self.pending_utf8);
        let (mut emit, stopped) = match self.stops.push(&piece) {
            StopStep::Continue { emit } => (emit, false),
            StopStep::Stopped { emit, .. } => (emit, true),
        };
        let reason = if stopped || json_done {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if reason.is_some() && !stopped {
            emit.push_str(&self.flush());
        }
        self.text.push_str(&emit);
        let ev = TokenEvent {
            index: self.generated.len() as u32 - 1,
            token_id: id,
            text: emit,
            logprob,
        };
        match reason {
            Some(r) => Step::Finish(Some(ev), r),
            None => Step::Token(ev),
        }
    }

    /// The context is full: ends with what is held back.
    pub fn finish_early(&mut self) -> String {
        let tail = self.flush();
        self.text.push_str(&tail);
        tail
    }

    fn flush(&mut self) -> String {
        let mut tail = self.stops.finish();
        tail.push_str(&String::from_utf8_lossy(&self.pending_utf8));
        self.pending_utf8.clear();
        tail
    }
}

/// Only tokens that continue the JSON object stay possible; end-of-generation only once it
/// is complete (and then nothing else).
fn mask_json(state: &JsonPrefix, logits: &mut [f32], tok: &Tokenizer) {
    let done = state.is_complete();
    let mut any = false;
    for (id, l) in logits.iter_mut().enumerate() {
        let id = id as u32;
        let ok = if tok.is_eog(id) {
            done
        } else {
            let bytes = tok.token_bytes(id);
            !done && !bytes.is_empty() && state.clone().feed(bytes)
        };
        if ok {
            any = any || l.is_finite();
        } else {
            *l = f32::NEG_INFINITY;
        }
    }
    if !any {
        // Cannot happen with a byte-level vocabulary; end rather than emit invalid JSON.
        if let Some(eos) = tok.eos_id() {
            if let Some(l) = logits.get_mut(eos as usize) {
                *l = 0.0;
            }
        }
    }
}

pub fn token_logprob(tok: &Tokenizer, id: u32, lp: f32, top: &[(u32, f32)]) -> TokenLogprob {
    let bytes = tok.token_bytes(id).to_vec();
    TokenLogprob {
        id,
        token: String::from_utf8_lossy(&bytes).into_owned(),
        logprob: lp,
        bytes,
        top: top
            .iter()
            .map(|&(t, l)| {
                let b = tok.token_bytes(t).to_vec();
                TopLogprob {
                    id: t,
                    token: String::from_utf8_lossy(&b).into_owned(),
                    logprob: l,
                    bytes: b,
                }
            })
            .collect(),
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `pending`, leaving an incomplete
/// trailing character (a token may end mid-character) for the next token to finish.
pub fn take_utf8(pending: &mut Vec<u8>) -> String {
    match std::str::from_utf8(pending) {
        Ok(s) => {
            let s = s.to_string();
            pending.clear();
            s
        }
        Err(e) if e.error_len().is_none() => {
            let valid = e.valid_up_to();
            let s = String::from_utf8_lossy(&pending[..valid]).into_owned();
            pending.drain(..valid);
            s
        }
        Err(_) => {
            // Invalid bytes that no continuation can fix: replace them.
            let s = String::from_utf8_lossy(pending).into_owned();
            pending.clear();
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsd_ipc::ChatMessage;

    fn req(params: GenerationParams) -> PromptRequest {
        PromptRequest {
            context: None,
            input: PromptInput::Text("hi".into()),
            params,
            stream: true,
        }
    }

    #[test]
    fn bad_parameters_are_refused_with_the_field() {
        let cases = [
            (
                GenerationParams {
                    max_tokens: 0,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                GenerationParams {
                    max_tokens: 100_000,
                    ..Default::default()
                },
                "max_tokens",
            ),
            (
                GenerationParams {
                    temperature: -1.0,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "temperature",
            ),
            (
                GenerationParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                GenerationParams {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "logprobs",
            ),
            (
                GenerationParams {
                    stop: vec!["".into()],
                    ..Default::default()
                },
                "stop",
            ),
            (
                GenerationParams {
                    stop: vec!["a".into(); 5],
                    ..Default::default()
                },
                "stop",
            ),
            (
                GenerationParams {
                    presence_penalty: 3.0,
                    ..Default::default()
                },
                "presence_penalty",
            ),
        ];
        for (p, field) in cases {
            let e = validate(&req(p.clone()), 100).unwrap_err();
            assert!(e.message.contains(field), "{p:?}: {}", e.message);
        }
        assert!(validate(&req(GenerationParams::default()), 100).is_ok());
        let mut bad_role = req(GenerationParams::default());
        bad_role.input = PromptInput::Messages(vec![ChatMessage::new("robot", "x")]);
        assert!(validate(&bad_role, 100)
            .unwrap_err()
            .message
            .contains("robot"));
    }

    #[test]
    fn utf8_split_across_tokens_is_held_back() {
        let mut p = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_utf8(&mut p), "");
        p.push("é".as_bytes()[1]);
        assert_eq!(take_utf8(&mut p), "é");
        assert!(p.is_empty());
    }
}
