//! Tokenizers from GGUF metadata, reproducing llama.cpp's `llama_tokenize` and
//! `llama_token_to_piece` id for id.
//!
//! Prompts must tokenize exactly as llama.cpp does, or the model sees different ids than it was
//! run with in every reference (and KV chunks computed elsewhere would not match). Two models:
//! byte-level BPE ("gpt2", [`bpe`]) with a named pre-tokenizer ([`pretokenize`]), and
//! SentencePiece-style BPE ("llama", [`spm`]). Both run after special-token partitioning
//! ([`special`]). Loading never panics: malformed metadata is a [`TokenizerError`], or is
//! skipped with a warning where llama.cpp skips it too.

mod bpe;
mod pretokenize;
mod special;
mod spm;
mod unicode;

use std::collections::BTreeSet;
use std::hash::{BuildHasherDefault, Hasher};

use crate::gguf::{GgufError, GgufFile, MetaValue};
use special::{attr, Fragment, SpecialTokens};

pub use pretokenize::PreType;

/// Why a tokenizer could not be built from a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    #[error("tokenizer metadata {key}: {reason}")]
    Malformed { key: &'static str, reason: String },
    #[error("unknown tokenizer model {0:?} (supported: gpt2, llama)")]
    UnknownModel(String),
    #[error("duplicate token {text:?} at ids {first} and {second}")]
    DuplicateToken {
        text: String,
        first: u32,
        second: u32,
    },
}

/// FxHash (rustc's): vocab lookups hash short strings millions of times, and SipHash's DoS
/// resistance buys nothing for a table built from the model file.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().unwrap_or([0; 8])));
        }
        for &b in chunks.remainder() {
            self.add(u64::from(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type HashMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<FxHasher>>;

fn malformed(key: &'static str, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Malformed {
        key,
        reason: reason.into(),
    }
}

enum Model {
    Bpe(bpe::Bpe),
    Spm,
}

/// A loaded vocabulary and its encoder/decoder. Cheap to share (`&Tokenizer` is `Sync`).
pub struct Tokenizer {
    model: Model,
    tokens: Vec<String>,
    token_to_id: HashMap<String, u32>,
    scores: Vec<f32>,
    attrs: Vec<u32>,
    /// `token_to_piece(id, special = true)` for every id.
    pieces: Vec<Vec<u8>>,
    special: SpecialTokens,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: BTreeSet<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match &self.model {
                    Model::Bpe(b) => format!("bpe ({:?})", b.pre),
                    Model::Spm => "spm".to_string(),
                },
            )
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_SCORES: &str = "tokenizer.ggml.scores";
const KEY_TYPES: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";

/// Optional array metadata: `Ok(None)` when absent, an error when present but not an array.
fn opt_array<'a>(
    g: &'a GgufFile,
    key: &'static str,
) -> Result<Option<&'a [MetaValue]>, TokenizerError> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .map(Some)
            .ok_or_else(|| malformed(key, format!("expected an array, found {}", v.type_name()))),
    }
}

fn opt_bool(g: &GgufFile, key: &str) -> Option<bool> {
    let v = g.get(key)?;
    let b = v.as_bool();
    if b.is_none() {
        tracing::warn!(
            "tokenizer: ignoring {key}: expected a bool, found {}",
            v.type_name()
        );
    }
    b
}

impl Tokenizer {
    /// Builds the tokenizer described by `tokenizer.ggml.*` metadata, as llama.cpp's
    /// `llama_vocab::load` does.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let model_name = g.get_str("tokenizer.ggml.model")?;
        let pre_name = match g.get("tokenizer.ggml.pre") {
            None => "",
            Some(v) => v.as_str().ok_or_else(|| {
                malformed(
                    "tokenizer.ggml.pre",
                    format!("expected a string, found {}", v.type_name()),
                )
            })?,
        };
        let is_spm = match model_name {
            "llama" => true,
            "gpt2" => false,
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };

