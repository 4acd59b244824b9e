//! Fixed phrases (greeting, apology, hold) synthesized once and cached per sample rate, so
//! the greeting starts in the first frame of a call and an apology can be spoken even when
//! the TTS provider is the thing that failed. Startup synthesis runs a bounded number at a
//! time (`tts.max_concurrency`) and retries a 429 after the service's backoff: small plans
//! allow only a few concurrent requests, and six at once would be refused.
//!
//! The texts are templates: `{caller_name}`, `{now}`, `{var_NAME}`... are filled in per call
//! ([`render`], [`PromptVars`]). A phrase without variables is cached per profile and rate as
//! before; one with variables differs per call, so it is never preloaded and each call
//! synthesizes its own, the greeting streamed as it is synthesized
//! ([`PromptCache::open_stream`], see `docs/profiles.md`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::RwLock;
use tracing::{info, warn};

use crate::providers::tts::{TtsError, TtsInput, TtsOutput, TtsParams, TtsProvider, TtsStream};

/// Which phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PromptKind {
    /// `agent.greeting`
    Greeting,
    /// `agent.apology`
    Apology,
    /// `agent.hold_prompt`
    Hold,
    /// `agent.still_there_prompt`
    StillThere,
    /// `agent.handover_line`
    Handover,
    /// `agent.filler_phrase`
    Filler,
}

/// The texts of the phrases.
#[derive(Debug, Clone)]
pub struct PromptTexts {
    /// Said when the call starts.
    pub greeting: String,
    /// Said when a provider fails.
    pub apology: String,
    /// Said when a reply is slow to start.
    pub hold: String,
    /// Said when the caller has been silent for a while, before the idle hang-up.
    pub still_there: String,
    /// Said before the call is handed to a person.
    pub handover: String,
    /// Said when a tool is slow.
    pub filler: String,
}

impl PromptTexts {
    /// The text of a phrase.
    pub fn text(&self, kind: PromptKind) -> &str {
        match kind {
            PromptKind::Greeting => &self.greeting,
            PromptKind::Apology => &self.apology,
            PromptKind::Hold => &self.hold,
            PromptKind::StillThere => &self.still_there,
            PromptKind::Handover => &self.handover,
            PromptKind::Filler => &self.filler,
        }
    }
}

impl PromptTexts {
    /// Every phrase, with its kind.
    pub fn all(&self) -> [(PromptKind, &str); 6] {
        [
            (PromptKind::Greeting, self.greeting.as_str()),
            (PromptKind::Apology, self.apology.as_str()),
            (PromptKind::Hold, self.hold.as_str()),
            (PromptKind::StillThere, self.still_there.as_str()),
            (PromptKind::Handover, self.handover.as_str()),
            (PromptKind::Filler, self.filler.as_str()),
        ]
    }

    /// The phrases with every variable filled in for one call.
    pub fn render(&self, vars: &PromptVars) -> Self {
        Self {
            greeting: render(&self.greeting, vars),
            apology: render(&self.apology, vars),
            hold: render(&self.hold, vars),
            still_there: render(&self.still_there, vars),
            handover: render(&self.handover, vars),
            filler: render(&self.filler, vars),
        }
    }
}

// ---- prompt variables ------------------------------------------------------------------

/// The variables every prompt may use, besides `{var_NAME}`.
pub const PROMPT_VARIABLES: [&str; 5] = ["caller_number", "caller_name", "did", "call_id", "now"];

/// The prefix of the dialplan's free variables: `{var_NAME}` is `CallContext::vars["NAME"]`.
pub const VAR_PREFIX: &str = "var_";

/// The prefix of the pre-call lookup's fields: `{lookup_NAME}` is `CallContext::vars` entry
/// `lookup_NAME` (see `call::tools::lookup_vars`).
pub const LOOKUP_PREFIX: &str = "lookup_";

