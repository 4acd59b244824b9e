//! [`CallControl`] over AMI: a call's context read from its channel, and its outcome set
//! on that channel as variables before the daemon sends 0x00.
//!
//! The shipped dialplan sets `SIFUCALL_UUID` (the UUID it passes to `AudioSocket()`) on the
//! channel first. When the UUID arrives, one `Status` action asks for every channel with
//! just the few variables needed to recognise it (`SIFUCALL_UUID`, the DID and the
//! profile); the channel whose `SIFUCALL_UUID` is the call's (preferring the one running
//! `AudioSocket`) is the call. A second `Status` on that channel alone with `AllVariables`
//! picks up the `SIFUCALL_VAR_*` values, so the dialplan needs no list of their names. Both
//! are asked on demand rather than kept from `VarSet`/`Newchannel` events: on a busy PBX
//! the event stream is far more traffic than two small lists per call, and nothing is
//! lost across reconnects.
//!
//! The outcome goes back as `Setvar` actions on the same channel: `SIFUCALL_DESTINATION`,
//! `SIFUCALL_REASON` and `SIFUCALL_WHISPER_UUID` when they apply, and `SIFUCALL_RESULT`
//! last. The channel name is remembered from the context lookup; if the call never had
//! one (refused at capacity) or the name no longer exists (a masquerade), it is looked up
//! again by UUID.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tracing::{debug, warn};
use uuid::Uuid;

use super::client::{AmiClient, AmiError};
use super::packet::{Action, Packet};
use crate::call::context::{CallContext, CallControl, CallOutcome, ContextSource};

/// The channel variable holding the call's UUID, set by the dialplan before `AudioSocket()`.
pub const UUID_VAR: &str = "SIFUCALL_UUID";
/// The profile the dialplan asks for.
pub const PROFILE_VAR: &str = "SIFUCALL_PROFILE";
/// An explicit DID from the dialplan (wins over `FROM_DID`).
pub const DID_VAR: &str = "SIFUCALL_DID";
/// MikoPBX's dialled number on incoming calls.
pub const FROM_DID_VAR: &str = "FROM_DID";
/// Prefix of free variables for prompts.
pub const VAR_PREFIX: &str = "SIFUCALL_VAR_";
/// The outcome the dialplan branches on.
pub const RESULT_VAR: &str = "SIFUCALL_RESULT";
/// The destination that goes with it.
pub const DESTINATION_VAR: &str = "SIFUCALL_DESTINATION";
/// Why (fallback, refused, error).
pub const REASON_VAR: &str = "SIFUCALL_REASON";
/// For a warm transfer: the UUID of the whisper leg the person's channel opens.
pub const WHISPER_VAR: &str = "SIFUCALL_WHISPER_UUID";

/// How long a call's channel name is remembered for its decision.
const CHANNEL_TTL: Duration = Duration::from_secs(4 * 3600);
/// Remembered channel names at most (older ones are looked up again if needed).
const MAX_CHANNELS: usize = 20_000;

/// One channel as `Status` described it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Channel name.
    pub channel: String,
    /// `CallerIDNum`.
    pub caller_number: Option<String>,
    /// `CallerIDName`.
    pub caller_name: Option<String>,
    /// `Exten`.
    pub exten: Option<String>,
    /// `Application` running now.
    pub application: Option<String>,
    /// The variables the event carried.
    pub vars: BTreeMap<String, String>,
}

