//! `llmsd`: the LLM system service, and one-shot subcommands over the same engine.

mod bench;
mod bench_switch;
mod config_cmd;
mod contexts;

mod oneshot;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "llmsd",
    version,
    about = "LLM system service: one shared model, stateful contexts per app"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: one shared model for every app, over a Unix socket, D-Bus and HTTP.
    Serve(serve::ServeArgs),
    /// Token ids of a text.
    Tokenize(oneshot::TokenizeArgs),
    /// Generate a continuation of a prompt.
    Generate(oneshot::GenerateArgs),
    /// Top next-token logits at every position of a token sequence (teacher forcing).
    Logits(oneshot::LogitsArgs),
    /// Perplexity of the model over the first tokens of a file.
    Perplexity(oneshot::PerplexityArgs),
    /// Architecture, sizes, tensor types and chat template of a model.
    Inspect(oneshot::InspectArgs),
    /// Prefill, decode and batched-decode speed of the engine (`bench switch`: context
    /// switches under each KV policy).
    Bench(bench::BenchArgs),
    /// Persistent contexts of the KV store, one operation per run.
    Ctx(contexts::CtxArgs),
    /// The configuration file: `llmsd config check [FILE]`.
    Config(config_cmd::ConfigArgs),
}

/// Where the model comes from when `--model` is not given.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArg {
    /// GGUF model file [default: $LLMSD_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, env = "LLMSD_MODEL")]
    model: Option<PathBuf>,
    /// Engine threads [default: number of cores]
    #[arg(long, env = "LLMSD_THREADS")]
    threads: Option<usize>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The daemon logs its life (ready, shutdown) by default; one-shot commands only problems.
    let default_filter = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLMSD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Serve(a) => serve::serve(a),
        Command::Tokenize(a) => oneshot::tokenize(a),
        Command::Generate(a) => oneshot::generate(a),
        Command::Logits(a) => oneshot::logits(a),
        Command::Perplexity(a) => oneshot::perplexity(a),
        Command::Inspect(a) => oneshot::inspect(a),
        Command::Bench(a) => bench::bench(a),
        Command::Ctx(a) => contexts::ctx(a),
        Command::Config(a) => config_cmd::config(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("llmsd: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