/// One `{name}` or `{name|fallback}` in a template, as byte offsets into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placeholder<'a> {
    /// Where `{` is.
    pub start: usize,
    /// Just past `}`.
    pub end: usize,
    /// The variable's name.
    pub name: &'a str,
    /// What to say when the variable has no value (`{caller_name|pelanggan}`).
    pub fallback: Option<&'a str>,
}

/// The placeholders of a template, in order. Only `{identifier}` and
/// `{identifier|fallback}` are placeholders; other text in braces (JSON in a system prompt,
/// `{ }`) is left as it is.
pub fn placeholders(template: &str) -> Vec<Placeholder<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = template[from..].find('{').map(|i| from + i) {
        from = open + 1;
        let rest = &template[open + 1..];
        let Some(close) = rest.find(['}', '{']) else {
            break;
        };
        if rest.as_bytes()[close] == b'{' {
            continue;
        }
        let inner = &rest[..close];
        let (name, fallback) = match inner.split_once('|') {
            Some((n, f)) => (n, Some(f)),
            None => (inner, None),
        };
        let is_ident = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_ident {
            out.push(Placeholder {
                start: open,
                end: open + 1 + close + 1,
                name,
                fallback,
            });
            from = open + 1 + close + 1;
        }
    }
    out
}

/// Whether a template has any variable (and so differs per call).
pub fn has_variables(template: &str) -> bool {
    !placeholders(template).is_empty()
}

/// Whether `name` is a variable prompts may use.
pub fn is_known_variable(name: &str) -> bool {
    PROMPT_VARIABLES.contains(&name)
        || [VAR_PREFIX, LOOKUP_PREFIX]
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|rest| !rest.is_empty()))
}

/// The names in a template that are not variables (`{foo}`, `{caller}`), once each.
pub fn unknown_variables(template: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in placeholders(template) {
        if !is_known_variable(p.name) && !out.iter().any(|n| n == p.name) {
            out.push(p.name.to_owned());
        }
    }
    out
}

/// What one call's variables hold. Missing values are empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptVars {
    values: std::collections::BTreeMap<String, String>,
    vars: std::collections::BTreeMap<String, String>,
}

impl PromptVars {
    /// The variables of one call: its context, its id, and the time as `{now}` says it.
    pub fn for_call(context: &super::CallContext, call_id: &str, now: String) -> Self {
        let mut values = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: Option<&str>| {
            if let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) {
                values.insert(k.to_owned(), v.to_owned());
            }
        };
        put("caller_number", context.caller_number.as_deref());
        put("caller_name", context.caller_name.as_deref());
        put("did", context.did.as_deref());
        put("call_id", Some(call_id));
        put("now", Some(&now));
        Self {
            values,
            vars: context.vars.clone(),
        }
    }

    /// A variable's value, if it has one. `{var_NAME}` finds `NAME` in the context's
    /// variables as written, else ignoring case (channel variables are often upper case).
    pub fn get(&self, name: &str) -> Option<&str> {
        let v = match name.strip_prefix(VAR_PREFIX) {
            Some(key) => self.vars.get(key).or_else(|| {
                self.vars
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v)
            }),
            None if name.starts_with(LOOKUP_PREFIX) => self.vars.get(name),
            None => self.values.get(name),
        };
        v.map(|v| v.trim()).filter(|v| !v.is_empty())
    }
}

/// Fills in a template. A variable without a value becomes its fallback
/// (`{caller_name|pelanggan}`) or nothing; then the space before it goes too when a space or
/// punctuation follows, so "Hello {caller_name}, welcome" reads "Hello, welcome". Unknown
/// names (which `sifucall check` refuses) render as nothing.
pub fn render(template: &str, vars: &PromptVars) -> String {
    let mut out = String::with_capacity(template.len());
    let mut at = 0;
    for p in placeholders(template) {
        out.push_str(&template[at..p.start]);
        at = p.end;
        let value = vars.get(p.name).or(p.fallback.filter(|f| !f.is_empty()));
        match value {
            Some(v) => out.push_str(v),
            None => {
                let next = template[p.end..].chars().next();
                let tidy = next.is_none_or(|c| c.is_whitespace() || ",.!?;:".contains(c));
                if tidy && out.ends_with(' ') {
                    out.pop();
                }
            }
        }
    }
    out.push_str(&template[at..]);
    out
}

