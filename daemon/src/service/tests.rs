//! The scheduler with the real model, in-process: queue bounds, priorities, fairness between
//! apps, cancellation. (That batching does not change a sequence's logits is tested in
//! engine/tests/batch_forward.rs.)

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use llmsd_engine::model::Model;
use llmsd_engine::pool::ThreadPool;
use llmsd_engine::tokenizer::Tokenizer;
use llmsd_ipc::{Door, ErrorCode, GenerationParams, Priority, PromptInput, PromptRequest};

use super::*;
use crate::kvstore::StoreConfig;

fn start(dir: &Path, cfg: ServiceConfig) -> Service {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models",
        path.display()
    );
    let model = Model::load(&path).expect("model loads");
    let tokenizer = Tokenizer::from_gguf(model.file()).expect("tokenizer");
    let mut store = StoreConfig::new(dir);
    store.fit_costs = false;
    let (svc, _engine) = Service::start(ServiceParts {
        model: Arc::new(model),
        tokenizer,
        pool: Arc::new(ThreadPool::new(2).expect("pool")),
        model_id: "test".into(),
        store,
        service: cfg,
    })
    .expect("service starts");
    svc
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn text(t: &str, max_tokens: u32) -> PromptRequest {
    PromptRequest {
        context: None,
        input: PromptInput::Text(t.into()),
        params: GenerationParams {
            max_tokens,
            ignore_eos: true,
            ..GenerationParams::default()
        },
        stream: true,
    }
}

fn caller(app: &str) -> Caller {
    Caller::user(Door::Socket, 1000, 1000, None, app).expect("caller")
}

#[test]
fn a_full_queue_answers_busy_with_a_retry_time() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(
        dir.path(),
        ServiceConfig {
            max_running: 1,
            max_queued: 2,
            ..ServiceConfig::default()
        },
    );
    rt().block_on(async {
        let c = caller("flood");
        let mut held = Vec::new();
        let mut busy = None;
        for _ in 0..8 {
            match svc.prompt(&c, text("Hello", 64)) {
                Ok(s) => held.push(s),
                Err(e) => {
                    busy = Some(e);
                    break;
                }
            }
            // Let the engine take the first one out of the queue.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let e = busy.expect("the queue filled up");
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.retry_after_ms.is_some_and(|ms| ms > 0));
        // Everything accepted still completes.
        for s in held {
            s.completion().await.unwrap();
        }
        assert!(svc.prompt(&c, text("Hello", 2)).is_ok());
    });
}

/// Waits for the completions and returns the order in which they finished.
async fn finish_order(streams: Vec<(String, PromptStream)>) -> Vec<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (name, s) in streams {
        let tx = tx.clone();
        tokio::spawn(async move {
            s.completion().await.unwrap();
            let _ = tx.send(name);
        });
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(n) = rx.recv().await {
        order.push(n);
    }
    order
}

#[test]
fn foreground_apps_go_first_and_background_last() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServiceConfig {
        max_running: 1,
        ..ServiceConfig::default()
    };
    cfg.app_priority
        .insert("player".into(), Priority::Foreground);
    let svc = start(dir.path(), cfg);
    rt().block_on(async {
        // The first request occupies the only slot while the others queue up behind it.
        let first = svc.prompt(&caller("first"), text("One", 24)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut bg = text("Two", 4);
        bg.params.priority = Priority::Background;
        let streams = vec![
            ("first".to_string(), first),
            (
                "background".to_string(),
                svc.prompt(&caller("indexer"), bg).unwrap(),
            ),
            (
                "normal".to_string(),
                svc.prompt(&caller("notes"), text("Three", 4)).unwrap(),
            ),
            (
                "foreground".to_string(),
                svc.prompt(&caller("player"), text("Four", 4)).unwrap(),
            ),
        ];
        // An app cannot raise itself: asking for foreground in the request changes nothing.
        let order = finish_order(streams).await;
        assert_eq!(order, ["first", "foreground", "normal", "background"]);
    });
}

#[test]
fn apps_take_turns_whatever_their_queue_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(
        dir.path(),
        ServiceConfig {
            max_running: 1,
            ..ServiceConfig::default()
        },
    );
    rt().block_on(async {
        let mut streams = Vec::new();
        for i in 0..4 {
            let s = svc.prompt(&caller("greedy"), text("Go", 6)).unwrap();
            streams.push((format!("greedy{i}"), s));
        }
        let s = svc.prompt(&caller("modest"), text("Go", 6)).unwrap();
        streams.push(("modest".to_string(), s));
        let order = finish_order(streams).await;
        let pos = order.iter().position(|n| n == "modest").unwrap();
        assert!(
            pos <= 2,
            "the modest app waited behind the greedy one: {order:?}"
        );
    });
}

