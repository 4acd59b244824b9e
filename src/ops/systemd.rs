//! systemd integration for `Type=notify` units: tell systemd when the daemon is ready, when
//! it starts stopping, what it is doing (`systemctl status` shows `STATUS=`), and ping the
//! watchdog if the unit sets `WatchdogSec=`.
//!
//! Everything is a no-op when `NOTIFY_SOCKET` is unset (running by hand, in tests, under
//! another supervisor). Failures are logged, never returned: a notification that cannot be
//! delivered must not take calls down.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1`: startup is complete (listeners bound). systemd holds `systemctl start` until
/// this arrives.
pub fn notify_ready() {
    send(&[NotifyState::Ready]);
}

/// `STOPPING=1`: shutdown has begun (draining calls).
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with the monotonic time: a reload (SIGHUP) has begun; [`notify_ready`]
/// ends it.
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STATUS=...`: a one-line status for `systemctl status`. Newlines are replaced, since
/// they would end the field.
pub fn notify_status(status: &str) {
    let one_line = status.replace(['\n', '\r'], " ");
    send(&[NotifyState::Status(&one_line)]);
}

/// The unit's watchdog interval (`WatchdogSec=`), if systemd enabled one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// `WATCHDOG=1`: the daemon is alive.
pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Pings the watchdog at half its interval until `cancel` fires; returns at once if no
/// watchdog is enabled. Run it on the same runtime as the calls, so a wedged runtime stops
/// the pings and systemd restarts the daemon.
pub async fn watchdog_loop(cancel: CancellationToken) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(?interval, "systemd watchdog enabled");
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticker.tick() => notify_watchdog(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    const CHILD_ENV: &str = "SIFUCALL_SYSTEMD_TEST_CHILD";

    /// Runs in a child process (spawned by `notifications_reach_the_socket`) with
    /// `NOTIFY_SOCKET` and `WATCHDOG_USEC` set, so this process's environment is never
    /// mutated. Ignored by default; a no-op when run directly.
    #[test]
    #[ignore = "child half of notifications_reach_the_socket"]
    fn child_sends_notifications() {
        if std::env::var_os(CHILD_ENV).is_none() {
            return;
        }
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(5)));
        notify_status("2 calls\nactive");
        notify_ready();
        notify_watchdog();
        notify_stopping();
    }

    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("sifucall-sd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();

        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ops::systemd::tests::child_sends_notifications",
                "--ignored",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "5000000")
            .env_remove("WATCHDOG_PID")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );

        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..4 {
            let n = sock.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "STATUS=2 calls active\n",
                "READY=1\n",
                "WATCHDOG=1\n",
                "STOPPING=1\n"
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn watchdog_loop_returns_when_disabled_or_cancelled() {
        // This process has no WATCHDOG_USEC for this pid (the unit test runner is not a
        // systemd service with WatchdogSec), so the loop must return at once.
        if watchdog_interval().is_none() {
            tokio::time::timeout(
                Duration::from_secs(30),
                watchdog_loop(CancellationToken::new()),
            )
            .await
            .unwrap();
        } else {
            let token = CancellationToken::new();
            token.cancel();
            tokio::time::timeout(Duration::from_secs(30), watchdog_loop(token))
                .await
                .unwrap();
        }
    }
}
