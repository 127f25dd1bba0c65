//! The KV store against the real SmolLM2 model: restores equal uninterrupted runs, damaged
//! files are recomputed, the budget holds, contexts survive reopening.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use llmsd_engine::model::{Logits, Model};
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;

use llmsd_engine::kvchunk::{Precision, SealedChunk};

use super::plan::{LinearCost, RestoreCosts};
use super::store::*;
use super::swapfile;

struct Fixture {
    model: Arc<Model>,
    pool: Arc<ThreadPool>,
    text: Vec<u32>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run scripts/fetch-models",
            path.display()
        );
        let model = Model::load(&path).expect("model loads");
        let tok = Tokenizer::from_gguf(model.file()).expect("tokenizer");
        let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").expect("GPL-3");
        let text = tok.encode(&text, false, false);
        Fixture {
            model: Arc::new(model),
            pool: Arc::new(ThreadPool::new(2).expect("pool")),
            text,
        }
    })
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn config(dir: &Path, policy: Policy) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.policy = policy;
    c.fit_costs = false;
    c.kv_budget_bytes = 256 << 20;
    c
}

fn open(dir: &Path, policy: Policy) -> KvStore {
    let f = fixture();
    KvStore::open(f.model.clone(), f.pool.clone(), config(dir, policy)).expect("store opens")
}

/// Next-token logits after `probe`, leaving the context as it was.
fn probe(store: &mut KvStore, app: &str, id: &str, probe: u32) -> (Vec<f32>, RestoreReport) {
    let mut s = store.open_session(app, id, 1).expect("session");
    let report = s.restore.clone();
    let logits = store
        .forward(&mut s, &[probe], Logits::Last)
        .expect("forward");
    store.abort_session(s);
    (logits, report)
}

/// Two next-token distributions agree: KL(a‖b) within `max_kl` nats (logits themselves move
/// by up to ~1 when activations re-quantized to Q8 see float-noise inputs), and the top token
/// of each is (near) the top of the other.
fn assert_close(a: &[f32], b: &[f32], max_kl: f64) {
    let logp = |v: &[f32]| {
        let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
        v.iter().map(move |&x| x as f64 - z).collect::<Vec<f64>>()
    };
    let (la, lb) = (logp(a), logp(b));
    let kl: f64 = la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum();
    let d = max_abs_diff(a, b);
    eprintln!("KL = {kl:.5}, max |logit difference| = {d}");
    assert!(kl <= max_kl, "next-token distributions differ: KL {kl}");
    let (ta, tb) = (argmax(a) as usize, argmax(b) as usize);
    assert!(
        b[tb] - b[ta] <= 2.0 * d && a[ta] - a[tb] <= 2.0 * d,
        "top tokens {ta} vs {tb}"
    );
}

