//! The side channel to the PBX: how a call learns who is calling and how the dialplan
//! learns how the call ended (see [`crate::call::context`] for the contract).
//!
//! Two transports, one [`PbxControl`]:
//! - [`ami`]: the daemon keeps one Asterisk Manager Interface connection, finds a call's
//!   channel by the `SIFUCALL_UUID` variable, reads its caller and variables, and sets
//!   `SIFUCALL_RESULT` (and the destination) there before 0x00.
//! - [`http`]: the dialplan registers the context with `CURL()` before `AudioSocket()` and
//!   reads the outcome back afterwards, through the admin server.
//!
//! [`PbxControl`] uses both: a registration already present wins (it is explicit);
//! otherwise the AMI lookup and a short wait for a late registration race, and whichever
//! brings a context first is used. The outcome is always stored for HTTP (memory only)
//! and, with AMI enabled, also set on the channel; a transfer's summary waits for the
//! warm transfer's [`whisper`] leg. See `docs/pbx.md`.

pub mod ami;
pub mod http;
pub mod whisper;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tracing::debug;
use uuid::Uuid;

use crate::call::context::{CallContext, CallControl, CallOutcome};
use crate::ops::config::Settings;
use ami::{AmiClient, AmiConfig, AmiControl};
use http::{CallRegistry, REGISTRATION_WAIT};

/// The daemon's call control: the HTTP registry, and AMI when configured.
#[derive(Debug, Clone)]
pub struct PbxControl {
    registry: Arc<CallRegistry>,
    ami: Option<Arc<AmiControl>>,
    whispers: Arc<whisper::WhisperStore>,
}

impl PbxControl {
    /// A control over the registry, and AMI if given.
    pub fn new(registry: Arc<CallRegistry>, ami: Option<Arc<AmiControl>>) -> Self {
        Self {
            registry,
            ami,
            whispers: Arc::default(),
        }
    }

    /// The AMI side, if enabled.
    pub fn ami(&self) -> Option<&Arc<AmiControl>> {
        self.ami.as_ref()
    }

    /// The HTTP registry.
    pub fn registry(&self) -> &Arc<CallRegistry> {
        &self.registry
    }

    async fn lookup(&self, call_id: Uuid) -> CallContext {
        if let Some(c) = self.registry.context_now(call_id) {
            self.note_channel(call_id, &c);
            return c;
        }
        let Some(ami) = &self.ami else {
            return self
                .registry
                .wait_context(call_id, REGISTRATION_WAIT)
                .await
                .unwrap_or_default();
        };
        let http = self.registry.wait_context(call_id, REGISTRATION_WAIT);
        let by_ami = ami.lookup(call_id);
        tokio::pin!(http, by_ami);
        let (mut http_done, mut ami_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut http, if !http_done => {
                    http_done = true;
                    if let Some(c) = r {
                        self.note_channel(call_id, &c);
                        return c;
                    }
                }
                r = &mut by_ami, if !ami_done => {
                    ami_done = true;
                    match r {
                        Ok(Some(c)) => return c,
                        Ok(None) => {}
                        Err(e) => debug!(%call_id, error = %e, "AMI lookup failed"),
                    }
                }
            }
            if http_done && ami_done {
                tracing::warn!(%call_id, "no call context (no channel with SIFUCALL_UUID, no registration): default profile");
                return CallContext::default();
            }
        }
    }

    fn note_channel(&self, call_id: Uuid, c: &CallContext) {
        if let (Some(ami), Some(ch)) = (&self.ami, &c.channel) {
            ami.remember_channel(call_id, ch);
        }
    }
}

impl CallControl for PbxControl {
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext> {
        Box::pin(self.lookup(call_id))
    }

    fn whisper(&self, call_id: Uuid) -> Option<String> {
        self.whispers.take(call_id)
    }

    fn decide(&self, call_id: Uuid, outcome: CallOutcome) -> BoxFuture<'_, ()> {
        if let CallOutcome::Transferred {
            summary: Some(s), ..
        } = &outcome
        {
            if !s.trim().is_empty() {
                self.whispers
                    .put(ami::control::whisper_uuid(call_id), s.trim().to_owned());
            }
        }
        self.registry.decide(call_id, outcome.clone());
        Box::pin(async move {
            if let Some(ami) = &self.ami {
                ami.decide(call_id, outcome).await;
            }
        })
    }
}

/// The AMI connection settings from the configuration (`None` when `[ami]` is disabled).
pub fn ami_config(settings: &Settings) -> Option<AmiConfig> {
    let a = &settings.ami;
    a.enabled.then(|| AmiConfig {
        host: a.host.clone(),
        port: a.port,
        username: a.username.clone(),
        secret: settings.secrets.ami_secret.clone(),
        tls: a.tls,
        tls_ca_file: (!a.tls_ca_file.trim().is_empty()).then(|| a.tls_ca_file.clone().into()),
        action_timeout: Duration::from_millis(a.action_timeout_ms),
        reconnect_max: Duration::from_millis(a.reconnect_max_ms),
    })
}

/// Builds the daemon's control: the registry always, AMI when enabled (its connection task
/// runs until `stop`).
pub fn build(
    settings: &Settings,
    registry: Arc<CallRegistry>,
    stop: CancellationToken,
) -> PbxControl {
    let ami =
        ami_config(settings).map(|cfg| Arc::new(AmiControl::new(AmiClient::start(cfg, stop))));
    PbxControl::new(registry, ami)
}