        // Vocabulary.
        let raw_tokens = g.get_array(KEY_TOKENS)?;
        let n = raw_tokens.len();
        if n == 0 || n > i32::MAX as usize {
            return Err(malformed(KEY_TOKENS, format!("{n} tokens")));
        }
        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity_and_hasher(n, Default::default());
        for (i, v) in raw_tokens.iter().enumerate() {
            let mut text = v
                .as_str()
                .ok_or_else(|| malformed(KEY_TOKENS, format!("token {i} is a {}", v.type_name())))?
                .to_string();
            if text.is_empty() {
                tracing::warn!("tokenizer: empty token at index {i}");
                text = format!("[EMPTY_{i}]");
            }
            if let Some(&first) = token_to_id.get(&text) {
                return Err(TokenizerError::DuplicateToken {
                    text,
                    first,
                    second: i as u32,
                });
            }
            token_to_id.insert(text.clone(), i as u32);
            tokens.push(text);
        }
        let scores = match opt_array(g, KEY_SCORES)? {
            None => vec![0.0; n],
            Some(a) if a.len() < n => {
                return Err(malformed(
                    KEY_SCORES,
                    format!("{} scores for {n} tokens", a.len()),
                ))
            }
            Some(a) => a[..n]
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_f64().map(|x| x as f32).ok_or_else(|| {
                        malformed(KEY_SCORES, format!("score {i} is a {}", v.type_name()))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let mut attrs = match opt_array(g, KEY_TYPES)? {
            None => vec![attr::NORMAL; n],
            Some(a) if a.len() < n => {
                return Err(malformed(
                    KEY_TYPES,
                    format!("{} types for {n} tokens", a.len()),
                ))
            }
            Some(a) => a[..n]
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let t = match *v {
                        MetaValue::I32(t) => i64::from(t),
                        MetaValue::U32(t) => i64::from(t),
                        MetaValue::I64(t) => t,
                        MetaValue::U8(t) => i64::from(t),
                        MetaValue::I8(t) => i64::from(t),
                        MetaValue::I16(t) => i64::from(t),
                        MetaValue::U16(t) => i64::from(t),
                        _ => {
                            return Err(malformed(
                                KEY_TYPES,
                                format!("type {i} is a {}", v.type_name()),
                            ))
                        }
                    };
                    Ok(match t {
                        1 => attr::NORMAL,
                        2 => attr::UNKNOWN,
                        3 => attr::CONTROL,
                        4 => attr::USER_DEFINED,
                        5 => attr::UNUSED,
                        6 => attr::BYTE,
                        _ => 0,
                    })
                })
                .collect::<Result<_, _>>()?,
        };

        // Model-type defaults, then metadata.
        let pre = if is_spm {
            PreType::Default
        } else {
            PreType::from_name(pre_name).unwrap_or_else(|| {
                tracing::warn!(
                    "tokenizer: unknown pre-tokenizer {pre_name:?}, using the gpt2 regex; \
                     tokenization may differ from llama.cpp"
                );
                PreType::Gpt2
            })
        };
        let llama3_like = matches!(
            pre_name,
            "llama3"
                | "llama-v3"
                | "llama-bpe"
                | "falcon3"
                | "falcon-h1"
                | "pixtral"
                | "midm-2.0"
                | "lfm2"
                | "jina-v5-nano"
        );
        let (mut bos, mut eos, mut unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else if matches!(pre_name, "chatglm-bpe" | "glm4") {
            (None, Some(11), None)
        } else {
            (Some(11), Some(11), None)
        };
        let mut add_bos = is_spm || llama3_like;
        let mut add_eos = false;
        let add_space_prefix = opt_bool(g, "tokenizer.ggml.add_space_prefix").unwrap_or(is_spm);

        let in_range = |id: u64| (id < n as u64).then_some(id as u32);
        let meta_id = |key: &str, default: Option<u32>| -> Option<u32> {
            let default = default.and_then(|d| in_range(d.into()));
            match g.get(key) {
                None => default,
                Some(v) => match v.as_u64() {
                    Some(id) if id < n as u64 => Some(id as u32),
                    _ => {
                        tracing::warn!("tokenizer: bad {key} = {v:?}, using default {default:?}");
                        default
                    }
                },
            }
        };
        bos = meta_id("tokenizer.ggml.bos_token_id", bos);
        eos = meta_id("tokenizer.ggml.eos_token_id", eos);
        unk = meta_id("tokenizer.ggml.unknown_token_id", unk);
        let mut eot = meta_id("tokenizer.ggml.eot_token_id", None);
        let mut eom = meta_id("tokenizer.ggml.eom_token_id", None);
        let mut fim_pre = meta_id("tokenizer.ggml.fim_pre_token_id", None);
        let mut fim_suf = meta_id("tokenizer.ggml.fim_suf_token_id", None);
        let mut fim_mid = meta_id("tokenizer.ggml.fim_mid_token_id", None);
        let mut fim_pad = meta_id("tokenizer.ggml.fim_pad_token_id", None);
        let mut fim_rep = meta_id("tokenizer.ggml.fim_rep_token_id", None);
        let mut fim_sep = meta_id("tokenizer.ggml.fim_sep_token_id", None);
        fim_pre = meta_id("tokenizer.ggml.prefix_token_id", fim_pre);
        fim_suf = meta_id("tokenizer.ggml.suffix_token_id", fim_suf);
        fim_mid = meta_id("tokenizer.ggml.middle_token_id", fim_mid);
        if let Some(b) = opt_bool(g, "tokenizer.ggml.add_bos_token") {
            add_bos = b;
        }
        if let Some(b) = opt_bool(g, "tokenizer.ggml.add_eos_token") {
            add_eos = b;
        }

        // Text-based detection of special tokens; such tokens become control tokens.
        for (slot, texts) in [
            (&mut eot, special::EOT_TEXTS),
            (&mut eom, special::EOM_TEXTS),
            (&mut fim_pre, special::FIM_PRE_TEXTS),
            (&mut fim_suf, special::FIM_SUF_TEXTS),
            (&mut fim_mid, special::FIM_MID_TEXTS),
            (&mut fim_pad, special::FIM_PAD_TEXTS),
            (&mut fim_rep, special::FIM_REP_TEXTS),
            (&mut fim_sep, special::FIM_SEP_TEXTS),
        ] {
            if slot.is_none() {
                if let Some(id) = (0..n).find(|&i| texts.contains(&tokens[i].as_str())) {
                    *slot = Some(id as u32);
                    attrs[id] |= attr::CONTROL;
                }
            }
        }
        let mut eog: BTreeSet<u32> = [fim_pad, fim_rep, fim_sep].into_iter().flatten().collect();
        for (i, t) in tokens.iter().enumerate() {
            if special::EOG_TEXTS.contains(&t.as_str()) {
                eog.insert(i as u32);
                attrs[i] |= attr::CONTROL;
            }
            if matches!(
                t.as_str(),
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                attrs[i] = attr::USER_DEFINED;
            }
        }
        eog.extend([eos, eot, eom].into_iter().flatten());
        let has = |eog: &BTreeSet<u32>, texts: &[&str]| {
            eog.iter()
                .find(|&&id| texts.contains(&tokens[id as usize].as_str()))
                .copied()
        };
        if let Some(end) = has(&eog, &["<|end|>"]) {
            let ret = has(&eog, &["<|return|>"]).is_some();
            let call = has(&eog, &["<|call|>", "<|calls|>"]).is_some();
            let flush = has(&eog, &["<|flush|>"]).is_some();
            if call && (ret || flush) {
                eog.remove(&end);
                attrs[end as usize] = attr::USER_DEFINED;
            }
        }
        if has(&eog, &["<|tool_response>"]).is_some() {
            if let Some(s) = has(&eog, &["</s>"]) {
                eog.remove(&s);
                attrs[s as usize] = attr::NORMAL;
            }
        }

        // Per-model strip attributes (llama.cpp sets them by name; they only affect partitioning).
        let set_attr = |attrs: &mut Vec<u32>, text: &str, bit: u32, on: bool| {
            if let Some(&id) = token_to_id.get(text) {
                let a = &mut attrs[id as usize];
                *a = if on { *a | bit } else { *a & !bit };
            }
        };
        let general_name = g
            .get("general.name")
            .and_then(MetaValue::as_str)
            .unwrap_or("")
            .to_lowercase();
        let arch = g
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|p| pre_name.contains(p))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|p| arch.contains(p))
        {
            set_attr(&mut attrs, "<mask>", attr::LSTRIP, true);
        } else if general_name.contains("phi-3") || general_name.contains("phi3") {
            for a in attrs.iter_mut() {
                if *a & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0 {
                    *a |= attr::RSTRIP;
                }
            }
            set_attr(&mut attrs, "</s>", attr::RSTRIP, true);
            for t in ["<unk>", "<s>", "<|endoftext|>"] {
                set_attr(&mut attrs, t, attr::RSTRIP, false);
            }
        } else if general_name.contains("modern-bert") {
            set_attr(&mut attrs, "[MASK]", attr::LSTRIP, true);
        }