/// Restored chunks: those read back are the same bytes; recomputed ones hold the same
/// values up to the noise of f16 rounding and quantization steps.
fn compare_chunks(
    before: &[Option<Arc<SealedChunk>>],
    after: &[Option<Arc<SealedChunk>>],
    exact: &[usize],
) {
    assert_eq!(before.len(), after.len());
    for (i, (b, a)) in before.iter().zip(after).enumerate() {
        let (b, a) = (
            b.as_ref().expect("resident before"),
            a.as_ref().expect("resident after"),
        );
        assert_eq!(b.precision(), a.precision(), "chunk {i}");
        let shape = b.shape();
        if exact.contains(&i) {
            for l in 0..shape.n_layers {
                assert_eq!(b.layer(l), a.layer(l), "chunk {i} layer {l} differs");
            }
        } else {
            let (x, y) = (b.dequantize().unwrap(), a.dequantize().unwrap());
            for l in 0..shape.n_layers {
                let (mut num, mut den) = (0.0f64, 0.0f64);
                for (p, q) in x
                    .keys(l)
                    .iter()
                    .zip(y.keys(l))
                    .chain(x.values(l).iter().zip(y.values(l)))
                {
                    num += ((p - q) as f64).powi(2);
                    den += (*p as f64).powi(2);
                }
                let rel = (num / den.max(1e-30)).sqrt();
                // Recomputed values differ by float noise; after quantization a value near a
                // rounding boundary may land one step away, which costs more at fewer bits.
                let tol = match b.precision() {
                    Precision::F16 => 0.05,
                    Precision::Int8 => 0.05,
                    Precision::Int4 => 0.15,
                    Precision::Int2 => 0.4,
                };
                assert!(
                    rel < tol,
                    "chunk {i} layer {l} ({:?}): relative RMS difference {rel}",
                    b.precision()
                );
            }
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    llmsd_engine::sampling::argmax(v)
}

const PROBE: u32 = 1000;

#[test]
fn restore_from_disk_equals_the_resident_context_bit_for_bit() {
    let text = &fixture().text;
    for policy in [
        Policy::Paged,
        Policy::PagedInt8,
        Policy::Llms,
        Policy::SwapWhole,
    ] {
        let dir = tempdir();
        let mut store = open(dir.path(), policy);
        let id = store.create_context("app", &text[..100]).expect("create");
        let (resident, r0) = probe(&mut store, "app", &id, PROBE);
        assert!(r0.was_resident, "{policy}: a new context is resident");
        store.evict_context("app", &id).expect("evict");
        assert_eq!(store.stats().kv_resident_bytes, 0, "{policy}: evicted");
        let (restored, r1) = probe(&mut store, "app", &id, PROBE);
        assert!(!r1.was_resident);
        assert_eq!(r1.chunks_recomputed, 0, "{policy}: {r1:?}");
        if policy != Policy::SwapWhole {
            assert_eq!(r1.chunks_read, 6, "{policy}: {r1:?}");
        }
        assert_eq!(resident, restored, "{policy}: restored logits differ");
    }
}

#[test]
fn recompute_policy_rebuilds_the_context() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Recompute);
    // One prefill slice: the rebuild repeats the very same computation, bit for bit.
    let id = store.create_context("app", &text[..60]).expect("create");
    let (resident, _) = probe(&mut store, "app", &id, PROBE);
    store.evict_context("app", &id).expect("evict");
    let (rebuilt, r) = probe(&mut store, "app", &id, PROBE);
    assert_eq!(r.chunks_recomputed, 3, "{r:?}");
    assert_eq!(r.chunks_read, 0);
    assert_eq!(resident, rebuilt);
    // Longer than a slice: the original attended to f16 chunks of its first slice, the
    // rebuild to f32 values; the same next token, logits within f16 noise.
    let id = store.create_context("app", &text[..100]).expect("create");
    let (resident, _) = probe(&mut store, "app", &id, PROBE);
    store.evict_context("app", &id).expect("evict");
    let (rebuilt, r) = probe(&mut store, "app", &id, PROBE);
    assert_eq!(r.chunks_recomputed, 6, "{r:?}");
    assert_close(&resident, &rebuilt, 0.02);
    // Nothing was written for this policy.
    let files = kv_files(dir.path());
    assert!(files.is_empty(), "{files:?}");
}

