//! A batched forward pass over several sequences (different lengths, positions, caches) gives
//! each sequence the logits it gets alone, to the bit; and a prompt gives the same logits
//! whether it is forwarded whole, in slices or token by token. The matmul kernels for few and
//! for many tokens add the same partial sums in the same order, so how many tokens share an
//! engine step never changes a sequence's output.

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

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Logits at every position of `ids` forwarded in slices of `step` tokens.
fn sliced_logits(
    m: &Model,
    pool: &ThreadPool,
    kv: &mut dyn KvCache,
    ids: &[u32],
    step: usize,
) -> Vec<f32> {
    let mut s = Scratch::default();
    let mut all = Vec::new();
    for (i, slice) in ids.chunks(step).enumerate() {
        let l = m
            .forward(
                pool,
                &mut [SeqBatch {
                    tokens: slice,
                    start_pos: i * step,
                    kv: &mut *kv,
                    logits: Logits::All,
                }],
                &mut s,
            )
            .expect("forward");
        all.extend_from_slice(l);
    }
    all
}

/// A 70-token prompt whole (panel kernels), in slices of 9 and 32 (few-token kernels, with
/// the cache), and token by token (the decode path): the same logits at every position.
fn check_slices(make: &dyn Fn() -> Box<dyn KvCache>) {
    let (m, tok) = model();
    let pool = ThreadPool::new(2).expect("pool");
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3");
    let ids = tok.encode(&text, false, false)[..70].to_vec();
    let whole = sliced_logits(&m, &pool, make().as_mut(), &ids, ids.len());
    let vocab = m.config.vocab_size;
    for step in [1, 9, 32] {
        let got = sliced_logits(&m, &pool, make().as_mut(), &ids, step);
        for (p, (a, b)) in got
            .chunks_exact(vocab)
            .zip(whole.chunks_exact(vocab))
            .enumerate()
        {
            assert!(
                same_bits(a, b),
                "slices of {step}: position {p} differs from the whole prompt by up to {}",
                max_diff(a, b)
            );
        }
    }
}

fn check(make: &dyn Fn() -> Box<dyn KvCache>) {
    let (m, tok) = model();
    let pool = ThreadPool::new(2).expect("pool");
    // Alone, the short prompt and the decode steps take the few-token kernels; together, the
    // batch has more tokens than they take.
    let prompts: Vec<Vec<u32>> = [
        "The history of Rome began on seven hills by the river, where shepherds and traders met \
         at a ford and built the first walls of a city that grew to rule the sea",
        "A poem",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    ]
    .iter()
    .map(|t| tok.encode(t, false, false))
    .collect();
    assert!(
        prompts[0].len() > 32 && prompts[1].len() <= 8,
        "{:?}",
        prompts.iter().map(Vec::len).collect::<Vec<_>>()
    );
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
            assert!(
                same_bits(row, &alone[i][step]),
                "sequence {i} step {step}: logits differ by up to {d}"
            );
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

#[test]
fn prompt_in_slices_matches_whole_contiguous() {
    let (m, _) = model();
    let shape = m.kv_shape();
    check_slices(&move || Box::new(ContiguousKv::new(shape, 256)));
}

#[test]
fn prompt_in_slices_matches_whole_chunked() {
    let (m, _) = model();
    let shape = m.kv_shape();
    check_slices(&move || Box::new(ChunkedKv::new(shape, 256)));
}
