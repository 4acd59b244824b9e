//! The `func_curl` side channel: the dialplan registers a call's context over HTTP with
//! `CURL()` before `AudioSocket()`, and asks for the outcome after it returns.
//!
//! Routes (served by the admin server, see [`router`]):
//! - `POST /calls/{uuid}/context`: form data as `CURL(url,postdata)` sends it
//!   (`caller_number`, `caller_name`, `did`, `channel`, `profile`, `var_NAME`), or the same
//!   keys as a JSON object. 204 on success.
//! - `GET /calls/{uuid}/outcome`: `result=transfer&destination=201&reason=&whisper=`
//!   (form encoding, for `CURLOPT(hashcompat)` and `HASH()`); 404 with `result=unknown`
//!   before the daemon decided.
//! - `GET /calls/{uuid}/outcome/{field}`: one bare value (`result`, `destination`,
//!   `reason` or `whisper`), the simplest thing for `Set(X=${CURL(...)})`.
//!
//! These routes carry caller data and steer calls, so when the admin server has a bearer
//! token (`admin.token_env`) every request must carry `Authorization: Bearer <token>`;
//! without a token the daemon only starts on a loopback admin address.
//!
//! Entries live in a bounded in-memory [`CallRegistry`] and expire: a registration the
//! daemon never used after [`CONTEXT_TTL`], an outcome after [`OUTCOME_TTL`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use crate::call::context::{CallContext, CallControl, CallOutcome, ContextSource};
use crate::ops::config::Secret;

/// How long an unused registration is kept.
pub const CONTEXT_TTL: Duration = Duration::from_secs(120);
/// How long an outcome is kept for the dialplan to read.
pub const OUTCOME_TTL: Duration = Duration::from_secs(300);
/// How long [`HttpControl`] waits for a registration that is not there yet (the `CURL()`
/// and `AudioSocket()` connections race).
pub const REGISTRATION_WAIT: Duration = Duration::from_millis(200);
/// Registrations and outcomes kept at most, each.
pub const MAX_ENTRIES: usize = 10_000;
/// Largest accepted registration body.
pub const MAX_BODY: usize = 16 * 1024;
const MAX_VALUE: usize = 512;
const MAX_VARS: usize = 64;

/// Registrations and outcomes by call UUID, with expiry. The clock is passed in, so
/// expiry is tested without waiting.
#[derive(Debug, Default)]
pub struct Entries {
    contexts: HashMap<Uuid, (CallContext, Instant)>,
    outcomes: HashMap<Uuid, (CallOutcome, Instant)>,
}

/// The registry is full of live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many registered calls")]
pub struct Full;

impl Entries {
    /// Stores a call's context (replacing an earlier one).
    pub fn register(&mut self, id: Uuid, ctx: CallContext, now: Instant) -> Result<(), Full> {
        if self.contexts.len() >= MAX_ENTRIES && !self.contexts.contains_key(&id) {
            self.expire(now);
            if self.contexts.len() >= MAX_ENTRIES {
                return Err(Full);
            }
        }
        self.contexts.insert(id, (ctx, now));
        Ok(())
    }

    /// A registered context that has not expired.
    pub fn context(&self, id: Uuid, now: Instant) -> Option<CallContext> {
        self.contexts
            .get(&id)
            .filter(|(_, at)| now.saturating_duration_since(*at) < CONTEXT_TTL)
            .map(|(c, _)| c.clone())
    }

    /// Stores a call's outcome; the oldest outcome makes room when full.
    pub fn decide(&mut self, id: Uuid, outcome: CallOutcome, now: Instant) {
        self.contexts.remove(&id);
        if self.outcomes.len() >= MAX_ENTRIES {
            self.expire(now);
            if self.outcomes.len() >= MAX_ENTRIES {
                if let Some(oldest) = self
                    .outcomes
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| *k)
                {
                    self.outcomes.remove(&oldest);
                }
            }
        }
        self.outcomes.insert(id, (outcome, now));
    }

    /// The outcome, if decided and not expired.
    pub fn outcome(&self, id: Uuid, now: Instant) -> Option<CallOutcome> {
        self.outcomes
            .get(&id)
            .filter(|(_, at)| now.saturating_duration_since(*at) < OUTCOME_TTL)
            .map(|(o, _)| o.clone())
    }

    /// Drops expired entries.
    pub fn expire(&mut self, now: Instant) {
        self.contexts
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < CONTEXT_TTL);
        self.outcomes
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < OUTCOME_TTL);
    }

    /// (registrations, outcomes) held.
    pub fn len(&self) -> (usize, usize) {
        (self.contexts.len(), self.outcomes.len())
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.contexts.is_empty() && self.outcomes.is_empty()
    }
}

