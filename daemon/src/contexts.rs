//! `llmsd ctx …`: the KV store's contexts driven from the command line, one operation per
//! run (state in `--state-dir`), and `llmsd perplexity --kv-policy`.
//!
//! Each run opens the store (every app's manifest), does one thing, waits for its swap-out
//! and exits, so contexts persist across runs exactly as they do across daemon restarts.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use llmsd_engine::model::Logits;
use llmsd_engine::sampling::argmax;
use serde_json::json;

use crate::oneshot::{self, Loaded};
use crate::ModelArg;
use llmsd::kvstore::{KvStore, Policy, StoreConfig};

/// Where and how the KV store keeps contexts.
#[derive(clap::Args, Clone, Debug)]
pub struct StoreArgs {
    /// State directory [default: $XDG_STATE_HOME/llmsd, else ~/.local/state/llmsd]
    #[arg(long, env = "LLMSD_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// KV policy: recompute, swap-whole, paged, paged-int8 or llms.
    #[arg(long = "kv-policy", env = "LLMSD_KV_POLICY", default_value = "llms")]
    pub policy: Policy,
    /// Resident KV budget in MiB.
    #[arg(long, env = "LLMSD_KV_BUDGET_MIB", default_value_t = 256.0)]
    pub kv_budget_mib: f64,
    /// Mean bits per KV element kept by the llms policy.
    #[arg(long, env = "LLMSD_KV_BITS_AVG", default_value_t = llmsd::kvstore::store::DEFAULT_AVG_BITS)]
    pub kv_bits_avg: f64,
}

impl StoreArgs {
    pub fn state_dir(&self) -> Result<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Ok(d.clone());
        }
        if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d).join("llmsd"));
        }
        match std::env::var_os("HOME") {
            Some(h) => Ok(PathBuf::from(h).join(".local/state/llmsd")),
            None => bail!("no --state-dir, $XDG_STATE_HOME or $HOME to keep contexts in"),
        }
    }

    pub fn config(&self) -> Result<StoreConfig> {
        if !(self.kv_budget_mib.is_finite() && self.kv_budget_mib > 0.0) {
            bail!("--kv-budget-mib must be a positive number");
        }
        let mut cfg = StoreConfig::new(self.state_dir()?);
        cfg.policy = self.policy;
        cfg.kv_budget_bytes = (self.kv_budget_mib * 1048576.0) as u64;
        cfg.avg_bits = self.kv_bits_avg;
        Ok(cfg)
    }
}

#[derive(clap::Args)]
pub struct CtxArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    store: StoreArgs,
    /// The app the contexts belong to.
    #[arg(long, default_value = "cli")]
    app: String,
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    op: CtxOp,
}

#[derive(clap::Subcommand)]
enum CtxOp {
    /// Create a context, optionally prefilled with a system text.
    Create {
        #[arg(long, default_value = "")]
        text: String,
    },
    /// The app's contexts.
    List,
    /// Append text to a context (prefill).
    Append {
        id: String,
        text: String,
    },
    /// Append a prompt, then generate greedily.
    Generate {
        id: String,
        #[arg(long, default_value = "")]
        prompt: String,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
    },
    /// A copy-on-write copy of a context.
    Fork {
        id: String,
    },
    /// Keep the first LEN tokens.
    Truncate {
        id: String,
        len: usize,
    },
    Delete {
        id: String,
    },
    /// Each chunk: tokens, precision, resident or on disk, density.
    Chunks {
        id: String,
    },
    /// The context's token ids.
    Tokens {
        id: String,
    },
}