fn kv_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for app in std::fs::read_dir(dir.join("apps"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(app.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "kv") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// Segment `f<num>.kv` of the one app in `dir`.
fn segment(dir: &Path, num: u64) -> PathBuf {
    let files = kv_files(dir);
    let name = format!("f{num}.kv");
    files
        .into_iter()
        .find(|f| f.file_name().is_some_and(|n| n == name.as_str()))
        .unwrap_or_else(|| panic!("no {name} in {}", dir.display()))
}

#[test]
fn damaged_sections_and_missing_segments_are_recomputed() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Paged);
    // One call writes one segment: six chunks in f1, then two more in f2.
    let id = store.create_context("app", &text[..96]).expect("create");
    let mut s = store.open_session("app", &id, 32).expect("session");
    store
        .forward(&mut s, &text[96..128], Logits::None)
        .expect("forward");
    store.close_session(s).expect("close");
    let (resident, _) = probe(&mut store, "app", &id, PROBE);
    let before = store.resident_chunks("app", &id);
    store.evict_context("app", &id).expect("evict");
    let files = kv_files(dir.path());
    assert_eq!(files.len(), 2, "one segment per call: {files:?}");
    // Flip a byte inside chunk 1's layer 7 (the other chunks of f1 stay readable) and
    // delete f2 (chunks 6 and 7).
    let f1 = segment(dir.path(), 1);
    let range = swapfile::SwapFile::open(&f1)
        .unwrap()
        .section_range(1, 7)
        .unwrap();
    let mut bytes = std::fs::read(&f1).unwrap();
    bytes[(range.start + range.end) as usize / 2] ^= 0x55;
    std::fs::write(&f1, &bytes).unwrap();
    std::fs::remove_file(segment(dir.path(), 2)).unwrap();
    let (restored, r) = probe(&mut store, "app", &id, PROBE);
    assert_eq!(r.chunks_recomputed, 3, "{r:?}");
    assert_eq!(r.chunks_read, 5, "{r:?}");
    compare_chunks(
        &before,
        &store.resident_chunks("app", &id),
        &[0, 2, 3, 4, 5],
    );
    assert_close(&resident, &restored, 0.02);
    // A segment header damaged while the daemon was down (a running store keeps the
    // segments it read open, tables checked): every chunk in it is recomputed.
    store.flush();
    drop(store);
    let mut store = open(dir.path(), Policy::Paged);
    let mut bytes = std::fs::read(&f1).unwrap();
    bytes[30] ^= 0x01;
    std::fs::write(&f1, &bytes).unwrap();
    let (restored, r) = probe(&mut store, "app", &id, PROBE);
    assert_eq!((r.chunks_read, r.chunks_recomputed), (0, 8), "{r:?}");
    assert_close(&resident, &restored, 0.02);
}

#[test]
fn segments_are_deleted_once_nothing_refers_to_them() {
    let text = &fixture().text;
    let dir = tempdir();
    let names = |dir: &Path| -> Vec<String> {
        kv_files(dir)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let mut store = open(dir.path(), Policy::Paged);
    // f1: chunks 0 and 1 and the 8-token tail; f2: chunk 2 (the tail in f1 is superseded,
    // its chunks keep f1 alive).
    let a = store.create_context("app", &text[..40]).unwrap();
    let mut s = store.open_session("app", &a, 8).unwrap();
    store.forward(&mut s, &text[40..48], Logits::None).unwrap();
    store.close_session(s).unwrap();
    store.flush();
    assert_eq!(names(dir.path()), ["f1.kv", "f2.kv"]);
    // A fork shares every chunk: deleting the original frees nothing.
    let b = store.fork("app", &a).unwrap();
    store.delete("app", &a).unwrap();
    store.flush();
    assert_eq!(names(dir.path()), ["f1.kv", "f2.kv"]);
    // Truncating to one chunk drops chunks 1 and 2: f2 goes, f1 still holds chunk 0.
    store.truncate("app", &b, 20).unwrap();
    store.flush();
    assert_eq!(names(dir.path()), ["f1.kv"]);
    let (p1, r) = probe(&mut store, "app", &b, PROBE);
    assert_eq!(store.tokens("app", &b).unwrap(), &text[..20]);
    let fresh = store.create_context("app", &text[..20]).unwrap();
    let (p2, _) = probe(&mut store, "app", &fresh, PROBE);
    assert_close(&p1, &p2, 0.02);
    assert!(r.was_resident || r.chunks_recomputed <= 1, "{r:?}");
    store.delete("app", &b).unwrap();
    store.delete("app", &fresh).unwrap();
    store.flush();
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    // Files no manifest names (a crash between a segment and its manifest) go at start.
    let c = store.create_context("app", &text[..32]).unwrap();
    store.flush();
    drop(store);
    let app_dir = kv_files(dir.path())[0].parent().unwrap().to_path_buf();
    std::fs::write(app_dir.join("f77.kv"), b"stray").unwrap();
    std::fs::write(app_dir.join("f78.kv.tmp"), b"torn").unwrap();
    let mut store = open(dir.path(), Policy::Paged);
    assert!(!app_dir.join("f77.kv").exists() && !app_dir.join("f78.kv.tmp").exists());
    store.evict_context("app", &c).unwrap();
    let (_, r) = probe(&mut store, "app", &c, PROBE);
    assert_eq!((r.chunks_read, r.chunks_recomputed), (2, 0), "{r:?}");
}

#[test]
fn pipelined_restore_reads_and_recomputes_at_once() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    let id = store.create_context("app", &text[..128]).expect("create");
    let (resident, _) = probe(&mut store, "app", &id, PROBE);
    let before = store.resident_chunks("app", &id);
    store.evict_context("app", &id).expect("evict");
    // Reads made as slow as recompute: the plan splits the work.
    store.set_costs(RestoreCosts {
        io: LinearCost {
            fixed: 0.0,
            per_unit: 1e-6,
        },
        recompute: LinearCost {
            fixed: 0.0,
            per_unit: 1e-3,
        },
    });
    let (restored, r) = probe(&mut store, "app", &id, PROBE);
    assert!(r.chunks_recomputed > 0 && r.chunks_read > 0, "{r:?}");
    assert_eq!(r.chunks_recomputed + r.chunks_read, 8);
    // A prefix is recomputed, the rest read back bit for bit.
    let read: Vec<usize> = (r.chunks_recomputed..8).collect();
    compare_chunks(&before, &store.resident_chunks("app", &id), &read);
    assert_close(&resident, &restored, 0.05);
}

