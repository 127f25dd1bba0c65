//! `llmsctl quota get|set APP`: an app's quota and usage; admins set quotas.
//!
//! The command connects as APP: a user who is not an admin sees the quota of the app they
//! name as theirs, and may not set any.

use std::path::Path;

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use llmsd_client::{Client, Door, Priority, Quota, QuotaKey, QuotaReport};

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// An app's quota (set by an admin, from the config, enforced now) and usage.
    Get {
        app: String,
        /// Machine output: the daemon's report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sets keys of an app's quota (admins: root, the daemon's user, the admin group).
    Set {
        app: String,
        #[command(flatten)]
        keys: QuotaArgs,
        /// A key to clear back to the config's value (repeatable), e.g. `--clear doors`.
        #[arg(long, value_name = "KEY")]
        clear: Vec<QuotaKey>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct QuotaArgs {
    /// Tokens prefilled and generated per minute.
    #[arg(long)]
    tokens_per_min: Option<u64>,
    /// Joules per hour (times the battery factor on battery).
    #[arg(long)]
    joules_per_hour: Option<f64>,
    /// Persistent contexts.
    #[arg(long)]
    max_contexts: Option<u32>,
    /// Tokens one context may hold.
    #[arg(long)]
    max_context_tokens: Option<u32>,
    /// Prompts queued or running at once.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Doors the app may use: a list of socket, dbus, http, or `none`.
    #[arg(long, value_parser = parse_doors)]
    doors: Option<DoorList>,
    /// Whether background prompts are accepted.
    #[arg(long, action = clap::ArgAction::Set, value_name = "true|false")]
    background_allowed: Option<bool>,
    /// background, normal or foreground.
    #[arg(long, value_parser = parse_priority)]
    priority: Option<Priority>,
}

/// A comma-separated door list (one clap value, not repeated ones).
#[derive(Clone, Debug)]
pub struct DoorList(Vec<Door>);

fn parse_doors(s: &str) -> Result<DoorList, String> {
    if s == "none" {
        return Ok(DoorList(Vec::new()));
    }
    s.split(',')
        .map(|d| d.trim().parse::<Door>())
        .collect::<Result<Vec<_>, _>>()
        .map(DoorList)
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    match s {
        "background" => Ok(Priority::Background),
        "normal" => Ok(Priority::Normal),
        "foreground" => Ok(Priority::Foreground),
        other => Err(format!(
            "priority must be background, normal or foreground, got {other:?}"
        )),
    }
}

impl QuotaArgs {
    fn quota(&self) -> Quota {
        Quota {
            tokens_per_min: self.tokens_per_min,
            joules_per_hour: self.joules_per_hour,
            max_contexts: self.max_contexts,
            max_context_tokens: self.max_context_tokens,
            max_concurrent: self.max_concurrent,
            doors: self.doors.clone().map(|d| d.0),
            background_allowed: self.background_allowed,
            priority: self.priority,
        }
    }
}

pub async fn run(socket: &Path, cmd: QuotaCmd) -> Result<()> {
    let app = match &cmd {
        QuotaCmd::Get { app, .. } | QuotaCmd::Set { app, .. } => app.clone(),
    };
    let client = Client::connect(socket, &app)
        .await
        .with_context(|| format!("is llmsd running? (socket {})", socket.display()))?;
    let (report, json) = match cmd {
        QuotaCmd::Get { json, .. } => (client.quota_get(&app).await?, json),
        QuotaCmd::Set {
            keys, clear, json, ..
        } => {
            let quota = keys.quota();
            anyhow::ensure!(
                quota != Quota::default() || !clear.is_empty(),
                "nothing to set: give a quota flag (e.g. --tokens-per-min 100) or --clear KEY"
            );
            (client.quota_set(&app, quota, clear).await?, json)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// One value of a quota key, `-` when unset.
fn value(q: &Quota, key: QuotaKey) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    match key {
        QuotaKey::TokensPerMin => opt(q.tokens_per_min.map(|v| v.to_string())),
        QuotaKey::JoulesPerHour => opt(q.joules_per_hour.map(|v| v.to_string())),
        QuotaKey::MaxContexts => opt(q.max_contexts.map(|v| v.to_string())),
        QuotaKey::MaxContextTokens => opt(q.max_context_tokens.map(|v| v.to_string())),
        QuotaKey::MaxConcurrent => opt(q.max_concurrent.map(|v| v.to_string())),
        QuotaKey::Doors => opt(q.doors.as_ref().map(|d| {
            if d.is_empty() {
                "none".to_string()
            } else {
                d.iter().map(|d| d.name()).collect::<Vec<_>>().join(",")
            }
        })),
        QuotaKey::BackgroundAllowed => opt(q.background_allowed.map(|v| v.to_string())),
        QuotaKey::Priority => opt(q.priority.map(|p| {
            match p {
                Priority::Background => "background",
                Priority::Normal => "normal",
                Priority::Foreground => "foreground",
            }
            .to_string()
        })),
    }
}

/// The human form: a table of keys (set, config, effective) and the usage.
fn table(r: &QuotaReport) -> String {
    let mut out = format!(
        "app {} ({})\n{:<20} {:>14} {:>14} {:>14}\n",
        r.app,
        if r.on_battery {
            "on battery"
        } else {
            "on mains"
        },
        "quota",
        "set",
        "config",
        "effective"
    );
    for k in QuotaKey::ALL {
        out.push_str(&format!(
            "{:<20} {:>14} {:>14} {:>14}\n",
            k.name(),
            value(&r.set, k),
            value(&r.config, k),
            value(&r.effective, k)
        ));
    }
    let u = &r.usage;
    out.push_str(&format!(
        "usage: {} tokens in the last minute, {:.3} J in the last hour, {} contexts, {} running\n\
         total: {} tokens, {:.3} J ({:.6} J/token)\n",
        u.tokens_last_min,
        u.joules_last_hour,
        u.contexts,
        u.running,
        u.tokens_total,
        u.energy_j_total,
        u.joules_per_token
    ));
    out
}
