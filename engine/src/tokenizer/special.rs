//! Special tokens: llama.cpp's `tokenizer_st_partition` and its text-based token detection.
//!
//! Before the model tokenizer runs, the text is cut around occurrences of special tokens
//! (control/unknown ones only when parsing specials, user-defined ones always), longest token
//! first, each token splitting every remaining raw fragment at its leftmost non-overlapping
//! matches. That order decides overlaps, so it is kept as is. A byte trie over the special
//! texts finds which ones occur at all, so the thousands of unused control tokens of a
//! vocabulary like Gemma's cost nothing.

/// llama.cpp's `llama_token_attr` bits.
pub mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
    pub const LSTRIP: u32 = 1 << 7;
    pub const RSTRIP: u32 = 1 << 8;
}

/// Texts llama.cpp treats as end-of-turn when `tokenizer.ggml.eot_token_id` is absent.
pub const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
pub const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
pub const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>",
    "<fim-prefix>",
    "<fim_prefix>",
    "<｜fim▁begin｜>",
    "<PRE>",
    "▁<PRE>",
    "<|code_prefix|>",
    "<|prefix|>",
];
pub const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>",
    "<fim-suffix>",
    "<fim_suffix>",
    "<｜fim▁hole｜>",
    "<SUF>",
    "▁<SUF>",
    "<|code_suffix|>",
    "<|suffix|>",
];
pub const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>",
    "<fim-middle>",
    "<fim_middle>",
    "<｜fim▁end｜>",
    "<MID>",
    "▁<MID>",
    "<|code_middle|>",
    "<|middle|>",
];
pub const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
pub const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
pub const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
/// Texts that always end generation (llama.cpp's special_eog_ids detection).
pub const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// A piece of the input: raw text (byte range) still to tokenize, or a special token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    Raw(usize, usize),
    Token(u32),
}

/// The special tokens in llama.cpp's partition order, with a trie to find which occur.
pub struct SpecialTokens {
    /// (id, text, attr) sorted by text length, longest first (ties by id).
    tokens: Vec<(u32, String, u32)>,
    /// Byte trie over the texts; `nodes[i]` = (sorted children, index into `tokens`).
    nodes: Vec<Node>,
}

/// A trie node: children sorted by byte, and the special token (index) ending here.
type Node = (Vec<(u8, u32)>, Option<usize>);

impl SpecialTokens {
    pub fn new(mut tokens: Vec<(u32, String, u32)>) -> Self {
        // llama.cpp uses std::sort by length only (unstable); ties by id keep this deterministic.
        tokens.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let mut nodes: Vec<Node> = vec![(Vec::new(), None)];
        for (i, (_, text, _)) in tokens.iter().enumerate() {
            let mut n = 0usize;
            for &b in text.as_bytes() {
                n = match nodes[n].0.binary_search_by_key(&b, |&(k, _)| k) {
                    Ok(p) => nodes[n].0[p].1 as usize,
                    Err(p) => {
                        let id = nodes.len();
                        nodes[n].0.insert(p, (b, id as u32));
                        nodes.push((Vec::new(), None));
                        id
                    }
                };
            }
            if n != 0 {
                nodes[n].1 = Some(i);
            }
        }
        SpecialTokens { tokens, nodes }
    }

    /// Splits `text` around special tokens like llama.cpp's `tokenizer_st_partition`.
    pub fn partition(&self, text: &str, parse_special: bool, attr_of: &[u32]) -> Vec<Fragment> {
        let mut frags = vec![Fragment::Raw(0, text.len())];
        if text.is_empty() {
            return Vec::new();
        }
        let skip = |a: u32| !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0;
        // Which special tokens occur anywhere in the text (fragments are substrings of it).
        let mut present = vec![false; self.tokens.len()];
        let mut any = false;
        let bytes = text.as_bytes();
        for start in 0..bytes.len() {
            let mut n = 0usize;
            for &b in &bytes[start..] {
                match self.nodes[n].0.binary_search_by_key(&b, |&(k, _)| k) {
                    Ok(p) => n = self.nodes[n].0[p].1 as usize,
                    Err(_) => break,
                }
                if let Some(i) = self.nodes[n].1 {
                    if !present[i] {
                        present[i] = true;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return frags;
        }
        for i in (0..self.tokens.len()).filter(|&i| present[i]) {
            let (id, ref tok, _) = self.tokens[i];
            let a = attr_of.get(id as usize).copied().unwrap_or(0);
            if skip(a) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for &f in &frags {
                let Fragment::Raw(s, e) = f else {
                    next.push(f);
                    continue;
                };
                let (mut base, mut end) = (s, e);
                loop {
                    let Some(m) = text[base..end].find(tok.as_str()).map(|p| p + base) else {
                        if end > base {
                            next.push(Fragment::Raw(base, end));
                        }
                        break;
                    };
                    if m > base {
                        let mut left_end = m;
                        if a & attr::LSTRIP != 0 {
                            while left_end > base && is_c_space(bytes[left_end - 1]) {
                                left_end -= 1;
                            }
                        }
                        if left_end > base {
                            next.push(Fragment::Raw(base, left_end));
                        }
                    }
                    next.push(Fragment::Token(id));
                    let mut right = m + tok.len();
                    if right >= end {
                        break;
                    }
                    if a & attr::RSTRIP != 0 {
                        while right < end && is_c_space(bytes[right]) {
                            right += 1;
                        }
                    }
                    base = right;
                    end = end.max(base);
                }
            }
            frags = next;
        }
        frags
    }
}

/// C's `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_and_strip() {
        let st = SpecialTokens::new(vec![
            (0, "<a>".into(), attr::CONTROL),
            (1, "<a><a>".into(), attr::CONTROL),
            (
                2,
                "x".into(),
                attr::USER_DEFINED | attr::LSTRIP | attr::RSTRIP,
            ),
        ]);
        let attrs = [
            attr::CONTROL,
            attr::CONTROL,
            attr::USER_DEFINED | attr::LSTRIP | attr::RSTRIP,
        ];
        let f = st.partition("q<a><a><a> x r", true, &attrs);
        assert_eq!(
            f,
            [
                Fragment::Raw(0, 1),
                Fragment::Token(1),
                Fragment::Token(0),
                Fragment::Token(2),
                Fragment::Raw(13, 14)
            ]
        );
        let f = st.partition("q<a>", false, &attrs);
        assert_eq!(f, [Fragment::Raw(0, 4)]);
    }
}