#[test]
fn resident_bytes_never_exceed_the_budget() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut cfg = config(dir.path(), Policy::Llms);
    cfg.kv_budget_bytes = 12 << 20;
    let f = fixture();
    let mut store = KvStore::open(f.model.clone(), f.pool.clone(), cfg).unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            store
                .create_context("app", &text[i * 200..i * 200 + 160])
                .unwrap(),
        );
        assert!(store.stats().kv_resident_bytes <= 12 << 20);
    }
    for k in 0..12 {
        let id = &ids[(k * 7) % 4];
        let mut s = store.open_session("app", id, 8).unwrap();
        store
            .forward(&mut s, &text[1000 + k..1008 + k], Logits::Last)
            .unwrap();
        store.close_session(s).unwrap();
        let st = store.stats();
        assert!(st.kv_resident_bytes <= st.kv_budget_bytes, "{st:?}");
    }
    let st = store.stats();
    assert!(st.kv_resident_peak_bytes <= st.kv_budget_bytes, "{st:?}");
    // A context that cannot fit even alone is refused, and nothing else is evicted for it.
    let before = store.stats().kv_resident_bytes;
    let mut small = config(dir.path(), Policy::Llms);
    small.kv_budget_bytes = 1 << 20;
    drop(store);
    let mut store = KvStore::open(f.model.clone(), f.pool.clone(), small).unwrap();
    match store.open_session("app", &ids[0], 8) {
        Err(StoreError::ContextWindowExceeded(msg)) => assert!(msg.contains("budget"), "{msg}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a context larger than the budget was opened"),
    }
    assert!(before > 0);
}

#[test]
fn a_lowered_budget_evicts_spares_calls_in_use_and_grows_back() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    let ids: Vec<String> = (0..3)
        .map(|i| {
            store
                .create_context("app", &text[i * 100..i * 100 + 80])
                .unwrap()
        })
        .collect();
    let full = store.stats().kv_resident_bytes;
    let one = store.info("app", &ids[0]).unwrap().resident_bytes;
    assert!(one > 0 && full >= 3 * one - 3);
    // Down to one context's worth: LCTRU evicts the others at once.
    store.set_budget(one).unwrap();
    let st = store.stats();
    assert_eq!(
        (st.kv_budget_bytes, st.kv_budget_max_bytes),
        (one, 256 << 20)
    );
    assert!(st.kv_resident_bytes <= one, "{st:?}");
    // A call may still open (within the configured budget), and is not evicted under it.
    let mut s = store.open_session("app", &ids[1], 8).unwrap();
    store.set_budget(0).unwrap();
    assert!(store.in_use("app", &ids[1]));
    store
        .forward(&mut s, &text[500..504], Logits::Last)
        .unwrap();
    store.close_session(s).unwrap();
    assert_eq!(store.stats().kv_resident_bytes, 0);
    // Nothing was lost: the evicted context reads back from disk.
    let (_, report) = probe(&mut store, "app", &ids[0], text[80]);
    assert!(!report.was_resident && report.chunks_read > 0, "{report:?}");
    // Never above the configured budget.
    store.set_budget(u64::MAX).unwrap();
    assert_eq!(store.budget(), 256 << 20);
}

