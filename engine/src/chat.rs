//! Chat templates: turn a list of messages into the prompt text a model was trained on.
//!
//! Models ship a Hugging Face Jinja template in `tokenizer.chat_template`; we render it with
//! minijinja configured like transformers' sandbox (trim/lstrip blocks, loop controls, Python
//! string/dict methods, `raise_exception`, a Python-compatible `tojson`, `strftime_now`).
//! Models without a template get a documented fallback (Gemma turns or ChatML), rendered
//! through the same code path. Templates come from model files and messages from apps, so a
//! render is bounded: fuel (instruction budget), recursion limit and output size cap turn
//! hostile input into a [`ChatError`], never a panic or a hang.

use std::fmt::Write as _;
use std::io;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;

/// One message of a conversation, as the template sees it (`message.role`, `message.content`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a template could not be compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template source does not parse.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template called `raise_exception(msg)` (e.g. roles not alternating).
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// The template failed while rendering (unknown filter, bad operation, ...).
    #[error("chat template render error: {0}")]
    Render(String),
    /// The render used more instructions or recursion than allowed.
    #[error("chat template exceeded its execution budget: {0}")]
    BudgetExceeded(String),
    /// The rendered prompt would be larger than [`MAX_RENDERED_BYTES`].
    #[error("rendered chat prompt exceeds {limit} bytes")]
    OutputTooLarge { limit: usize },
    /// A message role that is empty, too long or contains characters other than
    /// ASCII letters, digits, `_` and `-` (it could otherwise inject template markup).
    #[error("invalid message role {0:?}")]
    BadRole(String),
}

/// Largest rendered prompt accepted (1 MiB): far beyond any context window we serve.
pub const MAX_RENDERED_BYTES: usize = 1 << 20;
/// Instructions a single render may execute. A real template uses tens per message.
pub const RENDER_FUEL: u64 = 2_000_000;
/// Nesting depth (loops, ifs, macro calls) a render may reach.
pub const RECURSION_LIMIT: usize = 100;
/// Longest role name accepted.
pub const MAX_ROLE_LEN: usize = 64;

const TEMPLATE_NAME: &str = "chat";

/// Gemma 3's official Hugging Face chat template (text parts), used for gemma/gemma2/gemma3
/// GGUFs that carry no template. The system message is folded into the first user turn.
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = \"\" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = \"model\" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception(\"Invalid content type\") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
";

/// ChatML (`<|im_start|>role\n...<|im_end|>\n`), the fallback for every other architecture.
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|im_start|>assistant\n' }}
{%- endif -%}
";

/// A compiled chat template: compile once, render many times (it is `Send + Sync`).
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
    fallback: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("fallback", &self.fallback)
            .finish()
    }
}

impl ChatTemplate {
    /// From `tokenizer.chat_template`; without one, the fallback chosen by
    /// `general.architecture` (see [`ChatTemplate::fallback_for`]). `bos_token`/`eos_token`
    /// are the texts of `tokenizer.ggml.{bos,eos}_token_id` in `tokenizer.ggml.tokens`
    /// (empty when absent).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ChatError> {
        let token_text = |key: &str| -> String {
            let id = g.get(key).and_then(|v| v.as_u64());
            let tokens = g.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
            match (id, tokens) {
                (Some(id), Some(tokens)) => usize::try_from(id)
                    .ok()
                    .and_then(|i| tokens.get(i))
                    .and_then(|t| t.as_str())
                    .unwrap_or("")
                    .to_owned(),
                _ => String::new(),
            }
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        match g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) if !src.trim().is_empty() => Self::new(src, &bos, &eos),
            _ => {
                let arch = g
                    .get("general.architecture")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                Ok(Self::fallback_for(arch, &bos, &eos))
            }
        }
    }

    /// Compiles `source` (a Hugging Face Jinja chat template).
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        Self::build(source, bos_token, eos_token, false)
    }

    /// The built-in template for a GGUF without one: Gemma turns for `gemma`, `gemma2`,
    /// `gemma3` (and `gemma3n`...), ChatML for everything else.
    pub fn fallback_for(architecture: &str, bos_token: &str, eos_token: &str) -> Self {
        let src = if architecture.starts_with("gemma") {
            GEMMA_TEMPLATE
        } else {
            CHATML_TEMPLATE
        };
        // The built-in sources are constants covered by tests: compiling them cannot fail.
        Self::build(src, bos_token, eos_token, true).expect("built-in chat template compiles")
    }

    fn build(source: &str, bos: &str, eos: &str, fallback: bool) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(Self {
            env,
            source: source.to_owned(),
            bos_token: bos.to_owned(),
            eos_token: eos.to_owned(),
            fallback,
        })
    }

    /// Renders the conversation. With `add_generation_prompt` the text ends with the opening
    /// of an assistant turn, ready for generation.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        for m in messages {
            check_role(&m.role)?;
        }
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = LimitedWriter {
            buf: Vec::new(),
            overflow: false,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(_) if out.overflow => {
                return Err(ChatError::OutputTooLarge {
                    limit: MAX_RENDERED_BYTES,
                })
            }
            Err(e) => return Err(classify(&e)),
        }
        // minijinja only writes `str` pieces, so the output is valid UTF-8.
        String::from_utf8(out.buf).map_err(|e| ChatError::Render(e.to_string()))
    }

    /// The template source (for `llmsd inspect`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// True when the GGUF had no template and a built-in one is used.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

