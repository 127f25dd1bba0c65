//! The GGUF reader on real model files and on corrupted copies of them.

use llmsd_engine::gguf::{GgufError, GgufFile};
use rand::{Rng, SeedableRng};

fn model_path(name: &str) -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-models",
        p.display()
    );
    p
}

#[test]
fn real_models_parse() {
    let g = GgufFile::open(model_path("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    assert_eq!(g.tensors.len(), 272);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    let (info, data) = g.tensor("token_embd.weight").unwrap();
    assert_eq!(info.dims, vec![576, 49152]);
    assert_eq!(data.len(), 49152 * 576 / 32 * 34);

    let g = GgufFile::open(model_path("gemma-3-270m-q4_k_m.gguf")).unwrap();
    assert_eq!(g.tensors.len(), 236);
    assert_eq!(g.get_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(g.get_u64("gemma3.attention.sliding_window").unwrap(), 512);
    // Every tensor lies inside the file and tensors do not overlap.
    let mut spans: Vec<_> = g
        .tensors
        .iter()
        .map(|t| (t.offset, t.offset + t.size))
        .collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
    assert!(spans.last().unwrap().1 <= g.bytes().len());
}

#[test]
fn missing_file_is_an_io_error() {
    assert!(matches!(
        GgufFile::open("/nonexistent/model.gguf"),
        Err(GgufError::Io { .. })
    ));
}

/// Every prefix of a real file shorter than its last tensor's end is refused.
#[test]
fn truncated_real_file_is_refused() {
    let bytes = std::fs::read(model_path("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let full = GgufFile::from_bytes(bytes.clone()).unwrap();
    let data_end = full
        .tensors
        .iter()
        .map(|t| t.offset + t.size)
        .max()
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut cuts: Vec<usize> = (0..40).map(|_| rng.gen_range(0..data_end)).collect();
    cuts.extend([
        0,
        3,
        4,
        8,
        23,
        24,
        full.data_offset - 1,
        full.data_offset,
        data_end - 1,
    ]);
    for cut in cuts {
        let r = GgufFile::from_bytes(bytes[..cut].to_vec());
        assert!(r.is_err(), "prefix of {cut} bytes was accepted");
    }
}

/// Random byte flips in the header and metadata never panic, and whatever is accepted is
/// self-consistent.
#[test]
fn corrupted_real_header_never_panics() {
    let bytes = std::fs::read(model_path("gemma-3-270m-q4_k_m.gguf")).unwrap();
    let header_len = GgufFile::from_bytes(bytes.clone()).unwrap().data_offset;
    let img: Vec<u8> = bytes[..header_len].to_vec();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut errors = 0;
    for _ in 0..120 {
        let mut c = img.clone();
        for _ in 0..rng.gen_range(1..4) {
            // Bias flips toward the fixed header and the tensor-info table at the end.
            let pos = if rng.gen_bool(0.5) {
                rng.gen_range(0..64.min(c.len()))
            } else {
                rng.gen_range(c.len().saturating_sub(20_000)..c.len())
            };
            c[pos] = rng.gen();
        }
        match GgufFile::from_bytes(c) {
            Ok(g) => {
                for t in &g.tensors {
                    assert!(t.offset + t.size <= g.bytes().len());
                }
            }
            Err(_) => errors += 1,
        }
    }
    // The header alone lacks the tensor data, so only variants whose tensor count was hit can
    // be accepted (with no tensors left to point past the end).
    assert!(
        errors > 100,
        "only {errors} of 120 corrupted headers were refused"
    );
}

/// The fuzzer's seed corpus parses (so the fuzzer starts from valid structure).
#[test]
fn fuzz_seeds_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let g = GgufFile::from_bytes(bytes).unwrap();
        assert!(!g.tensors.is_empty());
        n += 1;
    }
    assert!(n >= 2);
}
