//! BPE pre-tokenizers: split text into words before merging, exactly as llama.cpp does.
//!
//! llama.cpp never runs the tokenizer.json regexes through a Unicode regex engine: the common
//! ones (gpt2, llama3) are hand-written scanners in unicode.cpp, and the rest run std::regex
//! over text whose code points were collapsed to one byte per category. Both differ from a
//! real regex engine in corner cases, so this module reimplements those scanners step by step
//! rather than using fancy-regex. Every function maps a list of piece lengths (in code points)
//! to a finer list, like llama.cpp's `bpe_offsets`.

use super::unicode::{flags, DEFINED, LETTER, NUMBER, PUNCTUATION, WHITESPACE};

/// Which pre-tokenizer a BPE vocabulary uses (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreType {
    /// llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: punctuation runs, gpt2, number runs, 3 digits.
    Default,
    /// The GPT-2 regex alone.
    Gpt2,
    /// `\p{N}` (each digit alone), then the GPT-2 regex (smollm, starcoder, refact, ...).
    Smollm,
    /// The llama3 regex (`\p{N}{1,3}`, newline handling).
    Llama3,
    /// The qwen2 regex: llama3's with single digits.
    Qwen2,
}

impl PreType {
    /// Maps a `tokenizer.ggml.pre` name; `None` for names llama.cpp would reject.
    pub fn from_name(name: &str) -> Option<PreType> {
        Some(match name {
            "" | "default" => PreType::Default,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
            | "midm-2.0" | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" | "chatglm-bpe"
            | "glm4" => PreType::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2"
            | "hunyuan" | "solar-open" => PreType::Qwen2,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" | "mellum2" => PreType::Smollm,
            "gpt-2" | "gpt2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais"
            | "trillion" | "granite-docling" | "exaone4" | "jina-v1-en" | "jina-v2-code"
            | "roberta-bpe" => PreType::Gpt2,
            _ => return None,
        })
    }

    /// Splits `cps` into words, returned as lengths in code points summing to `cps.len()`.
    pub fn split(self, cps: &[char]) -> Vec<usize> {
        let whole = vec![cps.len()];
        match self {
            PreType::Gpt2 => split_gpt2(cps, &whole),
            PreType::Smollm => split_gpt2(cps, &split_each_number(cps, &whole)),
            PreType::Llama3 => split_llama3(cps, &whole, 3),
            PreType::Qwen2 => split_llama3(cps, &whole, 1),
            PreType::Default => {
                let o = split_runs(cps, &whole, is_default_punct);
                let o = split_gpt2(cps, &o);
                let o = split_runs(cps, &o, |c| flags(c) & NUMBER != 0);
                split_three_digits(cps, &o)
            }
        }
    }
}

/// Iterates `(start, end)` code point ranges of the pieces.
fn ranges(offsets: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut start = 0;
    offsets.iter().map(move |&len| {
        let r = (start, start + len);
        start += len;
        r
    })
}

/// `[\p{P}\$\+<=>\^~\|]` over llama.cpp's collapsed text: ASCII uses its fixed table (which
/// leaves out '`'), other code points their punctuation category.
fn is_default_punct(c: char) -> bool {
    if c.is_ascii() {
        matches!(c, '!'..='#' | '%'..='*' | ','..='/' | ':' | ';' | '?' | '@' | '['..=']' | '_'
            | '{' | '}' | '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')
    } else {
        let f = flags(c);
        f & WHITESPACE == 0 && f & PUNCTUATION != 0
    }
}

/// A std::regex split by `X+`: maximal runs of `pred` become pieces, as do the gaps.
fn split_runs(cps: &[char], offsets: &[usize], pred: impl Fn(char) -> bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    for (s, e) in ranges(offsets) {
        let mut prev = s;
        let mut i = s;
        while i < e {
            if pred(cps[i]) {
                let j = (i..e).find(|&j| !pred(cps[j])).unwrap_or(e);
                if i > prev {
                    out.push(i - prev);
                }
                out.push(j - i);
                prev = j;
                i = j;
            } else {
                i += 1;
            }
        }
        if e > prev {
            out.push(e - prev);
        }
    }
    out
}

