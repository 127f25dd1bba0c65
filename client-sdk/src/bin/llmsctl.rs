//! llmsctl: the command line of llmsd for users and its admins. Human tables by default,
//! `--json` for scripts. Admin verbs are checked by the daemon (peer credentials): others see
//! and manage only their own uid's apps.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use llmsd_client::{render, Client, GenerationParams};

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
    /// App name to act as (scoped under your uid) [default: llmsctl]. `contexts` and `evict`
    /// narrow to it (admins: that app name under any uid); an owner such as `u1000:notes`
    /// names another user's app (admins only).
    #[arg(long, global = true, env = "LLMSD_APP")]
    app: Option<String>,
    /// Print the daemon's reply as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
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
    /// Contexts of your apps (admins: of every app) with their owners; --app narrows.
    Contexts,
    /// Deletes a context of --app.
    Delete { context: String },
    /// Model, memory against its budget, KV resident and on disk, pressure, queue.
    Status,
    /// Apps with contexts: totals, requests in flight, last use.
    Apps,
    /// Each chunk of a context of --app: tokens, precision, resident or on disk, density,
    /// last use.
    Chunks { context: String },
    /// Moves a context of --app, or without CONTEXT every context of --app, out of memory
    /// (its KV stays on disk).
    Evict { context: Option<String> },
    /// Admin: rebalance compression, evict everything idle, remove stray swap files.
    Compact,
    /// Live view of status and apps, refreshed every second (q or Ctrl-C quits).
    Top {
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many refreshes.
        #[arg(long)]
        iterations: Option<u64>,
        /// One refresh, then exit (same as --iterations 1).
        #[arg(long)]
        once: bool,
    },
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
    // `--app u1000:notes` addresses that owner; the connection itself says hello as `notes`.
    let (hello_app, owner) = match cli.app.as_deref() {
        Some(a) => match a.split_once(':') {
            Some((_, name)) => (name.to_string(), Some(a.to_string())),
            None => (a.to_string(), None),
        },
        None => ("llmsctl".to_string(), None),
    };
    let client = Client::connect(&path, &hello_app)
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
            let list = client.owned_contexts(cli.app.as_deref()).await?;
            print_or_json(cli.json, serde_json::to_value(&list)?, || {
                render::contexts(&list, render::now_unix())
            })?;
        }
        Cmd::Delete { context } => {
            match owner {
                Some(o) => client.delete_context_of(&o, &context).await?,
                None => client.context(&context).delete().await?,
            }
            if cli.json {
                println!("{}", serde_json::json!({"deleted": context}));
            } else {
                println!("deleted {context}");
            }
        }
        Cmd::Apps => {
            let list = client.apps().await?;
            print_or_json(cli.json, serde_json::to_value(&list)?, || {
                render::apps(&list, render::now_unix())
            })?;
        }
        Cmd::Chunks { context } => {
            let list = client.chunks(&context, owner.as_deref()).await?;
            print_or_json(cli.json, serde_json::to_value(&list)?, || {
                render::chunks(&list, render::now_unix())
            })?;
        }
        Cmd::Evict { context } => {
            let r = match (&context, cli.app.as_deref()) {
                (Some(c), _) => client.evict_context(c, owner.as_deref()).await?,
                (None, Some(a)) => client.evict_app(a).await?,
                (None, None) => anyhow::bail!("evict needs a CONTEXT or --app APP"),
            };
            print_or_json(cli.json, serde_json::to_value(&r)?, || render::evicted(&r))?;
        }
        Cmd::Compact => {
            let r = client.compact().await?;
            print_or_json(cli.json, serde_json::to_value(&r)?, || {
                render::compacted(&r)
            })?;
        }
        Cmd::Top {
            interval_ms,
            iterations,
            once,
        } => {
            let iterations = if once { Some(1) } else { iterations };
            top(&client, cli.json, interval_ms, iterations).await?;
        }
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
            let s = client.status().await?;
            print_or_json(cli.json, serde_json::to_value(&s)?, || render::status(&s))?;
        }
    }
    Ok(())
}

fn print_or_json(
    json: bool,
    value: serde_json::Value,
    human: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", human());
    }
    Ok(())
}

/// `llmsctl top`: status and apps every interval, on a cleared screen when stdout is a
/// terminal (one JSON object per line with `--json`). q quits (the terminal is put in
/// non-canonical mode so no Enter is needed), and so does Ctrl-C.
async fn top(client: &Client, json: bool, interval_ms: u64, iterations: Option<u64>) -> Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let _raw = KeyMode::enter();
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel::<u8>();
    if std::io::stdin().is_terminal() {
        std::thread::spawn(move || {
            use std::io::Read;
            let mut b = [0u8; 1];
            while std::io::stdin().read(&mut b).is_ok_and(|n| n == 1) {
                if keys_tx.send(b[0]).is_err() {
                    break;
                }
            }
        });
    }
    let mut n = 0u64;
    loop {
        let status = client.status().await?;
        let apps = client.apps().await?;
        let mut out = std::io::stdout();
        if json {
            let v = serde_json::json!({"status": status, "apps": apps});
            writeln!(out, "{}", serde_json::to_string(&v)?)?;
        } else {
            if tty {
                // Home and clear screen.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            write!(
                out,
                "{}\n{}",
                render::status(&status),
                render::apps(&apps, render::now_unix())
            )?;
            if tty {
                write!(out, "\n(q quits)")?;
            }
            writeln!(out)?;
        }
        out.flush()?;
        n += 1;
        if iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        let sleep = tokio::time::sleep(std::time::Duration::from_millis(interval_ms));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = tokio::signal::ctrl_c() => return Ok(()),
                k = keys.recv() => match k {
                    Some(b'q') | Some(b'Q') => return Ok(()),
                    _ => continue,
                },
            }
        }
    }
}

/// The terminal in non-canonical, no-echo mode while `top` runs (keys arrive one at a
/// time); restored when dropped. Nothing happens when stdin is not a terminal.
struct KeyMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl KeyMode {
    fn enter() -> KeyMode {
        use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return KeyMode { saved: None };
        };
        let mut raw = saved.clone();
        raw.local_flags
            .remove(LocalFlags::ICANON | LocalFlags::ECHO);
        if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_err() {
            return KeyMode { saved: None };
        }
        KeyMode { saved: Some(saved) }
    }
}

impl Drop for KeyMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}