pub fn ctx(a: CtxArgs) -> Result<()> {
    let l = oneshot::load(&a.model)?;
    let mut store = KvStore::open(l.model.clone(), l.pool.clone(), a.store.config()?)
        .context("opening the KV store")?;
    let app = a.app.as_str();
    let out = match a.op {
        CtxOp::Create { text } => {
            let ids = l.tokenizer.encode(&text, !text.is_empty(), false);
            let id = store.create_context(app, &ids)?;
            json!({"id": id, "tokens": ids.len()})
        }
        CtxOp::List => json!(store.list(app)),
        CtxOp::Append { id, text } => {
            let ids = l.tokenizer.encode(&text, false, false);
            let mut s = store.open_session(app, &id, ids.len())?;
            let r = store.forward(&mut s, &ids, Logits::None);
            let restore = s.restore.clone();
            store.close_session(s)?;
            r?;
            json!({"id": id, "appended": ids.len(), "restore": restore})
        }
        CtxOp::Generate {
            id,
            prompt,
            max_tokens,
        } => generate(&l, &mut store, app, &id, &prompt, max_tokens)?,
        CtxOp::Fork { id } => json!({"id": store.fork(app, &id)?}),
        CtxOp::Truncate { id, len } => {
            store.truncate(app, &id, len)?;
            json!({"id": id, "tokens": len})
        }
        CtxOp::Delete { id } => {
            store.delete(app, &id)?;
            json!({"deleted": id})
        }
        CtxOp::Chunks { id } => json!(store.chunks(app, &id)?),
        CtxOp::Tokens { id } => json!(store.tokens(app, &id)?),
    };
    store.flush();
    print_json(&out, a.json)
}

/// One line of JSON with `--json`, indented JSON for people otherwise.
pub fn print_json(out: &serde_json::Value, compact: bool) -> Result<()> {
    if compact {
        println!("{out}");
    } else {
        println!("{}", serde_json::to_string_pretty(out)?);
    }
    Ok(())
}

/// Greedy generation in a context; the generated tokens stay in it.
fn generate(
    l: &Loaded,
    store: &mut KvStore,
    app: &str,
    id: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<serde_json::Value> {
    let mut ids = l.tokenizer.encode(prompt, false, false);
    if ids.is_empty() {
        // Continue from the context's own last token: re-feeding is not possible, so the
        // prompt must hold at least one token.
        bail!("give a non-empty --prompt");
    }
    let mut s = store.open_session(app, id, ids.len() + max_tokens)?;
    let restore = s.restore.clone();
    let mut generated = Vec::new();
    let result = (|| -> Result<()> {
        for _ in 0..max_tokens {
            let logits = store.forward(&mut s, &ids, Logits::Last)?;
            let next = argmax(&logits) as u32;
            if l.tokenizer.is_eog(next) {
                break;
            }
            generated.push(next);
            ids = vec![next];
        }
        Ok(())
    })();
    store.close_session(s)?;
    result?;
    Ok(json!({
        "id": id,
        "text": String::from_utf8_lossy(&l.tokenizer.decode(&generated)),
        "tokens": generated,
        "restore": restore,
    }))
}

/// Perplexity with the history kept as `policy` keeps it: the text is fed in calls of 64
/// tokens, each closing its session (chunks sealed, densities updated, precisions chosen),
/// so later tokens attend to the compressed history.
pub fn perplexity_with_policy(l: &Loaded, ids: &[u32], policy: Policy, bits: f64) -> Result<f64> {
    let dir = std::env::temp_dir().join(format!(
        "llmsd-ppl-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let mut cfg = StoreConfig::new(&dir);
    cfg.policy = policy;
    cfg.avg_bits = bits;
    cfg.kv_budget_bytes = 1 << 40;
    cfg.fit_costs = false;
    let result = (|| -> Result<f64> {
        let mut store = KvStore::open(l.model.clone(), l.pool.clone(), cfg)?;
        let id = store.create_context("perplexity", &[])?;
        let vocab = l.model.config.vocab_size;
        let mut total = 0.0;
        for (k, part) in ids.chunks(64).enumerate() {
            let mut s = store.open_session("perplexity", &id, part.len())?;
            let r = store.forward(&mut s, part, Logits::All);
            store.close_session(s)?;
            let logits = r?;
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                if let Some(&next) = ids.get(k * 64 + j + 1) {
                    total += oneshot::nll(row, next);
                }
            }
        }
        store.flush();
        Ok((total / (ids.len() - 1) as f64).exp())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
