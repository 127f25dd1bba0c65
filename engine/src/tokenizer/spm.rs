//! SentencePiece-style BPE (tokenizer.ggml.model "llama"), llama.cpp's `llm_tokenizer_spm_session`.
//!
//! The text (spaces already escaped to U+2581) starts as one symbol per code point; the adjacent
//! pair whose concatenation is the vocab token with the highest score is merged first (ties:
//! leftmost), until no pair forms a token. Symbols that are not tokens fall back to `<0xXX>`
//! byte tokens. Merged symbols are contiguous, so a pair's text is a slice: no allocation.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Sym {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Greater = popped first: higher score, then smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
            .then_with(|| o.size.cmp(&self.size))
    }
}

/// Appends the tokens of `text` (already whitespace-escaped). `token_id` looks text up in the
/// vocab, `score` gives a token's score, `byte_token` the fallback token of one byte.
pub fn encode(
    text: &str,
    token_id: impl Fn(&str) -> Option<u32>,
    score: impl Fn(u32) -> f32,
    byte_token: impl Fn(u8) -> Option<u32>,
    out: &mut Vec<u32>,
) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: if i == 0 { NONE } else { i - 1 },
            next: i + 1,
        });
    }
    let Some(last) = syms.last_mut() else {
        return;
    };
    last.next = NONE;

    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], l: usize, r: usize| {
        if l == NONE || r == NONE {
            return;
        }
        let (s, size) = (syms[l].start, syms[l].len + syms[r].len);
        if let Some(id) = token_id(&text[s..s + size]) {
            heap.push(Bigram {
                score: score(id),
                left: l,
                right: r,
                size,
            });
        }
    };
    for i in 1..syms.len() {
        try_add(&mut heap, &syms, i - 1, i);
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (b.left, b.right);
        if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
            continue;
        }
        syms[l].len = b.size;
        syms[r].len = 0;
        let rn = syms[r].next;
        syms[l].next = rn;
        if rn != NONE {
            syms[rn].prev = l;
        }
        let lp = syms[l].prev;
        try_add(&mut heap, &syms, lp, l);
        try_add(&mut heap, &syms, l, rn);
    }

    let mut i = 0;
    while i != NONE {
        let s = &syms[i];
        let piece = &text[s.start..s.start + s.len];
        match token_id(piece) {
            Some(id) => out.push(id),
            None => out.extend(piece.bytes().filter_map(&byte_token)),
        }
        i = s.next;
    }
}