/// The shared registry the admin routes write and the calls read.
#[derive(Debug, Default)]
pub struct CallRegistry {
    entries: Mutex<Entries>,
    arrived: Notify,
    /// Whether any registration ever arrived: a PBX that does not use `CURL()` must not
    /// make every call wait for one.
    used: std::sync::atomic::AtomicBool,
}

impl CallRegistry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a call's context and wakes a call waiting for it.
    pub fn register(&self, id: Uuid, ctx: CallContext) -> Result<(), Full> {
        self.lock().register(id, ctx, Instant::now())?;
        self.used.store(true, std::sync::atomic::Ordering::SeqCst);
        self.arrived.notify_waiters();
        Ok(())
    }

    /// Whether the dialplan registers calls here at all (any registration so far).
    pub fn in_use(&self) -> bool {
        self.used.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The registered context now, if any.
    pub fn context_now(&self, id: Uuid) -> Option<CallContext> {
        self.lock().context(id, Instant::now())
    }

    /// The registered context, waiting up to `wait` for it to arrive; no wait at all while
    /// nothing was ever registered (the PBX does not use `CURL()`).
    pub async fn wait_context(&self, id: Uuid, wait: Duration) -> Option<CallContext> {
        if !self.in_use() {
            return None;
        }
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.context_now(id) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.context_now(id);
            }
        }
    }

    /// Stores the outcome for the dialplan to read.
    pub fn decide(&self, id: Uuid, outcome: CallOutcome) {
        self.lock().decide(id, outcome, Instant::now());
    }

    /// The outcome, if decided.
    pub fn outcome(&self, id: Uuid) -> Option<CallOutcome> {
        self.lock().outcome(id, Instant::now())
    }
}

/// [`CallControl`] from the HTTP registry alone.
#[derive(Debug, Clone)]
pub struct HttpControl {
    registry: Arc<CallRegistry>,
}

impl HttpControl {
    /// A control over this registry.
    pub fn new(registry: Arc<CallRegistry>) -> Self {
        Self { registry }
    }
}

impl CallControl for HttpControl {
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext> {
        Box::pin(async move {
            self.registry
                .wait_context(call_id, REGISTRATION_WAIT)
                .await
                .unwrap_or_default()
        })
    }

    fn decide(&self, call_id: Uuid, outcome: CallOutcome) -> BoxFuture<'_, ()> {
        self.registry.decide(call_id, outcome);
        Box::pin(async {})
    }
}

/// The form `GET /calls/{uuid}/outcome` returns.
pub fn outcome_form(call_id: Uuid, outcome: &CallOutcome) -> String {
    let vars = crate::pbx::ami::control::outcome_vars(call_id, outcome);
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    use crate::pbx::ami::control::{DESTINATION_VAR, REASON_VAR, RESULT_VAR, WHISPER_VAR};
    format!(
        "result={}&destination={}&reason={}&whisper={}",
        form_encode(get(RESULT_VAR)),
        form_encode(get(DESTINATION_VAR)),
        form_encode(get(REASON_VAR)),
        form_encode(get(WHISPER_VAR)),
    )
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why a registration body was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    /// Not form data or a JSON object of strings.
    #[error("the body is neither form data nor a JSON object: {0}")]
    Body(String),
    /// A field is not one the daemon knows.
    #[error(
        "unknown field {0:?} (known: caller_number, caller_name, did, channel, profile, var_NAME)"
    )]
    UnknownField(String),
    /// A value or the number of variables is over its limit.
    #[error("{0}")]
    TooLarge(String),
}