impl ChannelInfo {
    /// Reads a `Status` event.
    pub fn from_status(p: &Packet) -> Option<Self> {
        let channel = p.get("Channel")?.to_owned();
        let vars = p
            .get_all("Variable")
            .filter_map(|v| v.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
            .collect();
        Some(Self {
            channel,
            caller_number: known(p.get("CallerIDNum")),
            caller_name: known(p.get("CallerIDName")),
            exten: known(p.get("Exten").or_else(|| p.get("Extension"))),
            application: known(p.get("Application")),
            vars,
        })
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    /// Whether this channel carries the call's UUID.
    pub fn is_call(&self, call_id: Uuid) -> bool {
        self.var(UUID_VAR)
            .and_then(|v| Uuid::parse_str(v.trim()).ok())
            == Some(call_id)
    }

    /// The call's context from this channel.
    pub fn to_context(&self) -> CallContext {
        let vars = self
            .vars
            .iter()
            .filter_map(|(k, v)| {
                let name = strip_prefix_ci(k, VAR_PREFIX)?;
                (!name.is_empty()).then(|| (name.to_ascii_lowercase(), v.clone()))
            })
            .collect();
        CallContext {
            caller_number: self.caller_number.clone(),
            caller_name: self.caller_name.clone(),
            did: self
                .var(DID_VAR)
                .or_else(|| self.var(FROM_DID_VAR))
                .map(str::to_owned)
                .or_else(|| self.exten.clone()),
            channel: Some(self.channel.clone()),
            profile: self.var(PROFILE_VAR).map(str::to_owned),
            vars,
            source: ContextSource::Ami,
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Asterisk writes `<unknown>` for an unset caller ID.
fn known(v: Option<&str>) -> Option<String> {
    v.map(str::trim)
        .filter(|v| !v.is_empty() && *v != "<unknown>")
        .map(str::to_owned)
}

/// The variables an outcome sets, `SIFUCALL_RESULT` last.
pub fn outcome_vars(call_id: Uuid, outcome: &CallOutcome) -> Vec<(&'static str, String)> {
    let mut vars = Vec::new();
    vars.push((
        DESTINATION_VAR,
        outcome.destination().unwrap_or("").to_owned(),
    ));
    let reason = match outcome {
        CallOutcome::Fallback { reason, .. } | CallOutcome::Refused { reason } => reason.clone(),
        CallOutcome::Error { detail } => detail.clone(),
        _ => String::new(),
    };
    vars.push((REASON_VAR, reason));
    let whisper = match outcome {
        CallOutcome::Transferred {
            summary: Some(s), ..
        } if !s.trim().is_empty() => whisper_uuid(call_id).to_string(),
        _ => String::new(),
    };
    vars.push((WHISPER_VAR, whisper));
    vars.push((RESULT_VAR, outcome.dialplan_value().to_owned()));
    vars
}

/// The UUID of a warm transfer's whisper leg: the call's UUID with its first byte
/// inverted, so the daemon recognises it without shared state.
pub fn whisper_uuid(call_id: Uuid) -> Uuid {
    let mut b = *call_id.as_bytes();
    b[0] ^= 0xff;
    Uuid::from_bytes(b)
}

/// The side channel over AMI.
#[derive(Debug)]
pub struct AmiControl {
    client: AmiClient,
    channels: Mutex<HashMap<Uuid, (String, Instant)>>,
}

impl AmiControl {
    /// A control using this connection.
    pub fn new(client: AmiClient) -> Self {
        Self {
            client,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The connection.
    pub fn client(&self) -> &AmiClient {
        &self.client
    }

    /// Remembers a call's channel name learnt elsewhere (an HTTP registration).
    pub fn remember_channel(&self, call_id: Uuid, channel: &str) {
        let now = Instant::now();
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_CHANNELS {
            map.retain(|_, (_, at)| now.duration_since(*at) < CHANNEL_TTL);
            if map.len() >= MAX_CHANNELS {
                map.clear();
            }
        }
        map.insert(call_id, (channel.to_owned(), now));
    }

    fn remembered(&self, call_id: Uuid) -> Option<String> {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&call_id)
            .map(|(c, _)| c.clone())
    }

    fn forget(&self, call_id: Uuid) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&call_id);
    }

    /// Finds the call's channel (the cheap `Status` over all channels), `None` if no
    /// channel carries its UUID.
    pub async fn find(&self, call_id: Uuid) -> Result<Option<ChannelInfo>, AmiError> {
        let reply = self
            .client
            .send(Action::new("Status").field(
                "Variables",
                format!("{UUID_VAR},{DID_VAR},{FROM_DID_VAR},{PROFILE_VAR}"),
            ))
            .await?;
        let mut matches: Vec<ChannelInfo> = reply
            .events
            .iter()
            .filter(|e| e.event().is_some_and(|n| n.eq_ignore_ascii_case("Status")))
            .filter_map(ChannelInfo::from_status)
            .filter(|c| c.is_call(call_id))
            .collect();
        // The channel running AudioSocket is the call; others may have inherited the var.
        matches.sort_by_key(|c| {
            !c.application
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case("AudioSocket"))
        });
        Ok(matches.into_iter().next())
    }

    /// The call's context, or why there is none.
    pub async fn lookup(&self, call_id: Uuid) -> Result<Option<CallContext>, AmiError> {
        let Some(found) = self.find(call_id).await? else {
            return Ok(None);
        };
        self.remember_channel(call_id, &found.channel);
        let mut context = found.to_context();
        // The SIFUCALL_VAR_* values: every variable of that one channel.
        match self
            .client
            .send(
                Action::new("Status")
                    .field("Channel", found.channel.clone())
                    .field("AllVariables", "true"),
            )
            .await
        {
            Ok(reply) => {
                if let Some(all) = reply
                    .events
                    .iter()
                    .filter_map(ChannelInfo::from_status)
                    .find(|c| c.channel == found.channel)
                {
                    context.vars = all.to_context().vars;
                }
            }
            Err(e) => {
                debug!(error = %e, "AMI: no channel variables; the call goes on without them")
            }
        }
        Ok(Some(context))
    }

    async fn set_vars(
        &self,
        channel: &str,
        vars: &[(&'static str, String)],
    ) -> Result<(), AmiError> {
        for (name, value) in vars {
            self.client
                .send(
                    Action::new("Setvar")
                        .field("Channel", channel.to_owned())
                        .field("Variable", *name)
                        .field("Value", value.clone()),
                )
                .await?;
        }
        Ok(())
    }

    /// Sets the outcome on the call's channel; errors say why it could not.
    pub async fn tell(&self, call_id: Uuid, outcome: &CallOutcome) -> Result<(), AmiError> {
        let vars = outcome_vars(call_id, outcome);
        if let Some(channel) = self.remembered(call_id) {
            match self.set_vars(&channel, &vars).await {
                Ok(()) => {
                    self.forget(call_id);
                    return Ok(());
                }
                Err(AmiError::Refused { .. }) => {
                    debug!(%channel, "AMI: the call's channel is gone by that name; looking it up again");
                }
                Err(e) => return Err(e),
            }
        }
        let Some(found) = self.find(call_id).await? else {
            return Err(AmiError::Refused {
                action: "Status".into(),
                message: format!("no channel has {UUID_VAR}={call_id}"),
            });
        };
        self.set_vars(&found.channel, &vars).await?;
        self.forget(call_id);
        Ok(())
    }
}

impl CallControl for AmiControl {
    fn context(&self, call_id: Uuid) -> BoxFuture<'_, CallContext> {
        Box::pin(async move {
            match self.lookup(call_id).await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    warn!(%call_id, "AMI: no channel has {UUID_VAR} = this call; default profile");
                    CallContext::default()
                }
                Err(e) => {
                    warn!(%call_id, error = %e, "AMI: call context not read; default profile");
                    CallContext::default()
                }
            }
        })
    }

    fn decide(&self, call_id: Uuid, outcome: CallOutcome) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Err(e) = self.tell(call_id, &outcome).await {
                warn!(%call_id, outcome = outcome.dialplan_value(), error = %e, "AMI: the outcome did not reach the dialplan");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(fields: &[(&str, &str)]) -> Packet {
        Packet::from_fields(
            fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn context_from_a_status_event() {
        let id = Uuid::new_v4();
        let uuid_line = format!("SIFUCALL_UUID={}", id.to_string().to_uppercase());
        let p = status(&[
            ("Event", "Status"),
            ("Channel", "PJSIP/trunk-00000012"),
            ("CallerIDNum", "60312345678"),
            ("CallerIDName", "<unknown>"),
            ("Exten", "2000"),
            ("Application", "AudioSocket"),
            ("Variable", &uuid_line),
            ("Variable", "FROM_DID=0380001234"),
            ("Variable", "SIFUCALL_PROFILE=sales"),
            ("Variable", "SIFUCALL_VAR_Account=A-17"),
            ("Variable", "SIFUCALL_DID="),
        ]);
        let c = ChannelInfo::from_status(&p).unwrap();
        assert!(c.is_call(id));
        assert!(!c.is_call(Uuid::new_v4()));
        let ctx = c.to_context();
        assert_eq!(ctx.caller_number.as_deref(), Some("60312345678"));
        assert_eq!(ctx.caller_name, None);
        assert_eq!(ctx.did.as_deref(), Some("0380001234"));
        assert_eq!(ctx.profile.as_deref(), Some("sales"));
        assert_eq!(ctx.vars.get("account").map(String::as_str), Some("A-17"));
        assert_eq!(ctx.channel.as_deref(), Some("PJSIP/trunk-00000012"));
        assert_eq!(ctx.source, ContextSource::Ami);
    }

    #[test]
    fn did_falls_back_to_exten() {
        let p = status(&[("Channel", "Local/2000@x-1;2"), ("Exten", "2000")]);
        let ctx = ChannelInfo::from_status(&p).unwrap().to_context();
        assert_eq!(ctx.did.as_deref(), Some("2000"));
    }

    #[test]
    fn outcome_sets_result_last() {
        let id = Uuid::new_v4();
        let t = CallOutcome::Transferred {
            target: "sales".into(),
            destination: "201".into(),
            summary: Some("Wants a refund".into()),
        };
        let vars = outcome_vars(id, &t);
        assert_eq!(vars.last().unwrap(), &(RESULT_VAR, "transfer".to_owned()));
        assert!(vars.contains(&(DESTINATION_VAR, "201".to_owned())));
        assert!(vars.contains(&(WHISPER_VAR, whisper_uuid(id).to_string())));
        assert_ne!(whisper_uuid(id), id);
        assert_eq!(whisper_uuid(whisper_uuid(id)), id);
        let r = outcome_vars(
            id,
            &CallOutcome::Refused {
                reason: "over_capacity".into(),
            },
        );
        assert!(r.contains(&(REASON_VAR, "over_capacity".to_owned())));
        assert!(r.contains(&(DESTINATION_VAR, String::new())));
    }
}
