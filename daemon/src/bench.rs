//! `llmsd bench`: prefill, single-stream decode and batched decode speed of the engine.
//!
//! The prompt is real text (GPL-3) so tokenization and the model see ordinary input; each
//! figure is the best of `--runs` runs. Decode steps run the output head and pick the argmax,
//! as a real generation does.

use anyhow::{bail, Result};
use std::sync::Arc;

use llmsd_engine::kv::KvCache;
use llmsd_engine::kvchunk::{ChunkSlot, ChunkedKv, Precision, SealedChunk, CHUNK_TOKENS};
use llmsd_engine::model::{Logits, Scratch, SeqBatch};
use llmsd_engine::sampling::argmax;
use serde_json::json;
use std::time::Instant;

use crate::oneshot::{load, Loaded};
use crate::ModelArg;

pub const TEXT: &str = "/usr/share/common-licenses/GPL-3";

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    sub: Option<BenchSub>,
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Sequences decoded together in the batched measurement (0 skips it).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    json: bool,
}

fn prompt_ids(l: &Loaded, n: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(TEXT)?;
    let mut ids = l.tokenizer.encode(&text, false, false);
    if ids.is_empty() {
        bail!("{TEXT} gave no tokens");
    }
    while ids.len() < n {
        ids.extend_from_within(..);
    }
    ids.truncate(n);
    Ok(ids)
}

/// Seconds to prefill `prompt` and to decode `gen` tokens after it.
fn single_stream(l: &Loaded, prompt: &[u32], gen: usize) -> Result<(f64, f64)> {
    let mut kv = ChunkedKv::new(l.model.kv_shape(), prompt.len() + gen);
    let mut scratch = Scratch::default();
    let t0 = Instant::now();
    // In slices, each sealed to f16 as it completes, as the context store prefills: later
    // slices attend to f16 chunks. Only the last slice's last token needs logits (the
    // scheduler asks for no others; for Gemma-3 each would read the 262k-row output head).
    let mut logits = Vec::new();
    let n_slices = prompt.len().div_ceil(PREFILL_SLICE);
    for (k, part) in prompt.chunks(PREFILL_SLICE).enumerate() {
        let out = l.model.forward(
            &l.pool,
            &mut [SeqBatch {
                tokens: part,
                start_pos: k * PREFILL_SLICE,
                kv: &mut kv,
                logits: if k + 1 == n_slices {
                    Logits::Last
                } else {
                    Logits::None
                },
            }],
            &mut scratch,
        )?;
        logits.clear();
        logits.extend_from_slice(out);
        seal_f16(&mut kv)?;
    }
    let logits = &logits;
    let mut next = argmax(logits);
    seal_f16(&mut kv)?;
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for i in 0..gen {
        let logits = l.model.forward(
            &l.pool,
            &mut [SeqBatch {
                tokens: &[next],
                start_pos: prompt.len() + i,
                kv: &mut kv,
                logits: Logits::Last,
            }],
            &mut scratch,
        )?;
        next = argmax(logits);
        seal_f16(&mut kv)?;
    }
    Ok((prefill, t1.elapsed().as_secs_f64()))
}

