//! A context's conversation as text: the chat messages (or raw text) it was built from. The
//! KV store keeps token ids; this keeps what they were rendered from, so a new turn can be
//! rendered with the chat template and only the tokens that differ from the context's are
//! prefilled. Lost or stale transcripts cost recompute, never correctness: the token diff
//! truncates the context to what still matches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Transcripts on disk: `<dir>/<hex owner>/<context>.json`, each replaced atomically. A
/// transcript whose write is queued ([`Self::save_later`]) or failed (a full disk) is kept in
/// memory and read from there; a failed one is written with the next save that succeeds.
pub struct TranscriptStore {
    dir: PathBuf,
    unsaved: Mutex<HashMap<PathBuf, Unsaved>>,
    /// Numbers the saves, so a queued write knows whether a later save superseded it.
    saves: AtomicU64,
}

/// A transcript not (yet) on disk.
struct Unsaved {
    save: u64,
    transcript: Transcript,
    /// Its write was tried and failed (rather than queued).
    failed: bool,
}

impl TranscriptStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("transcripts"),
            unsaved: Mutex::new(HashMap::new()),
            saves: AtomicU64::new(0),
        }
    }

    fn path(&self, owner: &str, ctx: &str) -> PathBuf {
        let hex: String = owner.bytes().map(|b| format!("{b:02x}")).collect();
        self.dir.join(hex).join(format!("{ctx}.json"))
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Unsaved>> {
        self.unsaved.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transcript of a context; an unreadable one counts as lost (the context still
    /// works: its next turn is recomputed from where the texts diverge).
    pub fn load(&self, owner: &str, ctx: &str) -> Transcript {
        let path = self.path(owner, ctx);
        if let Some(u) = self.unsaved().get(&path) {
            return u.transcript.clone();
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

    /// Writes `t` now, and any transcript an earlier write could not write. On failure `t` is
    /// kept in memory (and the error returned for the log).
    pub fn save(&self, owner: &str, ctx: &str, t: &Transcript) -> Result<(), DurableError> {
        let path = self.path(owner, ctx);
        let save = self.stage(&path, t.clone());
        self.write_staged(&path, save)
    }

    /// Writes the transcripts whose writes failed (the disk had room again for another).
    fn retry_failed(&self, unsaved: &mut HashMap<PathBuf, Unsaved>) {
        let retry: Vec<(PathBuf, Transcript)> = unsaved
            .iter()
            .filter(|(_, u)| u.failed)
            .map(|(p, u)| (p.clone(), u.transcript.clone()))
            .collect();
        for (p, t) in retry {
            if self.write(&p, &t).is_ok() {
                unsaved.remove(&p);
            }
        }
    }

    /// Makes `t` the context's transcript at once (in memory) and returns its write, to run
    /// off the engine thread (an fsync can take hundreds of milliseconds). The write does
    /// nothing if a later save or a delete came first.
    pub fn save_later(
        self: &Arc<Self>,
        owner: &str,
        ctx: &str,
        t: Transcript,
    ) -> impl FnOnce() + Send + 'static {
        let path = self.path(owner, ctx);
        let save = self.stage(&path, t);
        let store = Arc::clone(self);
        move || {
            if let Err(e) = store.write_staged(&path, save) {
                // Kept in memory; the next successful save writes it.
                tracing::warn!(path = %path.display(), error = %e, "saving the transcript failed");
            }
        }
    }

    /// Makes `t` the transcript of `path` in memory, not written yet; returns its save number.
    fn stage(&self, path: &Path, transcript: Transcript) -> u64 {
        let save = self.saves.fetch_add(1, Ordering::Relaxed);
        let staged = Unsaved {
            save,
            transcript,
            failed: false,
        };
        self.unsaved().insert(path.to_path_buf(), staged);
        save
    }

    /// Writes save number `save` of `path` (from [`Self::stage`]); then, if it is still the
    /// latest, forgets it on success (and retries the failed ones) or marks it failed. A save
    /// superseded by a later one or by a delete is not written.
    fn write_staged(&self, path: &Path, save: u64) -> Result<(), DurableError> {
        let staged = |u: &HashMap<PathBuf, Unsaved>| {
            u.get(path)
                .filter(|u| u.save == save)
                .map(|u| u.transcript.clone())
        };
        let Some(t) = staged(&self.unsaved()) else {
            return Ok(());
        };
        let result = self.write(path, &t);
        let mut unsaved = self.unsaved();
        if unsaved.get(path).is_none_or(|u| u.save != save) {
            return Ok(());
        }
        match &result {
            Ok(()) => {
                unsaved.remove(path);
                self.retry_failed(&mut unsaved);
            }
            Err(_) => {
                if let Some(u) = unsaved.get_mut(path) {
                    u.failed = true;
                }
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

    /// Forgets the context's transcript at once and returns the removal of its file, to run
    /// after any write of it already queued.
    pub fn delete_later(&self, owner: &str, ctx: &str) -> impl FnOnce() + Send + 'static {
        let path = self.path(owner, ctx);
        self.unsaved().remove(&path);
        move || {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(text: &str) -> Transcript {
        Transcript::Chat {
            messages: vec![ChatMessage::new("user", text)],
        }
    }

    /// A queued save is what `load` returns at once; its write lands it on disk; a write
    /// superseded by a later save, or by a delete, writes nothing.
    #[test]
    fn queued_saves_are_read_at_once_and_written_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TranscriptStore::new(dir.path()));
        let file = store.path("app", "ctx-1");

        let first = store.save_later("app", "ctx-1", chat("one"));
        assert_eq!(store.load("app", "ctx-1"), chat("one"));
        assert!(!file.exists(), "written before its write ran");
        let second = store.save_later("app", "ctx-1", chat("two"));
        first();
        assert!(!file.exists(), "a superseded write wrote");
        assert_eq!(store.load("app", "ctx-1"), chat("two"));
        second();
        assert!(file.exists());
        assert!(store.unsaved().is_empty());
        // Read back from disk now.
        assert_eq!(store.load("app", "ctx-1"), chat("two"));

        let third = store.save_later("app", "ctx-1", chat("three"));
        let delete = store.delete_later("app", "ctx-1");
        assert_eq!(
            store.load("app", "ctx-1"),
            chat("two"),
            "from disk until removed"
        );
        third();
        delete();
        assert!(!file.exists());
        assert_eq!(store.load("app", "ctx-1"), Transcript::Empty);
    }

    /// A queued write that fails keeps the transcript in memory, readable; the next save that
    /// succeeds writes it too.
    #[test]
    fn a_failed_queued_write_is_kept_and_retried() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(TranscriptStore::new(dir.path()));
        // A file where the owner's directory must go: every write under it fails.
        std::fs::create_dir_all(&store.dir).unwrap();
        let owner_dir = store.path("app", "x").parent().unwrap().to_path_buf();
        std::fs::write(&owner_dir, b"in the way").unwrap();
        store.save_later("app", "ctx-1", chat("kept"))();
        assert_eq!(store.load("app", "ctx-1"), chat("kept"));
        assert!(store.unsaved().values().all(|u| u.failed));
        std::fs::remove_file(&owner_dir).unwrap();
        store.save("other", "ctx-2", &chat("x")).unwrap();
        assert!(store.unsaved().is_empty());
        assert!(store.path("app", "ctx-1").exists());

        // The same with the next queued write (a turn's) doing the retry.
        std::fs::remove_dir_all(&owner_dir).unwrap();
        std::fs::write(&owner_dir, b"in the way").unwrap();
        store.save_later("app", "ctx-3", chat("kept too"))();
        assert!(store.unsaved().values().all(|u| u.failed));
        std::fs::remove_file(&owner_dir).unwrap();
        store.save_later("other", "ctx-2", chat("y"))();
        assert!(store.unsaved().is_empty());
        assert_eq!(store.load("app", "ctx-3"), chat("kept too"));
        assert!(store.path("app", "ctx-3").exists());
    }
}
