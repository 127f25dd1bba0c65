//! Admin and inspection verbs (`llmsctl status`, `apps`, `contexts`, `chunks`, `evict`,
//! `compact`, `delete`), and who may use them on whom.
//!
//! Contexts belong to owners: `u<uid>:<app>` for local callers, `http:<app>` for the HTTP
//! door. An admin (root, the daemon's uid, or the admin group) reaches every owner; anyone
//! else reaches only the owners of their own uid, under any app name. `compact` is admin-only.

use std::sync::atomic::Ordering;

use llmsd_ipc::{
    ApiError, AppInfo, ChunkInfo, ChunkLocation, CompactReport, ErrorCode, EvictReport,
    MemoryPressure, OwnedContext, Response, Status,
};

use super::scheduler::Op;
use super::{unexpected, Caller, Service};

/// The owners a listing or a bulk eviction covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerScope {
    /// Every owner (admins only).
    All,
    /// Every app of one uid.
    Uid(u32),
    /// One owner, `u<uid>:<app>` or `http:<app>`.
    Owner(String),
    /// One app name, under any uid or door (admins only).
    AppName(String),
}

impl OwnerScope {
    pub fn matches(&self, owner: &str) -> bool {
        match self {
            OwnerScope::All => true,
            OwnerScope::Uid(uid) => owner_uid(owner) == Some(*uid),
            OwnerScope::Owner(o) => o == owner,
            OwnerScope::AppName(name) => owner_app(owner) == name,
        }
    }
}

/// The uid of a local owner (`u1000:notes` → 1000); none for the HTTP door's.
pub fn owner_uid(owner: &str) -> Option<u32> {
    let (head, _) = owner.split_once(':')?;
    head.strip_prefix('u')?.parse().ok()
}

/// The app name of an owner (`u1000:notes` → `notes`).
pub fn owner_app(owner: &str) -> &str {
    owner.split_once(':').map_or(owner, |(_, app)| app)
}

fn denied(what: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::PermissionDenied, what.to_string())
}

/// The owner a caller addresses: its own app by default; another owner only if it is an
/// admin or the owner is of its own uid.
pub fn resolve_owner(caller: &Caller, owner: Option<&str>) -> Result<String, ApiError> {
    let Some(o) = owner else {
        return Ok(caller.owner());
    };
    if !o.contains(':') {
        return Err(ApiError::invalid(format!(
            "owner must be u<uid>:<app> or http:<app>, got {o:?}"
        )));
    }
    if caller.admin
        || o == caller.owner()
        || (caller.uid().is_some() && owner_uid(o) == caller.uid())
    {
        Ok(o.to_string())
    } else {
        Err(denied(format!(
            "{o} is another user's app; only admins may manage it"
        )))
    }
}

/// The owners `apps` / `contexts` / `evict --app` cover for a caller: with `app` one owner
/// (`u1000:notes`) or one app name (any uid for admins, the caller's uid otherwise); without,
/// everything (admins) or the caller's uid's apps.
pub fn resolve_scope(caller: &Caller, app: Option<&str>) -> Result<OwnerScope, ApiError> {
    match (app, caller.admin, caller.uid()) {
        (Some(a), _, _) if a.contains(':') => resolve_owner(caller, Some(a)).map(OwnerScope::Owner),
        (Some(a), true, _) => Ok(OwnerScope::AppName(a.to_string())),
        (Some(a), false, Some(uid)) => Ok(OwnerScope::Owner(format!("u{uid}:{a}"))),
        (Some(a), false, None) if a == caller.app => Ok(OwnerScope::Owner(caller.owner())),
        (Some(a), false, None) => Err(denied(format!(
            "app {a:?} is not this API key's app; only admins may manage it"
        ))),
        (None, true, _) => Ok(OwnerScope::All),
        (None, false, Some(uid)) => Ok(OwnerScope::Uid(uid)),
        (None, false, None) => Ok(OwnerScope::Owner(caller.owner())),
    }
}

