//! Replays the fuzz targets' seed corpora through the same entry points cargo-fuzz runs
//! (`llmsd::fuzzing`, `llmsd_engine::fuzzing`), so every input a fuzzer was seeded with or
//! found is checked in CI: no panic, and each target's invariants hold.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;

fn seeds(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).expect("seed readable");
            (p, b)
        })
        .collect()
}

/// Runs `entry` on every seed of `target`; fails naming each seed that panicked.
fn replay(dir: PathBuf, min_seeds: usize, entry: impl Fn(&[u8])) {
    let all = seeds(&dir);
    assert!(
        all.len() >= min_seeds,
        "{}: {} seeds, expected at least {min_seeds}",
        dir.display(),
        all.len()
    );
    let failed: Vec<String> = all
        .iter()
        .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| entry(bytes))).is_err())
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(failed.is_empty(), "panicked on: {failed:?}");
}

fn fuzz_seeds(target: &str) -> PathBuf {
    common::repo_root().join("fuzz/seeds").join(target)
}

fn model() -> &'static (Arc<Model>, Arc<ThreadPool>) {
    static M: OnceLock<(Arc<Model>, Arc<ThreadPool>)> = OnceLock::new();
    M.get_or_init(|| {
        let model = Model::load(common::model(common::SMOLLM2)).expect("model loads");
        (Arc::new(model), Arc::new(ThreadPool::new(2).expect("pool")))
    })
}

#[test]
fn socket_frame_seeds() {
    replay(fuzz_seeds("socket_frame"), 10, llmsd::fuzzing::socket_frame);
}

#[test]
fn http_body_seeds() {
    replay(fuzz_seeds("http_body"), 10, llmsd::fuzzing::http_body);
}

#[test]
fn swap_file_seeds() {
    replay(fuzz_seeds("swap_file"), 1, llmsd::fuzzing::swap_file);
}

#[test]
fn chat_template_seeds() {
    replay(
        fuzz_seeds("chat_template"),
        8,
        llmsd_engine::fuzzing::chat_template,
    );
}

#[test]
fn tokenizer_seeds() {
    let tok = Tokenizer::from_gguf(model().0.file()).expect("tokenizer");
    replay(fuzz_seeds("tokenizer"), 5, |d| {
        llmsd_engine::fuzzing::tokenizer(&tok, d, true)
    });
}

#[test]
fn app_manifest_seeds() {
    let (m, p) = model();
    replay(fuzz_seeds("app_manifest"), 5, |d| {
        llmsd::fuzzing::app_manifest(m, p, d)
    });
}

#[test]
fn gguf_seeds() {
    let dir = common::repo_root().join("engine/fuzz/seeds/gguf_parse");
    replay(dir, 2, llmsd_engine::fuzzing::gguf_parse);
}

/// Writes fuzz/seeds/swap_file/segment.kv: a small valid segment with an uncompressed and a
/// compressed item (run with --ignored to regenerate it).
#[test]
#[ignore]
fn write_swap_file_seed() {
    use llmsd::kvstore::swapfile::{write_segment, ItemSpec};
    let plain: Vec<u8> = (0..96u32).map(|i| (i * 37 % 251) as u8).collect();
    let zeros = vec![0u8; 512];
    let items = [
        ItemSpec {
            precision: 4,
            kind: 0,
            n_tokens: 16,
            sections: vec![&plain, &plain[..40]],
        },
        ItemSpec {
            precision: 16,
            kind: 1,
            n_tokens: 3,
            sections: vec![&zeros],
        },
    ];
    let dir = fuzz_seeds("swap_file");
    std::fs::create_dir_all(&dir).expect("seed dir");
    write_segment(&dir.join("segment.kv"), 0x1234, &items, &mut |_, _| {}).expect("segment");
}
