//! Byte-level BPE (tokenizer.ggml.model "gpt2"), llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! Each pre-tokenized word is byte-encoded (GPT-2 table), split into code points, and adjacent
//! symbols are merged lowest merge rank first (ties: leftmost), with a heap so long words stay
//! O(n log n). Symbols carry an interned id of their text, so a merge lookup is a hash of two
//! integers instead of string concatenation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::HashMap;

use super::pretokenize::PreType;
use super::unicode::byte_to_char_table;

/// Text id of a symbol whose text is no merge operand (cannot merge).
const NO_TEXT: u32 = u32::MAX;

pub struct Bpe {
    pub pre: PreType,
    /// llama3-style vocabularies emit a whole word as one token when it is in the vocab.
    pub ignore_merges: bool,
    /// Text → text id. Vocab tokens have their token id; other merge operands/results follow.
    texts: HashMap<String, u32>,
    /// (left text id, right text id) → (rank, merged text id). First occurrence wins.
    merges: HashMap<(u32, u32), (u32, u32)>,
    n_vocab: u32,
}

struct Sym {
    start: usize,
    len: usize,
    text: u32,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// (rank, left, right, merged size, merged text id); `Reverse` makes the lowest rank, then
/// the leftmost pair, pop first.
type Candidate = Reverse<(u32, usize, usize, usize, u32)>;

impl Bpe {
    /// `vocab` are the token texts by id; `merges` the "left right" strings in rank order.
    pub fn new(pre: PreType, ignore_merges: bool, vocab: &[String], merges: &[&str]) -> Self {
        let mut texts: HashMap<String, u32> =
            HashMap::with_capacity_and_hasher(vocab.len() + 16, Default::default());
        for (i, t) in vocab.iter().enumerate() {
            texts.insert(t.clone(), i as u32);
        }
        let n_vocab = vocab.len() as u32;
        let mut next_id = n_vocab;
        let mut intern = |texts: &mut HashMap<String, u32>, s: &str| -> u32 {
            if let Some(&id) = texts.get(s) {
                return id;
            }
            let id = next_id;
            next_id += 1;
            texts.insert(s.to_string(), id);
            id
        };
        let mut map = HashMap::with_capacity_and_hasher(merges.len(), Default::default());
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte; no space: an empty
            // pair that can never apply.
            let Some(pos) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (a, b) = (&m[..pos], &m[pos + 1..]);
            if a.is_empty() || b.is_empty() {
                continue;
            }
            let ia = intern(&mut texts, a);
            let ib = intern(&mut texts, b);
            let merged = format!("{a}{b}");
            let im = intern(&mut texts, &merged);
            map.entry((ia, ib)).or_insert((rank as u32, im));
        }
        Bpe {
            pre,
            ignore_merges,
            texts,
            merges: map,
            n_vocab,
        }
    }

    /// Appends the tokens of one raw text fragment.
    pub fn encode(&self, text: &str, token_id: impl Fn(&str) -> Option<u32>, out: &mut Vec<u32>) {
        let cps: Vec<char> = text.chars().collect();
        let table = byte_to_char_table();
        let mut start = 0;
        let mut word = String::new();
        let mut utf8 = [0u8; 4];
        for len in self.pre.split(&cps) {
            word.clear();
            for &c in &cps[start..start + len] {
                for &b in c.encode_utf8(&mut utf8).as_bytes() {
                    word.push(table[b as usize]);
                }
            }
            start += len;
            self.encode_word(&word, &token_id, out);
        }
    }

    fn encode_word(&self, word: &str, token_id: &impl Fn(&str) -> Option<u32>, out: &mut Vec<u32>) {
        if word.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(id) = token_id(word) {
                out.push(id);
                return;
            }
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(word.len());
        for (i, (start, c)) in word.char_indices().enumerate() {
            let len = c.len_utf8();
            let text = self
                .texts
                .get(&word[start..start + len])
                .copied()
                .unwrap_or(NO_TEXT);
            syms.push(Sym {
                start,
                len,
                text,
                prev: if i == 0 { NONE } else { i - 1 },
                next: i + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        // Heap of (rank, left, right, size, merged): min rank, then leftmost.
        let mut heap: BinaryHeap<Candidate> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize, r: usize| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l].text, syms[r].text);
            if a == NO_TEXT || b == NO_TEXT {
                return;
            }
            if let Some(&(rank, merged)) = self.merges.get(&(a, b)) {
                heap.push(Reverse((rank, l, r, syms[l].len + syms[r].len, merged)));
            }
        };
        for i in 1..syms.len() {
            push(&mut heap, &syms, i - 1, i);
        }
        while let Some(Reverse((_, l, r, size, merged))) = heap.pop() {
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != size {
                continue; // stale
            }
            syms[l].len = size;
            syms[l].text = merged;
            syms[r].len = 0;
            let rn = syms[r].next;
            syms[l].next = rn;
            if rn != NONE {
                syms[rn].prev = l;
            }
            let lp = syms[l].prev;
            push(&mut heap, &syms, lp, l);
            push(&mut heap, &syms, l, rn);
        }
        let mut i = 0;
        while i != NONE {
            let s = &syms[i];
            if s.text < self.n_vocab {
                out.push(s.text);
            } else {
                // Not a token: each byte of the (byte-encoded) text as a one-byte token, as
                // llama.cpp does; bytes without one are dropped.
                let piece = &word.as_bytes()[s.start..s.start + s.len];
                for &b in piece {
                    if let Some(id) = std::str::from_utf8(&[b]).ok().and_then(&token_id) {
                        out.push(id);
                    }
                }
            }
            i = s.next;
        }
    }
}
