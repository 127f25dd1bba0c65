//! One-shot subcommands: load the model, do one thing, print (JSON with `--json`), exit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use llmsd_engine::chat::{ChatMessage, ChatTemplate};
use llmsd_engine::kv::ContiguousKv;
use llmsd_engine::model::{Logits, Model, Scratch, SeqBatch};
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::sampling::{Sampler, SamplingParams, StopMatcher, StopStep};
use llmsd_engine::tokenizer::Tokenizer;
use serde_json::json;

use crate::ModelArg;

/// The model every command uses when none is named.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Tokens per forward call when many positions need logits (bounds the logits buffer).
const LOGITS_BATCH: usize = 256;

/// Resolves the model path: the flag or `$LLMSD_MODEL`, else `models/` in the working
/// directory, else `models/` of the source tree the binary was built in (target/*/llmsd).
pub fn resolve_model(arg: &Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p.clone());
    }
    let mut candidates = vec![Path::new("models").join(DEFAULT_MODEL_FILE)];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(root) = exe.parent().and_then(Path::parent).and_then(Path::parent) {
            candidates.push(root.join("models").join(DEFAULT_MODEL_FILE));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no model given and {DEFAULT_MODEL_FILE} not found in ./models; \
                 run scripts/fetch-models or pass --model PATH"
            )
        })
}

pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Tokenizer,
    pub pool: Arc<ThreadPool>,
}

pub fn load(arg: &ModelArg) -> Result<Loaded> {
    let path = resolve_model(&arg.model)?;
    let model = Model::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(model.file())
        .with_context(|| format!("loading tokenizer of {}", path.display()))?;
    let threads = arg.threads.unwrap_or_else(default_threads);
    let pool = ThreadPool::with_pinning(threads, std::env::var_os("LLMSD_NO_PIN").is_none())
        .context("starting engine threads")?;
    Ok(Loaded {
        model: Arc::new(model),
        tokenizer,
        pool: Arc::new(pool),
    })
}

pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Token ids of `text`, with BOS first iff `bos` (whatever the model's own default).
pub fn encode(tokenizer: &Tokenizer, text: &str, bos: bool, special: bool) -> Vec<u32> {
    let mut ids = Vec::with_capacity(text.len() / 3 + 1);
    if bos {
        ids.extend(tokenizer.bos_id());
    }
    ids.extend(tokenizer.encode(text, false, special));
    ids
}

fn read_text(text: &Option<String>, file: &Option<PathBuf>) -> Result<String> {
    match (text, file) {
        (Some(t), None) => Ok(t.clone()),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
        }
        _ => bail!("give exactly one of the text and the file"),
    }
}

