//! Picking a call's agent: the profile the dialplan named, else the one its dialled number
//! routes to, else the default (see [`crate::ops::profiles`] for the configuration), and
//! that profile's texts with the call's variables filled in.
//!
//! Each profile is a whole [`AgentSetup`] (its own provider clients, so its own model and
//! voice, and its own prompt cache), built at startup and again on SIGHUP. A call takes
//! its profile once, before its state machine starts, and keeps it to the end.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::tz::TimeZone;
use tracing::{info, warn};

use super::context::CallContext;
use super::driver::AgentSetup;
use super::machine::AgentConfig;
use super::prompts::{self, PromptCache, PromptVars};
use crate::ops::profiles::{DEFAULT_PROFILE, DEFAULT_TIME_ZONE, Route, RoutingSettings};

/// One profile, ready for calls.
#[derive(Debug, Clone)]
pub struct ProfileSetup {
    /// Its name.
    pub name: String,
    /// Providers, cached phrases and behaviour.
    pub setup: Arc<AgentSetup>,
    /// Where `{now}` is told.
    pub time_zone: TimeZone,
}

/// What one call runs with.
#[derive(Debug, Clone)]
pub struct CallAgent {
    /// The profile's name.
    pub profile: String,
    /// The profile's setup (providers and its shared prompt cache).
    pub setup: Arc<AgentSetup>,
    /// Its behaviour with this call's texts (the setup's own when nothing varies).
    pub cfg: Arc<AgentConfig>,
    /// This call's own phrases (those with variables), when it has any.
    pub prompts: Option<Arc<PromptCache>>,
}

impl ProfileSetup {
    /// A profile whose `{now}` is told in `time_zone` (an IANA name; the default zone if
    /// the name is unknown, which `sifucall check` refuses anyway).
    pub fn new(name: impl Into<String>, setup: Arc<AgentSetup>, time_zone: &str) -> Self {
        let time_zone = TimeZone::get(time_zone)
            .or_else(|_| TimeZone::get(DEFAULT_TIME_ZONE))
            .unwrap_or(TimeZone::UTC);
        Self {
            name: name.into(),
            setup,
            time_zone,
        }
    }

    /// The profile's texts for one call, with its variables filled in at `now`.
    pub fn for_call(
        &self,
        context: &CallContext,
        call_id: &str,
        now: jiff::Timestamp,
    ) -> CallAgent {
        let cfg = &self.setup.cfg;
        let varies = prompts::has_variables(&cfg.system_prompt)
            || cfg
                .prompts
                .all()
                .iter()
                .any(|(_, t)| prompts::has_variables(t));
        let (cfg, prompts) = if varies {
            let text_now = prompts::format_now(now, &self.time_zone, &cfg.language);
            let vars = PromptVars::for_call(context, call_id, text_now);
            let mut own = AgentConfig::clone(cfg);
            own.system_prompt = prompts::render(&cfg.system_prompt, &vars);
            own.prompts = cfg.prompts.render(&vars);
            (Arc::new(own), self.setup.prompts.for_call(&vars))
        } else {
            (Arc::clone(cfg), None)
        };
        CallAgent {
            profile: self.name.clone(),
            setup: Arc::clone(&self.setup),
            cfg,
            prompts,
        }
    }
}

/// Every profile and the routing between them.
#[derive(Debug)]
pub struct AgentProfiles {
    profiles: BTreeMap<String, ProfileSetup>,
    routing: RoutingSettings,
}

impl AgentProfiles {
    /// The profiles by name; `routing.default` (and `default`) should be among them (the
    /// configuration checks that); if not, the first profile stands in.
    pub fn new(profiles: impl IntoIterator<Item = ProfileSetup>, routing: RoutingSettings) -> Self {
        Self {
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
            routing,
        }
    }

