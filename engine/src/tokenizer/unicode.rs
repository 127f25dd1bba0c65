//! Code point classes and the GPT-2 byte↔unicode table, as llama.cpp's unicode.cpp uses them.
//!
//! llama.cpp's pre-tokenizers only ask a few questions of a code point (letter? number?
//! whitespace? punctuation?), so one byte of flags per code point answers them in O(1). The
//! general categories come from regex-syntax's Unicode tables (no hand-copied data); the
//! whitespace set is Unicode's White_Space property, which is what llama.cpp uses.

use std::sync::OnceLock;

pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const WHITESPACE: u8 = 4;
pub const PUNCTUATION: u8 = 8;
/// Set for every valid code point, so "no flags" means "outside the fragment" (llama.cpp's
/// `unicode_cpt_flags{}`), as its `as_uint()` checks rely on.
pub const DEFINED: u8 = 16;

const MAX_CP: usize = 0x11_0000;

/// Unicode White_Space (PropList.txt), llama.cpp's `unicode_set_whitespace`.
const WHITESPACE_CPS: &[(u32, u32)] = &[
    (0x09, 0x0D),
    (0x20, 0x20),
    (0x85, 0x85),
    (0xA0, 0xA0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
];

fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![DEFINED; MAX_CP];
        for (pat, flag) in [
            (r"\p{L}", LETTER),
            (r"\p{N}", NUMBER),
            (r"\p{P}", PUNCTUATION),
        ] {
            for (lo, hi) in class_ranges(pat) {
                for f in &mut t[lo as usize..=(hi as usize).min(MAX_CP - 1)] {
                    *f |= flag;
                }
            }
        }
        for &(lo, hi) in WHITESPACE_CPS {
            for f in &mut t[lo as usize..=hi as usize] {
                *f |= WHITESPACE;
            }
        }
        t
    })
}

/// The code point ranges of a `\p{..}` class, from regex-syntax's tables.
fn class_ranges(pat: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let Ok(hir) = regex_syntax::Parser::new().parse(pat) else {
        return Vec::new();
    };
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => Vec::new(),
    }
}

/// Flags of `c` (never 0).
#[inline]
pub fn flags(c: char) -> u8 {
    table()[c as usize]
}

/// GPT-2's byte → printable code point mapping (`bytes_to_unicode`).
pub fn byte_to_char_table() -> &'static [char; 256] {
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut assigned = [false; 256];
        for b in (0x21..=0x7Eu32).chain(0xA1..=0xAC).chain(0xAE..=0xFF) {
            t[b as usize] = char::from_u32(b).unwrap_or('\0');
            assigned[b as usize] = true;
        }
        let mut n = 0u32;
        for b in 0..256usize {
            if !assigned[b] {
                t[b] = char::from_u32(256 + n).unwrap_or('\0');
                n += 1;
            }
        }
        t
    })
}

/// Inverse of [`byte_to_char_table`].
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    match cp {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(cp as u8),
        0x100..=0x143 => {
            let t = byte_to_char_table();
            t.iter().position(|&x| x == c).map(|b| b as u8)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(flags('a') & LETTER, LETTER);
        assert_eq!(flags('é') & LETTER, LETTER);
        assert_eq!(flags('7') & NUMBER, NUMBER);
        assert_eq!(flags('²') & NUMBER, NUMBER);
        assert_eq!(flags(' ') & WHITESPACE, WHITESPACE);
        assert_eq!(flags('\u{3000}') & WHITESPACE, WHITESPACE);
        assert_eq!(flags('!') & PUNCTUATION, PUNCTUATION);
        assert_eq!(flags('$') & (PUNCTUATION | LETTER | NUMBER), 0);
        assert_ne!(flags('\u{10FFFF}'), 0);
    }

    #[test]
    fn byte_table_round_trips() {
        let t = byte_to_char_table();
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }
}