#[derive(clap::Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, conflicts_with = "file")]
    text: Option<String>,
    #[arg(long)]
    file: Option<PathBuf>,
    /// Parse special tokens such as <|im_start|> in the text.
    #[arg(long)]
    special: bool,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    #[arg(long)]
    json: bool,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let path = resolve_model(&a.model.model)?;
    let file = llmsd_engine::gguf::GgufFile::open(&path)?;
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let text = read_text(&a.text, &a.file)?;
    let ids = encode(&tokenizer, &text, a.bos, a.special);
    if a.json {
        println!("{}", serde_json::to_string(&ids)?);
    } else {
        for id in ids {
            let piece = String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned();
            println!("{id:>8} {piece:?}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Prepend the BOS token.
    #[arg(long)]
    bos: bool,
    /// Wrap the prompt as one user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    json: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let l = load(&a.model)?;
    let mut prompt = read_text(&a.prompt, &a.prompt_file)?;
    let mut add_bos = a.bos;
    if a.chat {
        let template = ChatTemplate::from_gguf(l.model.file())?;
        let messages = [ChatMessage {
            role: "user".into(),
            content: prompt,
        }];
        prompt = template.render(&messages, true)?;
        // Templates that open with the BOS text (Gemma's) already carry it.
        if !template.bos_token().is_empty() && prompt.starts_with(template.bos_token()) {
            add_bos = false;
        }
    }
    let prompt_ids = encode(&l.tokenizer, &prompt, add_bos, true);
    if prompt_ids.is_empty() {
        bail!("the prompt has no tokens");
    }
    let params = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        seed: a.seed,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(params)?;
    let mut stops = StopMatcher::new(a.stop.clone());
    let capacity = l
        .model
        .config
        .context_length
        .min(prompt_ids.len() + a.max_tokens);
    let mut kv = ContiguousKv::new(l.model.kv_shape(), capacity);
    let mut scratch = Scratch::default();
    let mut history = prompt_ids.clone();
    let mut generated = Vec::new();
    let mut text = String::new();
    let mut pending = Vec::new(); // bytes of an incomplete UTF-8 character
    let mut next_input: Vec<u32> = prompt_ids.clone();
    let mut pos = 0;
    let stdout_stream = !a.json;
    let mut stopped = false;
    while generated.len() < a.max_tokens {
        if pos + next_input.len() > capacity {
            break;
        }
        let logits = l.model.forward(
            &l.pool,
            &mut [SeqBatch {
                tokens: &next_input,
                start_pos: pos,
                kv: &mut kv,
                logits: Logits::Last,
            }],
            &mut scratch,
        )?;
        pos += next_input.len();
        let id = sampler.sample(logits, &history);
        if l.tokenizer.is_eog(id) {
            break;
        }
        generated.push(id);
        history.push(id);
        pending.extend(l.tokenizer.token_bytes(id));
        let piece = llmsd::service::generation::take_utf8(&mut pending);
        let emit = match stops.push(&piece) {
            StopStep::Continue { emit } => emit,
            StopStep::Stopped { emit, .. } => {
                stopped = true;
                emit
            }
        };
        if stdout_stream {
            use std::io::Write;
            print!("{emit}");
            std::io::stdout().flush().ok();
        }
        text.push_str(&emit);
        if stopped {
            break;
        }
        next_input.clear();
        next_input.push(id);
    }
    if !stopped {
        let rest = stops.finish();
        if stdout_stream {
            print!("{rest}");
        }
        text.push_str(&rest);
        text.push_str(&String::from_utf8_lossy(&pending));
    }
    if a.json {
        println!(
            "{}",
            json!({"prompt_ids": prompt_ids, "generated_ids": generated, "text": text})
        );
    } else {
        println!();
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Comma-separated token ids.
    #[arg(long, conflicts_with = "ids_file")]
    ids: Option<String>,
    /// File of token ids (JSON array, or separated by commas or white space).
    #[arg(long)]
    ids_file: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Tokens per forward call: 1 runs every position through the decode path (one token at
    /// a time against the cache), the default through the prefill path.
    #[arg(long, default_value_t = LOGITS_BATCH as u32, value_parser = clap::value_parser!(u32).range(1..=LOGITS_BATCH as i64))]
    step: u32,
    #[arg(long)]
    json: bool,
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(|c: char| c == ',' || c.is_whitespace() || c == '[' || c == ']')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("{t:?} is not a token id"))
        })
        .collect()
}

/// Runs `ids` through the model in slices of `step` tokens, calling `each(position, logits)`
/// for every position.
fn for_each_position_logits(
    l: &Loaded,
    ids: &[u32],
    step: usize,
    mut each: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    let vocab = l.model.config.vocab_size;
    let mut kv = ContiguousKv::new(l.model.kv_shape(), ids.len());
    let mut scratch = Scratch::default();
    let step = step.max(1);
    for (chunk_idx, chunk) in ids.chunks(step).enumerate() {
        let start = chunk_idx * step;
        let logits = l.model.forward(
            &l.pool,
            &mut [SeqBatch {
                tokens: chunk,
                start_pos: start,
                kv: &mut kv,
                logits: Logits::All,
            }],
            &mut scratch,
        )?;
        for (i, row) in logits.chunks_exact(vocab).enumerate() {
            each(start + i, row)?;
        }
    }
    Ok(())
}

pub fn logits(a: LogitsArgs) -> Result<()> {
    let ids_text = read_text(&a.ids, &a.ids_file)?;
    let ids = parse_ids(&ids_text)?;
    if ids.is_empty() {
        bail!("no token ids given");
    }
    let l = load(&a.model)?;
    let k = a.top.clamp(1, l.model.config.vocab_size);
    let mut out = Vec::with_capacity(ids.len());
    for_each_position_logits(&l, &ids, a.step as usize, |_, row| {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_by(cmp);
        let vals: Vec<f32> = idx.iter().map(|&i| row[i as usize]).collect();
        out.push(json!({"ids": idx, "logits": vals}));
        Ok(())
    })?;
    if a.json {
        println!("{}", serde_json::Value::Array(out));
    } else {
        for (p, o) in out.iter().enumerate() {
            println!("{p:>5} {o}");
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    file: PathBuf,
    /// Tokens to evaluate (BOS included when --bos); tokens 2..N are predicted.
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    #[arg(long)]
    bos: bool,
    /// Keep the history as this KV policy would (chunks compressed as they fill); without it,
    /// an uncompressed f32 cache.
    #[arg(long)]
    kv_policy: Option<llmsd::kvstore::Policy>,
    /// Mean bits per KV element for the llms policy.
    #[arg(long, default_value_t = llmsd::kvstore::store::DEFAULT_AVG_BITS)]
    kv_bits_avg: f64,
    #[arg(long)]
    json: bool,
}

/// Negative log-likelihood of `target` under `logits` (log-softmax, in f64).
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let l = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let mut ids = encode(&l.tokenizer, &text, a.bos, false);
    if ids.len() < a.tokens {
        bail!(
            "{} has only {} tokens, {} asked for",
            a.file.display(),
            ids.len(),
            a.tokens
        );
    }
    if a.tokens < 2 {
        bail!("--tokens must be at least 2");
    }
    ids.truncate(a.tokens);
    let ppl = match a.kv_policy {
        Some(policy) => crate::contexts::perplexity_with_policy(&l, &ids, policy, a.kv_bits_avg)?,
        None => {
            let mut total = 0.0f64;
            for_each_position_logits(&l, &ids, LOGITS_BATCH, |p, row| {
                if let Some(&next) = ids.get(p + 1) {
                    total += nll(row, next);
                }
                Ok(())
            })?;
            (total / (ids.len() - 1) as f64).exp()
        }
    };
    if a.json {
        let policy = a.kv_policy.map(|p| p.name());
        println!(
            "{}",
            json!({"ppl": ppl, "tokens": ids.len(), "kv_policy": policy})
        );
    } else {
        println!("perplexity {ppl:.4} over {} tokens", ids.len());
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long)]
    json: bool,
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let path = resolve_model(&a.model.model)?;
    let model = Model::load(&path).with_context(|| format!("loading model {}", path.display()))?;
    let file = model.file();
    let c = &model.config;
    let mut types: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for t in &file.tensors {
        let e = types.entry(t.ty.name().to_string()).or_default();
        e.0 += 1;
        e.1 += t.size;
    }
    let template = ChatTemplate::from_gguf(file)?;
    let n_params: usize = file.tensors.iter().map(|t| t.n_elements()).sum();
    if a.json {
        println!(
            "{}",
            json!({
                "path": path,
                "architecture": c.arch.name(),
                "name": file.get("general.name").and_then(|v| v.as_str()),
                "parameters": n_params,
                "file_bytes": file.bytes().len(),
                "n_layers": c.n_layers, "d_model": c.d_model, "n_heads": c.n_heads,
                "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "ffn_dim": c.ffn_dim,
                "vocab_size": c.vocab_size, "context_length": c.context_length,
                "rope_base": c.rope_base, "sliding_window": c.sliding_window,
                "tensor_types": types.iter().map(|(k, (n, b))| (k.clone(), json!({"tensors": n, "bytes": b}))).collect::<serde_json::Map<_, _>>(),
                "chat_template": template.source(),
                "chat_template_fallback": template.is_fallback(),
            })
        );
        return Ok(());
    }
    println!("model         {}", path.display());
    if let Some(name) = file.get("general.name").and_then(|v| v.as_str()) {
        println!("name          {name}");
    }
    println!("architecture  {}", c.arch.name());
    println!(
        "parameters    {:.1} M in {} tensors, file {:.1} MiB",
        n_params as f64 / 1e6,
        file.tensors.len(),
        file.bytes().len() as f64 / (1 << 20) as f64
    );
    println!(
        "layers        {} × (d_model {}, {} heads / {} kv heads of {}, ffn {})",
        c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim
    );
    println!("vocabulary    {}", c.vocab_size);
    println!("context       {} (trained)", c.context_length);
    println!("rope          base {} ({:?})", c.rope_base, c.rope_style);
    if let Some(w) = c.sliding_window {
        println!(
            "sliding       window {w}, every {}th layer global, local rope base {}",
            c.swa_period, c.rope_base_swa
        );
    }
    println!("tensor types");
    for (ty, (n, bytes)) in &types {
        println!(
            "  {ty:<6} {n:>4} tensors {:>9.1} MiB",
            *bytes as f64 / (1 << 20) as f64
        );
    }
    if template.is_fallback() {
        println!("chat template (fallback: the file has none)");
    } else {
        println!("chat template");
    }
    println!("{}", template.source());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_in_any_separator() {
        assert_eq!(parse_ids("[1, 2,3\n4]").unwrap(), vec![1, 2, 3, 4]);
        assert!(parse_ids("1,x").is_err());
    }

    #[test]
    fn nll_is_log_softmax() {
        let l = [0.0f32, 0.0];
        assert!((nll(&l, 0) - 2f64.ln()).abs() < 1e-12);
    }
}