/// The wire form of a store chunk.
pub fn chunk_info(c: crate::kvstore::ChunkInfo) -> ChunkInfo {
    ChunkInfo {
        index: c.index as u64,
        tokens: c.tokens as u64,
        precision: c.precision,
        location: ChunkLocation::new(c.resident, c.on_disk),
        density: c.density,
        observations: c.observations,
        shared_by: c.shared_by,
        last_use_unix: c.last_use_unix,
    }
}

/// An empty app entry for `owner`, its counts to be filled.
pub fn app_info(owner: &str) -> AppInfo {
    AppInfo {
        owner: owner.to_string(),
        uid: owner_uid(owner),
        app: owner_app(owner).to_string(),
        contexts: 0,
        tokens: 0,
        resident_bytes: 0,
        disk_bytes: 0,
        running: 0,
        queued: 0,
        last_use_unix: 0,
    }
}

impl Service {
    /// The daemon at a glance; the same for every caller but for `admin`. Served from the
    /// gauges the engine and the memory watcher keep, so it never waits behind a step.
    pub fn status(&self, caller: &Caller) -> Status {
        let m = &self.inner.metrics;
        let info = &self.inner.model_info;
        let load = |v: &std::sync::atomic::AtomicU64| v.load(Ordering::Relaxed);
        let memory_budget = load(&m.memory_budget_bytes);
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            model: info.id.clone(),
            model_bytes: info.file_bytes,
            kv_policy: info.kv_policy.clone(),
            uptime_s: self.inner.started.elapsed().as_secs_f64(),
            rss_bytes: load(&m.rss_bytes),
            memory_budget_bytes: (memory_budget > 0).then_some(memory_budget),
            kv_budget_bytes: load(&m.kv_budget_bytes),
            kv_budget_max_bytes: load(&m.kv_budget_max_bytes),
            kv_resident_bytes: load(&m.kv_resident_bytes),
            kv_disk_bytes: load(&m.kv_disk_bytes),
            pressure: MemoryPressure::from_level(load(&m.memory_pressure)),
            pressure_source: m.pressure_source().to_string(),
            apps: load(&m.apps),
            contexts: load(&m.contexts),
            running: load(&m.running),
            queued: load(&m.queued),
            energy_j: self.inner.quotas.total_energy_j(),
            energy_source: self.inner.quotas.energy_source().to_string(),
            admin: caller.admin,
        }
    }

    /// Apps (owners) in the caller's scope, narrowed to `app` if given.
    pub async fn apps(&self, caller: &Caller, app: Option<&str>) -> Result<Vec<AppInfo>, ApiError> {
        let scope = resolve_scope(caller, app)?;
        match self.op(Op::Apps { scope }).await? {
            Response::Apps(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Contexts of every owner in the caller's scope, narrowed to `app` if given.
    pub async fn owned_contexts(
        &self,
        caller: &Caller,
        app: Option<&str>,
    ) -> Result<Vec<OwnedContext>, ApiError> {
        let scope = resolve_scope(caller, app)?;
        match self.op(Op::Contexts { scope }).await? {
            Response::OwnedContexts(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    pub async fn chunks(
        &self,
        caller: &Caller,
        owner: Option<&str>,
        id: &str,
    ) -> Result<Vec<ChunkInfo>, ApiError> {
        let owner = resolve_owner(caller, owner)?;
        match self
            .op(Op::Chunks {
                owner,
                id: id.to_string(),
            })
            .await?
        {
            Response::Chunks(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Moves one context (`id`, of `owner`) or every context of `app` out of memory.
    pub async fn evict(
        &self,
        caller: &Caller,
        id: Option<&str>,
        owner: Option<&str>,
        app: Option<&str>,
    ) -> Result<EvictReport, ApiError> {
        let op = match (id, app, owner) {
            (Some(id), None, owner) => Op::Evict {
                owner: resolve_owner(caller, owner)?,
                id: id.to_string(),
            },
            (None, Some(app), None) => Op::EvictScope {
                scope: resolve_scope(caller, Some(app))?,
            },
            // Every context of one owner (the caller's own app by default).
            (None, None, owner) => Op::EvictScope {
                scope: OwnerScope::Owner(resolve_owner(caller, owner)?),
            },
            _ => {
                return Err(ApiError::invalid(
                    "evict takes a context (with an optional owner), an app, or an owner",
                ))
            }
        };
        match self.op(op).await? {
            Response::Evicted(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Admin only: see [`crate::kvstore::KvStore::compact`].
    pub async fn compact(&self, caller: &Caller) -> Result<CompactReport, ApiError> {
        if !caller.admin {
            return Err(denied(
                "compact is an admin verb (root, the daemon's user or the admin group)",
            ));
        }
        match self.op(Op::Compact).await? {
            Response::Compacted(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Deletes a context of another owner the caller may manage.
    pub async fn delete_context_of(
        &self,
        caller: &Caller,
        owner: &str,
        id: &str,
    ) -> Result<(), ApiError> {
        let owner = resolve_owner(caller, Some(owner))?;
        match self
            .op(Op::Delete {
                owner,
                id: id.to_string(),
            })
            .await?
        {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the KV budget in force (the memory watcher under pressure); capped at the
    /// configured budget. Returns the resident KV bytes after eviction.
    pub async fn set_kv_budget(&self, bytes: u64) -> Result<(), ApiError> {
        match self.op(Op::SetBudget { bytes }).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets the configured KV budget (a reloaded configuration); the memory watcher lowers
    /// the budget in force below it under pressure.
    pub async fn set_kv_budget_max(&self, bytes: u64) -> Result<(), ApiError> {
        match self.op(Op::SetBudgetMax { bytes }).await? {
            Response::Ok => {
                self.inner
                    .metrics
                    .kv_budget_max_bytes
                    .store(bytes, Ordering::Relaxed);
                Ok(())
            }
            other => Err(unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsd_ipc::Door;

    fn user(uid: u32, app: &str, admin: bool) -> Caller {
        Caller::user(Door::Socket, uid, uid, None, app)
            .unwrap()
            .with_admin(admin)
    }

    #[test]
    fn owners_parse() {
        assert_eq!(owner_uid("u1000:notes"), Some(1000));
        assert_eq!(owner_uid("http:notes"), None);
        assert_eq!(owner_uid("ux:notes"), None);
        assert_eq!(owner_app("u1000:notes"), "notes");
        assert_eq!(owner_app("http:a:b"), "a:b");
    }

    #[test]
    fn non_admins_reach_only_their_own_uid() {
        let me = user(1000, "cli", false);
        assert_eq!(resolve_owner(&me, None).unwrap(), "u1000:cli");
        assert_eq!(
            resolve_owner(&me, Some("u1000:notes")).unwrap(),
            "u1000:notes"
        );
        for other in ["u0:notes", "u10000:notes", "http:notes"] {
            let e = resolve_owner(&me, Some(other)).unwrap_err();
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{other}");
        }
        assert_eq!(
            resolve_owner(&me, Some("notes")).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(resolve_scope(&me, None).unwrap(), OwnerScope::Uid(1000));
        assert_eq!(
            resolve_scope(&me, Some("notes")).unwrap(),
            OwnerScope::Owner("u1000:notes".into())
        );
        assert_eq!(
            resolve_scope(&me, Some("u0:notes")).unwrap_err().code,
            ErrorCode::PermissionDenied
        );
        let web = Caller::http("web").unwrap();
        assert_eq!(
            resolve_scope(&web, None).unwrap(),
            OwnerScope::Owner("http:web".into())
        );
        assert!(resolve_scope(&web, Some("other")).is_err());
    }

    #[test]
    fn admins_reach_everyone() {
        let root = user(0, "llmsctl", true);
        assert_eq!(resolve_scope(&root, None).unwrap(), OwnerScope::All);
        let by_name = resolve_scope(&root, Some("notes")).unwrap();
        assert!(by_name.matches("u1000:notes") && by_name.matches("http:notes"));
        assert!(!by_name.matches("u1000:notes2"));
        assert_eq!(
            resolve_owner(&root, Some("u1000:notes")).unwrap(),
            "u1000:notes"
        );
        assert!(OwnerScope::Uid(7).matches("u7:x") && !OwnerScope::Uid(7).matches("u70:x"));
    }
}
