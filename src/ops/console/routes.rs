//! The console's routes: pages under `/console`, JSON under `/api`.

use std::collections::HashMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde_json::json;
use uuid::Uuid;

use super::auth::{COOKIE, Denied};
use super::{CallFilter, Console, pages, time_range};

/// Content-Security-Policy of every page: only this origin, inline styles and the inline
/// live script, no frames.
const CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; \
                   img-src 'self' data:; media-src 'self'; frame-ancestors 'none'; form-action 'self'";

/// The console's routes (merge them into the admin router).
pub fn router(console: Console) -> Router {
    Router::new()
        .route("/console", get(live_page))
        .route("/console/", get(live_page))
        .route("/console/calls", get(history_page))
        .route("/console/calls/{id}", get(call_page))
        .route("/console/login", get(login_page).post(login))
        .route("/api/live", get(live_json))
        .route("/api/calls", get(calls_json))
        .route("/api/calls/{id}", get(call_json))
        .route("/api/calls/{id}/recording", get(recording))
        .route("/api/totals", get(totals_json))
        .with_state(console)
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

fn json_error(status: StatusCode, error: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(json!({ "error": error })),
    )
        .into_response()
}

const NO_TOKEN: &str = "the console is off: the admin server listens beyond loopback and no admin token is set \
                        (set SIFUCALL_ADMIN_TOKEN, or listen on 127.0.0.1 and use an SSH tunnel)";

/// A page request that may not look: the login form, or why the console is off.
fn page_guard(c: &Console, headers: &HeaderMap) -> Option<Response> {
    match c.access.check(headers) {
        Ok(()) => None,
        Err(Denied::NeedToken) => Some(
            (
                StatusCode::SEE_OTHER,
                [(header::LOCATION, HeaderValue::from_static("/console/login"))],
            )
                .into_response(),
        ),
        Err(Denied::NoTokenConfigured) => Some(html(
            StatusCode::FORBIDDEN,
            pages::message("Console off", NO_TOKEN),
        )),
    }
}

/// An API request that may not look.
fn api_guard(c: &Console, headers: &HeaderMap) -> Option<Response> {
    match c.access.check(headers) {
        Ok(()) => None,
        Err(Denied::NeedToken) => {
            let mut r = json_error(StatusCode::UNAUTHORIZED, "admin token required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sifucall\""),
            );
            Some(r)
        }
        Err(Denied::NoTokenConfigured) => Some(json_error(StatusCode::FORBIDDEN, NO_TOKEN)),
    }
}

fn filter_of(q: &HashMap<String, String>) -> CallFilter {
    let get = |k: &str| {
        q.get(k)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    // Times compare as RFC 3339 text: `2026-12-01 09:30Z` means `2026-12-01T09:30`.
    let time = |k: &str| get(k).map(|v| v.trim_end_matches('Z').replacen(' ', "T", 1));
    CallFilter {
        from: time("from"),
        to: time("to"),
        caller: get("caller"),
        did: get("did"),
        profile: get("profile"),
        outcome: get("outcome"),
        limit: get("limit").and_then(|l| l.parse().ok()),
    }
}

/// Days of totals shown when the filter names no start.
const TOTALS_DAYS: u64 = 31;

/// The totals' filter: the list's, starting [`TOTALS_DAYS`] ago unless it says otherwise.
fn totals_filter(f: &CallFilter) -> CallFilter {
    let mut f = f.clone();
    if f.from.is_none() {
        let start = std::time::SystemTime::now()
            .checked_sub(std::time::Duration::from_secs((TOTALS_DAYS - 1) * 86_400))
            .unwrap_or(std::time::UNIX_EPOCH);
        f.from = Some(crate::ops::records::rfc3339_utc(start)[..10].to_owned());
    }
    f
}

/// Calls the shared history has open under another daemon's name (with PostgreSQL: the
/// calls in progress elsewhere); none when the history is this daemon's own.
async fn other_nodes(c: &Console) -> Vec<super::CallRow> {
    let open = CallFilter {
        outcome: Some("open".into()),
        limit: Some(100),
        ..CallFilter::default()
    };
    match c.history.list(open).await {
        Ok(rows) => rows
            .into_iter()
            .filter(|r| r.node.as_deref().is_some_and(|n| n != c.node_id))
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "console: open calls of other daemons unavailable");
            Vec::new()
        }
    }
}

async fn live_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(r) = page_guard(&c, &headers) {
        return r;
    }
    let others = other_nodes(&c).await;
    html(StatusCode::OK, pages::live(&c.live.snapshot(), &others))
}

