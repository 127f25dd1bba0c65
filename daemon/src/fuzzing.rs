//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the tests that replay their
//! seed corpora in CI (tests/fuzz_corpus.rs). Each takes arbitrary bytes and must return
//! without panicking, checking the invariants that hold for every input.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use llmsd_engine::model::{Logits, Model};
use llmsd_engine::pool::ThreadPool;
use llmsd_ipc::{frame, ClientFrame, ServerFrame};

use crate::http::openai::{ChatCompletionRequest, CompletionRequest};
use crate::kvstore::store::app_dir_name;
use crate::kvstore::swapfile::SwapFile;
use crate::kvstore::{durable, KvStore, StoreConfig};
use crate::service::generation;

/// A socket frame as the daemon reads it: a 4-byte length header, then a JSON body. A frame
/// that decodes re-encodes to one that decodes to the same value.
pub fn socket_frame(data: &[u8]) {
    if let Some(header) = data.get(..4).and_then(|h| <[u8; 4]>::try_from(h).ok()) {
        if let Ok(len) = frame::body_len(header) {
            assert!(
                len <= llmsd_ipc::MAX_FRAME_BYTES,
                "oversized frame accepted"
            );
        }
    }
    let body = data.get(4..).unwrap_or_default();
    if let Ok(f) = frame::decode::<ClientFrame>(body) {
        let bytes = frame::encode(&f).expect("a decoded frame encodes");
        let again: ClientFrame = frame::decode(&bytes[4..]).expect("re-encoded frame decodes");
        assert_eq!(again, f, "frame changed in a round trip");
        if let ClientFrame::Request {
            request: llmsd_ipc::Request::Prompt(p),
            ..
        } = &f
        {
            let _ = generation::validate(p, 49_152);
        }
    }
    let _ = frame::decode::<ServerFrame>(body);
}

/// An HTTP body as the OpenAI door parses it, for both endpoints: JSON into the request type,
/// then into a prompt request and through the service's validation.
pub fn http_body(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<ChatCompletionRequest>(data) {
        if let Ok((p, _)) = req.into_prompt(Some("ctx-header")) {
            let _ = generation::validate(&p, 49_152);
        }
    }
    if let Ok(req) = serde_json::from_slice::<CompletionRequest>(data) {
        if let Ok((p, _)) = req.into_prompt(None) {
            let _ = generation::validate(&p, 49_152);
        }
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("llmsd-fuzz-{what}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A swap segment file with arbitrary content: opening and reading every section of every
/// item gives bytes or an error.
pub fn swap_file(data: &[u8]) {
    let Ok(dir) = Scratch::new("swap") else {
        return;
    };
    let path = dir.path().join("f1.kv");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(f) = SwapFile::open(&path) else {
        return;
    };
    for item in 0..f.n_items().min(4096) {
        let Ok(h) = f.item(item) else { continue };
        let _ = f.item_bytes(item);
        let _ = f.read_item(item);
        for section in 0..(h.n_sections as usize).min(4096) {
            if let Ok(b) = f.read_section(item, section) {
                assert_eq!(Some(b.len()), f.section_raw_len(item, section));
            }
        }
    }
}

/// An app's manifest with arbitrary (checksum-valid) content in a state directory: the store
/// opens (or refuses) it, and every context it lists can be opened and run one token further
/// (its KV recomputed from its tokens) without a panic.
pub fn app_manifest(model: &Arc<Model>, pool: &Arc<ThreadPool>, body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let app = value
        .get("app")
        .and_then(|a| a.as_str())
        .unwrap_or("fuzz")
        .to_string();
    let Ok(state) = Scratch::new("state") else {
        return;
    };
    let dir = state.path().join("apps").join(app_dir_name(&app));
    if std::fs::create_dir_all(&dir).is_err()
        || durable::write_json_atomic(&dir.join("manifest.json"), &value).is_err()
    {
        return;
    }
    let mut cfg = StoreConfig::new(state.path());
    cfg.fit_costs = false;
    cfg.kv_budget_bytes = 64 << 20;
    cfg.max_context_tokens = 256;
    let Ok(mut store) = KvStore::open(model.clone(), pool.clone(), cfg) else {
        return;
    };
    for app in store.apps() {
        for ctx in store.list(&app) {
            let Ok(mut s) = store.open_session(&app, &ctx.id, 1) else {
                continue;
            };
            let _ = store.forward(&mut s, &[0], Logits::Last);
            store.abort_session(s);
        }
    }
}
