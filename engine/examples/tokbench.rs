use std::time::Instant;
fn main() {
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    for m in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let t = Instant::now();
        let g = llmsd_engine::gguf::GgufFile::open(format!("models/{m}")).unwrap();
        let t1 = t.elapsed();
        let tok = llmsd_engine::tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let t2 = t.elapsed();
        let _ = tok.encode("warm up", false, false);
        let t = Instant::now();
        let ids = tok.encode(&text, false, false);
        let e1 = t.elapsed();
        let t = Instant::now();
        let ids2 = tok.encode(&text, true, true);
        let e2 = t.elapsed();
        println!(
            "{m}: open {t1:?} load {t2:?} encode {e1:?} ({} ids) special {e2:?} ({})",
            ids.len(),
            ids2.len()
        );
        for unit in ["a", " ", "\n", "<"] {
            let s = unit.repeat(100_000);
            let t = Instant::now();
            let n = tok.encode(&s, false, true).len();
            println!("  run {unit:?}: {:?} {n}", t.elapsed());
        }
    }
}
