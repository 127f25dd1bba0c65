//! `llmsctl bench`: concurrent apps with multi-turn conversations over the socket. Reports
//! total tokens/s against a single app measured in the same run, time to first token and
//! inter-token latency percentiles, before and during a long prefill by another app.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Client, ClientError, GenerationParams, PromptInput};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub socket: PathBuf,
    pub clients: usize,
    pub turns: usize,
    pub gen_tokens: u32,
    /// Tokens of the long prompt sent during the interference phase (0 skips it).
    pub prefill_tokens: usize,
    /// Text the long prompt is cut from.
    pub prefill_text: String,
}

/// Latencies of one conversation.
#[derive(Default, Clone, Debug)]
struct Trace {
    ttft_ms: Vec<f64>,
    /// (arrival time, gap since the previous token of the same reply) per token.
    itl: Vec<(Instant, f64)>,
    tokens: usize,
}

/// A conversation in progress: its trace and its task.
type RunningClient = (
    Arc<Mutex<Trace>>,
    tokio::task::JoinHandle<Result<(), ClientError>>,
);

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let k = ((v.len() - 1) as f64 * p).round() as usize;
    v[k.min(v.len() - 1)]
}

fn params(gen: u32) -> GenerationParams {
    GenerationParams {
        max_tokens: gen,
        ignore_eos: true,
        ..GenerationParams::default()
    }
}

/// One app: a context and `turns` user turns (or until `stop`), each generating `gen` tokens.
async fn conversation(
    socket: PathBuf,
    app: String,
    turns: usize,
    gen: u32,
    stop: Arc<AtomicBool>,
    trace: Arc<Mutex<Trace>>,
) -> Result<(), ClientError> {
    let c = Client::connect(&socket, &app).await?;
    let ctx = c
        .create_context(Some("You are a helpful assistant."))
        .await?;
    let topics = [
        "the sea",
        "mountains",
        "cities",
        "music",
        "rivers",
        "forests",
        "stars",
    ];
    for turn in 0..turns {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let msg = format!("Tell me about {}.", topics[turn % topics.len()]);
        let t0 = Instant::now();
        let input = PromptInput::Messages(vec![crate::ChatMessage::new("user", msg)]);
        let mut s = ctx.prompt(input, params(gen)).await?;
        let mut last: Option<Instant> = None;
        while s.next_token().await?.is_some() {
            let now = Instant::now();
            let mut t = trace.lock().map_err(|_| ClientError::Closed)?;
            match last {
                None => t.ttft_ms.push((now - t0).as_secs_f64() * 1e3),
                Some(prev) => t.itl.push((now, (now - prev).as_secs_f64() * 1e3)),
            }
            t.tokens += 1;
            last = Some(now);
        }
        s.completion().await?;
    }
    Ok(())
}

