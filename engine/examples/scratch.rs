use llmsd_engine::kv::ContiguousKv;
use llmsd_engine::model::{Logits, Model, Scratch, SeqBatch};
use llmsd_engine::pool::ThreadPool;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(&args[1]).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&args[2]).unwrap()).unwrap();
    let pool = ThreadPool::new(2).unwrap();
    let v = model.config.vocab_size;
    for case in r["greedy"].as_array().unwrap() {
        let p: Vec<u32> = case["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let g: Vec<u32> = case["generated_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let all: Vec<u32> = p.iter().chain(&g).copied().collect();
        let mut kv = ContiguousKv::new(model.kv_shape(), all.len());
        let mut s = Scratch::default();
        let t = std::time::Instant::now();
        let logits = model
            .forward(
                &pool,
                &mut [SeqBatch {
                    tokens: &all,
                    start_pos: 0,
                    kv: &mut kv,
                    logits: Logits::All,
                }],
                &mut s,
            )
            .unwrap()
            .to_vec();
        let el = t.elapsed();
        let mut agree = 0;
        let mut maxd: f32 = 0.0;
        let mut sumd = 0.0;
        let mut nd = 0;
        for (step, th) in case["top5_per_step"].as_array().unwrap().iter().enumerate() {
            let row = &logits[(p.len() - 1 + step) * v..][..v];
            let am = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            let tids = th["ids"].as_array().unwrap();
            if am as u64 == tids[0].as_u64().unwrap() {
                agree += 1;
            }
            for (id, l) in tids.iter().zip(th["logits"].as_array().unwrap()) {
                let d = (row[id.as_u64().unwrap() as usize] - l.as_f64().unwrap() as f32).abs();
                maxd = maxd.max(d);
                sumd += d;
                nd += 1;
            }
        }
        println!(
            "{} tokens in {:?}: top1 agree {}/{} mean {:.3} max {:.3}",
            all.len(),
            el,
            agree,
            g.len(),
            sumd / nd as f32,
            maxd
        );
    }
}