async fn live_json(State(c): State<Console>, headers: HeaderMap) -> Response {
    if let Some(r) = api_guard(&c, &headers) {
        return r;
    }
    let calls = c.live.snapshot();
    let others = other_nodes(&c).await;
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(json!({ "node_id": c.node_id, "calls": calls, "other_nodes": others })),
    )
        .into_response()
}

async fn history_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = page_guard(&c, &headers) {
        return r;
    }
    let filter = filter_of(&q);
    if let Err(e) = time_range(&filter) {
        return html(StatusCode::BAD_REQUEST, pages::message("Bad filter", &e));
    }
    let calls = c.history.list(filter.clone()).await;
    let totals = c.history.daily_totals(totals_filter(&filter)).await;
    match (calls, totals) {
        (Ok(calls), Ok(totals)) => html(
            StatusCode::OK,
            pages::history(&filter, &calls, &totals, &c.history.describe()),
        ),
        (Err(e), _) | (_, Err(e)) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message("History unavailable", &e.to_string()),
        ),
    }
}

async fn calls_json(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = api_guard(&c, &headers) {
        return r;
    }
    let filter = filter_of(&q);
    if let Err(e) = time_range(&filter) {
        return json_error(StatusCode::BAD_REQUEST, &e);
    }
    match c.history.list(filter).await {
        Ok(calls) => Json(json!({ "calls": calls })).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn totals_json(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = api_guard(&c, &headers) {
        return r;
    }
    let filter = filter_of(&q);
    if let Err(e) = time_range(&filter) {
        return json_error(StatusCode::BAD_REQUEST, &e);
    }
    match c.history.daily_totals(totals_filter(&filter)).await {
        Ok(days) => Json(json!({ "days": days })).into_response(),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn call_page(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = page_guard(&c, &headers) {
        return r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return html(
            StatusCode::NOT_FOUND,
            pages::message("No such call", "That is not a call id."),
        );
    };
    match c.history.call(id).await {
        Ok(Some(d)) => html(StatusCode::OK, pages::call(&d)),
        Ok(None) => html(
            StatusCode::NOT_FOUND,
            pages::message(
                "No such call",
                &format!("No finished call {id} in the history."),
            ),
        ),
        Err(e) => html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message("History unavailable", &e.to_string()),
        ),
    }
}

async fn call_json(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = api_guard(&c, &headers) {
        return r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return json_error(StatusCode::NOT_FOUND, "not a call id");
    };
    match c.history.call(id).await {
        Ok(Some(d)) => Json(d).into_response(),
        Ok(None) => json_error(StatusCode::NOT_FOUND, "no such call"),
        Err(e) => json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// The recording's path comes from the record, never from the request.
async fn recording(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = api_guard(&c, &headers) {
        return r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return json_error(StatusCode::NOT_FOUND, "not a call id");
    };
    let path = match c.history.call(id).await {
        Ok(Some(d)) => d.recording,
        Ok(None) => None,
        Err(e) => return json_error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let Some(path) = path else {
        return json_error(StatusCode::NOT_FOUND, "this call has no recording");
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("audio/wav")),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(call_id = %id, path = %path, error = %e, "console: recording unreadable");
            json_error(StatusCode::NOT_FOUND, "the recording is gone (retention?)")
        }
    }
}

async fn login_page(State(c): State<Console>) -> Response {
    if !c.access.needs_token() {
        return (
            StatusCode::SEE_OTHER,
            [(header::LOCATION, HeaderValue::from_static("/console"))],
        )
            .into_response();
    }
    html(StatusCode::OK, pages::login(false))
}

/// `POST /console/login` with `token=...` (a form): sets the cookie and goes to the console.
async fn login(State(c): State<Console>, body: String) -> Response {
    let given = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| form_decode(v))
        .unwrap_or_default();
    if !c.access.accepts(&given) {
        return html(StatusCode::UNAUTHORIZED, pages::login(true));
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        given.trim()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, v),
                (header::LOCATION, HeaderValue::from_static("/console")),
            ],
        )
            .into_response(),
        Err(_) => html(
            StatusCode::BAD_REQUEST,
            pages::message(
                "Token unusable in a browser",
                "The admin token holds characters a cookie cannot carry; use letters, digits, '-' and '_' \
                 (scripts can still send it as a Bearer header).",
            ),
        ),
    }
}

/// Decodes `application/x-www-form-urlencoded` text (`+` is a space, `%XX` a byte).
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::form_decode;

    #[test]
    fn form_values_are_decoded() {
        assert_eq!(form_decode("a%2Bb+c%3D%3d"), "a+b c==");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(form_decode("%zz"), "%zz");
    }
}