    /// The profile names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.profiles.keys().map(String::as_str)
    }

    /// The default profile's setup (for work with no call context, e.g. a whisper leg).
    pub fn default_setup(&self) -> Option<Arc<AgentSetup>> {
        self.profiles
            .get(self.routing.default.as_str())
            .or_else(|| self.profiles.get(DEFAULT_PROFILE))
            .or_else(|| self.profiles.values().next())
            .map(|p| Arc::clone(&p.setup))
    }

    /// A profile by name.
    pub fn get(&self, name: &str) -> Option<&ProfileSetup> {
        self.profiles.get(name)
    }

    /// The profile for a call with this context (logged, with how it was chosen). `None`
    /// only when there are no profiles at all.
    pub fn select(&self, context: &CallContext) -> Option<&ProfileSetup> {
        let (name, how) =
            self.routing
                .route(context.profile.as_deref(), context.did.as_deref(), |n| {
                    self.profiles.contains_key(n)
                });
        let chosen = self
            .profiles
            .get(&name)
            .or_else(|| self.profiles.get(DEFAULT_PROFILE))
            .or_else(|| self.profiles.values().next())?;
        match how {
            Route::UnknownProfile(asked) => warn!(
                asked = %asked,
                profile = %chosen.name,
                "the dialplan asked for a profile that does not exist; using the default"
            ),
            Route::Dialplan => info!(profile = %chosen.name, "profile chosen by the dialplan"),
            Route::Did(rule) => info!(profile = %chosen.name, rule, "profile chosen by DID"),
            Route::Default => info!(profile = %chosen.name, "default profile"),
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::prompts::PromptTexts;
    use crate::call::reply::Providers;
    use crate::providers::BoxFuture;
    use crate::providers::llm::{ChatRequest, LlmError, LlmProvider, LlmStream};
    use crate::providers::stt::{SttError, SttParams, SttProvider, SttSession};
    use crate::providers::tts::{TtsError, TtsParams, TtsProvider, TtsStream};

    struct Nothing;

    impl SttProvider for Nothing {
        fn start(&self, _: SttParams) -> BoxFuture<'_, Result<SttSession, SttError>> {
            Box::pin(std::future::pending())
        }
    }
    impl LlmProvider for Nothing {
        fn stream(&self, _: ChatRequest) -> BoxFuture<'_, Result<LlmStream, LlmError>> {
            Box::pin(std::future::pending())
        }
    }
    impl TtsProvider for Nothing {
        fn open(&self, _: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>> {
            Box::pin(std::future::pending())
        }
    }

    fn setup(greeting: &str, system_prompt: &str) -> Arc<AgentSetup> {
        let mut cfg = crate::call::scenarios::config();
        cfg.language = "ms-MY".into();
        cfg.system_prompt = system_prompt.into();
        cfg.prompts = PromptTexts {
            greeting: greeting.into(),
            apology: "Maaf.".into(),
            hold: "Sekejap.".into(),
            still_there: "Helo?".into(),
            handover: "Sambung.".into(),
            filler: "Sebentar.".into(),
        };
        let tts: Arc<dyn TtsProvider> = Arc::new(Nothing);
        Arc::new(AgentSetup {
            providers: Providers {
                stt: Arc::new(Nothing),
                llm: Arc::new(Nothing),
                tts: Arc::clone(&tts),
                tools: Arc::new(crate::call::tools::ToolBox::default()),
            },
            prompts: Arc::new(PromptCache::new(cfg.prompts.clone(), tts)),
            cfg: Arc::new(cfg),
        })
    }

    fn context(did: &str, profile: Option<&str>) -> CallContext {
        CallContext {
            caller_number: Some("0123456789".into()),
            caller_name: Some("Aminah".into()),
            did: Some(did.into()),
            profile: profile.map(str::to_owned),
            vars: [("ORDER".to_owned(), "A-17".to_owned())].into(),
            ..CallContext::default()
        }
    }

    #[test]
    fn a_call_gets_its_profiles_texts_with_its_variables() {
        let p = ProfileSetup::new(
            "sales",
            setup(
                "Selamat datang {caller_name}, pesanan {var_order}.",
                "Hari ini {now}. Pemanggil {caller_number} mendail {did}.",
            ),
            "Asia/Kuala_Lumpur",
        );
        // 2026-12-02 00:40 UTC is 08:40 on a Wednesday in Kuala Lumpur.
        let now: jiff::Timestamp = "2026-12-02T00:40:00Z".parse().unwrap();
        let call = p.for_call(&context("60312345678", None), "abc", now);
        assert_eq!(call.profile, "sales");
        assert_eq!(
            call.cfg.prompts.greeting,
            "Selamat datang Aminah, pesanan A-17."
        );
        assert_eq!(
            call.cfg.system_prompt,
            "Hari ini Rabu, 2 Disember 2026, 08:40. Pemanggil 0123456789 mendail 60312345678."
        );
        let own = call.prompts.expect("the greeting varies per call");
        assert_eq!(own.texts().greeting, call.cfg.prompts.greeting);
        assert!(
            call.setup
                .prompts
                .is_per_call(prompts::PromptKind::Greeting)
        );
        assert!(!call.setup.prompts.is_per_call(prompts::PromptKind::Apology));
    }

    #[test]
    fn fixed_texts_share_the_profiles_config_and_cache() {
        let p = ProfileSetup::new("default", setup("Helo.", "Anda pembantu."), "UTC");
        let call = p.for_call(&context("1", None), "abc", jiff::Timestamp::UNIX_EPOCH);
        assert!(Arc::ptr_eq(&call.cfg, &p.setup.cfg));
        assert!(call.prompts.is_none());
    }

    /// Speaks any text as 100 ms of a constant tone, except text with `Aminah` in it, which
    /// it never finishes (a synthesis that is too slow for the call).
    struct NoNames;

    const TONE: usize = 800;

    impl TtsProvider for NoNames {
        fn open(&self, _: TtsParams) -> BoxFuture<'_, Result<TtsStream, TtsError>> {
            use crate::providers::tts::{TtsInput, TtsOutput};
            let (text_tx, mut text_rx) = tokio::sync::mpsc::channel(8);
            let (audio_tx, audio_rx) = tokio::sync::mpsc::channel(8);
            tokio::spawn(async move {
                let mut said = String::new();
                while let Some(input) = text_rx.recv().await {
                    match input {
                        TtsInput::Text(t) => said.push_str(&t),
                        TtsInput::Finish => break,
                    }
                }
                if said.contains("Aminah") {
                    std::future::pending::<()>().await;
                }
                let _ = audio_tx.send(TtsOutput::Audio(vec![4_000; TONE])).await;
                let _ = audio_tx.send(TtsOutput::Done).await;
            });
            Box::pin(async move {
                Ok(TtsStream {
                    text: text_tx,
                    audio: audio_rx,
                })
            })
        }
    }

    #[derive(Debug)]
    struct Dialplan(CallContext);

    impl crate::call::CallControl for Dialplan {
        fn context(&self, _: uuid::Uuid) -> futures_util::future::BoxFuture<'_, CallContext> {
            let ctx = self.0.clone();
            Box::pin(async move { ctx })
        }
        fn decide(
            &self,
            _: uuid::Uuid,
            _: crate::call::CallOutcome,
        ) -> futures_util::future::BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_personal_greeting_gives_way_to_the_generic_one() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tts: Arc<dyn TtsProvider> = Arc::new(NoNames);
        let mut cfg = crate::call::scenarios::config();
        cfg.prompts.greeting = "Selamat datang, {caller_name|tuan}.".into();
        let prompts = Arc::new(PromptCache::new(cfg.prompts.clone(), Arc::clone(&tts)));
        prompts.preload(&[8_000]).await;
        let setup = Arc::new(AgentSetup {
            providers: Providers {
                stt: Arc::new(Nothing),
                llm: Arc::new(Nothing),
                tts,
                tools: Arc::new(crate::call::tools::ToolBox::default()),
            },
            prompts,
            cfg: Arc::new(cfg),
        });
        let profiles = AgentProfiles::new(
            [ProfileSetup::new("sales", setup, DEFAULT_TIME_ZONE)],
            RoutingSettings {
                default: "sales".into(),
                dids: BTreeMap::new(),
            },
        );
        let session = crate::call::SessionConfig {
            first_message_timeout: std::time::Duration::from_secs(2),
            behaviour: crate::call::Behaviour::Profiles(Arc::new(profiles)),
            idle_hangup: None,
            control: Arc::new(Dialplan(context("1", None))),
            records: None,
        };
        let (mut asterisk, daemon) = tokio::io::duplex(1 << 20);
        let call = tokio::spawn(crate::call::driver::run(
            daemon,
            "127.0.0.1:5000".parse().unwrap(),
            session,
            Arc::new(crate::ops::metrics::Metrics::new()),
            tokio_util::sync::CancellationToken::new(),
        ));
        let msg = |kind: u8, payload: &[u8]| {
            let mut m = vec![kind];
            m.extend_from_slice(&u16::try_from(payload.len()).unwrap().to_be_bytes());
            m.extend_from_slice(payload);
            m
        };
        asterisk.write_all(&msg(0x01, &[7; 16])).await.unwrap();
        let (mut rx, mut tx) = tokio::io::split(asterisk);
        let feeder = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
            for _ in 0..250 {
                tick.tick().await;
                if tx.write_all(&msg(0x10, &[0; 320])).await.is_err() {
                    break;
                }
            }
        });
        // The generic greeting (100 ms of tone) plays once the personal one is given up on.
        let mut heard = 0;
        let mut header = [0u8; 3];
        while heard < TONE && rx.read_exact(&mut header).await.is_ok() {
            let mut payload = vec![0; usize::from(u16::from_be_bytes([header[1], header[2]]))];
            rx.read_exact(&mut payload).await.unwrap();
            heard += payload
                .chunks_exact(2)
                .filter(|s| i16::from_le_bytes([s[0], s[1]]) == 4_000)
                .count();
        }
        assert_eq!(heard, TONE, "the generic greeting was heard whole");
        feeder.await.unwrap();
        drop(rx);
        let summary = call.await.unwrap();
        assert_eq!(summary.profile, "sales");
        let report = summary.agent.unwrap();
        assert!(
            !report.errors.iter().any(|e| e.contains("could not speak")),
            "{:?}",
            report.errors
        );
    }

    #[test]
    fn selection_follows_the_routing() {
        let profiles = AgentProfiles::new(
            ["default", "sales", "support"]
                .map(|n| ProfileSetup::new(n, setup(n, "x"), DEFAULT_TIME_ZONE)),
            RoutingSettings {
                default: "default".into(),
                dids: [("60312345678", "sales"), ("6031234*", "support")]
                    .map(|(d, p)| (d.to_owned(), p.to_owned()))
                    .into(),
            },
        );
        let pick = |did: &str, profile: Option<&str>| {
            profiles
                .select(&context(did, profile))
                .unwrap()
                .name
                .clone()
        };
        assert_eq!(pick("60312345678", None), "sales");
        assert_eq!(pick("60312340000", None), "support");
        assert_eq!(pick("999", None), "default");
        assert_eq!(pick("60312345678", Some("support")), "support");
        assert_eq!(pick("60312345678", Some("gone")), "default");
    }
}
