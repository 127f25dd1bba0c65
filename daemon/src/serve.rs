//! `llmsd serve`: the daemon. Loads the model, opens the KV store, starts the engine thread
//! and the doors (Unix socket, D-Bus, HTTP), logs one line when ready, and shuts down cleanly
//! on SIGTERM/SIGINT (running calls end without changing their contexts; swap-outs flushed).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use llmsd::config::{self, BusChoice, ConfigFile};
use llmsd::http::HttpOptions;
use llmsd::kvstore::{Policy, StoreConfig};
use llmsd::service::energy::EnergyConfig;
use llmsd::service::quota::QuotaConfig;
use llmsd::service::{Reload, Service, ServiceConfig, ServiceParts};
use llmsd::systemd::InheritedSockets;
use llmsd_ipc::Priority;

use crate::oneshot;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// GGUF model [default: $LLMSD_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf]
    #[arg(long, env = "LLMSD_MODEL")]
    model: Option<PathBuf>,
    /// TOML configuration file (flags and LLMSD_* variables override it) [default:
    /// $XDG_CONFIG_HOME/llmsd/llmsd.toml; /etc/llmsd/llmsd.toml with --system; either may be
    /// absent]
    #[arg(long, env = "LLMSD_CONFIG")]
    config: Option<PathBuf>,
    /// Unix socket [default: $XDG_RUNTIME_DIR/llmsd/llmsd.sock; /run/llmsd/llmsd.sock with --system]
    #[arg(long, env = "LLMSD_SOCKET")]
    socket: Option<PathBuf>,
    /// OpenAI-compatible HTTP address, or `off` [default: 127.0.0.1:8460]
    #[arg(long, env = "LLMSD_HTTP")]
    http: Option<String>,
    /// Where contexts live [default: $XDG_STATE_HOME/llmsd; /var/lib/llmsd with --system]
    #[arg(long, env = "LLMSD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// D-Bus door: session, system or off [default: session; system with --system]
    #[arg(long, env = "LLMSD_BUS")]
    bus: Option<String>,
    /// Engine threads [default: number of cores]
    #[arg(long, env = "LLMSD_THREADS")]
    threads: Option<usize>,
    /// KV cache memory budget in MiB [default: 256]
    #[arg(long, env = "LLMSD_KV_BUDGET_MIB")]
    kv_budget_mib: Option<u64>,
    /// Total memory budget in MiB (weights + KV + scratch); without --kv-budget-mib the KV
    /// budget is what it leaves
    #[arg(long, env = "LLMSD_MEMORY_BUDGET_MIB")]
    memory_budget_mib: Option<u64>,
    /// KV policy: recompute, swap-whole, paged, paged-int8, llms [default: llms]
    #[arg(long, env = "LLMSD_KV_POLICY")]
    kv_policy: Option<Policy>,
    /// System-wide service: system paths and bus defaults.
    #[arg(long)]
    system: bool,
}

const DEFAULT_KV_BUDGET_MIB: u64 = 256;
const DEFAULT_MIN_KV_MIB: u64 = 8;
const DEFAULT_MEMORY_INTERVAL_MS: u64 = 1000;

