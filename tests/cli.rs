//! The one-shot subcommands of the real `llmsd` binary: output forms, determinism, chat
//! wrapping and clear errors for bad input.

mod common;

use common::*;

fn smollm2() -> String {
    model(SMOLLM2).to_str().unwrap().to_string()
}

fn gemma3() -> String {
    model(GEMMA3).to_str().unwrap().to_string()
}

#[test]
fn same_seed_same_output_and_seeds_differ() {
    let m = smollm2();
    let run = |seed: &str| {
        json(&llmsd(&[
            "generate",
            "--model",
            &m,
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--json",
        ]))
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    let others: Vec<_> = ["2", "3", "4"].iter().map(|s| run(s)).collect();
    assert!(
        others
            .iter()
            .any(|o| o["generated_ids"] != a["generated_ids"]),
        "three other seeds all produced seed 1's tokens"
    );
    assert_eq!(ids(&a["generated_ids"]).len(), 16);
}

#[test]
fn chat_wraps_prompt_in_the_model_template() {
    let out = json(&llmsd(&[
        "generate",
        "--model",
        &smollm2(),
        "--chat",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "12",
        "--json",
    ]));
    // The template inserts SmolLM2's default system prompt: the result is exactly llama.cpp's
    // chat prompt of the reference file, and greedy decoding continues it the same way.
    let r = reference("smollm2_public.json");
    assert_eq!(ids(&out["prompt_ids"]), ids(&r["greedy"][1]["prompt_ids"]));
    let expected = ids(&r["greedy"][1]["generated_ids"]);
    assert_eq!(ids(&out["generated_ids"])[..4], expected[..4]);

    // Gemma has no template in its file: the Gemma fallback, with exactly one BOS even when
    // --bos is also given.
    let out = json(&llmsd(&[
        "generate",
        "--model",
        &gemma3(),
        "--chat",
        "--bos",
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "4",
        "--json",
    ]));
    let prompt = ids(&out["prompt_ids"]);
    assert_eq!(prompt[0], 2);
    assert_ne!(prompt[1], 2, "double BOS: {prompt:?}");
}

#[test]
fn stop_strings_end_generation_and_are_not_included() {
    let out = json(&llmsd(&[
        "generate",
        "--model",
        &smollm2(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "24",
        "--stop",
        "\n\n",
        "--json",
    ]));
    // llama.cpp's greedy continuation is " Paris.\n\nThe United States has ...". Each token up
    // to the blank line wins by over 1.2 logits, ours and llama.cpp's alike; after "The" the
    // top two are 0.1-0.2 apart, where any other float rounding may pick the other.
    assert_eq!(out["text"].as_str().unwrap(), " Paris.");
}

#[test]
fn logits_gives_sorted_top_k_per_position() {
    let model = smollm2();
    let logits = |more: &[&str]| {
        let mut args = vec![
            "logits",
            "--model",
            &model,
            "--ids",
            "504,3575,282,4649,314",
            "--top",
            "3",
            "--json",
        ];
        args.extend_from_slice(more);
        json(&llmsd(&args))
    };
    let out = logits(&[]);
    let rows = out.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        let l: Vec<f64> = r["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(l.len(), 3);
        assert!(l.windows(2).all(|w| w[0] >= w[1]));
    }
    // After "The capital of France is": " Paris" (7042).
    assert_eq!(ids(&rows[4]["ids"])[0], 7042);
    // Token by token (the decode path), and in slices of 2: the same figures, to the digit.
    for step in ["1", "2"] {
        assert_eq!(logits(&["--step", step]), out, "--step {step}");
    }
    let err = llmsd_fails(&["logits", "--model", &smollm2(), "--ids", "1", "--step", "0"]);
    assert!(err.contains("--step"), "{err}");
}

#[test]
fn inspect_reports_architecture_and_template() {
    let out = json(&llmsd(&["inspect", "--model", &gemma3(), "--json"]));
    assert_eq!(out["architecture"], "gemma3");
    assert_eq!(out["n_layers"], 18);
    assert_eq!(out["sliding_window"], 512);
    assert_eq!(out["chat_template_fallback"], true);
    assert!(out["tensor_types"]["Q4_K"]["tensors"].as_u64().unwrap() > 0);
    let out = json(&llmsd(&["inspect", "--model", &smollm2(), "--json"]));
    assert_eq!(out["architecture"], "llama");
    assert_eq!(out["chat_template_fallback"], false);
    let text = llmsd(&["inspect", "--model", &smollm2()]);
    assert!(text.contains("architecture  llama"), "{text}");
}

#[test]
fn bad_input_gives_clear_errors() {
    let m = smollm2();
    let err = llmsd_fails(&["generate", "--model", "/nonexistent.gguf", "--prompt", "x"]);
    assert!(err.contains("/nonexistent.gguf"), "{err}");

    let dir = std::env::temp_dir().join(format!("llmsd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(&m).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = llmsd_fails(&["inspect", "--model", truncated.to_str().unwrap()]);
    assert!(err.contains("truncated"), "{err}");
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"definitely not a model").unwrap();
    let err = llmsd_fails(&["tokenize", "--model", junk.to_str().unwrap(), "--text", "x"]);
    assert!(err.contains("not a GGUF file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let err = llmsd_fails(&["logits", "--model", &m, "--ids", "1,999999"]);
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = llmsd_fails(&["logits", "--model", &m, "--ids", "1,abc"]);
    assert!(err.contains("not a token id"), "{err}");
    let err = llmsd_fails(&[
        "perplexity",
        "--model",
        &m,
        "--file",
        "/usr/share/common-licenses/GPL-3",
        "--tokens",
        "100000000",
    ]);
    assert!(err.contains("tokens"), "{err}");
    let err = llmsd_fails(&["tokenize", "--model", &m]);
    assert!(err.contains("exactly one"), "{err}");
    let err = llmsd_fails(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "x",
        "--temperature=-1",
    ]);
    assert!(err.to_lowercase().contains("temperature"), "{err}");
}

#[test]
fn default_model_is_found_without_flag() {
    // Run from the repository root, where models/ holds the default model.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmsd"))
        .args(["tokenize", "--text", "Hello, world!", "--json"])
        .current_dir(repo_root())
        .env_remove("LLMSD_MODEL")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        ids(&json(&String::from_utf8_lossy(&out.stdout))),
        vec![19556, 28, 905, 17]
    );
}