/// The day names, Monday first.
const MALAY_DAYS: [&str; 7] = [
    "Isnin", "Selasa", "Rabu", "Khamis", "Jumaat", "Sabtu", "Ahad",
];
const MALAY_MONTHS: [&str; 12] = [
    "Januari",
    "Februari",
    "Mac",
    "April",
    "Mei",
    "Jun",
    "Julai",
    "Ogos",
    "September",
    "Oktober",
    "November",
    "Disember",
];
const ENGLISH_DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const ENGLISH_MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `{now}`: the day, date and 24-hour time in `tz`, in Malay for `ms`/`ms-*` languages
/// ("Rabu, 2 Disember 2026, 08:40") and in English otherwise ("Wednesday, 2 December 2026,
/// 08:40").
pub fn format_now(now: jiff::Timestamp, tz: &jiff::tz::TimeZone, language: &str) -> String {
    let t = now.to_zoned(tz.clone());
    let malay = language
        .split(['-', '_'])
        .next()
        .is_some_and(|l| l.eq_ignore_ascii_case("ms"));
    let (days, months) = if malay {
        (MALAY_DAYS, MALAY_MONTHS)
    } else {
        (ENGLISH_DAYS, ENGLISH_MONTHS)
    };
    let day = days[usize::from(t.weekday().to_monday_zero_offset().unsigned_abs()) % 7];
    let month = months[(usize::from(t.month().unsigned_abs()) + 11) % 12];
    format!(
        "{day}, {} {month} {}, {:02}:{:02}",
        t.day(),
        t.year(),
        t.hour(),
        t.minute()
    )
}

/// Shared synthesized audio.
type Pcm = Arc<Vec<i16>>;

/// Synthesized phrases by (kind, rate).
pub struct PromptCache {
    texts: PromptTexts,
    tts: Arc<dyn TtsProvider>,
    audio: RwLock<HashMap<(PromptKind, u32), Pcm>>,
    max_concurrency: usize,
}

impl std::fmt::Debug for PromptCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptCache")
            .field("texts", &self.texts)
            .finish_non_exhaustive()
    }
}

/// Longest a phrase synthesis may take (each attempt).
const SYNTH_TIMEOUT: Duration = Duration::from_secs(15);
/// Syntheses at once during [`PromptCache::preload`] unless set with
/// [`PromptCache::with_max_concurrency`] (the default of `tts.max_concurrency`).
pub const DEFAULT_MAX_CONCURRENCY: usize = 2;
/// Attempts per phrase while the service answers 429.
const BUSY_ATTEMPTS: u32 = 6;
/// The first wait after a 429 without `Retry-After`; doubled after each further one.
const BUSY_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between attempts, whatever the service asks for.
const MAX_BUSY_WAIT: Duration = Duration::from_secs(10);

/// Why one synthesis attempt failed.
enum SynthError {
    /// 429: retry after the wait the service asked for, if it said.
    Busy(Option<Duration>, String),
    Other(String),
}

impl SynthError {
    fn message(self) -> String {
        match self {
            Self::Busy(_, m) | Self::Other(m) => m,
        }
    }
}

impl From<TtsError> for SynthError {
    fn from(e: TtsError) -> Self {
        match e {
            TtsError::Status {
                retry_after_ms,
                ref message,
                ..
            } if e.is_busy() => Self::Busy(
                retry_after_ms.map(Duration::from_millis),
                format!("HTTP 429: {message}"),
            ),
            other => Self::Other(other.to_string()),
        }
    }
}

impl PromptCache {
    /// An empty cache.
    pub fn new(texts: PromptTexts, tts: Arc<dyn TtsProvider>) -> Self {
        Self {
            texts,
            tts,
            audio: RwLock::new(HashMap::new()),
            max_concurrency: DEFAULT_MAX_CONCURRENCY,
        }
    }

