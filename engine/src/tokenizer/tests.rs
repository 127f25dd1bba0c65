//! Unit tests on small synthetic vocabularies: loading malformed metadata never panics.

use super::*;
use crate::gguf::writer::build;

fn s(x: &str) -> MetaValue {
    MetaValue::String(x.into())
}

fn strs(xs: &[&str]) -> MetaValue {
    MetaValue::Array(xs.iter().map(|x| s(x)).collect())
}

fn load(meta: &[(&str, MetaValue)]) -> Result<Tokenizer, TokenizerError> {
    let g = GgufFile::from_bytes(build(meta, &[])).expect("valid image");
    Tokenizer::from_gguf(&g)
}

fn tiny_bpe(extra: &[(&str, MetaValue)]) -> Result<Tokenizer, TokenizerError> {
    let mut meta = vec![
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("gpt-2")),
        (
            "tokenizer.ggml.tokens",
            strs(&["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab"]),
        ),
        (
            "tokenizer.ggml.merges",
            strs(&["a b", "Ġ ab", "x y", "nospace", " "]),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array([3, 1, 1, 1, 1, 1].map(MetaValue::I32).to_vec()),
        ),
        ("tokenizer.ggml.eos_token_id", MetaValue::U32(0)),
        ("tokenizer.ggml.bos_token_id", MetaValue::U32(99)),
    ];
    for (k, v) in extra {
        meta.retain(|(mk, _)| mk != k);
        meta.push((k, v.clone()));
    }
    load(&meta)
}

#[test]
fn tiny_bpe_merges_and_specials() {
    let t = tiny_bpe(&[]).unwrap();
    assert_eq!(t.encode("ab ab", false, false), [3, 5]);
    // Characters without a token are dropped (llama.cpp has no byte token to use).
    assert_eq!(t.encode("abc", false, false), [3]);
    assert_eq!(t.encode("<|endoftext|>", false, true), [0]);
    assert_eq!(t.decode(&[3, 5, 0]), b"ab ab<|endoftext|>");
    assert!(t.is_eog(0));
    // bos 99 is out of range and the gpt2 default (11) too: no BOS.
    assert_eq!(t.bos_id(), None);
    assert_eq!(t.token_bytes(1000), b"");
}

#[test]
fn malformed_metadata_is_an_error() {
    assert!(matches!(
        tiny_bpe(&[("tokenizer.ggml.model", s("wordpiece"))]),
        Err(TokenizerError::UnknownModel(_))
    ));
    assert!(tiny_bpe(&[("tokenizer.ggml.tokens", s("nope"))]).is_err());
    assert!(tiny_bpe(&[(
        "tokenizer.ggml.tokens",
        MetaValue::Array(vec![MetaValue::U8(1)])
    )])
    .is_err());
    assert!(tiny_bpe(&[("tokenizer.ggml.tokens", strs(&["a", "a"]))]).is_err());
    assert!(tiny_bpe(&[("tokenizer.ggml.merges", MetaValue::U32(3))]).is_err());
    assert!(tiny_bpe(&[("tokenizer.ggml.token_type", strs(&["x"]))]).is_err());
    assert!(tiny_bpe(&[(
        "tokenizer.ggml.scores",
        MetaValue::Array(vec![MetaValue::F32(0.0)])
    )])
    .is_err());
    assert!(tiny_bpe(&[("tokenizer.ggml.pre", MetaValue::U32(3))]).is_err());
    // Unknown pre-tokenizer: gpt2 fallback; wrong-typed flags are ignored.
    let t = tiny_bpe(&[
        ("tokenizer.ggml.pre", s("martian")),
        ("tokenizer.ggml.add_bos_token", s("yes")),
        ("tokenizer.ggml.eos_token_id", s("0")),
    ])
    .unwrap();
    assert_eq!(t.pre_type(), Some(PreType::Gpt2));
    assert_eq!(t.encode("ab", true, false), [3]);
    let _ = t.encode("ab \u{0}\u{10FFFF}", true, true);
}

#[test]
fn tiny_spm_byte_fallback_and_unknown() {
    let mut meta = vec![
        ("tokenizer.ggml.model", s("llama")),
        (
            "tokenizer.ggml.tokens",
            strs(&["<unk>", "<s>", "</s>", "▁", "a", "▁a", "<0xC3>", "<0xA9>"]),
        ),
        (
            "tokenizer.ggml.scores",
            MetaValue::Array(
                [0.0, 0.0, 0.0, -1.0, -2.0, -0.5, 0.0, 0.0]
                    .map(MetaValue::F32)
                    .to_vec(),
            ),
        ),
        (
            "tokenizer.ggml.token_type",
            MetaValue::Array([2, 3, 3, 1, 1, 1, 6, 6].map(MetaValue::I32).to_vec()),
        ),
    ];
    let t = load(&meta).unwrap();
    assert!(t.add_bos_default());
    // add_space_prefix defaults to true for SPM.
    assert_eq!(t.encode("a é", true, false), [1, 5, 3, 6, 7]);
    assert_eq!(t.decode(&[5, 3, 6, 7]), " a é".as_bytes());
    // No byte token for 'z': the unknown token.
    assert_eq!(t.encode("z", false, false), [3, 0]);
    meta.push(("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false)));
    let t = load(&meta).unwrap();
    assert_eq!(t.encode("a a", false, false), [4, 5]);
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
}
