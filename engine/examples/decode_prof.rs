//! Profiling harness for the forward pass (not a benchmark of record: `llmsd bench` is).
//!
//! `cargo run --release -p llmsd-engine --example decode_prof -- MODE MODEL [THREADS] [STEPS]
//! [BATCH] [CONTEXT]` with MODE `batch` (BATCH sequences decoded together, each after a
//! CONTEXT-token history in f16 chunks: one prefilled history deep-copied per sequence, so the
//! setup is short under `valgrind --tool=callgrind`), `single` (one sequence), `prefill`
//! (CONTEXT tokens in 64-token slices, sealed as they fill) or `mixed` (`batch` plus one more
//! sequence that prefills `LLMSD_MIXED_K` tokens a step after an `LLMSD_MIXED_CTX`-token
//! history: the scheduler's mixed steps). Prints seconds and tok/s.

use std::sync::Arc;
use std::time::Instant;

use llmsd_engine::kv::KvCache;
use llmsd_engine::kvchunk::{ChunkSlot, ChunkedKv, Precision, SealedChunk, CHUNK_TOKENS};
use llmsd_engine::model::{Logits, Model, Scratch, SeqBatch};
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::sampling::argmax;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The precision full chunks are sealed at: `LLMSD_KV_PRECISION` (f16, int8, int4, int2), f16
/// by default.
fn sealed_precision() -> Precision {
    match std::env::var("LLMSD_KV_PRECISION").as_deref() {
        Ok("int8") => Precision::Int8,
        Ok("int4") => Precision::Int4,
        Ok("int2") => Precision::Int2,
        _ => Precision::F16,
    }
}

fn seal(kv: &mut ChunkedKv) -> Res<()> {
    for i in 0..kv.len() / CHUNK_TOKENS {
        if let Some(slot) = kv.slot_mut(i) {
            if let ChunkSlot::Staged(st) = slot {
                *slot = ChunkSlot::Sealed(Arc::new(SealedChunk::quantize(st, sealed_precision())?));
            }
        }
    }
    Ok(())
}

fn prefill(model: &Model, pool: &ThreadPool, ids: &[u32], kv: &mut ChunkedKv) -> Res<u32> {
    let mut scratch = Scratch::default();
    let mut next = 0;
    let n_slices = ids.len().div_ceil(64);
    for (k, part) in ids.chunks(64).enumerate() {
        let last = k + 1 == n_slices;
        let out = model.forward(
            pool,
            &mut [SeqBatch {
                tokens: part,
                start_pos: k * 64,
                kv,
                logits: if last { Logits::Last } else { Logits::None },
            }],
            &mut scratch,
        )?;
        if last {
            next = argmax(out);
        }
        seal(kv)?;
    }
    Ok(next)
}

/// A deep copy of `kv` (sealed chunks get their own bytes, as separate contexts have).
fn deep_copy(kv: &ChunkedKv, capacity: usize) -> Res<ChunkedKv> {
    let mut slots = Vec::new();
    for s in kv.slots() {
        slots.push(match s {
            ChunkSlot::Sealed(c) => {
                let n = SealedChunk::empty(c.shape(), c.precision());
                for l in 0..c.shape().n_layers {
                    let bytes = c.layer(l).ok_or("missing layer")?;
                    n.set_layer(l, bytes.to_vec().into_boxed_slice())?;
                }
                ChunkSlot::Sealed(Arc::new(n))
            }
            ChunkSlot::Staged(st) => ChunkSlot::Staged(st.clone()),
        });
    }
    Ok(ChunkedKv::from_slots(
        kv.shape(),
        capacity,
        slots,
        kv.len(),
    )?)
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("batch", |s| s.as_str());
    let model_path = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (threads, steps, batch, ctx) = (num(3, 2), num(4, 16), num(5, 8), num(6, 512));
    let model = Model::load(&model_path)?;
    let pool = ThreadPool::new(threads)?;
    let vocab = model.config.vocab_size as u32;
    let ids: Vec<u32> = (0..ctx as u32).map(|i| (i * 7919 + 13) % vocab).collect();
    let cap = ctx + steps + 1;
    let mut kv = ChunkedKv::new(model.kv_shape(), cap);
    if mode == "prefill" {
        let t = Instant::now();
        prefill(&model, &pool, &ids, &mut kv)?;
        let s = t.elapsed().as_secs_f64();
        println!("prefill {ctx}: {s:.3} s, {:.1} tok/s", ctx as f64 / s);
        return Ok(());
    }
    // `batch`/`single` with LLMSD_SYNTH=1: a random history instead of a prefilled one (fast
    // under callgrind; attention costs the same).
    let first = if std::env::var_os("LLMSD_SYNTH").is_some() {
        let sh = model.kv_shape();
        kv.reserve(ctx)?;
        let (kd, vd) = (sh.n_kv_heads * sh.head_dim, sh.n_kv_heads * sh.v_head_dim);
        let mut x = 1u32;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        for p in 0..ctx {
            for l in 0..sh.n_layers {
                let (k, v) = (rnd(kd), rnd(vd));
                kv.write(l, p, &k, &v);
            }
        }
        kv.set_len(ctx);
        seal(&mut kv)?;
        1
    } else {
        prefill(&model, &pool, &ids, &mut kv)?
    };
    let b = if mode == "single" { 1 } else { batch };
    let mut caches: Vec<ChunkedKv> = (0..b).map(|_| deep_copy(&kv, cap)).collect::<Res<_>>()?;
    let mut next: Vec<u32> = (0..b as u32).map(|i| (first + i) % vocab).collect();
    let mut scratch = Scratch::default();
    // `mixed`: one more sequence prefills `LLMSD_MIXED_K` tokens a step beside the decoders.
    let mixed_k: usize = std::env::var("LLMSD_MIXED_K")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mixed_ctx: usize = std::env::var("LLMSD_MIXED_CTX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut pkv = ChunkedKv::new(model.kv_shape(), mixed_ctx + steps * mixed_k + 1);
    if mode == "mixed" && mixed_ctx > 0 {
        let pids: Vec<u32> = (0..mixed_ctx as u32)
            .map(|i| (i * 104_729 + 7) % vocab)
            .collect();
        prefill(&model, &pool, &pids, &mut pkv)?;
    }
    let t = Instant::now();
    for step in 0..steps {
        let inputs: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut sb: Vec<SeqBatch<'_>> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(kv, tok)| SeqBatch {
                tokens: tok,
                start_pos: ctx + step,
                kv,
                logits: Logits::Last,
            })
            .collect();
        let ptoks: Vec<u32> = (0..mixed_k as u32)
            .map(|i| (i * 31 + step as u32) % vocab)
            .collect();
        if mode == "mixed" && mixed_k > 0 {
            sb.push(SeqBatch {
                tokens: &ptoks,
                start_pos: mixed_ctx + step * mixed_k,
                kv: &mut pkv,
                logits: Logits::None,
            });
        }
        let logits = model.forward(&pool, &mut sb, &mut scratch)?;
        for (n, row) in next.iter_mut().zip(logits.chunks_exact(vocab as usize)) {
            *n = argmax(row);
        }
        for kv in caches.iter_mut() {
            seal(kv)?;
        }
        if mode == "mixed" {
            seal(&mut pkv)?;
        }
    }
    let s = t.elapsed().as_secs_f64();
    println!(
        "{mode} b={b} ctx={ctx} steps={steps}: {s:.3} s, {:.1} tok/s",
        (b * steps) as f64 / s
    );
    Ok(())
}
