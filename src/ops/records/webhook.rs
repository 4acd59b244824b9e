//! The webhook, delivered from the outbox table: each finished call's record is POSTed,
//! signed, until the receiver answers 2xx, with exponential backoff between tries. Rows
//! live in the database, so deliveries pending at shutdown or a crash go out after the next
//! start; several daemons sharing a PostgreSQL database claim rows with a lease, so a row
//! is normally sent by one of them (at least once, never lost).
//!
//! Signing (docs/records.md): `X-Sifucall-Timestamp` is the Unix time in seconds, and
//! `X-Sifucall-Signature` is `v1=` and the lowercase hex HMAC-SHA256, keyed with the secret
//! from `WEBHOOK_SIGNING_SECRET`, of the timestamp, a `.`, and the body bytes.
//! `X-Sifucall-Call-Id` and `Idempotency-Key` carry the call id, the same on every retry.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::Url;
use sqlx::Row as _;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::RecordsError;
use super::db::{Db, with_pool};
use super::store::epoch_ms;
use crate::ops::metrics::Metrics;

/// The environment variable holding the signing secret (not `SIFUCALL_*`: those are
/// configuration keys).
pub const SECRET_ENV: &str = "WEBHOOK_SIGNING_SECRET";

/// Rows taken per round.
const BATCH: i64 = 16;
/// How long a claimed row is left to its claimer before another daemon may take it.
const LEASE: Duration = Duration::from_secs(60);
/// How often the outbox is looked at when nothing wakes the poster.
const POLL: Duration = Duration::from_secs(5);

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where to.
    pub url: Url,
    /// The HMAC key; `None` sends unsigned (and says so at startup).
    pub secret: Option<Vec<u8>>,
    /// Wait after the first failure; doubled each time...
    pub backoff_initial: Duration,
    /// ... up to this.
    pub backoff_max: Duration,
    /// One POST's deadline.
    pub timeout: Duration,
    /// This daemon's node id (the claim's owner).
    pub node_id: String,
}

/// `v1=<hex>` for a body sent at `timestamp` (Unix seconds).
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for b in tag.as_ref() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// An error with its causes, `outer: inner: innermost` (reqwest's own message is only
/// "error sending request").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Backoff before try `attempts + 1`, after `attempts` failures.
pub fn backoff(cfg: &WebhookConfig, attempts: u32) -> Duration {
    let factor = 1u32 << attempts.saturating_sub(1).min(20);
    cfg.backoff_initial
        .saturating_mul(factor)
        .min(cfg.backoff_max)
}

/// Starts the poster.
pub fn start(
    db: Db,
    cfg: WebhookConfig,
    metrics: Arc<Metrics>,
    wake: Arc<Notify>,
    closing: CancellationToken,
) -> Result<JoinHandle<()>, RecordsError> {
    let client = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .user_agent(concat!("sifucall/", env!("CARGO_PKG_VERSION")))
        .build()?;
    if cfg.secret.is_none() {
        tracing::warn!(
            "webhook.url is set but WEBHOOK_SIGNING_SECRET is not: records are sent unsigned"
        );
    }
    Ok(tokio::spawn(async move {
        // Rows this node had claimed when it stopped (killed mid-delivery) are free again
        // at once, rather than when their lease runs out.
        let released = with_pool!(&db, pool => {
            sqlx::query(
                "UPDATE webhook_outbox SET claimed_until_ms = NULL \
                 WHERE claimed_by = $1 AND delivered_at_ms IS NULL",
            )
            .bind(&cfg.node_id)
            .execute(pool)
            .await
            .map(|_| ())
        });
        if let Err(e) = released {
            tracing::debug!(error = %e, "cannot release this node's webhook claims yet");
        }
        loop {
            let next = match round(&db, &client, &cfg, &metrics).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::debug!(error = %e, "webhook outbox unreadable (database down?)");
                    Some(POLL)
                }
            };
            let wait = next.unwrap_or(POLL).min(POLL);
            tokio::select! {
                () = closing.cancelled() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }))
}

/// One row claimed for delivery.
struct Due {
    call_id: String,
    body: String,
    attempts: i64,
}