/// Runs `n` conversations at once until they end (or `stop` is set).
fn spawn_clients(
    o: &BenchOptions,
    n: usize,
    tag: &str,
    turns: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<RunningClient> {
    (0..n)
        .map(|i| {
            let trace = Arc::new(Mutex::new(Trace::default()));
            let h = tokio::spawn(conversation(
                o.socket.clone(),
                format!("bench-{tag}-{i}"),
                turns,
                o.gen_tokens,
                stop.clone(),
                trace.clone(),
            ));
            (trace, h)
        })
        .collect()
}

async fn join_clients(clients: Vec<RunningClient>) -> Result<Vec<Trace>, ClientError> {
    let mut traces = Vec::new();
    for (trace, h) in clients {
        h.await
            .map_err(|e| ClientError::Protocol(e.to_string()))??;
        let t = trace.lock().map_err(|_| ClientError::Closed)?.clone();
        traces.push(t);
    }
    Ok(traces)
}

async fn run_phase(
    o: &BenchOptions,
    n: usize,
    tag: &str,
) -> Result<(Vec<Trace>, f64), ClientError> {
    let t0 = Instant::now();
    let never = Arc::new(AtomicBool::new(false));
    let traces = join_clients(spawn_clients(o, n, tag, o.turns, &never)).await?;
    Ok((traces, t0.elapsed().as_secs_f64()))
}

fn summary(traces: &[Trace], secs: f64) -> serde_json::Value {
    let tokens: usize = traces.iter().map(|t| t.tokens).sum();
    let mut ttft: Vec<f64> = traces.iter().flat_map(|t| t.ttft_ms.clone()).collect();
    let mut itl: Vec<f64> = traces
        .iter()
        .flat_map(|t| t.itl.iter().map(|x| x.1))
        .collect();
    serde_json::json!({
        "clients": traces.len(),
        "tokens": tokens,
        "seconds": secs,
        "total_tok_s": tokens as f64 / secs,
        "ttft_ms_p50": percentile(&mut ttft, 0.5),
        "ttft_ms_p99": percentile(&mut ttft, 0.99),
        "itl_ms_p50": percentile(&mut itl, 0.5),
        "itl_ms_p99": percentile(&mut itl, 0.99),
    })
}

pub async fn bench(o: BenchOptions) -> Result<serde_json::Value, ClientError> {
    // Warm-up: first-use costs (page faults of the weights, allocations) out of the figures.
    run_phase(
        &BenchOptions {
            turns: 1,
            gen_tokens: 8,
            ..o.clone()
        },
        1,
        "warm",
    )
    .await?;
    let (single, single_s) = run_phase(&o, 1, "single").await?;
    let (many, many_s) = run_phase(&o, o.clients, "many").await?;
    let single_v = summary(&single, single_s);
    let many_v = summary(&many, many_s);
    let ratio = many_v["total_tok_s"].as_f64().unwrap_or(0.0)
        / single_v["total_tok_s"].as_f64().unwrap_or(1.0).max(1e-9);
    let mut out = serde_json::json!({
        "single": single_v,
        "concurrent": many_v,
        "throughput_ratio": ratio,
    });
    if o.prefill_tokens > 0 {
        out["during_prefill"] = interference(&o).await?;
    }
    Ok(out)
}

/// `clients` apps decode continuously; after a quiet stretch another app sends a long
/// prompt. Each client's inter-token gaps during that prefill are compared with its own
/// median before it.
async fn interference(o: &BenchOptions) -> Result<serde_json::Value, ClientError> {
    let quiet = Duration::from_secs(5);
    let stop = Arc::new(AtomicBool::new(false));
    let clients = spawn_clients(o, o.clients, "bg", usize::MAX, &stop);
    let start = Instant::now();
    let c = Client::connect(&o.socket, "bench-prefill").await?;
    // Cut the text to about the asked number of tokens (at a word boundary).
    let words: Vec<&str> = o
        .prefill_text
        .split_inclusive(char::is_whitespace)
        .collect();
    let (mut lo, mut hi) = (1usize, words.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        if c.tokenize(&words[..mid].concat(), false).await?.len() < o.prefill_tokens {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let text = words[..lo].concat();
    tokio::time::sleep(quiet.saturating_sub(start.elapsed())).await;
    let p0 = Instant::now();
    let done = c
        .prompt(crate::PromptRequest {
            context: None,
            input: PromptInput::Text(text),
            params: GenerationParams {
                max_tokens: 1,
                ..GenerationParams::default()
            },
            stream: false,
        })
        .await?
        .completion()
        .await?;
    let p1 = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let traces = join_clients(clients).await?;
    let warm = start + Duration::from_secs(1);
    let mut per_client = Vec::new();
    let mut worst: f64 = 0.0;
    let (mut all_before, mut all_during) = (Vec::new(), Vec::new());
    for t in &traces {
        let mut before: Vec<f64> = t
            .itl
            .iter()
            .filter(|x| x.0 > warm && x.0 < p0)
            .map(|x| x.1)
            .collect();
        let mut during: Vec<f64> = t
            .itl
            .iter()
            .filter(|x| x.0 >= p0 && x.0 <= p1)
            .map(|x| x.1)
            .collect();
        all_before.extend_from_slice(&before);
        all_during.extend_from_slice(&during);
        let med = percentile(&mut before, 0.5);
        let p99 = percentile(&mut during, 0.99);
        let ratio = if med > 0.0 { p99 / med } else { 0.0 };
        worst = worst.max(ratio);
        per_client.push(serde_json::json!({
            "itl_ms_p50_before": med,
            "itl_ms_p50_during": percentile(&mut during, 0.5),
            "itl_ms_p99_during": p99,
            "p99_during_over_median_before": ratio,
            "tokens_during": during.len(),
        }));
    }
    Ok(serde_json::json!({
        "prefill_tokens": done.usage.prompt_tokens,
        "prefill_ms": (p1 - p0).as_secs_f64() * 1e3,
        "itl_ms_p50_before": percentile(&mut all_before, 0.5),
        "itl_ms_p50_during": percentile(&mut all_during, 0.5),
        "itl_ms_p99_during": percentile(&mut all_during, 0.99),
        "worst_p99_during_over_median_before": worst,
        "clients": per_client,
    }))
}
