//! Tokenizer against llama.cpp's reference ids, with the real SmolLM2 and Gemma-3 models.
//!
//! Missing models or reference files fail the tests (run `scripts/fetch-models`), so a CI
//! without them cannot look green.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use llmsd_engine::gguf::GgufFile;
use llmsd_engine::tokenizer::Tokenizer;
use serde_json::Value;

const SMOLLM: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";
const GPL3: &str = "/usr/share/common-licenses/GPL-3";

fn model_path(name: &str) -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name);
    assert!(
        p.exists(),
        "model {} is missing: run scripts/fetch-models",
        p.display()
    );
    p
}

fn reference(name: &str) -> Value {
    let dir = std::env::var_os("LLMSD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/reference/"
            ))
        });
    let p = dir.join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| {
        panic!(
            "reference file {} unreadable ({e}); set LLMSD_REFERENCE_DIR or run scripts/fetch-models",
            p.display()
        )
    });
    serde_json::from_str(&text).expect("reference JSON")
}

fn load(name: &str) -> Tokenizer {
    let g = GgufFile::open(model_path(name)).expect("open model");
    Tokenizer::from_gguf(&g).expect("tokenizer")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn gpl3() -> String {
    std::fs::read_to_string(GPL3).unwrap_or_else(|e| panic!("{GPL3} unreadable: {e}"))
}

/// Every reference case: exact ids, round trips, and generated ids decoding to their text.
fn check_reference(tok: &Tokenizer, file: &str) {
    let r = reference(file);
    let cases = r["tokenize"].as_array().expect("tokenize cases");
    assert!(!cases.is_empty());
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let got = tok.encode(text, false, false);
        assert_eq!(got, ids(&c["ids"]), "{file}: tokenize {text:?}");
        assert_eq!(
            tok.decode(&got),
            text.as_bytes(),
            "{file}: round trip {text:?}"
        );
    }
    let greedy = r["greedy"].as_array().expect("greedy cases");
    assert!(!greedy.is_empty());
    for c in greedy {
        let prompt = c["prompt"].as_str().unwrap();
        let bos = c["bos"].as_bool().unwrap();
        let got = tok.encode(prompt, bos, true);
        assert_eq!(got, ids(&c["prompt_ids"]), "{file}: prompt {prompt:?}");
        let body = if bos { &got[1..] } else { &got[..] };
        assert_eq!(
            tok.decode(body),
            prompt.as_bytes(),
            "{file}: prompt round trip"
        );
        let gen = tok.decode(&ids(&c["generated_ids"]));
        assert_eq!(
            String::from_utf8_lossy(&gen),
            c["generated_text"].as_str().unwrap(),
            "{file}: generated text of {prompt:?}"
        );
    }
}

#[test]
fn tokenizer_smollm2_matches_llama_cpp() {
    let tok = load(SMOLLM);
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(!tok.add_bos_default());
    check_reference(&tok, "smollm2_public.json");
}

#[test]
fn tokenizer_gemma3_matches_llama_cpp() {
    let tok = load(GEMMA);
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(2), Some(1)));
    assert!(tok.add_bos_default());
    check_reference(&tok, "gemma3_public.json");
}

#[test]
fn tokenizer_eog_tokens() {
    let s = load(SMOLLM);
    let im_end = s.token_id("<|im_end|>").unwrap();
    assert_eq!(im_end, 2);
    assert!(s.is_eog(im_end));
    assert!(s.is_eog(s.eos_id().unwrap()));
    assert!(s.is_eog(s.token_id("<|endoftext|>").unwrap()));
    assert!(!s.is_eog(s.token_id("<|im_start|>").unwrap()));
    assert!(!s.is_eog(s.encode("Hello", false, false)[0]));
    assert_eq!(s.token_text(im_end), Some("<|im_end|>"));
    assert_eq!(s.token_bytes(im_end), b"<|im_end|>");

    let g = load(GEMMA);
    let eot = g.token_id("<end_of_turn>").unwrap();
    assert!(g.is_eog(eot));
    assert!(g.is_eog(g.eos_id().unwrap()));
    assert!(!g.is_eog(g.token_id("<start_of_turn>").unwrap()));
    assert!(!g.is_eog(g.bos_id().unwrap()));
    assert_eq!(
        g.encode("<start_of_turn>user\nHi<end_of_turn>\n", true, true),
        [2, 105, 2364, 107, 10979, 106, 107]
    );
}

#[test]
fn tokenizer_gpl3_round_trip_and_speed() {
    let text = gpl3();
    for name in [SMOLLM, GEMMA] {
        let tok = load(name);
        let ids = tok.encode(&text, false, false);
        assert!(ids.len() > 5000, "{name}: {} tokens", ids.len());
        assert_eq!(
            tok.decode(&ids),
            text.as_bytes(),
            "{name}: GPL-3 round trip"
        );
        // Best of 3: the machine is shared, one slow run is not the tokenizer's fault.
        // Special-token parsing too (Gemma has ~6400 control tokens to look for).
        for special in [false, true] {
            let dt = (0..3)
                .map(|_| {
                    let t = Instant::now();
                    let _ = tok.encode(&text, special, special);
                    t.elapsed()
                })
                .min()
                .unwrap();
            assert!(
                dt < Duration::from_millis(100),
                "{name}: GPL-3 (parse_special {special}) took {dt:?}"
            );
        }
    }
}

#[test]
fn tokenizer_long_runs_are_not_quadratic() {
    for name in [SMOLLM, GEMMA] {
        let tok = load(name);
        for unit in ["a", " ", "\n", "ab ", "1", "é", "\t", "<"] {
            let text = unit.repeat(100_000 / unit.len());
            let t = Instant::now();
            let ids = tok.encode(&text, false, true);
            let dt = t.elapsed();
            assert_eq!(tok.decode(&ids), text.as_bytes(), "{name}: run of {unit:?}");
            assert!(
                dt < Duration::from_secs(1),
                "{name}: run of {unit:?} took {dt:?}"
            );
        }
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn smollm() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| load(SMOLLM))
    }

    fn gemma() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(|| load(GEMMA))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn tokenizer_round_trips_arbitrary_text(s in any::<String>()) {
            for tok in [smollm(), gemma()] {
                let ids = tok.encode(&s, false, false);
                // SentencePiece renders U+2581 as a space, as llama.cpp does.
                let expect = if tok.pre_type().is_none() { s.replace('\u{2581}', " ") } else { s.clone() };
                prop_assert_eq!(tok.decode(&ids), expect.into_bytes());
                let _ = tok.encode(&s, true, true);
            }
        }

        #[test]
        fn tokenizer_round_trips_wordy_text(s in "[ a-zA-Z0-9\t\n'.,<>|_éü日本🚀]{0,200}") {
            for tok in [smollm(), gemma()] {
                let ids = tok.encode(&s, false, false);
                prop_assert_eq!(tok.decode(&ids), s.as_bytes());
            }
        }
    }
}
