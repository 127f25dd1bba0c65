//! Who is calling: the identity a door establishes (peer credentials, bus credentials or an
//! API key) and the app name the caller claims, scoped so that apps of different users (or
//! of the HTTP door) can never name each other's contexts.

use llmsd_ipc::{ApiError, Door};

/// Longest app name a caller may claim.
pub const MAX_APP_NAME: usize = 48;

/// How the caller was identified.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A local process: uid/gid from SO_PEERCRED or the bus's GetConnectionCredentials.
    User {
        uid: u32,
        gid: u32,
        pid: Option<u32>,
    },
    /// The HTTP door: an API key the owner mapped to an app, or none (`anonymous`).
    ApiKey,
}

/// A caller as every method of the service sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Caller {
    pub principal: Principal,
    pub app: String,
    /// The door the call came through.
    pub door: Door,
    /// May use admin verbs (root, the daemon's own uid, or the configured admin group; never
    /// an HTTP caller).
    pub admin: bool,
}

impl Caller {
    /// A local process claiming `app`, through the socket or D-Bus door. Not an admin until
    /// [`Self::with_admin`] says so.
    pub fn user(
        door: Door,
        uid: u32,
        gid: u32,
        pid: Option<u32>,
        app: &str,
    ) -> Result<Self, ApiError> {
        validate_app(app)?;
        Ok(Self {
            principal: Principal::User { uid, gid, pid },
            app: app.to_string(),
            door,
            admin: false,
        })
    }

    pub fn with_admin(mut self, admin: bool) -> Self {
        self.admin = admin;
        self
    }

    /// An HTTP caller whose key maps to `app` (or the anonymous app).
    pub fn http(app: &str) -> Result<Self, ApiError> {
        validate_app(app)?;
        Ok(Self {
            principal: Principal::ApiKey,
            app: app.to_string(),
            door: Door::Http,
            admin: false,
        })
    }

    /// The owner key under which the KV store keeps this caller's contexts.
    pub fn owner(&self) -> String {
        match self.principal {
            Principal::User { uid, .. } => format!("u{uid}:{}", self.app),
            Principal::ApiKey => format!("http:{}", self.app),
        }
    }

    pub fn uid(&self) -> Option<u32> {
        match self.principal {
            Principal::User { uid, .. } => Some(uid),
            Principal::ApiKey => None,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.owner())
    }
}

/// Who may use admin verbs: root, the uid the daemon runs as (its owner), and members of
/// the configured admin group (by primary gid or by the group's member list, resolved when
/// the configuration is loaded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdminPolicy {
    pub daemon_uid: u32,
    pub admin_gid: Option<u32>,
    pub member_uids: Vec<u32>,
}

impl AdminPolicy {
    pub fn is_admin(&self, uid: u32, gid: u32) -> bool {
        uid == 0
            || uid == self.daemon_uid
            || self.admin_gid == Some(gid)
            || self.member_uids.contains(&uid)
    }
}

/// App names are short identifiers: letters, digits, `.`, `_`, `-`.
pub fn validate_app(app: &str) -> Result<(), ApiError> {
    let ok = !app.is_empty()
        && app.len() <= MAX_APP_NAME
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "app name must be 1-{MAX_APP_NAME} characters of [A-Za-z0-9._-], got {app:?}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmsd_ipc::Door;

    #[test]
    fn owners_are_scoped_by_user_and_door() {
        let a = Caller::user(Door::Socket, 1000, 1000, Some(5), "notes").unwrap();
        let b = Caller::user(Door::Dbus, 1001, 1001, None, "notes").unwrap();
        let h = Caller::http("notes").unwrap();
        assert_eq!(a.owner(), "u1000:notes");
        assert_ne!(a.owner(), b.owner());
        assert_ne!(a.owner(), h.owner());
    }

    #[test]
    fn admins_are_root_the_daemon_uid_and_the_admin_group() {
        let p = AdminPolicy {
            daemon_uid: 990,
            admin_gid: Some(50),
            member_uids: vec![1002],
        };
        assert!(p.is_admin(0, 0));
        assert!(p.is_admin(990, 990));
        assert!(p.is_admin(1001, 50), "primary group");
        assert!(p.is_admin(1002, 1002), "listed member");
        assert!(!p.is_admin(1003, 1003));
        let none = AdminPolicy {
            daemon_uid: 990,
            ..AdminPolicy::default()
        };
        assert!(!none.is_admin(1001, 50));
    }

    #[test]
    fn bad_app_names_are_refused() {
        for bad in ["", "a/b", "x y", "ü", &"a".repeat(MAX_APP_NAME + 1), "..\n"] {
            assert!(
                Caller::user(Door::Socket, 0, 0, None, bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(Caller::http("my-app_2.0").is_ok());
    }
}