/// Reads a registration: form data (what `CURL()` posts, whatever `Content-Type` it says)
/// or a JSON object.
pub fn parse_registration(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<CallContext, RegistrationError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"))
        || body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let pairs: Vec<(String, String)> = if json {
        let map: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(body).map_err(|e| RegistrationError::Body(e.to_string()))?;
        map.into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect()
    } else {
        serde_urlencoded::from_bytes(body).map_err(|e| RegistrationError::Body(e.to_string()))?
    };
    let mut ctx = CallContext {
        source: ContextSource::Http,
        ..CallContext::default()
    };
    for (k, v) in pairs {
        if v.len() > MAX_VALUE {
            return Err(RegistrationError::TooLarge(format!(
                "{k} is longer than {MAX_VALUE} bytes"
            )));
        }
        let v = v.trim().to_owned();
        let value = (!v.is_empty()).then_some(v.clone());
        match k.as_str() {
            "caller_number" => ctx.caller_number = value,
            "caller_name" => ctx.caller_name = value,
            "did" => ctx.did = value,
            "channel" => ctx.channel = value,
            "profile" => ctx.profile = value,
            _ => match k.strip_prefix("var_") {
                Some(name)
                    if !name.is_empty()
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                {
                    if ctx.vars.len() >= MAX_VARS {
                        return Err(RegistrationError::TooLarge(format!(
                            "more than {MAX_VARS} var_ fields"
                        )));
                    }
                    ctx.vars.insert(name.to_ascii_lowercase(), v);
                }
                _ => return Err(RegistrationError::UnknownField(k)),
            },
        }
    }
    Ok(ctx)
}

/// What the `/calls` routes need.
#[derive(Debug, Clone)]
pub struct CallRoutes {
    /// Where registrations go and outcomes come from.
    pub registry: Arc<CallRegistry>,
    /// The bearer token every request must carry, if set.
    pub token: Secret,
}

/// The `/calls` routes, to merge into the admin router.
pub fn router<S>(routes: CallRoutes) -> Router<S> {
    Router::new()
        .route("/calls/{uuid}/context", post(register))
        .route("/calls/{uuid}/outcome", get(outcome))
        .route("/calls/{uuid}/outcome/{field}", get(outcome_field))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(routes)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

/// `Err` with the response when the request lacks the token.
#[allow(clippy::result_large_err)]
fn authorize(routes: &CallRoutes, headers: &HeaderMap) -> Result<(), Response> {
    let Some(expected) = routes.token.expose() else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is required\n",
        )
            .into_response()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[allow(clippy::result_large_err)]
fn call_id(raw: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(raw.trim())
        .map_err(|_| text(StatusCode::BAD_REQUEST, format!("{raw:?} is not a UUID\n")))
}

async fn register(
    State(routes): State<CallRoutes>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = authorize(&routes, &headers) {
        return r;
    }
    let id = match call_id(&uuid) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let ctx = match parse_registration(&headers, &body) {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match routes.registry.register(id, ctx) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(Full) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many registered calls\n",
        ),
    }
}

async fn outcome(
    State(routes): State<CallRoutes>,
    Path(uuid): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&routes, &headers) {
        return r;
    }
    let id = match call_id(&uuid) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match routes.registry.outcome(id) {
        Some(o) => text(StatusCode::OK, outcome_form(id, &o)),
        None => text(StatusCode::NOT_FOUND, "result=unknown"),
    }
}

