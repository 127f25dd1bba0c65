//! `response_format: json_object`: generation constrained to one JSON object. A byte-level
//! recognizer of JSON prefixes tells which tokens may come next; the sampler only sees those,
//! and generation ends when the object closes.

/// Deepest nesting allowed (the recognizer's stack is fixed-size so a state clones cheaply).
const MAX_DEPTH: usize = 32;
/// Whitespace bytes allowed in a row: stops a model from padding forever.
const MAX_WS_RUN: u8 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level `{`.
    Start,
    /// A value is expected (after `:` or `[` or `,` in an array).
    Value,
    /// After `{` : a key or `}`.
    KeyOrEnd,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value inside a container: `,` or the closer.
    CommaOrEnd,
    /// After `[`: a value or `]`.
    ValueOrEnd,
    /// Inside a string; `key` tells what follows it.
    Str {
        key: bool,
    },
    Escape {
        key: bool,
    },
    Unicode {
        key: bool,
        left: u8,
    },
    /// Inside a number; `state` follows JSON's grammar.
    Number(Num),
    /// Inside `true`/`false`/`null`: the rest of the word.
    Literal {
        word: u8,
        at: u8,
    },
    /// The object is closed.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPrefix {
    mode: Mode,
    /// `{` or `[` per open container.
    stack: [u8; MAX_DEPTH],
    depth: u8,
    ws_run: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self {
            mode: Mode::Start,
            stack: [0; MAX_DEPTH],
            depth: 0,
            ws_run: 0,
        }
    }
}