/// A context that fits the budget alone finds no room while a call in use holds the rest:
/// `NoRoomNow` (the scheduler waits for that call), not a refusal for good; once the call
/// ends, it opens.
#[test]
fn no_room_now_while_a_call_in_use_holds_the_budget() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut cfg = config(dir.path(), Policy::Llms);
    let f = fixture();
    let mut store = KvStore::open(f.model.clone(), f.pool.clone(), cfg.clone()).unwrap();
    let a = store.create_context("app", &text[..160]).unwrap();
    let b = store.create_context("app", &text[200..360]).unwrap();
    let one = store.info("app", &a).unwrap().resident_bytes;
    let need = store.call_need("app", &b, 8).unwrap();
    assert_eq!(need, store.call_need("app", &a, 8).unwrap());
    store.flush();
    drop(store);
    // Room for one call and half a context more: not for a second call beside the first.
    cfg.kv_budget_bytes = need + one / 2;
    let mut store = KvStore::open(f.model.clone(), f.pool.clone(), cfg).unwrap();
    let s = store.open_session("app", &a, 8).unwrap();
    match store.open_session("app", &b, 8) {
        Err(StoreError::NoRoomNow(m)) => assert!(m.contains("in use"), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("two calls opened in room for one"),
    }
    store.close_session(s).unwrap();
    let s = store.open_session("app", &b, 8).unwrap();
    store.close_session(s).unwrap();
}

#[test]
fn compact_evicts_everything_idle_and_keeps_it_readable() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    let a = store.create_context("app", &text[..100]).unwrap();
    let b = store.create_context("other", &text[200..300]).unwrap();
    // A stray segment (as a crash leaves one) is swept.
    let app_dir = std::fs::read_dir(dir.path().join("apps"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(app_dir.join("f999999.kv"), b"stray").unwrap();
    let st = store.compact().unwrap();
    assert_eq!(st.evicted_contexts, 2);
    assert_eq!(st.files_removed, 1);
    assert!(st.freed_bytes > 0);
    assert_eq!(store.stats().kv_resident_bytes, 0);
    assert!(!app_dir.join("f999999.kv").exists());
    for (app, id, next) in [("app", &a, text[100]), ("other", &b, text[300])] {
        let (_, report) = probe(&mut store, app, id, next);
        assert!(report.chunks_read > 0, "{report:?}");
    }
}

#[test]
fn contexts_survive_reopening_bit_for_bit() {
    let text = &fixture().text;
    let dir = tempdir();
    let (ids, before) = {
        let mut store = open(dir.path(), Policy::Llms);
        let a = store.create_context("app", &text[..70]).unwrap();
        let b = store.create_context("app", &text[300..333]).unwrap();
        let other = store.create_context("other", &text[..20]).unwrap();
        let pa = probe(&mut store, "app", &a, PROBE).0;
        let pb = probe(&mut store, "app", &b, PROBE).0;
        store.flush();
        (vec![a, b, other], vec![pa, pb])
    };
    let mut store = open(dir.path(), Policy::Llms);
    let listed: Vec<String> = store.list("app").into_iter().map(|c| c.id).collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&ids[0]) && listed.contains(&ids[1]));
    assert_eq!(store.tokens("app", &ids[0]).unwrap(), &text[..70]);
    assert_eq!(store.tokens("other", &ids[2]).unwrap(), &text[..20]);
    for (id, want) in ids.iter().zip(&before) {
        let (got, r) = probe(&mut store, "app", id, PROBE);
        assert_eq!(r.chunks_recomputed, 0, "{r:?}");
        assert_eq!(&got, want, "context {id} changed across a restart");
    }
}

