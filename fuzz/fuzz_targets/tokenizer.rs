//! Arbitrary text through SmolLM2's tokenizer (`LLMSD_FUZZ_MODEL` overrides the model).
#![no_main]

use std::sync::OnceLock;

use llmsd_engine::gguf::GgufFile;
use llmsd_engine::tokenizer::Tokenizer;

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = std::env::var("LLMSD_FUZZ_MODEL").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../models/SmolLM2-135M-Instruct.Q4_1.gguf").into()
        });
        let file = GgufFile::open(&path).expect("model file");
        Tokenizer::from_gguf(&file).expect("tokenizer")
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmsd_engine::fuzzing::tokenizer(tokenizer(), data, true));
