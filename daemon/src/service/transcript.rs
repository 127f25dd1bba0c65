//! A context's conversation as text: the chat messages (or raw text) it was built from. The
//! KV store keeps token ids; this keeps what they were rendered from, so a new turn can be
//! rendered with the chat template and only the tokens that differ from the context's are
//! prefilled. Lost or stale transcripts cost recompute, never correctness: the token diff
//! truncates the context to what still matches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use llmsd_engine::chat::{ChatMessage as TemplateMessage, ChatTemplate};
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{ApiError, ChatMessage, PromptInput};
use serde::{Deserialize, Serialize};

use crate::kvstore::durable::{self, DurableError};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Transcript {
    /// Nothing yet: the first prompt decides chat or text.
    #[default]
    Empty,
    Chat {
        messages: Vec<ChatMessage>,
    },
    Text {
        text: String,
    },
}

impl Transcript {
    pub fn messages(&self) -> usize {
        match self {
            Transcript::Chat { messages } => messages.len(),
            _ => 0,
        }
    }

    /// This transcript with a prompt's input appended.
    pub fn extended(&self, input: &PromptInput) -> Result<Transcript, ApiError> {
        match (self, input) {
            (Transcript::Empty, PromptInput::Messages(m)) => Ok(Transcript::Chat {
                messages: m.clone(),
            }),
            (Transcript::Empty, PromptInput::Text(t)) => Ok(Transcript::Text { text: t.clone() }),
            (Transcript::Chat { messages }, PromptInput::Messages(m)) => {
                let mut all = messages.clone();
                all.extend(m.iter().cloned());
                Ok(Transcript::Chat { messages: all })
            }
            (Transcript::Text { text }, PromptInput::Text(t)) => Ok(Transcript::Text {
                text: format!("{text}{t}"),
            }),
            (Transcript::Chat { .. }, PromptInput::Text(_)) => Err(ApiError::invalid(
                "this context holds a chat; continue it with messages, not text",
            )),
            (Transcript::Text { .. }, PromptInput::Messages(_)) => Err(ApiError::invalid(
                "this context holds raw text; continue it with text, not messages",
            )),
        }
    }

    /// This transcript after the model answered `reply`.
    pub fn with_reply(mut self, reply: &str) -> Transcript {
        match &mut self {
            Transcript::Chat { messages } => {
                messages.push(ChatMessage::new("assistant", reply));
            }
            Transcript::Text { text } => text.push_str(reply),
            Transcript::Empty => {}
        }
        self
    }
}

/// Turns transcripts into token ids. Special tokens are parsed only in the chat template's
/// own text, never in message contents: a user cannot forge turns by typing `<|im_end|>`.
pub struct Renderer<'a> {
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
}

/// Marks a message's content in a rendering (private-use code points no text we render
/// contains: contents holding them are refused).
const MARK_OPEN: char = '\u{F8F0}';
const MARK_CLOSE: char = '\u{F8F1}';