#[test]
fn fork_shares_chunks_and_diverges() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    let a = store.create_context("app", &text[..50]).unwrap();
    let b = store.fork("app", &a).unwrap();
    assert_ne!(a, b);
    let chunks = store.chunks("app", &b).unwrap();
    assert_eq!(chunks.len(), 4);
    assert!(chunks[..3].iter().all(|c| c.shared_by == 2), "{chunks:?}");
    let mut s = store.open_session("app", &b, 20).unwrap();
    store.forward(&mut s, &text[50..70], Logits::None).unwrap();
    store.close_session(s).unwrap();
    assert_eq!(store.tokens("app", &a).unwrap(), &text[..50]);
    assert_eq!(store.tokens("app", &b).unwrap(), &text[..70]);
    // Same history, same next-token logits.
    let pa = probe(&mut store, "app", &a, PROBE).0;
    let c = store.fork("app", &a).unwrap();
    let pc = probe(&mut store, "app", &c, PROBE).0;
    assert_eq!(pa, pc);
    store.delete("app", &a).unwrap();
    assert!(store.chunks("app", &c).unwrap()[..3]
        .iter()
        .all(|c| c.shared_by == 2));
}

#[test]
fn truncate_delete_limits_and_foreign_ids() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut cfg = config(dir.path(), Policy::Paged);
    cfg.max_context_tokens = 128;
    let f = fixture();
    let mut store = KvStore::open(f.model.clone(), f.pool.clone(), cfg).unwrap();
    let a = store.create_context("app", &text[..60]).unwrap();
    store.truncate("app", &a, 40).unwrap();
    assert_eq!(store.tokens("app", &a).unwrap(), &text[..40]);
    assert_eq!(store.chunks("app", &a).unwrap().len(), 3);
    // The truncated context continues like a fresh one with the same 40 tokens.
    let fresh = store.create_context("app", &text[..40]).unwrap();
    let (p1, _) = probe(&mut store, "app", &a, PROBE);
    let (p2, _) = probe(&mut store, "app", &fresh, PROBE);
    assert_close(&p1, &p2, 0.02);
    assert!(matches!(
        store.truncate("app", &a, 41),
        Err(StoreError::InvalidRequest(_))
    ));
    assert!(matches!(
        store.create_context("app", &text[..129]),
        Err(StoreError::ContextWindowExceeded(_))
    ));
    assert!(matches!(
        store.open_session("app", &a, 100),
        Err(StoreError::ContextWindowExceeded(_))
    ));
    // Another app cannot see or touch the context.
    assert!(matches!(
        store.tokens("intruder", &a),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete("intruder", &a),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.tokens("app", "ctx-zz"),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.create_context("", &[]),
        Err(StoreError::InvalidRequest(_))
    ));
    store.delete("app", &a).unwrap();
    assert!(matches!(
        store.tokens("app", &a),
        Err(StoreError::NotFound(_))
    ));
}

#[test]
fn llms_keeps_the_ratio_and_dense_chunks_get_more_bits() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    let a = store.create_context("app", &text[..256]).unwrap();
    let chunks = store.chunks("app", &a).unwrap();
    assert_eq!(chunks.len(), 16);
    let bits = |p: &str| match p {
        "int8" => 8.0,
        "int4" => 4.0,
        "int2" => 2.0,
        other => panic!("unexpected precision {other}"),
    };
    let mean: f64 = chunks.iter().map(|c| bits(&c.precision)).sum::<f64>() / 16.0;
    assert!(mean <= 4.0 + 1e-9, "mean bits {mean}");
    assert!(chunks.iter().all(|c| c.density > 0.0 && c.observations > 0));
    // Attention sinks: the first chunk is the densest and keeps 8 bits.
    assert_eq!(chunks[0].precision, "int8", "{chunks:?}");
    let mut sorted = chunks.clone();
    sorted.sort_by(|x, y| y.density.total_cmp(&x.density));
    for w in sorted.windows(2) {
        assert!(bits(&w[0].precision) >= bits(&w[1].precision), "{sorted:?}");
    }
}

#[test]
fn swap_files_are_private() {
    let text = &fixture().text;
    let dir = tempdir();
    let mut store = open(dir.path(), Policy::Llms);
    store.create_context("app", &text[..40]).unwrap();
    store.flush();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("apps")), 0o700);
    let files = kv_files(dir.path());
    assert!(!files.is_empty());
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
        assert_eq!(mode(f.parent().unwrap()), 0o700);
    }
    let manifest = files[0].parent().unwrap().join("manifest.json");
    assert_eq!(mode(&manifest), 0o600);
}