async fn outcome_field(
    State(routes): State<CallRoutes>,
    Path((uuid, field)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = authorize(&routes, &headers) {
        return r;
    }
    let id = match call_id(&uuid) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let name = match field.as_str() {
        "result" => crate::pbx::ami::control::RESULT_VAR,
        "destination" => crate::pbx::ami::control::DESTINATION_VAR,
        "reason" => crate::pbx::ami::control::REASON_VAR,
        "whisper" => crate::pbx::ami::control::WHISPER_VAR,
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                "fields: result, destination, reason, whisper\n",
            );
        }
    };
    match routes.registry.outcome(id) {
        Some(o) => {
            let vars = crate::pbx::ami::control::outcome_vars(id, &o);
            let v = vars
                .into_iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v)
                .unwrap_or_default();
            text(StatusCode::OK, v)
        }
        None if field == "result" => text(StatusCode::NOT_FOUND, "unknown"),
        None => text(StatusCode::NOT_FOUND, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_and_json_registrations() {
        let h = HeaderMap::new();
        let c = parse_registration(
            &h,
            b"caller_number=%2B60312345678&caller_name=Ali+Baba&did=0380001234&profile=&var_Account=A-17",
        )
        .unwrap();
        assert_eq!(c.caller_number.as_deref(), Some("+60312345678"));
        assert_eq!(c.caller_name.as_deref(), Some("Ali Baba"));
        assert_eq!(c.profile, None);
        assert_eq!(c.vars.get("account").map(String::as_str), Some("A-17"));
        assert_eq!(c.source, ContextSource::Http);
        let j = parse_registration(&h, br#"{"did":"123","var_x":"1","caller_name":null}"#).unwrap();
        assert_eq!(j.did.as_deref(), Some("123"));
        assert_eq!(j.vars.get("x").map(String::as_str), Some("1"));
        assert!(matches!(
            parse_registration(&h, b"colour=blue"),
            Err(RegistrationError::UnknownField(_))
        ));
        assert!(matches!(
            parse_registration(&h, b"var_a%20b=1"),
            Err(RegistrationError::UnknownField(_))
        ));
    }

    #[test]
    fn entries_expire() {
        let t0 = Instant::now();
        let mut e = Entries::default();
        let id = Uuid::new_v4();
        e.register(id, CallContext::default(), t0).unwrap();
        assert!(e.context(id, t0 + CONTEXT_TTL / 2).is_some());
        assert!(e.context(id, t0 + CONTEXT_TTL).is_none());
        e.decide(id, CallOutcome::Completed, t0);
        assert_eq!(e.len(), (0, 1), "deciding drops the registration");
        assert!(e.outcome(id, t0 + OUTCOME_TTL / 2).is_some());
        e.expire(t0 + OUTCOME_TTL);
        assert!(e.is_empty());
    }

    #[test]
    fn registrations_are_bounded() {
        let t0 = Instant::now();
        let mut e = Entries::default();
        for _ in 0..MAX_ENTRIES {
            e.register(Uuid::new_v4(), CallContext::default(), t0)
                .unwrap();
        }
        assert_eq!(
            e.register(Uuid::new_v4(), CallContext::default(), t0),
            Err(Full)
        );
        // Once the old ones expire there is room again.
        assert!(
            e.register(Uuid::new_v4(), CallContext::default(), t0 + CONTEXT_TTL)
                .is_ok()
        );
        assert_eq!(e.len().0, 1);
    }

    #[test]
    fn outcome_form_is_hash_friendly() {
        let id = Uuid::new_v4();
        let f = outcome_form(
            id,
            &CallOutcome::Fallback {
                reason: "provider failures".into(),
                destination: "queue-support".into(),
            },
        );
        assert_eq!(
            f,
            "result=fallback&destination=queue-support&reason=provider%20failures&whisper="
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_registration_is_waited_for() {
        let reg = CallRegistry::new();
        // Before any registration nobody waits: a PBX without CURL() costs calls nothing.
        let before = Instant::now();
        assert!(
            reg.wait_context(Uuid::new_v4(), REGISTRATION_WAIT)
                .await
                .is_none()
        );
        assert_eq!(Instant::now(), before);
        reg.register(Uuid::new_v4(), CallContext::default())
            .unwrap();
        let id = Uuid::new_v4();
        let r2 = Arc::clone(&reg);
        let waiter = tokio::spawn(async move { r2.wait_context(id, REGISTRATION_WAIT).await });
        tokio::time::sleep(REGISTRATION_WAIT / 2).await;
        reg.register(
            id,
            CallContext {
                did: Some("1".into()),
                ..CallContext::default()
            },
        )
        .unwrap();
        assert_eq!(waiter.await.unwrap().unwrap().did.as_deref(), Some("1"));
        // Nobody registers: the wait ends empty at the deadline.
        assert!(
            reg.wait_context(Uuid::new_v4(), REGISTRATION_WAIT)
                .await
                .is_none()
        );
    }
}