/// `\p{N}`: every number code point is its own piece.
fn split_each_number(cps: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    for (s, e) in ranges(offsets) {
        let mut prev = s;
        for (i, &c) in cps.iter().enumerate().take(e).skip(s) {
            if flags(c) & NUMBER != 0 {
                if i > prev {
                    out.push(i - prev);
                }
                out.push(1);
                prev = i + 1;
            }
        }
        if e > prev {
            out.push(e - prev);
        }
    }
    out
}

/// `[0-9][0-9][0-9]`: leftmost non-overlapping runs of three ASCII digits.
fn split_three_digits(cps: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len());
    for (s, e) in ranges(offsets) {
        let mut prev = s;
        let mut i = s;
        while i + 3 <= e {
            if cps[i..i + 3].iter().all(|c| c.is_ascii_digit()) {
                if i > prev {
                    out.push(i - prev);
                }
                out.push(3);
                i += 3;
                prev = i;
            } else {
                i += 1;
            }
        }
        if e > prev {
            out.push(e - prev);
        }
    }
    out
}

/// State shared by the hand-written scanners: one fragment `[ini, end)` of `cps`.
struct Scan<'a> {
    cps: &'a [char],
    ini: usize,
    end: usize,
    prev_end: usize,
    out: &'a mut Vec<usize>,
}

impl Scan<'_> {
    /// The code point at `pos`, or None outside the fragment (llama.cpp's OUT_OF_RANGE).
    #[inline]
    fn cpt(&self, pos: usize) -> Option<char> {
        (self.ini <= pos && pos < self.end).then(|| self.cps[pos])
    }

    #[inline]
    fn flags(&self, pos: usize) -> u8 {
        self.cpt(pos).map_or(0, flags)
    }

    /// Closes the current word at `end`; returns its length.
    #[inline]
    fn add(&mut self, end: usize) -> usize {
        let len = end - self.prev_end;
        if len > 0 {
            self.out.push(len);
        }
        self.prev_end = end;
        len
    }
}

#[inline]
fn is(f: u8, flag: u8) -> bool {
    f & flag != 0
}

/// unicode.cpp's `unicode_regex_split_custom_gpt2`:
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
fn split_gpt2(cps: &[char], offsets: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(offsets.len() + cps.len() / 4);
    for (ini, end) in ranges(offsets) {
        let mut s = Scan {
            cps,
            ini,
            end,
            prev_end: ini,
            out: &mut out,
        };
        let mut pos = ini;
        while pos < end {
            let cpt = cps[pos];
            let f = flags(cpt);
            if cpt == '\'' && pos + 1 < end {
                let next = s.cpt(pos + 1);
                if matches!(next, Some('s' | 't' | 'm' | 'd')) {
                    pos += s.add(pos + 2);
                    continue;
                }
                if pos + 2 < end {
                    let nn = s.cpt(pos + 2);
                    if matches!(
                        (next, nn),
                        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                    ) {
                        pos += s.add(pos + 3);
                        continue;
                    }
                }
            }
            let space = usize::from(cpt == ' ');
            let mut f2 = if cpt == ' ' { s.flags(pos + 1) } else { f };
            if is(f2, LETTER) {
                pos += space;
                while is(f2, LETTER) {
                    pos += 1;
                    f2 = s.flags(pos);
                }
                s.add(pos);
                continue;
            }
            if is(f2, NUMBER) {
                pos += space;
                while is(f2, NUMBER) {
                    pos += 1;
                    f2 = s.flags(pos);
                }
                s.add(pos);
                continue;
            }
            let other = |f: u8| f & (WHITESPACE | LETTER | NUMBER) == 0 && f & DEFINED != 0;
            if other(f2) {
                pos += space;
                while other(f2) {
                    pos += 1;
                    f2 = s.flags(pos);
                }
                s.add(pos);
                continue;
            }
            let mut n_ws = 0;
            while is(s.flags(pos + n_ws), WHITESPACE) {
                n_ws += 1;
            }
            if n_ws > 1 && s.cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                s.add(pos);
                continue;
            }
            if n_ws > 0 {
                pos += n_ws;
                s.add(pos);
                continue;
            }
            pos += 1;
            s.add(pos);
        }
    }
    out
}

