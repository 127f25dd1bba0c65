//! Who is calling: the identity a door establishes (peer credentials, bus credentials or an
//! API key) and the app name the caller claims, scoped so that apps of different users (or
//! of the HTTP door) can never name each other's contexts.

use llmsd_ipc::ApiError;

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
}

impl Caller {
    /// A local process claiming `app`.
    pub fn user(uid: u32, gid: u32, pid: Option<u32>, app: &str) -> Result<Self, ApiError> {
        validate_app(app)?;
        Ok(Self {
            principal: Principal::User { uid, gid, pid },
            app: app.to_string(),
        })
    }

    /// An HTTP caller whose key maps to `app` (or the anonymous app).
    pub fn http(app: &str) -> Result<Self, ApiError> {
        validate_app(app)?;
        Ok(Self {
            principal: Principal::ApiKey,
            app: app.to_string(),
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

    #[test]
    fn owners_are_scoped_by_user_and_door() {
        let a = Caller::user(1000, 1000, Some(5), "notes").unwrap();
        let b = Caller::user(1001, 1001, None, "notes").unwrap();
        let h = Caller::http("notes").unwrap();
        assert_eq!(a.owner(), "u1000:notes");
        assert_ne!(a.owner(), b.owner());
        assert_ne!(a.owner(), h.owner());
    }

    #[test]
    fn bad_app_names_are_refused() {
        for bad in ["", "a/b", "x y", "ü", &"a".repeat(MAX_APP_NAME + 1), "..\n"] {
            assert!(Caller::user(0, 0, None, bad).is_err(), "{bad:?}");
        }
        assert!(Caller::http("my-app_2.0").is_ok());
    }
}
