//! `llmsd bench switch`: many contexts, a small KV budget, and calls that switch between
//! them — how long each policy takes to make an evicted context usable again.
//!
//! N contexts of T tokens of real text are built first; then K calls each pick a context
//! (uniformly at random, or by a Markov chain that mostly moves on to the next context or back
//! to the previous one) and append 16 tokens of text, then decode 16 tokens greedily.
//! `restore` is the time from the request until the context's whole KV is usable (zero when it
//! was resident); `ttft` runs to the first new token.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use llmsd_engine::model::Logits;
use llmsd_engine::sampling::argmax;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::oneshot;
use crate::ModelArg;
use llmsd::kvstore::{KvStore, Policy, StoreConfig};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Pattern {
    Random,
    Markov,
}

#[derive(clap::Args)]
pub struct SwitchArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, default_value = "llms")]
    policy: Policy,
    #[arg(long, default_value_t = 8)]
    contexts: usize,
    #[arg(long, default_value_t = 1024)]
    tokens: usize,
    #[arg(long, default_value_t = 32.0)]
    kv_budget_mib: f64,
    #[arg(long, default_value_t = 20)]
    switches: usize,
    #[arg(long, value_enum, default_value = "random")]
    pattern: Pattern,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Mean bits per element for the llms policy.
    #[arg(long, default_value_t = llmsd::kvstore::store::DEFAULT_AVG_BITS)]
    kv_bits_avg: f64,
    /// Evict the picked context completely before each call, so every restore reads (or
    /// recomputes) all of its chunks.
    #[arg(long)]
    cold: bool,
    /// Pause between calls (an app's think time; ahead-of-time swap-out runs in it).
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Where the swap files go [default: a fresh directory under $TMPDIR, removed after].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn switch(a: SwitchArgs) -> Result<()> {
    if a.contexts == 0 || a.tokens == 0 || a.switches == 0 {
        bail!("--contexts, --tokens and --switches must be positive");
    }
    let l = oneshot::load(&a.model)?;
    let text = std::fs::read_to_string(crate::bench::TEXT)?;
    let mut corpus = l.tokenizer.encode(&text, false, false);
    if corpus.len() < 64 {
        bail!("{} gave too few tokens", crate::bench::TEXT);
    }
    let need = a.contexts * (a.tokens + 32 * a.switches) + 64;
    while corpus.len() < need {
        corpus.extend_from_within(..corpus.len().min(need - corpus.len()));
    }
    let (dir, temporary) = match &a.state_dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("llmsd-switch-{}", std::process::id())),
            true,
        ),
    };
    let mut cfg = StoreConfig::new(&dir);
    cfg.policy = a.policy;
    cfg.kv_budget_bytes = (a.kv_budget_mib * 1048576.0) as u64;
    cfg.avg_bits = a.kv_bits_avg;
    let result = run(&a, &l, &corpus, cfg);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    crate::contexts::print_json(&result?, a.json)
}

fn run(
    a: &SwitchArgs,
    l: &oneshot::Loaded,
    corpus: &[u32],
    cfg: StoreConfig,
) -> Result<serde_json::Value> {
    let mut store =
        KvStore::open(l.model.clone(), l.pool.clone(), cfg).context("opening the KV store")?;
    let app = "bench";
    // Each context reads its own stretch of the text.
    let stride = a.tokens + 32 * a.switches;
    let mut ids = Vec::new();
    let mut next_text = Vec::new();
    for i in 0..a.contexts {
        let start = i * stride;
        let id = store
            .create_context(app, &corpus[start..start + a.tokens])
            .with_context(|| format!("building context {i}"))?;
        ids.push(id);
        next_text.push(start + a.tokens);
    }
    store.flush();
    let built = store.stats();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let mut restores = Vec::new();
    let mut ttfts = Vec::new();
    let mut recomputed = 0usize;
    let mut read = 0usize;
    let (mut cur, mut prev) = (0usize, 0usize);
    for k in 0..a.switches {
        let pick = match a.pattern {
            Pattern::Random => rng.gen_range(0..a.contexts),
            Pattern::Markov if k == 0 => 0,
            Pattern::Markov => {
                let r: f64 = rng.gen();
                if r < 0.5 {
                    (cur + 1) % a.contexts
                } else if r < 0.8 {
                    prev
                } else {
                    rng.gen_range(0..a.contexts)
                }
            }
        };
        prev = cur;
        cur = pick;
        let id = &ids[pick];
        if a.cold {
            store.evict_context(app, id)?;
        }
        let t0 = Instant::now();
        let mut s = store.open_session(app, id, 32)?;
        let restore_s = if s.restore.was_resident {
            0.0
        } else {
            s.restore.elapsed_s
        };
        read += s.restore.chunks_read;
        recomputed += s.restore.chunks_recomputed;
        let prompt = &corpus[next_text[pick]..next_text[pick] + 16];
        next_text[pick] += 16;
        let call = (|| -> Result<f64> {
            let logits = store.forward(&mut s, prompt, Logits::Last)?;
            let mut tok = argmax(&logits) as u32;
            let ttft = t0.elapsed().as_secs_f64();
            for _ in 1..16 {
                let logits = store.forward(&mut s, &[tok], Logits::Last)?;
                tok = argmax(&logits) as u32;
            }
            // The last sampled token is part of the context too.
            store.forward(&mut s, &[tok], Logits::None)?;
            Ok(ttft)
        })();
        store.close_session(s)?;
        ttfts.push(call? * 1e3);
        restores.push(restore_s * 1e3);
        if a.think_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.think_ms));
        }
    }
    store.flush();
    let stats = store.stats();
    let mean = restores.iter().sum::<f64>() / restores.len() as f64;
    let mut sorted = restores.clone();
    sorted.sort_by(f64::total_cmp);
    let mut tt = ttfts.clone();
    tt.sort_by(f64::total_cmp);
    Ok(json!({
        "policy": a.policy.name(),
        "contexts": a.contexts,
        "tokens": a.tokens,
        "switches": a.switches,
        "pattern": format!("{:?}", a.pattern).to_lowercase(),
        "kv_budget_mib": a.kv_budget_mib,
        "cold": a.cold,
        "think_ms": a.think_ms,
        "restore_mean_ms": mean,
        "restore_median_ms": percentile(&sorted, 0.5),
        "restore_p90_ms": percentile(&sorted, 0.9),
        "ttft_median_ms": percentile(&tt, 0.5),
        "resident_peak_mib": stats.kv_resident_peak_bytes as f64 / 1048576.0,
        "chunks_read": read,
        "chunks_recomputed": recomputed,
        "kv_disk_mib": stats.kv_disk_bytes as f64 / 1048576.0,
        "swap_files_per_call": (stats.files_written - built.files_written) as f64 / a.switches as f64,
        "swap_mib_per_call": (stats.bytes_written - built.bytes_written) as f64 / 1048576.0 / a.switches as f64,
        "restore_costs": store.costs(),
        // The whole process's peak resident set: weights, KV, scratch, swap I/O buffers.
        "peak_rss_mib": crate::bench::peak_rss_mib(),
    }))
}