impl Renderer<'_> {
    /// Token ids of `t`, ready for generation (a chat ends with the assistant's opening).
    pub fn tokens(&self, t: &Transcript) -> Result<Vec<u32>, ApiError> {
        match t {
            Transcript::Empty => Ok(self.bos().into_iter().collect()),
            Transcript::Text { text } => {
                let mut ids: Vec<u32> = self.bos().into_iter().collect();
                ids.extend(self.tokenizer.encode(text, false, false));
                Ok(ids)
            }
            Transcript::Chat { messages } => self.chat_tokens(messages),
        }
    }

    fn bos(&self) -> Option<u32> {
        if self.tokenizer.add_bos_default() {
            self.tokenizer.bos_id()
        } else {
            None
        }
    }

    fn chat_tokens(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
        let template = self
            .template
            .ok_or_else(|| ApiError::invalid("this model has no chat template; send text"))?;
        if messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty"));
        }
        for m in messages {
            if m.content.contains([MARK_OPEN, MARK_CLOSE]) {
                return Err(ApiError::invalid(
                    "message content contains reserved code points U+F8F0/U+F8F1",
                ));
            }
        }
        let render = |msgs: Vec<TemplateMessage>| {
            template
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid(format!("chat template: {e}")))
        };
        let real = render(
            messages
                .iter()
                .map(|m| TemplateMessage::new(m.role.clone(), m.content.clone()))
                .collect(),
        )?;
        let marked = render(
            messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    TemplateMessage::new(m.role.clone(), format!("{MARK_OPEN}{i}{MARK_CLOSE}"))
                })
                .collect(),
        )?;
        // Walk the marked rendering: template text between marks is parsed with special
        // tokens; each mark stands for its message's content as the template wrote it into
        // the real rendering (verbatim or trimmed).
        let mut ids = Vec::new();
        let mut rest = marked.as_str();
        let mut pos = 0usize; // in `real`
        let mut first = true;
        loop {
            let (literal, after) = match rest.find(MARK_OPEN) {
                Some(k) => (&rest[..k], Some(&rest[k + MARK_OPEN.len_utf8()..])),
                None => (rest, None),
            };
            if !real[pos..].starts_with(literal) {
                return Err(ApiError::internal(
                    "chat template renders content in a way llmsd cannot separate",
                ));
            }
            // Templates that open with the BOS text (Gemma's) already carry it.
            let bos_text = template.bos_token();
            let add_bos = first
                && self.tokenizer.add_bos_default()
                && (bos_text.is_empty() || !literal.starts_with(bos_text));
            ids.extend(self.tokenizer.encode(literal, add_bos, true));
            first = false;
            pos += literal.len();
            let Some(after) = after else { break };
            let close = after
                .find(MARK_CLOSE)
                .ok_or_else(|| ApiError::internal("chat template cut a message mark"))?;
            let index: usize = after[..close]
                .parse()
                .map_err(|_| ApiError::internal("chat template changed a message mark"))?;
            let content = messages
                .get(index)
                .map(|m| m.content.as_str())
                .ok_or_else(|| ApiError::internal("chat template invented a message"))?;
            let tail = &real[pos..];
            let written = if tail.starts_with(content) {
                content
            } else if tail.starts_with(content.trim()) {
                content.trim()
            } else {
                return Err(ApiError::internal(
                    "chat template transforms message content in a way llmsd cannot separate",
                ));
            };
            ids.extend(self.tokenizer.encode(written, false, false));
            pos += written.len();
            rest = &after[close + MARK_CLOSE.len_utf8()..];
        }
        if pos != real.len() {
            return Err(ApiError::internal(
                "chat template rendering did not line up",
            ));
        }
        Ok(ids)
    }
}

/// Transcripts on disk: `<dir>/<hex owner>/<context>.json`, each replaced atomically. One
/// that could not be written (a full disk) is kept in memory, read from there, and written
/// with the next save that succeeds.
pub struct TranscriptStore {
    dir: PathBuf,
    unsaved: Mutex<HashMap<PathBuf, Transcript>>,
}

impl TranscriptStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("transcripts"),
            unsaved: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, owner: &str, ctx: &str) -> PathBuf {
        let hex: String = owner.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(hex).join(format!("{ctx}.json"))
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Transcript>> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transcript of a context; an unreadable one counts as lost (the context still
    /// works: its next turn is recomputed from where the texts diverge).
    pub fn load(&self, owner: &str, ctx: &str) -> Transcript {
        let path = self.path(owner, ctx);
        if let Some(t) = self.unsaved().get(&path) {
            return t.clone();
        }
        match durable::read_json::<Transcript>(&path) {
            Ok(Some(t)) => t,
            Ok(None) => Transcript::Empty,
            Err(e) => {
                tracing::warn!(owner, ctx, error = %e, "transcript unreadable; starting over");
                Transcript::Empty
            }
        }
    }

    /// Writes `t`, and any transcript an earlier save could not write. On failure `t` is
    /// kept in memory (and the error returned for the log).
    pub fn save(&self, owner: &str, ctx: &str, t: &Transcript) -> Result<(), DurableError> {
        let path = self.path(owner, ctx);
        let result = self.write(&path, t);
        let mut unsaved = self.unsaved();
        match &result {
            Ok(()) => {
                unsaved.remove(&path);
                let retry: Vec<(PathBuf, Transcript)> = unsaved
                    .iter()
                    .map(|(p, t)| (p.clone(), t.clone()))
                    .collect();
                for (p, t) in retry {
                    if self.write(&p, &t).is_ok() {
                        unsaved.remove(&p);
                    }
                }
            }
            Err(_) => {
                unsaved.insert(path, t.clone());
            }
        }
        result
    }

    fn write(&self, path: &Path, t: &Transcript) -> Result<(), DurableError> {
        if let Some(dir) = path.parent() {
            durable::ensure_private_dir(&self.dir)?;
            durable::ensure_private_dir(dir)?;
        }
        durable::write_json_atomic(path, t)
    }

    pub fn delete(&self, owner: &str, ctx: &str) {
        let path = self.path(owner, ctx);
        self.unsaved().remove(&path);
        let _ = std::fs::remove_file(path);
    }
}
