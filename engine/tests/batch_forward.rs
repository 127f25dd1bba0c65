//! A batched forward pass over several sequences (different lengths, positions, caches) gives
//! each sequence the logits it gets alone.

use std::path::PathBuf;

use llmsd_engine::kv::{ContiguousKv, KvCache};
use llmsd_engine::kvchunk::ChunkedKv;
use llmsd_engine::model::{Logits, Model, Scratch, SeqBatch};
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;

fn model() -> (Model, Tokenizer) {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models"))
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} missing: run scripts/fetch-models",
        path.display()
    );
    let m = Model::load(&path).expect("model");
    let t = Tokenizer::from_gguf(m.file()).expect("tokenizer");
    (m, t)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(make: &dyn Fn() -> Box<dyn KvCache>) {
    let (m, tok) = model();
    let pool = ThreadPool::new(2).expect("pool");
    // Prompts over 8 tokens, so alone and together they take the same matmul kernels (the
    // 1-8-token streaming kernels and the tiled ones round differently).
    let prompts: Vec<Vec<u32>> = [
        "The history of Rome began on seven hills by the river",
        "A short poem about the sea and the wind that",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    ]
    .iter()
    .map(|t| tok.encode(t, false, false))
    .collect();
    assert!(prompts.iter().all(|p| p.len() > 8));
    let vocab = m.config.vocab_size;
    // Alone: prompt, then two decode steps.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut kv = make();
        let mut s = Scratch::default();
        let mut rows = Vec::new();
        let mut next = p.clone();
        let mut pos = 0;
        for _ in 0..3 {
            let l = m
                .forward(
                    &pool,
                    &mut [SeqBatch {
                        tokens: &next,
                        start_pos: pos,
                        kv: kv.as_mut(),
                        logits: Logits::Last,
                    }],
                    &mut s,
                )
                .expect("forward")
                .to_vec();
            pos += next.len();
            let id = llmsd_engine::sampling::argmax(&l);
            rows.push(l);
            next = vec![id];
        }
        alone.push(rows);
    }
    // Together: the same steps for all three in one batch each time.
    let mut kvs: Vec<Box<dyn KvCache>> = prompts.iter().map(|_| make()).collect();
    let mut s = Scratch::default();
    let mut next: Vec<Vec<u32>> = prompts.clone();
    let mut pos = vec![0usize; prompts.len()];
    #[allow(clippy::needless_range_loop)] // `step` indexes the inner lists of `alone`.
    for step in 0..3 {
        let out = {
            let mut batch: Vec<SeqBatch<'_>> = kvs
                .iter_mut()
                .zip(&next)
                .zip(&pos)
                .map(|((kv, t), &p)| SeqBatch {
                    tokens: t,
                    start_pos: p,
                    kv: kv.as_mut(),
                    logits: Logits::Last,
                })
                .collect();
            m.forward(&pool, &mut batch, &mut s)
                .expect("forward")
                .to_vec()
        };
        for (i, row) in out.chunks_exact(vocab).enumerate() {
            let d = max_diff(row, &alone[i][step]);
            assert!(d < 1e-3, "sequence {i} step {step}: logits differ by {d}");
            pos[i] += next[i].len();
            next[i] = vec![llmsd_engine::sampling::argmax(row)];
        }
    }
}

#[test]
fn batched_sequences_match_alone_contiguous() {
    let (m, _) = model();
    let shape = m.kv_shape();
    check(&move || Box::new(ContiguousKv::new(shape, 256)));
}

#[test]
fn batched_sequences_match_alone_chunked() {
    let (m, _) = model();
    let shape = m.kv_shape();
    check(&move || Box::new(ChunkedKv::new(shape, 256)));
}
