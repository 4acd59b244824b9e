//! Who may see the console: the call history holds callers' numbers and what they said, so
//! it is never open to a network without the admin token.
//!
//! - A token is set: every console page and API call needs it, as `Authorization: Bearer
//!   TOKEN` (scripts) or the `sifucall_admin` cookie that the `/console/login` form sets
//!   (browsers; HttpOnly, SameSite=Strict, so another site cannot use it).
//! - No token and the admin server listens on loopback only: open (an SSH tunnel is the
//!   way in).
//! - No token and it listens beyond loopback: refused, saying how to set one.

use std::sync::Arc;

use axum::http::{HeaderMap, header};

/// The cookie that carries the token for a browser.
pub(super) const COOKIE: &str = "sifucall_admin";

/// The console's access rule.
#[derive(Clone, Default)]
pub struct Access {
    token: Option<Arc<str>>,
    beyond_loopback: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("beyond_loopback", &self.beyond_loopback)
            .finish()
    }
}

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No token or the wrong one.
    NeedToken,
    /// The admin server is reachable from the network and no token is set.
    NoTokenConfigured,
}

impl Access {
    /// `token` (empty counts as none), for an admin server that listens on `listen`.
    pub fn new(token: Option<&str>, listen: std::net::SocketAddr) -> Self {
        Self {
            token: token
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(Arc::from),
            beyond_loopback: !listen.ip().is_loopback(),
        }
    }

    /// Open to anyone who can reach the port (tests, loopback without a token).
    pub fn open() -> Self {
        Self::default()
    }

    /// Whether a token is required.
    pub fn needs_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether a request with these headers may look.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            return if self.beyond_loopback {
                Err(Denied::NoTokenConfigured)
            } else {
                Ok(())
            };
        };
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "));
        let cookies = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='));
        if bearer
            .chain(cookies)
            .any(|given| same(given.trim().as_bytes(), token.as_bytes()))
        {
            Ok(())
        } else {
            Err(Denied::NeedToken)
        }
    }

    /// Whether `given` is the token (for the login form).
    pub fn accepts(&self, given: &str) -> bool {
        self.token
            .as_ref()
            .is_some_and(|t| same(given.trim().as_bytes(), t.as_bytes()))
    }
}

/// Compares without stopping at the first difference, so the time taken says nothing about
/// how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(name: header::HeaderName, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn loopback_without_token_is_open_and_beyond_it_is_refused() {
        let lo = Access::new(None, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(lo.check(&HeaderMap::new()), Ok(()));
        let any = Access::new(Some("  "), "0.0.0.0:9090".parse().unwrap());
        assert_eq!(any.check(&HeaderMap::new()), Err(Denied::NoTokenConfigured));
    }

    #[test]
    fn a_token_is_required_by_header_or_cookie() {
        let a = Access::new(Some("s3cret"), "0.0.0.0:9090".parse().unwrap());
        assert_eq!(a.check(&HeaderMap::new()), Err(Denied::NeedToken));
        assert_eq!(
            a.check(&headers(header::AUTHORIZATION, "Bearer s3cret")),
            Ok(())
        );
        assert_eq!(
            a.check(&headers(header::AUTHORIZATION, "Bearer s3cre")),
            Err(Denied::NeedToken)
        );
        assert_eq!(
            a.check(&headers(header::COOKIE, "x=1; sifucall_admin=s3cret")),
            Ok(())
        );
        assert_eq!(
            a.check(&headers(header::COOKIE, "sifucall_admin=nope")),
            Err(Denied::NeedToken)
        );
        // On loopback too, once a token is set.
        let lo = Access::new(Some("s3cret"), "127.0.0.1:9090".parse().unwrap());
        assert_eq!(lo.check(&HeaderMap::new()), Err(Denied::NeedToken));
        assert!(lo.accepts("s3cret") && !lo.accepts("s3cret2"));
    }
}