pub fn serve(a: ServeArgs) -> Result<()> {
    // Before any thread starts: both clear the variables they read.
    let inherited = InheritedSockets::take_from_env().context("socket activation")?;
    let watchdog = llmsd::systemd::watchdog_from_env();
    let (file, config_path): (ConfigFile, _) = config::load_config(a.config.as_deref(), a.system)?;
    let model_arg = crate::ModelArg {
        model: a.model.clone().or(file.model.clone()),
        threads: a.threads.or(file.threads),
    };
    let mut socket = a
        .socket
        .clone()
        .or(file.socket.clone())
        .unwrap_or_else(|| config::default_socket(a.system));
    // With socket activation systemd owns the socket's path: serve there, never unlink it.
    let socket_inherited = inherited.unix;
    let activated = socket_inherited.is_some();
    if let Some(l) = &socket_inherited {
        if let Some(p) = l
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(PathBuf::from))
        {
            socket = p;
        }
    }
    let http_spec = a
        .http
        .clone()
        .or(file.http.clone())
        .unwrap_or_else(|| llmsd_ipc::DEFAULT_HTTP_ADDR.to_string());
    let http = config::http_addr(&http_spec, file.http_allow_remote)?;
    // An HTTP socket systemd passed replaces the configured address, under the same rule.
    let http_inherited = match inherited.tcp {
        Some(_) if http.is_none() => {
            anyhow::bail!("systemd passed a TCP socket but the HTTP door is off (http = \"off\")")
        }
        Some(l) => {
            let addr = l.local_addr().context("inherited TCP socket")?;
            config::http_addr(&addr.to_string(), file.http_allow_remote)?;
            Some(l)
        }
        None => None,
    };
    let http = match &http_inherited {
        Some(l) => Some(l.local_addr().context("inherited TCP socket")?),
        None => http,
    };
    if let Some(addr) = http {
        config::check_remote_http(addr, file.http_keys.len(), file.http_allow_anonymous)?;
    }
    let bus_explicit = a.bus.is_some() || file.bus.is_some();
    let bus: BusChoice = match a.bus.as_deref().or(file.bus.as_deref()) {
        Some(b) => b.parse()?,
        None if a.system => BusChoice::System,
        None => BusChoice::Session,
    };
    let state_dir = a
        .state_dir
        .clone()
        .or(file.state_dir.clone())
        .unwrap_or_else(|| config::default_state_dir(a.system));

    let mut store = StoreConfig::new(&state_dir);
    // systemd's CacheDirectory= (a list; the first is ours), else the config's, else none.
    store.cache_dir = std::env::var_os("CACHE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .filter(|p| !p.as_os_str().is_empty())
        .or(file.cache_dir.clone());
    store.kv_budget_bytes = a
        .kv_budget_mib
        .or(file.kv.budget_mib)
        .unwrap_or(DEFAULT_KV_BUDGET_MIB)
        << 20;
    store.policy = match (a.kv_policy, &file.kv.policy) {
        (Some(p), _) => p,
        (None, Some(p)) => p.parse().map_err(anyhow::Error::msg)?,
        (None, None) => Policy::Llms,
    };
    if let Some(b) = file.kv.bits_avg {
        store.avg_bits = b;
    }
    if let Some(m) = file.kv.max_context_tokens {
        store.max_context_tokens = m;
    }
    let mut svc = ServiceConfig::default();
    let s = &file.scheduler;
    svc.max_running = s.max_running.unwrap_or(svc.max_running).max(1);
    svc.max_queued = s.max_queued.unwrap_or(svc.max_queued);
    svc.step_prefill_tokens = s
        .step_prefill_tokens
        .unwrap_or(svc.step_prefill_tokens)
        .max(1);
    svc.alone_prefill_tokens = s
        .alone_prefill_tokens
        .unwrap_or(svc.alone_prefill_tokens)
        .max(1);
    if let Some(f) = s.prefill_latency_factor {
        anyhow::ensure!(
            f.is_finite() && f > 0.0,
            "scheduler.prefill_latency_factor must be positive, got {f}"
        );
        svc.prefill_latency_factor = f;
    }
    svc.app_priority = app_priorities(&file);
    if let Some(ms) = file.limits.slow_client_timeout_ms {
        svc.slow_client_timeout = std::time::Duration::from_millis(ms.max(1));
    }

    svc.admin = config::admin_policy(file.admin_group.as_deref())?;
    svc.quota = quota_config(&file);

    let config_shown = config_path
        .as_deref()
        .map_or("(defaults)".into(), |p| p.display().to_string());
    let t0 = std::time::Instant::now();
    let path = oneshot::resolve_model(&model_arg.model)?;
    let loaded = oneshot::load(&model_arg)?;
    let memory_total = a
        .memory_budget_mib
        .or(file.memory.budget_mib)
        .map(|m| m << 20);
    let min_kv = file.memory.min_kv_mib.unwrap_or(DEFAULT_MIN_KV_MIB) << 20;
    let parts = memory_parts(&loaded, &svc, store.max_context_tokens);
    let budget_flags = BudgetFlags {
        kv_mib: a.kv_budget_mib,
        memory_mib: a.memory_budget_mib,
        min_kv,
    };
    if let Some(kv) = kv_budget(&budget_flags, &file, parts)? {
        store.kv_budget_bytes = kv;
    }
    let model_id = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let (service, engine) = Service::start(ServiceParts {
        model: loaded.model,
        tokenizer: loaded.tokenizer,
        pool: loaded.pool,
        model_id: model_id.clone(),
        store,
        service: svc,
    })
    .with_context(|| format!("opening the KV store in {}", state_dir.display()))?;
    if let Some(total) = memory_total {
        service
            .metrics()
            .memory_budget_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }
    let watch = llmsd::memory::WatchConfig::from_env(
        file.memory.pressure.unwrap_or(true),
        min_kv,
        std::time::Duration::from_millis(
            file.memory
                .interval_ms
                .unwrap_or(DEFAULT_MEMORY_INTERVAL_MS)
                .max(10),
        ),
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("llmsd-io")
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let result = rt.block_on(async {
        let listener = match socket_inherited {
            Some(l) => {
                tokio::net::UnixListener::from_std(l).context("serving the inherited socket")?
            }
            None => llmsd::socket::bind(&socket)?,
        };
        let socket_task = tokio::spawn(llmsd::socket::serve(service.clone(), listener));
        let memory_task = tokio::spawn(llmsd::memory::watch(service.clone(), watch));
        let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
        let http_task = match http {
            Some(addr) => {
                let listener = match http_inherited {
                    Some(l) => tokio::net::TcpListener::from_std(l)
                        .context("serving the inherited HTTP socket")?,
                    None => tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding the HTTP door to {addr}"))?,
                };
                let opts = HttpOptions {
                    api_keys: file.http_keys.clone(),
                    // Unset: anonymous callers on loopback only (a remote door needs keys).
                    allow_anonymous: file.http_allow_anonymous.unwrap_or(addr.ip().is_loopback()),
                    max_body_bytes: file
                        .http_max_body_bytes
                        .unwrap_or(HttpOptions::default().max_body_bytes),
                    // `serve` turns it on for a non-loopback address.
                    keyed_metrics: false,
                };
                Some(tokio::spawn(llmsd::http::serve(
                    service.clone(),
                    listener,
                    opts,
                    async move {
                        let _ = http_stopped.await;
                    },
                )))
            }
            None => None,
        };
        // The D-Bus door: fatal when asked for by flag or config, a warning when it is only
        // the default and no bus is there.
        let dbus_bus = match bus {
            BusChoice::Off => None,
            BusChoice::Session => Some(llmsd::dbus::Bus::Session),
            BusChoice::System => Some(llmsd::dbus::Bus::System),
        };
        let dbus = match dbus_bus {
            None => None,
            Some(b) => match llmsd::dbus::serve(service.clone(), b.clone()).await {
                Ok(conn) => Some(conn),
                Err(e) if !bus_explicit => {
                    tracing::warn!(error = %e, "no D-Bus door (pass --bus off to silence)");
                    None
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("starting the D-Bus door on the {b}")));
                }
            },
        };
        tracing::info!(
            model = %model_id,
            socket = %socket.display(),
            http = %http.map_or("off".to_string(), |a| a.to_string()),
            bus = ?bus,
            state_dir = %state_dir.display(),
            config = %config_shown,
            socket_activated = activated,
            watchdog_ms = watchdog.map(|w| w.as_millis() as u64),
            startup_ms = t0.elapsed().as_millis() as u64,
            "llmsd ready"
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        let supervisor = (watchdog.is_some() || llmsd::systemd::notify_socket_set()).then(|| {
            tokio::spawn(llmsd::systemd::supervise(
                service.clone(),
                watchdog,
                llmsd::systemd::notify,
            ))
        });
        let reloader = tokio::spawn(reload_on_sighup(
            service.clone(),
            a.config.clone(),
            a.system,
            (budget_flags, parts),
        ));
        shutdown_signal().await;
        reloader.abort();
        tracing::info!("shutting down");
        if let Some(t) = supervisor {
            t.abort();
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        socket_task.abort();
        memory_task.abort();
        if let Some(conn) = dbus {
            let _ = conn.close().await;
        }
        let _ = stop_http.send(());
        if let Some(t) = http_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        anyhow::Ok(())
    });
    if !activated {
        let _ = std::fs::remove_file(&socket);
    }
    service.shutdown();
    drop(service);
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    let _ = engine.join();
    result
}

/// Reloads the configuration file on SIGHUP: quotas, app priorities, the admin group and
/// the memory and KV budgets change for the calls that follow (a smaller KV budget evicts);
/// contexts and running calls carry on. A file that no longer parses (names an unknown admin
/// group, or budgets that do not fit) is refused, keeping what was in force. Budgets given
/// as flags at start stay.
async fn reload_on_sighup(
    service: Service,
    explicit: Option<PathBuf>,
    system: bool,
    (flags, parts): (BudgetFlags, MemoryParts),
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler; configuration reload disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
        let loaded = config::load_config(explicit.as_deref(), system)
            .map_err(anyhow::Error::from)
            .and_then(|(file, path)| {
                let admin = config::admin_policy(file.admin_group.as_deref())?;
                let kv = kv_budget(&flags, &file, parts)?
                    .unwrap_or(StoreConfig::new(PathBuf::new()).kv_budget_bytes);
                Ok((file, path, admin, kv))
            });
        match loaded {
            Ok((file, path, admin, kv)) => {
                service.reload(Reload {
                    quota: quota_config(&file),
                    app_priority: app_priorities(&file),
                    admin,
                });
                let total = flags.memory_mib.or(file.memory.budget_mib).unwrap_or(0) << 20;
                service
                    .metrics()
                    .memory_budget_bytes
                    .store(total, std::sync::atomic::Ordering::Relaxed);
                if let Err(e) = service.set_kv_budget_max(kv).await {
                    tracing::error!(error = %e, "setting the reloaded KV budget failed");
                }
                tracing::info!(
                    config = %path.as_deref().map_or("(defaults)".into(), |p| p.display().to_string()),
                    "configuration reloaded"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; keeping the old one")
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
}

fn app_priorities(file: &ConfigFile) -> HashMap<String, Priority> {
    file.apps
        .iter()
        .filter_map(|(name, app)| app.priority.map(|p| (name.clone(), p)))
        .collect()
}

/// Quota defaults and energy settings from the file; `LLMSD_POWERCAP_DIR` and
/// `LLMSD_POWER_SUPPLY_DIR` move the sysfs roots (tests use fake trees).
fn quota_config(file: &ConfigFile) -> QuotaConfig {
    let e = &file.energy;
    let mut energy = EnergyConfig::default();
    energy.source = e.source.unwrap_or(energy.source);
    energy.watts_per_core = e.watts_per_core.unwrap_or(energy.watts_per_core);
    energy.battery_factor = e.battery_factor.unwrap_or(energy.battery_factor);
    energy.block_background_on_battery = e
        .block_background_on_battery
        .unwrap_or(energy.block_background_on_battery);
    if let Some(d) = std::env::var_os("LLMSD_POWERCAP_DIR").filter(|d| !d.is_empty()) {
        energy.powercap_dir = d.into();
    }
    if let Some(d) = std::env::var_os("LLMSD_POWER_SUPPLY_DIR").filter(|d| !d.is_empty()) {
        energy.power_supply_dir = d.into();
    }
    QuotaConfig {
        defaults: file.quotas.clone(),
        apps: file
            .apps
            .iter()
            .map(|(name, app)| (name.clone(), app.quota()))
            .collect(),
        energy,
    }
}

/// What start-up measured for splitting a total memory budget: the weights (the model file,
/// with the matrices repacked at load counted at their packed size) and the scratch (the
/// anonymous memory in use once the model is loaded, less the packed weights (tokenizer,
/// thread pool, tables), plus the activations of the largest step (a whole alone-prefill
/// slice, logits of every row), plus slack for request buffers).
#[derive(Clone, Copy, Debug)]
struct MemoryParts {
    model_bytes: u64,
    scratch: u64,
}

fn memory_parts(loaded: &oneshot::Loaded, svc: &ServiceConfig, max_context: usize) -> MemoryParts {
    use llmsd::memory;
    let (model_bytes, packed) = memory::weights_memory(&loaded.model);
    let step = svc
        .alone_prefill_tokens
        .max(svc.step_prefill_tokens + svc.max_running);
    let scratch = memory::rss_anon_bytes().unwrap_or(0).saturating_sub(packed)
        + memory::step_scratch_bytes(
            &loaded.model.config,
            step,
            step,
            loaded.pool.n_threads(),
            max_context.min(loaded.model.config.context_length),
        )
        + memory::SCRATCH_SLACK_BYTES;
    MemoryParts {
        model_bytes,
        scratch,
    }
}

/// The budget flags given at start (they win over the file, also on reload).
#[derive(Clone, Copy, Debug)]
struct BudgetFlags {
    kv_mib: Option<u64>,
    memory_mib: Option<u64>,
    min_kv: u64,
}

/// The KV budget from flags and file: the explicit one (checked against a total memory
/// budget if there is one), else the total less the weights and the scratch; None when
/// neither is set (the store's default).
fn kv_budget(flags: &BudgetFlags, file: &ConfigFile, parts: MemoryParts) -> Result<Option<u64>> {
    use llmsd::memory;
    let explicit = flags.kv_mib.or(file.kv.budget_mib).map(|m| m << 20);
    let Some(total) = flags.memory_mib.or(file.memory.budget_mib).map(|m| m << 20) else {
        return Ok(explicit);
    };
    let MemoryParts {
        model_bytes,
        scratch,
    } = parts;
    let kv = match explicit {
        Some(kv) => {
            memory::check_kv_within_total(total, model_bytes, scratch, kv)?;
            kv
        }
        None => memory::kv_budget_from_total(total, model_bytes, scratch, flags.min_kv)?,
    };
    tracing::info!(
        memory_budget_mib = total >> 20,
        model_mib = model_bytes >> 20,
        scratch_mib = scratch >> 20,
        kv_budget_mib = kv >> 20,
        "memory budget split"
    );
    Ok(Some(kv))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