/// Delivers what is due; returns how long until the next row is due, if any is pending.
async fn round(
    db: &Db,
    client: &reqwest::Client,
    cfg: &WebhookConfig,
    metrics: &Metrics,
) -> Result<Option<Duration>, RecordsError> {
    let err = |e| RecordsError::db("read the webhook outbox", e);
    loop {
        let now = epoch_ms(SystemTime::now());
        let lease_until = now + LEASE.as_millis() as i64;
        let due: Vec<Due> = with_pool!(db, pool => {
            let rows = sqlx::query(
                "SELECT call_id, body, attempts FROM webhook_outbox \
                 WHERE delivered_at_ms IS NULL AND next_attempt_at_ms <= $1 \
                 AND (claimed_until_ms IS NULL OR claimed_until_ms < $1) \
                 ORDER BY next_attempt_at_ms LIMIT $2",
            )
            .bind(now)
            .bind(BATCH)
            .fetch_all(pool)
            .await
            .map_err(err)?;
            let mut claimed = Vec::new();
            for r in rows {
                let id: String = r.try_get("call_id").map_err(err)?;
                // The claim: only one daemon's UPDATE finds the row unclaimed.
                let got = sqlx::query(
                    "UPDATE webhook_outbox SET claimed_by = $1, claimed_until_ms = $2 \
                     WHERE call_id = $3 AND delivered_at_ms IS NULL \
                     AND (claimed_until_ms IS NULL OR claimed_until_ms < $4)",
                )
                .bind(&cfg.node_id)
                .bind(lease_until)
                .bind(&id)
                .bind(now)
                .execute(pool)
                .await
                .map_err(err)?
                .rows_affected();
                if got == 1 {
                    claimed.push(Due {
                        call_id: id,
                        body: r.try_get("body").map_err(err)?,
                        attempts: r.try_get("attempts").map_err(err)?,
                    });
                }
            }
            claimed
        });
        if due.is_empty() {
            break;
        }
        let results =
            futures_util::future::join_all(due.iter().map(|d| deliver(client, cfg, d))).await;
        for (d, result) in due.iter().zip(results) {
            let now = epoch_ms(SystemTime::now());
            match result {
                Ok(()) => {
                    metrics.webhook_delivery("delivered");
                    with_pool!(db, pool => {
                        sqlx::query(
                            "UPDATE webhook_outbox SET delivered_at_ms = $1, attempts = attempts + 1, \
                             claimed_until_ms = NULL, last_error = NULL WHERE call_id = $2",
                        )
                        .bind(now)
                        .bind(&d.call_id)
                        .execute(pool)
                        .await
                        .map_err(err)?;
                    });
                }
                Err(cause) => {
                    metrics.webhook_delivery("failed");
                    let attempts = u32::try_from(d.attempts + 1).unwrap_or(u32::MAX);
                    let wait = backoff(cfg, attempts);
                    tracing::warn!(
                        call_id = %d.call_id,
                        webhook_host = cfg.url.host_str().unwrap_or_default(),
                        attempt = attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %cause,
                        "webhook delivery failed; will retry"
                    );
                    with_pool!(db, pool => {
                        sqlx::query(
                            "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at_ms = $1, \
                             claimed_until_ms = NULL, last_error = $2 WHERE call_id = $3",
                        )
                        .bind(now + wait.as_millis() as i64)
                        .bind(&cause)
                        .bind(&d.call_id)
                        .execute(pool)
                        .await
                        .map_err(err)?;
                    });
                }
            }
        }
    }
    let next: Option<i64> = with_pool!(db, pool => {
        sqlx::query("SELECT MIN(next_attempt_at_ms) AS next FROM webhook_outbox WHERE delivered_at_ms IS NULL")
            .fetch_one(pool)
            .await
            .map_err(err)?
            .try_get("next")
            .map_err(err)?
    });
    let now = epoch_ms(SystemTime::now());
    Ok(next.map(|t| Duration::from_millis(u64::try_from(t - now).unwrap_or(0))))
}

/// One POST; the error says why, with its causes (never the URL: it may carry a token).
async fn deliver(client: &reqwest::Client, cfg: &WebhookConfig, d: &Due) -> Result<(), String> {
    let ts = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut req = client
        .post(cfg.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("X-Sifucall-Call-Id", &d.call_id)
        .header("Idempotency-Key", &d.call_id)
        .header("X-Sifucall-Timestamp", ts.to_string());
    if let Some(secret) = &cfg.secret {
        req = req.header(
            "X-Sifucall-Signature",
            signature(secret, ts, d.body.as_bytes()),
        );
    }
    match req.body(d.body.clone()).send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(format!("the receiver answered {}", resp.status())),
        Err(e) => {
            let e = e.without_url();
            Err(error_chain(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        // Here the data is "<ts>.<body>", so split it so: ts is not a number there; check
        // against an independent computation instead.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let tag = ring::hmac::sign(&key, b"what do ya want for nothing?");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let s = signature(b"k", 1_700_000_000, b"{}");
        let expect = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"k"),
            b"1700000000.{}",
        );
        let hex: String = expect.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s, format!("v1={hex}"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = WebhookConfig {
            url: Url::parse("http://127.0.0.1/").unwrap(),
            secret: None,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            timeout: Duration::from_secs(5),
            node_id: "n".into(),
        };
        let secs: Vec<u64> = (1..=8).map(|a| backoff(&cfg, a).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