impl JsonPrefix {
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Feeds bytes; false (state unspecified) if they cannot continue a JSON object.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| self.byte(b))
    }

    fn after_value(&mut self) -> bool {
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::CommaOrEnd
        };
        true
    }

    fn open(&mut self, c: u8) -> bool {
        if self.depth as usize == MAX_DEPTH {
            return false;
        }
        self.stack[self.depth as usize] = c;
        self.depth += 1;
        self.mode = if c == b'{' {
            Mode::KeyOrEnd
        } else {
            Mode::ValueOrEnd
        };
        true
    }

    fn close(&mut self, c: u8) -> bool {
        let want = if c == b'}' { b'{' } else { b'[' };
        if self.depth == 0 || self.stack[self.depth as usize - 1] != want {
            return false;
        }
        self.depth -= 1;
        self.after_value()
    }

    fn value_start(&mut self, b: u8) -> bool {
        match b {
            b'{' | b'[' => self.open(b),
            b'"' => {
                self.mode = Mode::Str { key: false };
                true
            }
            b'-' => {
                self.mode = Mode::Number(Num::Minus);
                true
            }
            b'0' => {
                self.mode = Mode::Number(Num::Zero);
                true
            }
            b'1'..=b'9' => {
                self.mode = Mode::Number(Num::Int);
                true
            }
            _ => match WORDS.iter().position(|w| w[0] == b) {
                Some(word) => {
                    self.mode = Mode::Literal {
                        word: word as u8,
                        at: 1,
                    };
                    true
                }
                None => false,
            },
        }
    }

    fn byte(&mut self, b: u8) -> bool {
        let ws = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        let in_token = matches!(
            self.mode,
            Mode::Str { .. } | Mode::Escape { .. } | Mode::Unicode { .. } | Mode::Literal { .. }
        );
        if ws && !in_token && !matches!(self.mode, Mode::Number(_)) {
            if self.mode == Mode::Done || self.mode == Mode::Start {
                return false;
            }
            self.ws_run += 1;
            return self.ws_run <= MAX_WS_RUN;
        }
        if !ws {
            self.ws_run = 0;
        }
        match self.mode {
            Mode::Done => false,
            Mode::Start => b == b'{' && self.open(b),
            Mode::Value => self.value_start(b),
            Mode::ValueOrEnd => b == b']' && self.close(b) || b != b']' && self.value_start(b),
            Mode::KeyOrEnd | Mode::Key => {
                if b == b'"' {
                    self.mode = Mode::Str { key: true };
                    true
                } else {
                    self.mode == Mode::KeyOrEnd && b == b'}' && self.close(b)
                }
            }
            Mode::Colon => {
                self.mode = Mode::Value;
                b == b':'
            }
            Mode::CommaOrEnd => match b {
                b',' => {
                    let top = self.stack[self.depth as usize - 1];
                    self.mode = if top == b'{' { Mode::Key } else { Mode::Value };
                    true
                }
                b'}' | b']' => self.close(b),
                _ => false,
            },
            Mode::Str { key } => match b {
                b'"' => {
                    if key {
                        self.mode = Mode::Colon;
                        true
                    } else {
                        self.after_value()
                    }
                }
                b'\\' => {
                    self.mode = Mode::Escape { key };
                    true
                }
                0..=0x1f => false,
                _ => true,
            },
            Mode::Escape { key } => {
                self.mode = match b {
                    b'u' => Mode::Unicode { key, left: 4 },
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Mode::Str { key },
                    _ => return false,
                };
                true
            }
            Mode::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return false;
                }
                self.mode = if left == 1 {
                    Mode::Str { key }
                } else {
                    Mode::Unicode {
                        key,
                        left: left - 1,
                    }
                };
                true
            }
            Mode::Literal { word, at } => {
                let w = WORDS[word as usize];
                if w[at as usize] != b {
                    return false;
                }
                if at as usize + 1 == w.len() {
                    self.after_value()
                } else {
                    self.mode = Mode::Literal { word, at: at + 1 };
                    true
                }
            }
            Mode::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                if let Some(n) = next {
                    self.mode = Mode::Number(n);
                    return true;
                }
                // The number ended: it must have been complete, and `b` goes on after it.
                if !matches!(n, Num::Zero | Num::Int | Num::Frac | Num::Exp) {
                    return false;
                }
                self.after_value();
                self.byte(b)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(s: &str) -> bool {
        let mut p = JsonPrefix::default();
        p.feed(s.as_bytes())
    }

    fn complete(s: &str) -> bool {
        let mut p = JsonPrefix::default();
        p.feed(s.as_bytes()) && p.is_complete()
    }

    #[test]
    fn whole_objects_complete() {
        for s in [
            r#"{}"#,
            r#"{"a":1}"#,
            r#"{"a": [1, 2.5, -3e4, true, null, "x\"y\u00e9"], "b": {"c": false}}"#,
            "{\n  \"k\": 0\n}",
            r#"{"n":-0.5E+3}"#,
        ] {
            assert!(complete(s), "{s}");
            assert!(serde_json::from_str::<serde_json::Value>(s).is_ok());
        }
    }

    #[test]
    fn prefixes_are_accepted_but_not_complete() {
        let s = r#"{"a": [1, {"b": "c\\"}], "d": 12"#;
        for i in 0..s.len() {
            assert!(accepts(&s[..i]), "prefix {:?}", &s[..i]);
        }
        assert!(!complete(s));
    }

    #[test]
    fn invalid_continuations_are_refused() {
        for s in [
            "[1]",
            "\"x\"",
            "{a",
            "{\"a\" 1",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":01",
            "{\"a\":tru,",
            "{\"a\":1]",
            "{}x",
            "{} ",
            "{\"a\":\"\u{1}\"",
            "{\"a\":-}",
            "{\"a\":1.}",
            " {",
            &format!("{{\"a\":{}1}}", " ".repeat(25)),
        ] {
            assert!(!accepts(s), "{s:?}");
        }
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH);
        assert!(!accepts(&deep));
    }

    /// Every prefix of a serde_json rendering of random values is accepted, and the whole
    /// rendering completes.
    #[test]
    fn agrees_with_serde_on_random_values() {
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|v| serde_json::json!(v)),
            (-1e6f64..1e6).prop_map(|v| serde_json::json!(v)),
            "[ -~é\\n\"\\\\]{0,8}".prop_map(serde_json::Value::String),
        ];
        let value = leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        });
        let obj = proptest::collection::btree_map("[a-z]{1,4}", value, 0..4)
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()));
        TestRunner::default()
            .run(&(obj, any::<bool>()), |(v, pretty)| {
                let s = if pretty {
                    serde_json::to_string_pretty(&v).unwrap()
                } else {
                    serde_json::to_string(&v).unwrap()
                };
                let mut p = JsonPrefix::default();
                for (i, b) in s.bytes().enumerate() {
                    prop_assert!(p.byte(b), "refused byte {i} of {s}");
                }
                prop_assert!(p.is_complete(), "{s}");
                Ok(())
            })
            .unwrap();
    }
}