#[test]
fn cancel_takes_effect_within_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(dir.path(), ServiceConfig::default());
    rt().block_on(async {
        let c = caller("cancel");
        let mut s = svc.prompt(&c, text("Once upon a time", 2000)).unwrap();
        let mut seen = 0;
        while seen < 4 {
            if let Some(StreamItem::Token(_)) = s.next().await {
                seen += 1;
            }
        }
        svc.cancel(&c, s.request).unwrap();
        // Another app cannot cancel it (it is not theirs).
        assert_eq!(
            svc.cancel(&caller("other"), s.request).unwrap_err().code,
            ErrorCode::NotFound
        );
        let mut after = 0;
        let end = loop {
            match s.next().await {
                Some(StreamItem::Token(_)) => after += 1,
                Some(other) => break other,
                None => panic!("stream ended without a result"),
            }
        };
        assert!(
            matches!(end, StreamItem::Failed(ref e) if e.code == ErrorCode::Cancelled),
            "{end:?}"
        );
        // Tokens already sampled when the cancel arrived may still be delivered, no more.
        assert!(after <= 2, "{after} tokens after cancel");
    });
}

#[test]
fn only_admins_set_quotas_and_others_see_only_their_app() {
    let dir = tempfile::tempdir().unwrap();
    let svc = start(dir.path(), ServiceConfig::default());
    let user = Caller::user(Door::Socket, 1000, 1000, None, "notes").unwrap();
    let admin = Caller::user(Door::Socket, 0, 0, None, "llmsctl")
        .unwrap()
        .with_admin(true);
    let set = QuotaSet {
        app: "notes".into(),
        quota: llmsd_ipc::Quota {
            max_contexts: Some(1),
            ..llmsd_ipc::Quota::default()
        },
        clear: Vec::new(),
    };
    rt().block_on(async {
        let e = svc.quota_set(&user, set.clone()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        let r = svc.quota_set(&admin, set).await.unwrap();
        assert_eq!(r.effective.max_contexts, Some(1));
        let own = svc.quota_get(&user, "notes").await.unwrap();
        assert_eq!(own.set.max_contexts, Some(1));
        let e = svc.quota_get(&user, "mail").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(svc.quota_get(&admin, "mail").await.is_ok());
        // Quotas are per app name: another uid's `notes` shares the one context.
        svc.create_context(&user, CreateContext::default())
            .await
            .unwrap();
        let other = Caller::user(Door::Dbus, 1001, 1001, None, "notes").unwrap();
        let e = svc
            .create_context(&other, CreateContext::default())
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert_eq!(
            svc.quota_get(&admin, "notes").await.unwrap().usage.contexts,
            1
        );
    });
}

#[test]
fn a_stream_nobody_reads_is_held_to_its_capacity_then_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let timeout = Duration::from_millis(1500);
    let svc = start(
        dir.path(),
        ServiceConfig {
            slow_client_timeout: timeout,
            ..ServiceConfig::default()
        },
    );
    let cancels = || {
        svc.metrics()
            .slow_client_cancels_total
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    rt().block_on(async {
        let c = caller("deaf");
        let ctx = svc
            .create_context(&c, CreateContext::default())
            .await
            .unwrap();
        let mut req = text("Once upon a time", 400);
        req.context = Some(ctx.id.clone());
        let mut unread = svc.prompt(&c, req).unwrap();
        // It runs until its stream is full, less the room its end needs.
        let held = scheduler::STREAM_CAPACITY - 2;
        let t0 = std::time::Instant::now();
        while unread.rx.len() < held {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the stream never filled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let full = std::time::Instant::now();
        // Another app is served meanwhile.
        let done = svc
            .prompt(&caller("reader"), text("Go", 24))
            .unwrap()
            .completion()
            .await
            .unwrap();
        assert_eq!(done.usage.completion_tokens, 24);
        assert_eq!(unread.rx.len(), held, "the engine ran a stalled request");
        while cancels() == 0 {
            assert!(
                full.elapsed() < timeout * 10,
                "the stalled request was not cancelled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(full.elapsed() >= timeout - Duration::from_millis(100));
        let mut tokens = 0;
        let end = loop {
            match unread.next().await {
                Some(StreamItem::Token(_)) => tokens += 1,
                Some(other) => break other,
                None => panic!("stream ended without a result"),
            }
        };
        assert_eq!(
            tokens, held,
            "tokens delivered to a client that did not read"
        );
        match end {
            StreamItem::Failed(e) => {
                assert_eq!(e.code, ErrorCode::Cancelled, "{e:?}");
                assert!(e.message.contains("did not read"), "{e:?}");
            }
            other => panic!("not cancelled: {other:?}"),
        }
        assert_eq!(cancels(), 1);
        // The context is as before the call.
        assert_eq!(svc.get_context(&c, &ctx.id).await.unwrap().tokens, 0);
    });
}
