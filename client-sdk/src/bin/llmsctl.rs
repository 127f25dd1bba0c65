//! llmsctl: the command line of llmsd for users (and, later, its owner).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use llmsd_client::{Client, GenerationParams};

#[path = "llmsctl/quota.rs"]
mod quota;

#[derive(Parser)]
#[command(
    name = "llmsctl",
    version,
    about = "Command line of the llmsd LLM service"
)]
struct Cli {
    /// Daemon socket [default: $LLMSD_SOCKET, $XDG_RUNTIME_DIR/llmsd/llmsd.sock, /run/llmsd/llmsd.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// App name to act as (scoped under your uid).
    #[arg(long, global = true, default_value = "llmsctl", env = "LLMSD_APP")]
    app: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Interactive streamed conversation (one line per turn; empty line or EOF ends).
    Chat {
        /// Continue this context instead of creating one.
        #[arg(long)]
        context: Option<String>,
        /// System prompt of a new context.
        #[arg(long)]
        system: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Print usage and timings after each reply.
        #[arg(long)]
        verbose: bool,
    },
    /// This app's contexts, as JSON.
    Contexts,
    /// Deletes a context.
    Delete { context: String },
    /// The daemon's model and health, as JSON.
    Status,
    /// Serving benchmark: concurrent apps with multi-turn conversations, against one app in
    /// the same run, and inter-token latency while another app prefills a long prompt.
    Bench {
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 2)]
        turns: usize,
        #[arg(long, default_value_t = 64)]
        gen_tokens: u32,
        /// Tokens of the long prompt (0 skips the interference phase).
        #[arg(long, default_value_t = 2048)]
        prefill_tokens: usize,
        /// Text the long prompt is cut from.
        #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
        prefill_file: PathBuf,
    },
    /// An app's quota and usage; admins set quotas (`quota set APP --tokens-per-min 10`).
    #[command(subcommand)]
    Quota(quota::QuotaCmd),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let path = cli.socket.unwrap_or_else(llmsd_client::default_socket_path);
    let client = Client::connect(&path, &cli.app)
        .await
        .with_context(|| format!("is llmsd running? (socket {})", path.display()))?;
    match cli.command {
        Cmd::Chat {
            context,
            system,
            max_tokens,
            temperature,
            verbose,
        } => {
            let ctx = match context {
                Some(id) => client.context(&id),
                None => client.create_context(system.as_deref()).await?,
            };
            eprintln!(
                "context {} (model {}); empty line ends",
                ctx.id(),
                client.model()
            );
            let params = GenerationParams {
                max_tokens,
                temperature,
                ..GenerationParams::default()
            };
            let stdin = std::io::stdin();
            let mut line = String::new();
            loop {
                eprint!("> ");
                line.clear();
                if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                    break;
                }
                let mut stream = ctx.chat(line.trim_end(), params.clone()).await?;
                let mut out = std::io::stdout();
                while let Some(t) = stream.next_token().await? {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                }
                let done = stream.completion().await?;
                println!();
                if verbose {
                    eprintln!(
                        "[{} prompt tokens, {} cached, {} generated; first token {:.0} ms, {:.1} tok/s]",
                        done.usage.prompt_tokens,
                        done.usage.cached_tokens,
                        done.usage.completion_tokens,
                        done.timings.first_token_ms,
                        done.timings.decode_tok_s
                    );
                }
            }
        }
        Cmd::Contexts => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.list_contexts().await?)?
            );
        }
        Cmd::Delete { context } => client.context(&context).delete().await?,
        // Connects again, as the app it is about.
        Cmd::Quota(q) => quota::run(&path, q).await?,
        Cmd::Bench {
            clients,
            turns,
            gen_tokens,
            prefill_tokens,
            prefill_file,
        } => {
            let prefill_text = std::fs::read_to_string(&prefill_file)
                .with_context(|| format!("reading {}", prefill_file.display()))?;
            let out = llmsd_client::bench::bench(llmsd_client::bench::BenchOptions {
                socket: path,
                clients,
                turns,
                gen_tokens,
                prefill_tokens,
                prefill_text,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Cmd::Status => {
            let v = serde_json::json!({
                "model": client.model_info().await?,
                "health": client.health().await?,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}
