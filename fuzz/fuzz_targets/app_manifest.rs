//! A hostile manifest loaded by the KV store over SmolLM2 (`LLMSD_FUZZ_MODEL` overrides it).
#![no_main]

use std::sync::{Arc, OnceLock};

use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;

fn model() -> &'static (Arc<Model>, Arc<ThreadPool>) {
    static M: OnceLock<(Arc<Model>, Arc<ThreadPool>)> = OnceLock::new();
    M.get_or_init(|| {
        let path = std::env::var("LLMSD_FUZZ_MODEL").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf").into()
        });
        let model = Model::load(std::path::Path::new(&path)).expect("model");
        (Arc::new(model), Arc::new(ThreadPool::new(1).expect("pool")))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (m, p) = model();
    llmsd::fuzzing::app_manifest(m, p, data)
});