fn check_role(role: &str) -> Result<(), ChatError> {
    let ok = !role.is_empty()
        && role.len() <= MAX_ROLE_LEN
        && role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ChatError::BadRole(
            role.chars().take(MAX_ROLE_LEN).collect(),
        ))
    }
}

/// Collects output, refusing (with an I/O error that aborts the render) past the cap.
struct LimitedWriter {
    buf: Vec<u8>,
    overflow: bool,
}

impl io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() + data.len() > MAX_RENDERED_BYTES {
            self.overflow = true;
            return Err(io::Error::other("rendered chat prompt too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Marker carried as the source of the error `raise_exception` returns.
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(msg: Option<Value>) -> Result<Value, JinjaError> {
    let msg = match msg {
        Some(v) => v
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string()),
        None => String::from("raise_exception called"),
    };
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

fn classify(e: &JinjaError) -> ChatError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return ChatError::Raised(r.0.clone());
        }
        src = s.source();
    }
    match e.kind() {
        ErrorKind::OutOfFuel => ChatError::BudgetExceeded(describe(e)),
        ErrorKind::InvalidOperation
            if e.detail().is_some_and(|d| d.contains("recursion limit")) =>
        {
            ChatError::BudgetExceeded(describe(e))
        }
        ErrorKind::SyntaxError => ChatError::Syntax(describe(e)),
        _ => ChatError::Render(describe(e)),
    }
}

