//! Who is calling the HTTP door: `Authorization: Bearer <key>` mapped to an app by the
//! owner's key table, or the `anonymous` app when no key is sent (and that is allowed).

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::error::HttpError;
use super::{AppState, HttpOptions};
use crate::service::Caller;

/// The app name of callers without a key.
pub const ANONYMOUS_APP: &str = "anonymous";

/// The key table, checked without early exit on the first differing byte.
pub struct Keys {
    keys: Vec<(Vec<u8>, Caller)>,
    anonymous: Option<Caller>,
}

impl Keys {
    pub fn new(opts: &HttpOptions) -> Self {
        let mut keys = Vec::with_capacity(opts.api_keys.len());
        for (key, app) in &opts.api_keys {
            match Caller::http(app) {
                Ok(c) if !key.is_empty() => keys.push((key.as_bytes().to_vec(), c)),
                Ok(_) => tracing::warn!(app, "ignoring an empty API key"),
                Err(e) => tracing::warn!(app, error = %e, "ignoring an API key: bad app name"),
            }
        }
        let anonymous = if opts.allow_anonymous {
            Caller::http(ANONYMOUS_APP).ok()
        } else {
            None
        };
        Self { keys, anonymous }
    }

    /// The caller a request's headers identify.
    ///
    /// With no key table at all, a key means nothing: clients that must send one (the
    /// `openai` package does) are the anonymous app, if anonymous access is allowed.
    pub fn identify(&self, headers: &HeaderMap) -> Result<Caller, HttpError> {
        let key = match headers.get(AUTHORIZATION) {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| bad_key())?.trim();
                let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
                if !scheme.eq_ignore_ascii_case("bearer") {
                    return Err(HttpError::unauthorized(
                        "invalid_api_key",
                        "the Authorization header must be `Bearer <key>`",
                    ));
                }
                Some(rest.trim()).filter(|k| !k.is_empty())
            }
        };
        match key {
            Some(k) if !self.keys.is_empty() => {
                let mut found = None;
                for (known, caller) in &self.keys {
                    if ct_eq(known, k.as_bytes()) {
                        found = Some(caller);
                    }
                }
                found.cloned().ok_or_else(bad_key)
            }
            _ => self.anonymous.clone().ok_or_else(|| {
                HttpError::unauthorized(
                    "missing_api_key",
                    "an API key is required: send `Authorization: Bearer <key>`",
                )
            }),
        }
    }
}

fn bad_key() -> HttpError {
    HttpError::unauthorized("invalid_api_key", "incorrect API key provided")
}

/// Equality whose time does not depend on where two equally long keys differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The identified caller of a request (401 before the body is read when the key is bad).
pub struct AppCaller(pub Caller);

impl FromRequestParts<AppState> for AppCaller {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        state.keys.identify(&parts.headers).map(AppCaller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    #[test]
    fn keys_map_to_apps() {
        let mut opts = HttpOptions::default();
        opts.api_keys.insert("k1".into(), "notes".into());
        opts.api_keys.insert("k2".into(), "bad/app".into());
        let keys = Keys::new(&opts);
        assert_eq!(
            keys.identify(&headers(Some("Bearer k1"))).unwrap().app,
            "notes"
        );
        assert_eq!(
            keys.identify(&headers(Some("bearer  k1 "))).unwrap().app,
            "notes"
        );
        let e = keys.identify(&headers(Some("Bearer k2"))).unwrap_err();
        assert_eq!(e.status, 401);
        assert_eq!(e.code.as_deref(), Some("invalid_api_key"));
        assert!(keys.identify(&headers(Some("Basic abc"))).is_err());
        assert_eq!(keys.identify(&headers(None)).unwrap().app, ANONYMOUS_APP);
        assert_eq!(
            keys.identify(&headers(Some("Bearer "))).unwrap().app,
            ANONYMOUS_APP
        );
    }

    #[test]
    fn anonymous_can_be_refused() {
        let opts = HttpOptions {
            allow_anonymous: false,
            ..HttpOptions::default()
        };
        let keys = Keys::new(&opts);
        let e = keys.identify(&headers(None)).unwrap_err();
        assert_eq!(e.status, 401);
        assert_eq!(e.code.as_deref(), Some("missing_api_key"));
        // Without a key table any key is anonymous, which is refused here too.
        assert!(keys.identify(&headers(Some("Bearer x"))).is_err());
        let open = Keys::new(&HttpOptions::default());
        assert_eq!(
            open.identify(&headers(Some("Bearer sk-anything")))
                .unwrap()
                .app,
            ANONYMOUS_APP
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