        let special = SpecialTokens::new(
            (0..n)
                .filter(|&i| attrs[i] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0)
                .map(|i| (i as u32, tokens[i].clone(), attrs[i]))
                .collect(),
        );

        let model = if is_spm {
            Model::Spm
        } else {
            let merges = g
                .get(KEY_MERGES)
                .ok_or_else(|| malformed(KEY_MERGES, "missing"))?;
            let merges = merges.as_array().ok_or_else(|| {
                malformed(
                    KEY_MERGES,
                    format!("expected an array, found {}", merges.type_name()),
                )
            })?;
            let merges: Vec<&str> = merges
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str().ok_or_else(|| {
                        malformed(KEY_MERGES, format!("merge {i} is a {}", v.type_name()))
                    })
                })
                .collect::<Result<_, _>>()?;
            Model::Bpe(bpe::Bpe::new(
                pre,
                llama3_like || pre_name == "tekken",
                &tokens,
                &merges,
            ))
        };

        let mut tok = Tokenizer {
            model,
            tokens,
            token_to_id,
            scores,
            attrs,
            pieces: Vec::new(),
            special,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
        };
        tok.pieces = (0..n as u32).map(|id| tok.piece(id)).collect();
        Ok(tok)
    }

    /// llama.cpp's `token_to_piece(id, special = true)`, uncached.
    fn piece(&self, id: u32) -> Vec<u8> {
        let (Some(text), Some(&a)) = (self.tokens.get(id as usize), self.attrs.get(id as usize))
        else {
            return Vec::new();
        };
        if a & (attr::UNKNOWN | attr::CONTROL | attr::USER_DEFINED) != 0 {
            return text.as_bytes().to_vec();
        }
        if a & attr::NORMAL != 0 {
            return match self.model {
                Model::Spm => text.replace('\u{2581}', " ").into_bytes(),
                Model::Bpe(_) => {
                    let mut out = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match unicode::char_to_byte(c) {
                            Some(b) => out.push(b),
                            None => {
                                // llama.cpp's llama_decode_text marks bytes it cannot map.
                                out.extend_from_slice(b"[UNK_BYTE_0x");
                                let mut buf = [0u8; 4];
                                for b in c.encode_utf8(&mut buf).bytes() {
                                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                                }
                                out.extend_from_slice(text.as_bytes());
                                out.push(b']');
                            }
                        }
                    }
                    out
                }
            };
        }
        if a & attr::BYTE != 0 {
            return vec![token_to_byte(text)];
        }
        Vec::new()
    }

    /// llama.cpp's `llama_tokenize(text, add_special = add_bos, parse_special)`.
    ///
    /// `add_bos` is llama.cpp's `add_special`: BOS is prepended only when the model asks for it
    /// ([`Self::add_bos_default`]), and EOS appended when `tokenizer.ggml.add_eos_token` is set.
    /// `parse_special` lets control tokens written in the text (e.g. `<|im_start|>`) become
    /// their ids; user-defined tokens are always matched.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos && self.add_bos {
            out.extend(self.bos);
        }
        let frags = self.special.partition(text, parse_special, &self.attrs);
        let lookup = |s: &str| self.token_to_id.get(s).copied();
        match &self.model {
            Model::Spm => {
                let mut prev_special = true;
                let mut buf = String::new();
                for f in frags {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Raw(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('\u{2581}');
                            }
                            for c in text[s..e].chars() {
                                buf.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            spm::encode(
                                &buf,
                                lookup,
                                |id| self.scores.get(id as usize).copied().unwrap_or(0.0),
                                |b| self.byte_to_token(b),
                                &mut out,
                            );
                            prev_special = false;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for f in frags {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Raw(s, e) => bpe.encode(&text[s..e], lookup, &mut out),
                    }
                }
            }
        }
        if add_bos && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// SPM byte fallback: `<0xXX>`, else the byte itself as a token, else the unknown token.
    fn byte_to_token(&self, b: u8) -> Option<u32> {
        self.token_to_id
            .get(&format!("<0x{b:02X}>"))
            .or_else(|| {
                std::str::from_utf8(&[b])
                    .ok()
                    .and_then(|s| self.token_to_id.get(s))
            })
            .copied()
            .or(self.unk)
    }

    /// Bytes of one token as llama.cpp's `token_to_piece(id, special = true)`: control tokens
    /// render as their text, byte tokens as their byte (so a piece may be invalid UTF-8 alone).
    /// Empty for ids out of range.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Concatenated bytes of `ids`; streaming callers keep bytes until they form valid UTF-8.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// `tokenizer.ggml.add_bos_token` (llama.cpp's default for the model type when absent).
    pub fn add_bos_default(&self) -> bool {
        self.add_bos
    }

    /// End of generation: eos, eot, eom, and the control tokens llama.cpp puts in
    /// `special_eog_ids` (`<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|endoftext|>`, FIM
    /// pad/repo/sep, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Every end-of-generation token id.
    pub fn eog_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.eog.iter().copied()
    }

    /// Exact vocabulary lookup, e.g. `token_id("<|im_end|>")`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// Whether byte-level BPE can write byte `b` at all: its one-byte token is in the
    /// vocabulary. SmolLM2's lacks a few (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D and bytes no
    /// UTF-8 text holds); encoding drops such bytes, as llama.cpp does.
    pub fn has_byte_token(&self, b: u8) -> bool {
        let c = unicode::byte_to_char_table()[b as usize];
        self.token_id(c.encode_utf8(&mut [0; 4])).is_some()
    }

    /// The vocabulary text of `id` (byte-level BPE texts are in GPT-2's byte encoding).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The pre-tokenizer in use (None for SentencePiece vocabularies).
    pub fn pre_type(&self) -> Option<PreType> {
        match &self.model {
            Model::Bpe(b) => Some(b.pre),
            Model::Spm => None,
        }
    }
}

/// `<0xAB>` → 0xAB, like llama.cpp's `strtol(text.substr(3, 2), 16)` (0 when not hex).
fn token_to_byte(text: &str) -> u8 {
    let hex = text.get(3..).unwrap_or("");
    let mut v = 0u8;
    for c in hex.chars().take(2) {
        match c.to_digit(16) {
            Some(d) => v = v.wrapping_mul(16).wrapping_add(d as u8),
            None => break,
        }
    }
    v
}

#[cfg(test)]
mod tests;