    /// At most `n` (at least 1) syntheses at once during [`PromptCache::preload`]
    /// (`tts.max_concurrency`).
    pub fn with_max_concurrency(mut self, n: u32) -> Self {
        self.max_concurrency = usize::try_from(n).unwrap_or(usize::MAX).max(1);
        self
    }

    /// The texts.
    pub fn texts(&self) -> &PromptTexts {
        &self.texts
    }

    /// Whether the phrase has variables, so each call renders and synthesizes its own (see
    /// [`PromptCache::for_call`]).
    pub fn is_per_call(&self, kind: PromptKind) -> bool {
        has_variables(self.texts.text(kind))
    }

    /// A cache for one call's own phrases (those with variables, rendered with `vars`),
    /// sharing this cache's TTS client; `None` when every phrase is fixed.
    pub fn for_call(&self, vars: &PromptVars) -> Option<Arc<PromptCache>> {
        let any = self.texts.all().iter().any(|(_, t)| has_variables(t));
        any.then(|| {
            Arc::new(Self {
                texts: self.texts.render(vars),
                tts: Arc::clone(&self.tts),
                audio: RwLock::new(HashMap::new()),
                max_concurrency: self.max_concurrency,
            })
        })
    }

    /// What this cache says for a phrase: its text, or for a phrase with variables the text
    /// with none of them filled in (their fallbacks, or nothing): the generic version a call
    /// plays when its own could not be synthesized in time.
    pub fn spoken_text(&self, kind: PromptKind) -> std::borrow::Cow<'_, str> {
        let text = self.texts.text(kind);
        if has_variables(text) {
            render(text, &PromptVars::default()).into()
        } else {
            text.into()
        }
    }

    /// Synthesizes every phrase at each rate (a phrase with variables in its generic
    /// version, see [`PromptCache::spoken_text`]), at most `max_concurrency` at a time,
    /// retrying 429s; failures are logged and retried on first use.
    pub async fn preload(&self, rates: &[u32]) {
        let jobs: Vec<(PromptKind, u32)> = rates
            .iter()
            .flat_map(|&rate| {
                [
                    PromptKind::Greeting,
                    PromptKind::Apology,
                    PromptKind::Hold,
                    PromptKind::StillThere,
                    PromptKind::Handover,
                    PromptKind::Filler,
                ]
                .map(move |kind| (kind, rate))
            })
            .collect();
        futures_util::stream::iter(jobs)
            .map(|(kind, rate)| self.preload_one(kind, rate))
            .buffer_unordered(self.max_concurrency)
            .collect::<Vec<()>>()
            .await;
    }

    async fn preload_one(&self, kind: PromptKind, rate: u32) {
        if self.spoken_text(kind).trim().is_empty() {
            return;
        }
        match self.synthesize(kind, rate).await {
            Ok(pcm) => info!(
                ?kind,
                rate,
                ms = pcm.len() as u64 * 1000 / u64::from(rate),
                "prompt cached"
            ),
            Err(e) => {
                warn!(?kind, rate, error = %e, "could not synthesize prompt at startup; will retry on first use")
            }
        }
    }

    /// Opens a synthesis of a phrase at `rate` and sends it its whole text: the audio comes
    /// on the stream as the service produces it, for a phrase that plays while it is being
    /// synthesized (one with variables, which no cache holds). No retry: the caller is
    /// waiting, and the generic version is the fallback.
    pub async fn open_stream(&self, kind: PromptKind, rate: u32) -> Result<TtsStream, String> {
        let text = self.spoken_text(kind);
        if text.trim().is_empty() {
            return Err("empty prompt text".into());
        }
        let params = TtsParams {
            sample_rate: rate,
            call_id: format!("prompt-{kind:?}"),
            language_code: None,
        };
        let stream = self.tts.open(params).await.map_err(|e| e.to_string())?;
        let closed = |_| "TTS stream closed".to_owned();
        let text = TtsInput::Text(format!("{} ", text.trim()));
        stream.text.send(text).await.map_err(closed)?;
        stream.text.send(TtsInput::Finish).await.map_err(closed)?;
        Ok(stream)
    }

    /// The cached audio, if ready (never waits).
    pub fn cached(&self, kind: PromptKind, rate: u32) -> Option<Arc<Vec<i16>>> {
        self.audio
            .try_read()
            .ok()
            .and_then(|m| m.get(&(kind, rate)).cloned())
    }

    /// The audio, synthesizing it now if it is not cached.
    pub async fn get(&self, kind: PromptKind, rate: u32) -> Result<Arc<Vec<i16>>, String> {
        if let Some(a) = self.audio.read().await.get(&(kind, rate)) {
            return Ok(Arc::clone(a));
        }
        self.synthesize(kind, rate).await
    }

    async fn synthesize(&self, kind: PromptKind, rate: u32) -> Result<Arc<Vec<i16>>, String> {
        let text = self.spoken_text(kind);
        let text = text.as_ref();
        if text.trim().is_empty() {
            return Err("empty prompt text".into());
        }
        let mut backoff = BUSY_BACKOFF;
        let mut attempt = 1;
        let pcm = loop {
            let params = TtsParams {
                sample_rate: rate,
                call_id: format!("prompt-{kind:?}"),
                language_code: None,
            };
            let result = tokio::time::timeout(
                SYNTH_TIMEOUT,
                synthesize_attempt(self.tts.as_ref(), params, text),
            )
            .await
            .unwrap_or_else(|_| {
                Err(SynthError::Other(format!(
                    "timed out after {SYNTH_TIMEOUT:?}"
                )))
            });
            match result {
                Ok(pcm) => break pcm,
                Err(SynthError::Busy(asked, why)) if attempt < BUSY_ATTEMPTS => {
                    let wait = asked.unwrap_or(backoff).min(MAX_BUSY_WAIT);
                    warn!(?kind, rate, attempt, wait_ms = wait.as_millis() as u64, reason = %why, "TTS busy; retrying the prompt");
                    tokio::time::sleep(wait).await;
                    backoff = (backoff * 2).min(MAX_BUSY_WAIT);
                    attempt += 1;
                }
                Err(e) => return Err(e.message()),
            }
        };
        let pcm = Arc::new(pcm);
        self.audio
            .write()
            .await
            .insert((kind, rate), Arc::clone(&pcm));
        Ok(pcm)
    }
}