fn describe(e: &JinjaError) -> String {
    match e.line() {
        Some(line) => format!("{e} (line {line})"),
        None => e.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// tojson, as transformers defines it: json.dumps(x, ensure_ascii=False, indent=None,
// separators=None, sort_keys=False) — Python's spacing (", " and ": "), no HTML escaping.

fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    JinjaError::new(ErrorKind::InvalidOperation, "tojson: bad indent")
                })?;
                Some(" ".repeat(n.clamp(0, 32) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if v.len() == Some(2) => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_owned(),
                b.as_str().unwrap_or(":").to_owned(),
            )
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOpts {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

const JSON_MAX_DEPTH: usize = 64;

fn write_json(out: &mut String, v: &Value, o: &JsonOpts, depth: usize) -> Result<(), JinjaError> {
    if depth > JSON_MAX_DEPTH || out.len() > MAX_RENDERED_BYTES {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            "tojson: value too deep or too large",
        ));
    }
    let newline = |out: &mut String, d: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..d {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(f) = f64::try_from(v.clone()).ok().filter(|_| !v.is_integer()) {
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else if f.fract() == 0.0 && f.abs() < 1e16 {
                    let _ = write!(out, "{f:.1}");
                } else {
                    let _ = write!(out, "{f}");
                }
            } else {
                let _ = write!(out, "{v}");
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or(""), o.ensure_ascii),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                let ks = match k.as_str() {
                    Some(s) => s.to_owned(),
                    None => k.to_string(),
                };
                write_json_str(out, &ks, o.ensure_ascii);
                out.push_str(&o.key_sep);
                write_json(out, &v.get_item(k)?, o, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let mut n = 0;
            for item in v.try_iter()? {
                if n > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(out, depth + 1);
                write_json(out, &item, o, depth + 1)?;
                n += 1;
            }
            if n > 0 {
                newline(out, depth);
            }
            out.push(']');
        }
        _ => write_json_str(out, &v.to_string(), o.ensure_ascii),
    }
    Ok(())
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime_now(format): the current UTC time, formatted with the common strftime directives.

fn strftime_now(format: &str) -> Result<Value, JinjaError> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(format, secs)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats Unix time `secs` (UTC). Supports %Y %y %m %d %e %B %b %h %A %a %H %I %M %S %p %j %F
/// %T %%; other directives are copied through.
fn strftime(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (index 3)
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let month = MONTHS[(m - 1) as usize];
    let wday = WEEKDAYS[weekday];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{y}"),
            Some('y') => write!(out, "{:02}", y.rem_euclid(100)),
            Some('m') => write!(out, "{m:02}"),
            Some('d') => write!(out, "{d:02}"),
            Some('e') => write!(out, "{d:2}"),
            Some('B') => write!(out, "{month}"),
            Some('b') | Some('h') => write!(out, "{}", &month[..3]),
            Some('A') => write!(out, "{wday}"),
            Some('a') => write!(out, "{}", &wday[..3]),
            Some('H') => write!(out, "{hh:02}"),
            Some('I') => write!(out, "{:02}", if hh % 12 == 0 { 12 } else { hh % 12 }),
            Some('M') => write!(out, "{mm:02}"),
            Some('S') => write!(out, "{ss:02}"),
            Some('p') => write!(out, "{}", if hh < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('F') => write!(out, "{y}-{m:02}-{d:02}"),
            Some('T') => write!(out, "{hh:02}:{mm:02}:{ss:02}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    const SMOL: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
    );
    const GEMMA: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/gemma-3-270m-q4_k_m.gguf"
    );
    const SMOL_REF: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/reference/smollm2_public.json"
    );

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    fn smol() -> ChatTemplate {
        assert!(
            Path::new(SMOL).exists(),
            "{SMOL} missing: run scripts/fetch-models"
        );
        let g = GgufFile::open(SMOL).unwrap();
        ChatTemplate::from_gguf(&g).unwrap()
    }

    #[test]
    fn chat_smollm2_matches_reference_prompt() {
        let t = smol();
        assert!(!t.is_fallback());
        assert_eq!(t.bos_token(), "<|im_start|>");
        assert_eq!(t.eos_token(), "<|im_end|>");
        let out = t
            .render(
                &[
                    msg(
                        "system",
                        "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
                    ),
                    msg("user", "What is the capital of France?"),
                ],
                true,
            )
            .unwrap();
        let reference = std::fs::read_to_string(SMOL_REF)
            .unwrap_or_else(|e| panic!("{SMOL_REF} unreadable: {e}"));
        let j: serde_json::Value = serde_json::from_str(&reference).unwrap();
        let expected = j["greedy"][1]["prompt"].as_str().unwrap();
        assert_eq!(out, expected);
    }

    #[test]
    fn chat_smollm2_inserts_default_system_prompt() {
        let t = smol();
        let out = t.render(&[msg("user", "Hi")], false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn chat_gemma_gguf_uses_fallback() {
        assert!(
            Path::new(GEMMA).exists(),
            "{GEMMA} missing: run scripts/fetch-models"
        );
        let g = GgufFile::open(GEMMA).unwrap();
        let t = ChatTemplate::from_gguf(&g).unwrap();
        assert!(t.is_fallback());
        assert_eq!(t.source(), GEMMA_TEMPLATE);
        let out = t.render(&[msg("user", "Hello")], true).unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chat_gemma_fallback_user_and_system() {
        let t = ChatTemplate::fallback_for("gemma3", "<bos>", "<eos>");
        assert!(t.is_fallback());
        let out = t
            .render(
                &[
                    msg("user", "Hi"),
                    msg("assistant", " Hello! "),
                    msg("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
        );
        let out = t.render(&[msg("user", "Hi")], false).unwrap();
        assert_eq!(out, "<bos><start_of_turn>user\nHi<end_of_turn>\n");
        // gemma and gemma2 get the same fallback.
        assert_eq!(
            ChatTemplate::fallback_for("gemma2", "", "").source(),
            GEMMA_TEMPLATE
        );
    }

    #[test]
    fn chat_gemma_fallback_rejects_non_alternating_roles() {
        let t = ChatTemplate::fallback_for("gemma", "<bos>", "<eos>");
        let err = t
            .render(&[msg("user", "a"), msg("user", "b")], true)
            .unwrap_err();
        match err {
            ChatError::Raised(m) => assert!(m.contains("must alternate"), "{m}"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn chat_chatml_fallback() {
        let t = ChatTemplate::fallback_for("qwen2", "", "<|im_end|>");
        assert!(t.is_fallback());
        let out = t
            .render(&[msg("system", "S"), msg("user", "U")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn chat_raise_exception_carries_message() {
        let t = ChatTemplate::new(
            "{% if messages|length == 0 %}{{ raise_exception('No messages given!') }}{% endif %}ok",
            "",
            "",
        )
        .unwrap();
        match t.render(&[], true).unwrap_err() {
            ChatError::Raised(m) => assert_eq!(m, "No messages given!"),
            other => panic!("expected Raised, got {other:?}"),
        }
        assert_eq!(t.render(&[msg("user", "x")], true).unwrap(), "ok");
    }

    #[test]
    fn chat_template_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
        assert_send_sync::<ChatError>();
    }

    #[test]
    fn chat_syntax_errors_are_errors() {
        for src in [
            "{% for m in messages %}",
            "{{ 1 + }}",
            "{% endif %}",
            "{{ x | }}",
        ] {
            assert!(
                matches!(ChatTemplate::new(src, "", ""), Err(ChatError::Syntax(_))),
                "{src}"
            );
        }
    }

    #[test]
    fn chat_hostile_templates_error_quickly() {
        let cases = [
            // effectively infinite loop
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            // huge output
            "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
            // unbounded recursion
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            // one huge write
            "{{ 'x' * 50000000 }}",
        ];
        for src in cases {
            let t = ChatTemplate::new(src, "", "").unwrap();
            let start = Instant::now();
            let err = t.render(&[msg("user", "x")], true).unwrap_err();
            assert!(
                matches!(
                    err,
                    ChatError::BudgetExceeded(_) | ChatError::OutputTooLarge { .. }
                ),
                "{src}: {err:?}"
            );
            assert!(start.elapsed() < Duration::from_secs(1), "{src}: too slow");
        }
    }

    #[test]
    fn chat_bad_roles_rejected() {
        let t = ChatTemplate::fallback_for("llama", "", "");
        for role in ["", "user<|im_end|>", "a b", &"x".repeat(100)] {
            assert!(matches!(
                t.render(&[msg(role, "x")], true),
                Err(ChatError::BadRole(_))
            ));
        }
    }

    #[test]
    fn chat_hf_quirks() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
                   {{ m.content.strip() }}|{{ m.content.startswith(' a') }}|{{ m.content.split(',') | length }}|\
                   {% for k, v in {'r': m.role}.items() %}{{ k }}={{ v }}{% endfor %}|{% if loop.index > 5 %}{% break %}{% endif %}\
                   {% endfor %}{{ eos_token }}{{ add_generation_prompt }}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t
            .render(&[msg("user", " a,b "), msg("skip", "zz")], false)
            .unwrap();
        // Booleans print the Python way, as in transformers.
        assert_eq!(out, "<s>a,b|True|2|r=user|</s>False");
    }

    #[test]
    fn chat_tojson_is_python_like() {
        let t = ChatTemplate::new(
            "{{ {'name': 'f', 'a': [1, 2.0, true, none], 'q': 'x\"<é'} | tojson }}\n\
             {{ messages[0] | tojson(indent=2) }}",
            "",
            "",
        )
        .unwrap();
        let out = t.render(&[msg("user", "hi")], false).unwrap();
        let (first, second) = out.split_once('\n').unwrap();
        assert_eq!(
            first,
            r#"{"name": "f", "a": [1, 2.0, true, null], "q": "x\"<é"}"#
        );
        assert_eq!(second, "{\n  \"role\": \"user\",\n  \"content\": \"hi\"\n}");
    }

    #[test]
    fn chat_strftime_now() {
        let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
        let out = t.render(&[], false).unwrap();
        assert_eq!(out.len(), 10, "{out}");
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %A %j", 0),
            "01 Jan 1970 00:00:00 Thursday 001"
        );
        // 2024-02-29T13:05:09Z
        assert_eq!(
            strftime("%F %T %B %a %I%p %y %%", 1_709_211_909),
            "2024-02-29 13:05:09 February Thu 01PM 24 %"
        );
    }
}