/// Seconds to decode `gen` tokens for each of `b` sequences at once, each after its own
/// prefilled `prompt` (prefill not timed).
fn batched(l: &Loaded, prompt: &[u32], gen: usize, b: usize) -> Result<f64> {
    let mut caches: Vec<ChunkedKv> = (0..b)
        .map(|_| ChunkedKv::new(l.model.kv_shape(), prompt.len() + gen))
        .collect();
    let mut scratch = Scratch::default();
    let mut next = vec![0u32; b];
    for (i, kv) in caches.iter_mut().enumerate() {
        // Different prompts per sequence: rotate the text.
        let mut p = prompt.to_vec();
        p.rotate_left(i * 7 % prompt.len().max(1));
        let logits = l.model.forward(
            &l.pool,
            &mut [SeqBatch {
                tokens: &p,
                start_pos: 0,
                kv,
                logits: Logits::Last,
            }],
            &mut scratch,
        )?;
        next[i] = argmax(logits);
        seal_f16(kv)?;
    }
    let vocab = l.model.config.vocab_size;
    let t0 = Instant::now();
    for step in 0..gen {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut batch: Vec<SeqBatch<'_>> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(kv, tok)| SeqBatch {
                tokens: tok,
                start_pos: prompt.len() + step,
                kv,
                logits: Logits::Last,
            })
            .collect();
        let logits = l.model.forward(&l.pool, &mut batch, &mut scratch)?;
        for (n, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
            *n = argmax(row);
        }
        for kv in caches.iter_mut() {
            seal_f16(kv)?;
        }
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Tokens per prefill call (the context store's default slice).
const PREFILL_SLICE: usize = 64;

/// Seals every full chunk still in f32 to f16: the cache a context keeps, and the precision
/// llama.cpp's cache has in the comparison.
fn seal_f16(kv: &mut ChunkedKv) -> Result<()> {
    for i in 0..kv.len() / CHUNK_TOKENS {
        if let Some(slot) = kv.slot_mut(i) {
            if let ChunkSlot::Staged(st) = slot {
                *slot = ChunkSlot::Sealed(Arc::new(SealedChunk::quantize(st, Precision::F16)?));
            }
        }
    }
    Ok(())
}

/// Peak resident set size of this process, from /proc.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[derive(clap::Subcommand)]
enum BenchSub {
    /// Context switches under a KV policy: restore time and time to first token.
    Switch(crate::bench_switch::SwitchArgs),
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if let Some(BenchSub::Switch(s)) = a.sub {
        return crate::bench_switch::switch(s);
    }
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.runs == 0 {
        bail!("--prompt-tokens, --gen-tokens and --runs must be positive");
    }
    let l = load(&a.model)?;
    let prompt = prompt_ids(&l, a.prompt_tokens)?;
    // The service's footprint with an empty cache: model and tokenizer loaded, one token run
    // (so lazily built tables and scratch exist), no context kept.
    single_stream(&l, &prompt[..1], 1)?;
    let rss_empty = peak_rss_mib().unwrap_or(0.0);
    let (mut best_prefill, mut best_decode) = (0.0f64, 0.0f64);
    for _ in 0..a.runs {
        let (p, d) = single_stream(&l, &prompt, a.gen_tokens)?;
        best_prefill = best_prefill.max(a.prompt_tokens as f64 / p);
        best_decode = best_decode.max(a.gen_tokens as f64 / d);
    }
    let mut best_batch = 0.0f64;
    if a.batch > 0 {
        for _ in 0..a.runs {
            let t = batched(&l, &prompt, a.gen_tokens, a.batch)?;
            best_batch = best_batch.max((a.batch * a.gen_tokens) as f64 / t);
        }
    }
    let rss_run = peak_rss_mib().unwrap_or(0.0);
    if a.json {
        println!(
            "{}",
            json!({
                "prefill_tok_s": best_prefill,
                "decode_tok_s": best_decode,
                "batch": a.batch,
                "batch_decode_tok_s": best_batch,
                "peak_rss_mib": rss_empty,
                "peak_rss_run_mib": rss_run,
                "threads": l.pool.n_threads(),
            })
        );
    } else {
        println!(
            "prefill {} tokens: {best_prefill:.1} tok/s",
            a.prompt_tokens
        );
        println!("decode {} tokens: {best_decode:.1} tok/s", a.gen_tokens);
        if a.batch > 0 {
            println!(
                "batched decode, {} sequences: {best_batch:.1} tok/s ({:.2}x single stream)",
                a.batch,
                best_batch / best_decode
            );
        }
        println!("peak RSS with an empty cache: {rss_empty:.1} MiB");
        println!("peak RSS over the whole run (with its caches): {rss_run:.1} MiB");
    }
    Ok(())
}