/// Synthesizes a whole text through a streaming provider.
pub async fn synthesize_text(
    tts: &dyn TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, String> {
    synthesize_attempt(tts, params, text)
        .await
        .map_err(SynthError::message)
}

async fn synthesize_attempt(
    tts: &dyn TtsProvider,
    params: TtsParams,
    text: &str,
) -> Result<Vec<i16>, SynthError> {
    let closed = || SynthError::Other("TTS stream closed".into());
    let mut stream = tts.open(params).await?;
    stream
        .text
        .send(TtsInput::Text(format!("{} ", text.trim())))
        .await
        .map_err(|_| closed())?;
    stream
        .text
        .send(TtsInput::Finish)
        .await
        .map_err(|_| closed())?;
    let mut pcm = Vec::new();
    while let Some(out) = stream.audio.recv().await {
        match out {
            TtsOutput::Audio(a) => pcm.extend(a),
            TtsOutput::Alignment { .. } => {}
            TtsOutput::Done => break,
            // Over HTTP a 429 arrives here, as text: retried with the default backoff.
            TtsOutput::Failed(e) if e.contains("HTTP 429") => {
                return Err(SynthError::Busy(None, e));
            }
            TtsOutput::Failed(e) => return Err(SynthError::Other(e)),
        }
    }
    if pcm.is_empty() {
        return Err(SynthError::Other("TTS returned no audio".into()));
    }
    Ok(pcm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::config::{OutputFormat, Secret, Settings, TtsTransport};
    use crate::providers::tts::elevenlabs::ElevenLabs;
    use crate::sandbox::elevenlabs::{self as fake, FakeElevenLabsConfig};

    const KEY: &str = "el-test-key";
    const GUARD: Duration = Duration::from_secs(60);

    fn texts() -> PromptTexts {
        PromptTexts {
            greeting: "Selamat datang ke khidmat pelanggan.".into(),
            apology: "Maaf, ada gangguan.".into(),
            hold: "Sekejap, ya.".into(),
            still_there: "Helo, anda masih di talian?".into(),
            handover: String::new(),
            filler: String::new(),
        }
    }

    /// A fake whose plan allows two syntheses at once, each slow enough to overlap.
    async fn small_plan(transport: TtsTransport) -> (fake::FakeElevenLabs, Arc<dyn TtsProvider>) {
        let srv = fake::spawn(FakeElevenLabsConfig {
            key: Some(KEY.into()),
            first_byte_delay_ms: 20,
            realtime_factor: 10.0,
            max_concurrent: 2,
            ..FakeElevenLabsConfig::default()
        })
        .await
        .unwrap();
        let mut s = Settings::defaults().tts;
        s.base_url = srv.base_url();
        s.transport = transport;
        s.output_format = OutputFormat::Ulaw8000;
        let el = ElevenLabs::new(&s, Secret::new(Some(KEY.into()))).unwrap();
        (srv, Arc::new(el))
    }

    async fn all_cached(cache: &PromptCache) -> usize {
        let mut n = 0;
        for rate in [8_000, 16_000] {
            for kind in [
                PromptKind::Greeting,
                PromptKind::Apology,
                PromptKind::Hold,
                PromptKind::StillThere,
            ] {
                n += usize::from(cache.cached(kind, rate).is_some());
            }
        }
        n
    }

    #[tokio::test]
    async fn preload_stays_within_the_plans_concurrency() {
        for transport in [TtsTransport::Websocket, TtsTransport::Http] {
            let (srv, tts) = small_plan(transport).await;
            let cache = PromptCache::new(texts(), tts).with_max_concurrency(2);
            tokio::time::timeout(GUARD, cache.preload(&[8_000, 16_000]))
                .await
                .expect("hang guard");
            assert_eq!(all_cached(&cache).await, 8, "{transport:?}");
            assert!(srv.stats().max_concurrent_seen() <= 2);
        }
    }

    #[tokio::test]
    async fn preload_retries_429_until_every_prompt_is_cached() {
        // Eight at once against a plan of two: six are refused at first, then retried.
        let (srv, tts) = small_plan(TtsTransport::Websocket).await;
        let cache = PromptCache::new(texts(), tts).with_max_concurrency(8);
        tokio::time::timeout(GUARD, cache.preload(&[8_000, 16_000]))
            .await
            .expect("hang guard");
        assert!(
            srv.stats().busy_rejections() >= 6,
            "the plan's limit was hit"
        );
        assert_eq!(all_cached(&cache).await, 8);
    }

    fn vars() -> PromptVars {
        let ctx = crate::call::CallContext {
            caller_number: Some("0123456789".into()),
            caller_name: Some(" ".into()),
            did: Some("60312345678".into()),
            vars: [("CUSTOMER".to_owned(), "Siti".to_owned())].into(),
            ..Default::default()
        };
        PromptVars::for_call(&ctx, "c-1", "Rabu".into())
    }

    #[test]
    fn variables_are_filled_in_and_missing_ones_leave_no_gap() {
        let v = vars();
        for (template, want) in [
            (
                "Nombor {caller_number}, DID {did}.",
                "Nombor 0123456789, DID 60312345678.",
            ),
            (
                "Helo {caller_name}, selamat datang.",
                "Helo, selamat datang.",
            ),
            ("Helo {caller_name}!", "Helo!"),
            ("Helo {caller_name|tuan/puan}, ya.", "Helo tuan/puan, ya."),
            ("Helo {var_customer} ({var_CUSTOMER}).", "Helo Siti (Siti)."),
            ("{var_missing}Hari {now}; id {call_id}", "Hari Rabu; id c-1"),
            (
                "JSON {\"a\": {b}} and { x } stay",
                "JSON {\"a\": } and { x } stay",
            ),
            ("{{caller_number}}", "{0123456789}"),
            ("no variables", "no variables"),
        ] {
            assert_eq!(render(template, &v), want, "{template}");
        }
        assert_eq!(
            unknown_variables("{caller_number} {foo} {var_} {var_x} {foo} {a b} {\"k\": 1}"),
            ["foo", "var_"]
        );
        assert!(!has_variables("Selamat datang."));
        assert!(has_variables("Hari {now}."));
    }

    #[test]
    fn now_is_told_in_the_profiles_zone_and_language() {
        let tz = jiff::tz::TimeZone::get("Asia/Kuala_Lumpur").unwrap();
        let t: jiff::Timestamp = "2026-12-06T16:05:00Z".parse().unwrap();
        assert_eq!(format_now(t, &tz, "ms-MY"), "Isnin, 7 Disember 2026, 00:05");
        assert_eq!(format_now(t, &tz, "ms"), "Isnin, 7 Disember 2026, 00:05");
        assert_eq!(
            format_now(t, &tz, "en-US"),
            "Monday, 7 December 2026, 00:05"
        );
        let t: jiff::Timestamp = "2027-08-01T04:30:00Z".parse().unwrap();
        assert_eq!(format_now(t, &tz, "ms-MY"), "Ahad, 1 Ogos 2027, 12:30");
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(format_now(t, &utc, "en-GB"), "Sunday, 1 August 2027, 04:30");
    }

    #[tokio::test]
    async fn phrases_with_variables_are_synthesized_per_call_and_cached_generic() {
        let (srv, tts) = small_plan(TtsTransport::Websocket).await;
        let mut t = texts();
        t.greeting = "Selamat datang, {caller_name|tuan}.".into();
        let vars = PromptVars::for_call(
            &crate::call::CallContext {
                caller_name: Some("Aminah Binti Abdullah".into()),
                ..Default::default()
            },
            "c-1",
            String::new(),
        );
        let cache = PromptCache::new(t, tts);
        tokio::time::timeout(GUARD, cache.preload(&[8_000]))
            .await
            .expect("hang guard");
        let generic = cache
            .cached(PromptKind::Greeting, 8_000)
            .expect("the generic version");
        assert_eq!(
            generic.len(),
            crate::sandbox::elevenlabs::speech_samples("Selamat datang, tuan.", 8_000)
        );
        assert!(cache.cached(PromptKind::Apology, 8_000).is_some());
        let own = cache.for_call(&vars).expect("the greeting varies");
        let said = "Selamat datang, Aminah Binti Abdullah.";
        assert_eq!(own.texts().greeting, said);
        let pcm = tokio::time::timeout(GUARD, own.get(PromptKind::Greeting, 8_000))
            .await
            .expect("hang guard")
            .unwrap();
        assert_eq!(
            pcm.len(),
            crate::sandbox::elevenlabs::speech_samples(said, 8_000)
        );
        let shared = cache.cached(PromptKind::Greeting, 8_000).unwrap();
        assert!(
            Arc::ptr_eq(&shared, &generic),
            "the call's own is never shared"
        );
        let fixed = PromptCache::new(texts(), Arc::clone(&cache.tts));
        assert!(fixed.for_call(&vars).is_none());
        drop(srv);
    }

    #[test]
    fn a_429_is_busy_with_the_asked_wait() {
        let e = TtsError::Status {
            status: 429,
            message: "too_many_concurrent_requests".into(),
            retry_after_ms: Some(1_500),
        };
        assert!(
            matches!(SynthError::from(e), SynthError::Busy(Some(d), m) if d == Duration::from_millis(1_500) && m.contains("429"))
        );
        let e = TtsError::Status {
            status: 401,
            message: "invalid_api_key".into(),
            retry_after_ms: None,
        };
        assert!(matches!(SynthError::from(e), SynthError::Other(_)));
    }
}