/// unicode.cpp's `unicode_regex_split_custom_llama3`, with `\p{N}{1,max_digits}`:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
/// With `max_digits == 1` it is qwen2's regex, which llama.cpp runs through std::regex on
/// category-collapsed text; the scanner gives the same words.
fn split_llama3(cps: &[char], offsets: &[usize], max_digits: usize) -> Vec<usize> {
    let lower = |c: Option<char>| c.map(|c| c.to_lowercase().next().unwrap_or(c));
    let mut out = Vec::with_capacity(offsets.len() + cps.len() / 4);
    for (ini, end) in ranges(offsets) {
        let mut s = Scan {
            cps,
            ini,
            end,
            prev_end: ini,
            out: &mut out,
        };
        let mut pos = ini;
        while pos < end {
            let cpt = cps[pos];
            let f = flags(cpt);
            if cpt == '\'' && pos + 1 < end {
                let next = lower(s.cpt(pos + 1));
                if matches!(next, Some('s' | 't' | 'm' | 'd')) {
                    pos += s.add(pos + 2);
                    continue;
                }
                if pos + 2 < end {
                    let nn = lower(s.cpt(pos + 2));
                    if matches!(
                        (next, nn),
                        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                    ) {
                        pos += s.add(pos + 3);
                        continue;
                    }
                }
            }
            if !(cpt == '\r' || cpt == '\n' || is(f, NUMBER))
                && (is(f, LETTER) || is(s.flags(pos + 1), LETTER))
            {
                pos += 1;
                while is(s.flags(pos), LETTER) {
                    pos += 1;
                }
                s.add(pos);
                continue;
            }
            if is(f, NUMBER) {
                let mut start = pos;
                while is(s.flags(pos), NUMBER) {
                    pos += 1;
                    if pos - start >= max_digits {
                        s.add(pos);
                        start = pos;
                    }
                }
                s.add(pos);
                continue;
            }
            let f2 = if cpt == ' ' { s.flags(pos + 1) } else { f };
            let other = |f: u8| f & (WHITESPACE | LETTER | NUMBER) == 0;
            if other(f2) && f != 0 {
                pos += usize::from(cpt == ' ');
                let mut f2 = f2;
                while other(f2) && f2 != 0 {
                    pos += 1;
                    f2 = s.flags(pos);
                }
                while matches!(s.cpt(pos), Some('\r' | '\n')) {
                    pos += 1;
                }
                s.add(pos);
                continue;
            }
            let mut n_ws = 0;
            let mut last_rn = 0;
            while is(s.flags(pos + n_ws), WHITESPACE) {
                if matches!(s.cpt(pos + n_ws), Some('\r' | '\n')) {
                    last_rn = pos + n_ws + 1;
                }
                n_ws += 1;
            }
            if last_rn > 0 {
                pos = last_rn;
                s.add(pos);
                continue;
            }
            if n_ws > 1 && s.cpt(pos + n_ws).is_some() {
                pos += n_ws - 1;
                s.add(pos);
                continue;
            }
            if n_ws > 0 {
                pos += n_ws;
                s.add(pos);
                continue;
            }
            pos += 1;
            s.add(pos);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: PreType, text: &str) -> Vec<String> {
        let cps: Vec<char> = text.chars().collect();
        ranges(&p.split(&cps))
            .map(|(s, e)| cps[s..e].iter().collect())
            .collect()
    }

    #[test]
    fn gpt2_words() {
        assert_eq!(
            words(PreType::Gpt2, "Hello, world!  it's 2024\n\n"),
            ["Hello", ",", " world", "!", " ", " it", "'s", " 2024", "\n\n"]
        );
    }

    #[test]
    fn smollm_splits_digits() {
        assert_eq!(
            words(PreType::Smollm, "year 2024"),
            ["year", " ", "2", "0", "2", "4"]
        );
    }

    #[test]
    fn llama3_words() {
        assert_eq!(
            words(PreType::Llama3, "Hello  world 12345\r\n\nIt'S"),
            ["Hello", " ", " world", " ", "123", "45", "\r\n\n", "It", "'S"]
        );
        assert_eq!(words(PreType::Qwen2, "x 123"), ["x", " ", "1", "2", "3"]);
    }

    #[test]
    fn default_words() {
        assert_eq!(words(PreType::Default, "a+=1234"), ["a", "+=", "123", "4"]);
    }
}
