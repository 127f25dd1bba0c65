//! `llmsd config check`: validates a configuration file the way `llmsd serve` reads it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use llmsd::config::{self, ConfigFile};

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ConfigCommand {
    /// Parse and check a configuration file (syntax, unknown keys, values, the model file);
    /// prints OK or every problem, exits 1 on an error.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The file [default: the one `llmsd serve` reads: /etc/llmsd/llmsd.toml with --system,
    /// else $XDG_CONFIG_HOME/llmsd/llmsd.toml]
    #[arg(long, conflicts_with = "file")]
    config: Option<PathBuf>,
    /// The file, as a positional argument.
    file: Option<PathBuf>,
    /// Check it as the system service's file (llmsd.service: `llmsd serve --system`).
    #[arg(long)]
    system: bool,
    /// Also print the settings the daemon would run with and the MemoryMax= that fits them.
    #[arg(long)]
    print: bool,
}

pub fn config(a: ConfigArgs) -> Result<()> {
    match a.command {
        ConfigCommand::Check(c) => check(c),
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let explicit = a.config.or(a.file);
    let path = match explicit
        .clone()
        .or_else(|| config::default_config_path(a.system))
    {
        Some(p) => p,
        None => bail!("no file named and no default location (HOME is not set)"),
    };
    if explicit.is_none() && !path.exists() {
        println!(
            "{}: absent; llmsd serve{} runs with the defaults",
            path.display(),
            if a.system { " --system" } else { "" }
        );
        if a.print {
            print_effective(&ConfigFile::default(), a.system);
        }
        return Ok(());
    }
    let file = match ConfigFile::load(&path) {
        Ok(f) => f,
        Err(e) => {
            println!("error: {e}");
            bail!("{} is not valid", path.display());
        }
    };
    let report = file.check(a.system);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for e in &report.errors {
        println!("error: {e}");
    }
    if !report.errors.is_empty() {
        bail!(
            "{}: {} error{}",
            path.display(),
            report.errors.len(),
            if report.errors.len() == 1 { "" } else { "s" }
        );
    }
    println!("{}: OK", path.display());
    if a.print {
        print_effective(&file, a.system);
    }
    Ok(())
}

/// The settings `serve` resolves from the file and its defaults (flags and LLMSD_* variables
/// aside), one `key = value` a line.
fn print_effective(file: &ConfigFile, system: bool) {
    let defaults = llmsd::kvstore::StoreConfig::new(config::default_state_dir(system));
    let model = file.model.clone();
    let kv_budget_mib = file.kv.budget_mib.unwrap_or(defaults.kv_budget_bytes >> 20);
    let bus = file
        .bus
        .clone()
        .unwrap_or_else(|| if system { "system" } else { "session" }.into());
    let lines = [
        (
            "model",
            model.as_ref().map_or_else(
                || {
                    format!(
                        "(not set: models/{} in the working directory)",
                        crate::oneshot::DEFAULT_MODEL_FILE
                    )
                },
                |m| m.display().to_string(),
            ),
        ),
        (
            "socket",
            file.socket
                .clone()
                .unwrap_or_else(|| config::default_socket(system))
                .display()
                .to_string(),
        ),
        (
            "http",
            file.http
                .clone()
                .unwrap_or_else(|| llmsd_ipc::DEFAULT_HTTP_ADDR.to_string()),
        ),
        ("bus", bus),
        (
            "state_dir",
            file.state_dir
                .clone()
                .unwrap_or(defaults.state_dir)
                .display()
                .to_string(),
        ),
        (
            "threads",
            file.threads
                .map_or_else(|| "(number of cores)".into(), |t| t.to_string()),
        ),
        ("kv.budget_mib", kv_budget_mib.to_string()),
        (
            "kv.policy",
            file.kv
                .policy
                .clone()
                .unwrap_or_else(|| defaults.policy.name().to_string()),
        ),
        (
            "admin_group",
            file.admin_group.clone().unwrap_or_else(|| "(none)".into()),
        ),
    ];
    for (key, value) in lines {
        println!("{key} = {value}");
    }
    match model.as_ref().and_then(|m| std::fs::metadata(m).ok()) {
        Some(meta) => {
            let max = config::suggested_memory_max(meta.len(), kv_budget_mib << 20);
            println!(
                "MemoryMax={}M  (model {} MiB + KV budget {kv_budget_mib} MiB + runtime margin; \
                 `systemctl edit llmsd.service` to set it)",
                max >> 20,
                meta.len().div_ceil(1 << 20)
            );
        }
        None => println!("MemoryMax: set model to a file to get a suggestion"),
    }
}
