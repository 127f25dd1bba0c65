//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the tests that replay their
//! seed corpora in CI: each takes arbitrary bytes and must return without panicking, checking
//! the invariants that hold for every input.

use crate::chat::{ChatMessage, ChatTemplate};
use crate::gguf::GgufFile;
use crate::tokenizer::Tokenizer;

/// Any bytes give a file or an error; every tensor of an accepted file lies inside it.
pub fn gguf_parse(data: &[u8]) {
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for t in &file.tensors {
            assert!(t.offset + t.size <= data.len(), "tensor outside the file");
            let _ = file.tensor_data(t);
        }
        for v in file.metadata.values() {
            let _ = (v.as_u64(), v.as_f64(), v.as_str(), v.as_array());
        }
    }
}

/// A hostile template and hostile messages: `template \0 role \x01 content \0 role \x01 ...`.
/// Compiling and rendering end (fuel, recursion and output caps) with text or an error.
pub fn chat_template(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let source = parts.next().unwrap_or_default();
    let messages: Vec<ChatMessage> = parts
        .map(|m| match m.split_once('\x01') {
            Some((role, content)) => ChatMessage::new(role, content),
            None => ChatMessage::new("user", m),
        })
        .collect();
    for add_generation_prompt in [false, true] {
        if let Ok(t) = ChatTemplate::new(source, "<s>", "</s>") {
            let _ = t.render(&messages, add_generation_prompt);
        }
        // The built-in templates never panic; ChatML renders any conversation of known roles
        // (Gemma's may refuse one whose roles do not alternate, as the original does).
        let _ = ChatTemplate::fallback_for("gemma3", "<s>", "</s>").render(&messages, true);
        let chatml = ChatTemplate::fallback_for("llama", "<s>", "</s>");
        let r = chatml.render(&messages, add_generation_prompt);
        let known_roles = messages
            .iter()
            .all(|m| matches!(m.role.as_str(), "system" | "user" | "assistant"));
        if known_roles && text.len() < 64 * 1024 {
            if let Err(e) = r {
                panic!("ChatML refused a conversation of known roles: {e}");
            }
        }
    }
}

/// Arbitrary text through a real tokenizer: ids are in range and decode back to the text
/// (byte-level BPE is lossless but for the bytes the vocabulary has no token for, which it
/// drops as llama.cpp does); arbitrary ids decode without panicking.
pub fn tokenizer(tok: &Tokenizer, data: &[u8], lossless: bool) {
    let text = String::from_utf8_lossy(data);
    for special in [false, true] {
        let ids = tok.encode(&text, false, special);
        let vocab = tok.vocab_size();
        assert!(
            ids.iter().all(|&id| (id as usize) < vocab),
            "id out of range"
        );
        if lossless && !special {
            let writable: Vec<u8> = text.bytes().filter(|&b| tok.has_byte_token(b)).collect();
            assert_eq!(tok.decode(&ids), writable, "round trip changed the text");
        }
    }
    let ids: Vec<u32> = data
        .chunks(4)
        .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | b as u32))
        .collect();
    let _ = tok.decode(&ids);
}
