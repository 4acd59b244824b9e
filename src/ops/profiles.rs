//! Agent profiles: one daemon, several agents. A call centre puts sales, support and an
//! after-hours line on different numbers; each wants its own greeting, instructions, voice
//! and model, while everything else (listeners, providers' endpoints, records) is shared.
//!
//! A profile is an overlay: `[profiles.NAME]` may set any key of `[agent]` (except the
//! daemon-wide `mode`) and the provider keys in [`PROVIDER_KEYS`]; the rest comes from
//! `[agent]`, `[llm]` and `[tts]`. The overlay is merged over those tables before they are
//! deserialised, so a key added to `[agent]` later is a profile key at once, with the same
//! type checks, and unknown keys are refused with the file and line they are on.
//! `[routing]` picks the profile of a call from the number it dialled ([`RoutingSettings`]);
//! the dialplan may name one instead. Without `[profiles]` there is one profile, `default`,
//! which is `[agent]` itself.

use std::collections::BTreeMap;

use config::{Value, ValueKind};
use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::config::{AgentSettings, LlmSettings, Settings, TtsSettings};
use crate::call::prompts::{PROMPT_VARIABLES, VAR_PREFIX, has_variables, unknown_variables};

/// The profile of calls nothing else chose, unless `routing.default` names another; it is
/// `[agent]` itself (plus `[profiles.default]`, if written).
pub const DEFAULT_PROFILE: &str = "default";

/// The time zone of `{now}` unless `agent.time_zone` says otherwise.
pub const DEFAULT_TIME_ZONE: &str = "Asia/Kuala_Lumpur";

/// A profile key that sets a provider setting rather than an `[agent]` one.
#[derive(Debug, Clone, Copy)]
pub struct ProviderKey {
    /// The key under `[profiles.NAME]`.
    pub key: &'static str,
    /// The section it overrides.
    pub section: &'static str,
    /// The key in that section.
    pub field: &'static str,
}

/// The provider settings a profile may override (the providers read them per client, and
/// each profile gets its own clients).
pub const PROVIDER_KEYS: [ProviderKey; 6] = [
    ProviderKey {
        key: "llm_model",
        section: "llm",
        field: "model",
    },
    ProviderKey {
        key: "llm_fallbacks",
        section: "llm",
        field: "fallback_models",
    },
    ProviderKey {
        key: "temperature",
        section: "llm",
        field: "temperature",
    },
    ProviderKey {
        key: "voice_id",
        section: "tts",
        field: "voice_id",
    },
    ProviderKey {
        key: "tts_model",
        section: "tts",
        field: "model_id",
    },
    ProviderKey {
        key: "tts_language_code",
        section: "tts",
        field: "language_code",
    },
];

/// `[agent]` keys that are the same for every call, so no profile may set them.
pub const DAEMON_WIDE_AGENT_KEYS: [&str; 1] = ["mode"];

/// One profile, resolved: the `[agent]`, `[llm]` and `[tts]` settings its calls use.
#[derive(Debug, Clone)]
pub struct ProfileSettings {
    /// Its name (`[profiles.NAME]`).
    pub name: String,
    /// `[agent]` with the profile's keys over it.
    pub agent: AgentSettings,
    /// `[llm]` with `llm_model`, `llm_fallbacks`, `temperature` over it.
    pub llm: LlmSettings,
    /// `[tts]` with `voice_id`, `tts_model`, `tts_language_code` over it.
    pub tts: TtsSettings,
    /// The keys the profile sets itself, as written under `[profiles.NAME]`.
    pub overrides: Vec<String>,
}

/// Shown (by `sifucall check`) as the keys the profile sets, not the whole merged settings.
impl Serialize for ProfileSettings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sections = (
            serde_json::to_value(&self.agent),
            serde_json::to_value(&self.llm),
            serde_json::to_value(&self.tts),
        );
        let (Ok(agent), Ok(llm), Ok(tts)) = sections else {
            return s.serialize_none();
        };
        let own: BTreeMap<&str, &serde_json::Value> = self
            .overrides
            .iter()
            .filter_map(|k| {
                let v = match PROVIDER_KEYS.iter().find(|p| p.key == k) {
                    Some(p) if p.section == "llm" => llm.get(p.field),
                    Some(p) => tts.get(p.field),
                    None => agent.get(k),
                };
                v.map(|v| (k.as_str(), v))
            })
            .collect();
        own.serialize(s)
    }
}

impl ProfileSettings {
    /// `[agent]`, `[llm]` and `[tts]` as they are: the implicit `default` profile.
    pub fn base(settings: &Settings) -> Self {
        Self {
            name: DEFAULT_PROFILE.to_owned(),
            agent: settings.agent.clone(),
            llm: settings.llm.clone(),
            tts: settings.tts.clone(),
            overrides: Vec::new(),
        }
    }

    /// The whole configuration as this profile's calls see it (no profiles of its own):
    /// `settings` with the keys the profile sets replaced. Inherited keys are read from
    /// `settings` now, not when the file was loaded, so a program that changes them after
    /// loading (the sandbox pointing the providers at its fakes) changes every profile.
    pub fn apply(&self, settings: &Settings) -> Settings {
        let mut s = settings.clone();
        let agent: Vec<&str> = self
            .overrides
            .iter()
            .map(String::as_str)
            .filter(|k| !PROVIDER_KEYS.iter().any(|p| p.key == *k))
            .collect();
        let provider = |section: &str| -> Vec<&str> {
            PROVIDER_KEYS
                .iter()
                .filter(|p| p.section == section && self.overrides.iter().any(|k| k == p.key))
                .map(|p| p.field)
                .collect()
        };
        s.agent = overlay(&settings.agent, &self.agent, &agent);
        s.llm = overlay(&settings.llm, &self.llm, &provider("llm"));
        s.tts = overlay(&settings.tts, &self.tts, &provider("tts"));
        s.profiles.clear();
        s
    }

    /// Where the profile sets `key` (`agent.greeting`, `llm.model`...):
    /// `profiles.NAME.greeting`, `profiles.NAME.llm_model`; `None` when it inherits it.
    pub fn own_key(&self, key: &str) -> Option<String> {
        let (section, field) = key.split_once('.')?;
        let own = match section {
            "agent" => field,
            "llm" | "tts" => {
                PROVIDER_KEYS
                    .iter()
                    .find(|p| p.section == section && p.field == field)?
                    .key
            }
            _ => return None,
        };
        self.overrides
            .iter()
            .any(|k| k == own)
            .then(|| format!("profiles.{}.{own}", self.name))
    }
}

/// `base` with `fields` taken from `own`; `own` itself if that does not make a value (it
/// always does: both are the same type, read from the same layered file).
fn overlay<T: Serialize + DeserializeOwned + Clone>(base: &T, own: &T, fields: &[&str]) -> T {
    if fields.is_empty() {
        return base.clone();
    }
    let (Ok(mut merged), Ok(own_value)) = (serde_json::to_value(base), serde_json::to_value(own))
    else {
        return own.clone();
    };
    for f in fields {
        if let (Some(slot), Some(v)) = (merged.get_mut(*f), own_value.get(*f)) {
            *slot = v.clone();
        }
    }
    serde_json::from_value(merged).unwrap_or_else(|_| own.clone())
}

/// Every profile's settings, `default` first: `[agent]` itself unless `[profiles.default]`
/// overlays it.
pub fn all_profiles(settings: &Settings) -> Vec<ProfileSettings> {
    let default = settings
        .profiles
        .get(DEFAULT_PROFILE)
        .cloned()
        .unwrap_or_else(|| ProfileSettings::base(settings));
    std::iter::once(default)
        .chain(
            settings
                .profiles
                .values()
                .filter(|p| p.name != DEFAULT_PROFILE)
                .cloned(),
        )
        .collect()
}

/// `[routing]`: which profile a call gets.
///
/// Order: the profile the dialplan names (`SIFUCALL_PROFILE`), else the rule for the
/// dialled number (an exact number before any prefix, the longest prefix first), else
/// `default`. Numbers are compared without a leading `+` and without spaces, dashes, dots
/// and brackets, so `"+60 3-1234 5678"` and `"60312345678"` are the same number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSettings {
    /// The profile of calls no rule matches (and of calls whose dialplan names a profile
    /// that does not exist).
    #[serde(default = "default_profile_name")]
    pub default: String,
    /// Dialled number -> profile. A number ending in `*` is a prefix:
    /// `dids = { "60312345678" = "sales", "6031234*" = "support" }`.
    #[serde(default)]
    pub dids: BTreeMap<String, String>,
}

fn default_profile_name() -> String {
    DEFAULT_PROFILE.to_owned()
}

impl Default for RoutingSettings {
    fn default() -> Self {
        Self {
            default: default_profile_name(),
            dids: BTreeMap::new(),
        }
    }
}

/// How a call's profile was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// The dialplan named it.
    Dialplan,
    /// A DID rule (as written in the file) matched.
    Did(&'a str),
    /// Nothing matched.
    Default,
    /// The dialplan named this profile, which does not exist: the default it is.
    UnknownProfile(String),
}

/// A number as rules compare it: no `+`, spaces, dashes, dots or brackets.
pub fn normalise_number(number: &str) -> String {
    number
        .trim()
        .trim_start_matches('+')
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect()
}

impl RoutingSettings {
    /// The rule that matches `did`: an exact number first, else the longest prefix.
    /// Returns the rule as written and its profile.
    pub fn rule_for(&self, did: &str) -> Option<(&str, &str)> {
        let did = normalise_number(did);
        if did.is_empty() {
            return None;
        }
        let mut best: Option<(usize, &str, &str)> = None;
        for (rule, profile) in &self.dids {
            let n = normalise_number(rule);
            match n.strip_suffix('*') {
                None if n == did => return Some((rule, profile)),
                Some(prefix)
                    if !prefix.is_empty()
                        && did.starts_with(prefix)
                        && best.is_none_or(|(len, _, _)| prefix.len() > len) =>
                {
                    best = Some((prefix.len(), rule, profile));
                }
                _ => {}
            }
        }
        best.map(|(_, rule, profile)| (rule, profile))
    }

    /// The profile for a call: `dialplan` (the name the dialplan set) when it names one of
    /// `exists`, else the DID rule, else the default.
    pub fn route<'a>(
        &'a self,
        dialplan: Option<&str>,
        did: Option<&str>,
        exists: impl Fn(&str) -> bool,
    ) -> (String, Route<'a>) {
        if let Some(asked) = dialplan.map(|p| p.trim().to_lowercase()) {
            if !asked.is_empty() {
                if exists(&asked) {
                    return (asked, Route::Dialplan);
                }
                return (self.default.clone(), Route::UnknownProfile(asked));
            }
        }
        if let Some((rule, profile)) = did.and_then(|d| self.rule_for(d)) {
            return (profile.to_owned(), Route::Did(rule));
        }
        (self.default.clone(), Route::Default)
    }
}

/// Whether a profile name can be written as a section and set from the environment
/// (`SIFUCALL_PROFILES__NAME__KEY`, which is read in lower case).
pub fn valid_profile_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

// ---- resolving the overlay -----------------------------------------------------------

/// The layered configuration without `[profiles]`, which [`Settings`] does not deserialise
/// itself (see [`resolve`]).
pub(crate) fn without_profiles(cache: &Value) -> Value {
    let mut v = cache.clone();
    if let ValueKind::Table(t) = &mut v.kind {
        t.remove("profiles");
    }
    v
}

fn table_of(v: &Value) -> Option<&config::Map<String, Value>> {
    match &v.kind {
        ValueKind::Table(t) => Some(t),
        _ => None,
    }
}

/// Resolves every `[profiles.NAME]` of the layered configuration over its `[agent]`,
/// `[llm]` and `[tts]`. Returns the profiles that resolved and one `(key, problem)` for
/// each that did not.
pub(crate) fn resolve(cache: &Value) -> (BTreeMap<String, ProfileSettings>, Vec<(String, String)>) {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    let Some(root) = table_of(cache) else {
        return (out, problems);
    };
    let Some(profiles) = root.get("profiles") else {
        return (out, problems);
    };
    let Some(profiles) = table_of(profiles) else {
        problems.push((
            "profiles".to_owned(),
            "must be a table of [profiles.NAME] sections".to_owned(),
        ));
        return (out, problems);
    };
    let section = |name: &str| {
        root.get(name)
            .and_then(table_of)
            .cloned()
            .unwrap_or_default()
    };
    let agent_fields = struct_fields::<AgentSettings>();
    let mut names: Vec<&String> = profiles.keys().collect();
    names.sort();
    for name in names {
        let key = format!("profiles.{name}");
        if !valid_profile_name(name) {
            problems.push((
                key,
                format!(
                    "{name:?} is not a profile name: use lower-case letters, digits, '-' and '_' \
                     (the environment can only set lower-case names)"
                ),
            ));
            continue;
        }
        let Some(own) = profiles.get(name).and_then(table_of) else {
            problems.push((
                key,
                "must be a table: [profiles.NAME] followed by its keys".to_owned(),
            ));
            continue;
        };
        let (mut agent, mut llm, mut tts) = (section("agent"), section("llm"), section("tts"));
        let mut overrides = Vec::new();
        let mut keys: Vec<&String> = own.keys().collect();
        keys.sort();
        for k in keys {
            let value = own[k].clone();
            if let Some(p) = PROVIDER_KEYS.iter().find(|p| p.key == k) {
                let target = if p.section == "llm" {
                    &mut llm
                } else {
                    &mut tts
                };
                target.insert(p.field.to_owned(), value);
            } else if DAEMON_WIDE_AGENT_KEYS.contains(&k.as_str()) {
                problems.push((
                    format!("{key}.{k}"),
                    format!("agent.{k} is the same for every call; set it in [agent] only"),
                ));
                continue;
            } else if agent_fields.contains(&k.as_str()) {
                agent.insert(k.clone(), value);
            } else {
                let provider: Vec<&str> = PROVIDER_KEYS.iter().map(|p| p.key).collect();
                problems.push((
                    format!("{key}.{k}"),
                    format!(
                        "unknown profile key; a profile may set any [agent] key but {} \
                         (e.g. greeting, system_prompt, language) and {}",
                        DAEMON_WIDE_AGENT_KEYS.join(", "),
                        provider.join(", ")
                    ),
                ));
                continue;
            }
            overrides.push(k.clone());
        }
        let agent = deserialise::<AgentSettings>(agent, &key, |f| f.to_owned());
        let from_provider = |section: &'static str| {
            move |field: &str| {
                PROVIDER_KEYS
                    .iter()
                    .find(|p| p.section == section && p.field == field)
                    .map_or_else(|| format!("({section}.{field})"), |p| p.key.to_owned())
            }
        };
        let llm = deserialise::<LlmSettings>(llm, &key, from_provider("llm"));
        let tts = deserialise::<TtsSettings>(tts, &key, from_provider("tts"));
        match (agent, llm, tts) {
            (Ok(agent), Ok(llm), Ok(tts)) => {
                out.insert(
                    name.clone(),
                    ProfileSettings {
                        name: name.clone(),
                        agent,
                        llm,
                        tts,
                        overrides,
                    },
                );
            }
            (a, l, t) => problems.extend([a.err(), l.err(), t.err()].into_iter().flatten()),
        }
    }
    (out, problems)
}

/// Deserialises one merged section; an error names the profile's key (`own_key(field)`).
fn deserialise<T: DeserializeOwned>(
    table: config::Map<String, Value>,
    profile_key: &str,
    own_key: impl Fn(&str) -> String,
) -> Result<T, (String, String)> {
    Value::new(None, ValueKind::Table(table))
        .try_deserialize::<T>()
        .map_err(|e| {
            let msg = e.to_string();
            let field = msg
                .split("for key `")
                .nth(1)
                .and_then(|r| r.split('`').next())
                .map(|f| f.split('.').next().unwrap_or(f).to_owned());
            let key = match field {
                Some(f) => format!("{profile_key}.{}", own_key(&f)),
                None => profile_key.to_owned(),
            };
            (key, msg)
        })
}

/// The field names of a struct deriving `Deserialize` (what `deny_unknown_fields` accepts).
pub fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

/// A deserializer that only asks for the struct's field names.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("fields read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

// ---- validation ------------------------------------------------------------------------

/// The `[agent]` texts that may hold prompt variables, with whether each is spoken.
pub const TEMPLATE_KEYS: [&str; 5] = [
    "greeting",
    "system_prompt",
    "apology",
    "hold_prompt",
    "still_there_prompt",
];

/// Checks one resolved profile (the `default` one too) as a whole: the hook for checks that
/// need more than one key's value, e.g. tool names against the tools defined, transfer
/// targets against the profile's list. Returns `(key, problem)` with keys as in `[agent]`
/// (`agent.greeting`, `llm.model`); the caller reports them under the profile's own key
/// (`profiles.NAME.greeting`) when the profile sets that key, and once under `[agent]`
/// otherwise.
pub fn validate_profile(profile: &ProfileSettings) -> Vec<(String, String)> {
    let a = &profile.agent;
    let mut out = Vec::new();
    let known = || {
        let mut names: Vec<String> = PROMPT_VARIABLES
            .iter()
            .map(|v| format!("{{{v}}}"))
            .collect();
        names.push(format!("{{{VAR_PREFIX}NAME}}"));
        names.push("{lookup_FIELD}".to_owned());
        names.join(", ")
    };
    for (key, text) in [
        ("greeting", &a.greeting),
        ("system_prompt", &a.system_prompt),
        ("apology", &a.apology),
        ("hold_prompt", &a.hold_prompt),
        ("still_there_prompt", &a.still_there_prompt),
        ("handover_line", &a.handover_line),
        ("filler_phrase", &a.filler_phrase),
    ] {
        let unknown = unknown_variables(text);
        if !unknown.is_empty() {
            let list: Vec<String> = unknown.iter().map(|n| format!("{{{n}}}")).collect();
            out.push((
                format!("agent.{key}"),
                format!(
                    "undefined variable{} {}; prompts may use {} (text in braces that is not \
                     a name, such as JSON, is left as it is)",
                    if list.len() == 1 { "" } else { "s" },
                    list.join(", "),
                    known()
                ),
            ));
        }
    }
    if has_variables(&a.apology) {
        out.push((
            "agent.apology".to_owned(),
            "must not hold variables: it is synthesized once and cached, because it is what \
             callers hear when text-to-speech itself fails"
                .to_owned(),
        ));
    }
    if let Err(e) = jiff::tz::TimeZone::get(&a.time_zone) {
        out.push((
            "agent.time_zone".to_owned(),
            format!(
                "{:?} is not a time zone of the IANA database, e.g. {DEFAULT_TIME_ZONE:?} ({e})",
                a.time_zone
            ),
        ));
    }
    out
}

/// Checks `[routing]` against the profiles that exist: `(key, problem)`.
pub fn validate_routing(settings: &Settings) -> Vec<(String, String)> {
    let exists = |name: &str| name == DEFAULT_PROFILE || settings.profiles.contains_key(name);
    let defined = || {
        let mut names = vec![DEFAULT_PROFILE.to_owned()];
        names.extend(
            settings
                .profiles
                .keys()
                .filter(|n| *n != DEFAULT_PROFILE)
                .cloned(),
        );
        names.join(", ")
    };
    let r = &settings.routing;
    let mut out = Vec::new();
    if !exists(&r.default) {
        out.push((
            "routing.default".to_owned(),
            format!(
                "profile {:?} is not defined (profiles: {})",
                r.default,
                defined()
            ),
        ));
    }
    for (did, profile) in &r.dids {
        let key = format!("routing.dids.{did}");
        let n = normalise_number(did);
        let digits = n.strip_suffix('*').unwrap_or(&n);
        if digits.is_empty() {
            out.push((
                key,
                format!(
                    "{did:?} matches every number; use routing.default for calls no rule matches"
                ),
            ));
            continue;
        }
        if digits.contains('*') {
            out.push((
                key.clone(),
                format!("{did:?}: '*' may only end a number (a prefix rule)"),
            ));
        }
        if !exists(profile) {
            out.push((
                key,
                format!(
                    "routes to profile {profile:?}, which is not defined (profiles: {})",
                    defined()
                ),
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(rules: &[(&str, &str)]) -> RoutingSettings {
        RoutingSettings {
            default: "main".into(),
            dids: rules
                .iter()
                .map(|(d, p)| (d.to_string(), p.to_string()))
                .collect(),
        }
    }

    #[test]
    fn exact_number_beats_any_prefix_and_the_longest_prefix_wins() {
        let r = routing(&[
            ("6031234*", "support"),
            ("603123*", "general"),
            ("60312345678", "sales"),
        ]);
        let all = |_: &str| true;
        let pick = |did: &str| r.route(None, Some(did), all).0;
        assert_eq!(pick("60312345678"), "sales");
        assert_eq!(pick("+60 3-1234 5678"), "sales", "written differently");
        assert_eq!(pick("60312345679"), "support", "longest prefix");
        assert_eq!(pick("6031239999"), "general");
        assert_eq!(pick("6039999"), "main");
        assert_eq!(r.route(None, None, all), ("main".into(), Route::Default));
        assert_eq!(
            r.route(None, Some("60312345679"), all).1,
            Route::Did("6031234*")
        );
    }

    #[test]
    fn the_dialplan_wins_and_an_unknown_name_gets_the_default() {
        let r = routing(&[("60312345678", "sales")]);
        let exists = |n: &str| ["sales", "support", "main"].contains(&n);
        assert_eq!(
            r.route(Some("support"), Some("60312345678"), exists),
            ("support".into(), Route::Dialplan)
        );
        assert_eq!(
            r.route(Some(" Support "), None, exists).0,
            "support",
            "case and spaces"
        );
        assert_eq!(
            r.route(Some("nosuch"), Some("60312345678"), exists),
            ("main".into(), Route::UnknownProfile("nosuch".into()))
        );
        assert_eq!(
            r.route(Some(""), Some("60312345678"), exists).0,
            "sales",
            "an empty channel variable names nothing"
        );
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: u32,
        b: String,
    }

    #[test]
    fn struct_fields_are_read_from_the_derive() {
        assert_eq!(struct_fields::<Two>(), &["a", "b"]);
        let agent = struct_fields::<AgentSettings>();
        assert!(agent.contains(&"greeting") && agent.contains(&"time_zone"));
    }

    // ---- the overlay, as loaded from a file ----------------------------------------------

    fn load(toml: &str, env: &[(&str, &str)]) -> (Result<Settings, String>, String) {
        let dir = std::env::temp_dir().join(format!(
            "sifucall-profiles-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sifucall.toml");
        std::fs::write(&path, toml).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let r = Settings::load_from(Some(&path), env).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        (r, path.display().to_string())
    }

    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    const TWO_PROFILES: &str = r#"
[agent]
greeting = "Helo."
hold_after_ms = 1300

[profiles.sales]
greeting = "Jualan, {caller_name|tuan/puan}."
hold_after_ms = 900
llm_model = "openai/gpt-4o"
temperature = 0.2
voice_id = "salesVoice"

[profiles.support]
language = "en-US"
languages = ["en-US", "ms-MY"]
tts_language_code = "en"

[routing]
default = "support"
dids = { "60312345678" = "sales", "6031234*" = "support" }
"#;

    #[test]
    fn a_profile_overlays_agent_and_provider_keys_and_inherits_the_rest() {
        let s = load(TWO_PROFILES, &[]).0.unwrap();
        let sales = &s.profiles["sales"];
        assert_eq!(sales.agent.greeting, "Jualan, {caller_name|tuan/puan}.");
        assert_eq!(sales.agent.hold_after_ms, 900);
        assert_eq!(sales.llm.model, "openai/gpt-4o");
        assert_eq!(sales.llm.temperature, 0.2);
        assert_eq!(sales.tts.voice_id, "salesVoice");
        // Inherited: from the operator's [agent] and from the built-in defaults.
        assert_eq!(sales.agent.language, s.agent.language);
        assert_eq!(sales.agent.apology, s.agent.apology);
        assert_eq!(sales.tts.model_id, s.tts.model_id);
        assert_eq!(sales.llm.max_tokens, s.llm.max_tokens);
        let support = &s.profiles["support"];
        assert_eq!(support.agent.greeting, "Helo.", "the operator's [agent]");
        assert_eq!(support.agent.hold_after_ms, 1300);
        assert_eq!(support.agent.language, "en-US");
        assert_eq!(support.tts.language_code, "en");
        assert_eq!(
            support.agent.languages,
            ["en-US", "ms-MY"],
            "a key added to [agent] later"
        );
        assert!(sales.agent.languages.is_empty());
        assert_eq!(
            sales.overrides,
            [
                "greeting",
                "hold_after_ms",
                "llm_model",
                "temperature",
                "voice_id"
            ]
        );
        let names: Vec<String> = all_profiles(&s).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["default", "sales", "support"]);
        assert_eq!(all_profiles(&s)[0].agent.greeting, "Helo.");
        // `check` shows what each profile sets, not the whole merged sections.
        let shown = s.redacted_json().unwrap();
        assert_eq!(shown["profiles"]["sales"]["llm_model"], "openai/gpt-4o");
        assert_eq!(shown["profiles"]["support"].as_object().unwrap().len(), 3);
        assert_eq!(shown["routing"]["dids"]["6031234*"], "support");
    }

    #[test]
    fn inherited_keys_follow_later_changes_to_the_sections() {
        let mut s = load(TWO_PROFILES, &[]).0.unwrap();
        s.llm.base_url = "http://127.0.0.1:1/api/v1".into();
        s.tts.base_url = "http://127.0.0.1:2".into();
        s.agent.apology = "Maaf sekali lagi.".into();
        let sales = s.profiles["sales"].apply(&s);
        assert_eq!(sales.llm.base_url, "http://127.0.0.1:1/api/v1");
        assert_eq!(sales.tts.base_url, "http://127.0.0.1:2");
        assert_eq!(sales.agent.apology, "Maaf sekali lagi.");
        assert_eq!(sales.llm.model, "openai/gpt-4o", "its own");
        assert_eq!(sales.llm.temperature, 0.2);
        assert_eq!(sales.tts.voice_id, "salesVoice");
        assert_eq!(sales.agent.hold_after_ms, 900);
        assert!(sales.profiles.is_empty());
    }

    #[test]
    fn profile_keys_come_from_the_environment_too() {
        let (s, _) = load(
            TWO_PROFILES,
            &[
                ("SIFUCALL_PROFILES__SALES__GREETING", "Dari env."),
                ("SIFUCALL_PROFILES__SALES__HOLD_AFTER_MS", "700"),
            ],
        );
        let s = s.unwrap();
        assert_eq!(s.profiles["sales"].agent.greeting, "Dari env.");
        assert_eq!(s.profiles["sales"].agent.hold_after_ms, 700);
        let (e, _) = load(
            TWO_PROFILES,
            &[("SIFUCALL_PROFILES__SALES__HOLD_AFTER_MS", "5")],
        );
        let e = e.unwrap_err();
        assert!(
            e.contains("profiles.sales.hold_after_ms")
                && e.contains("SIFUCALL_PROFILES__SALES__HOLD_AFTER_MS"),
            "{e}"
        );
    }

    #[test]
    fn without_profiles_the_default_is_agent_itself() {
        let s = load("[agent]\ngreeting = \"Helo.\"\n", &[]).0.unwrap();
        assert!(s.profiles.is_empty());
        let all = all_profiles(&s);
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].name, DEFAULT_PROFILE);
        assert_eq!(all[0].agent.greeting, "Helo.");
        assert!(all[0].overrides.is_empty());
        assert_eq!(s.routing, RoutingSettings::default());
        let defaults = Settings::defaults();
        assert!(defaults.profiles.is_empty() && defaults.routing.dids.is_empty());
    }

    /// The problems of a file, one per line.
    fn problems(toml: &str) -> (Vec<String>, String) {
        let (r, path) = load(toml, &[]);
        match r {
            Ok(_) => panic!("accepted:\n{toml}"),
            Err(e) => (e.lines().map(str::to_owned).collect(), path),
        }
    }

    fn has(problems: &[String], needles: &[&str]) -> bool {
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n)))
    }

    #[test]
    fn unknown_and_daemon_wide_keys_are_refused_with_file_and_line() {
        let (p, path) = problems(
            "[profiles.sales]\ngreeting = \"Helo.\"\ngreting = \"typo\"\nmode = \"echo\"\n",
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            has(
                &p,
                &[
                    "profiles.sales.greting",
                    &format!("{path}:3"),
                    "unknown profile key"
                ]
            ),
            "{p:#?}"
        );
        assert!(
            has(
                &p,
                &["profiles.sales.mode", &format!("{path}:4"), "[agent] only"]
            ),
            "{p:#?}"
        );
    }

    #[test]
    fn profile_values_get_the_same_checks_as_agent() {
        let (p, path) = problems(
            r#"
[profiles.sales]
hold_after_ms = 50
language = "ms_MY"
temperature = 3.0
tts_model = "bad model"
languages = ["ms-MY"]

[profiles.typed]
hold_after_ms = 1.5
"#,
        );
        for (key, line) in [
            ("profiles.sales.hold_after_ms", 3),
            ("profiles.sales.language", 4),
            ("profiles.sales.temperature", 5),
            ("profiles.sales.tts_model", 6),
            ("profiles.sales.languages", 7),
            ("profiles.typed.hold_after_ms", 10),
        ] {
            assert!(has(&p, &[key, &format!("{path}:{line}")]), "{key}: {p:#?}");
        }
        assert_eq!(p.len(), 6, "{p:#?}");
    }

    #[test]
    fn an_inherited_problem_is_reported_once_under_its_own_key() {
        let (p, _) =
            problems("[agent]\nhold_after_ms = 50\n\n[profiles.sales]\ngreeting = \"x\"\n");
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("agent.hold_after_ms"), "{p:#?}");
    }

    #[test]
    fn undefined_prompt_variables_are_errors() {
        let (p, path) = problems(
            r#"
[agent]
system_prompt = 'Hari ini {today}. JSON like {"a": 1} and { } is text.'

[profiles.sales]
greeting = "Helo {caller_nmae}, {var_order} {caller_name|tuan}."
hold_prompt = "Sekejap {did}."
"#,
        );
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(has(&p, &["agent.system_prompt", "{today}"]), "{p:#?}");
        assert!(
            has(
                &p,
                &[
                    "profiles.sales.greeting",
                    &format!("{path}:6"),
                    "{caller_nmae}"
                ]
            ),
            "{p:#?}"
        );
        let (p, _) = problems("[agent]\napology = \"Maaf {caller_name}.\"\n");
        assert!(has(&p, &["agent.apology", "cached"]), "{p:#?}");
        let (p, _) = problems("[profiles.x]\ntime_zone = \"Asia/Kuala_Lumpar\"\n");
        assert!(has(&p, &["profiles.x.time_zone", "IANA"]), "{p:#?}");
    }

    #[test]
    fn routing_must_name_profiles_that_exist() {
        let (p, _) = problems(
            r#"
[profiles.sales]
greeting = "x"

[routing]
default = "main"
dids = { "601" = "sales", "602" = "nosuch", "*" = "sales", "60*1*" = "sales" }
"#,
        );
        assert!(
            has(&p, &["routing.default", "\"main\"", "default, sales"]),
            "{p:#?}"
        );
        assert!(has(&p, &["routing.dids.602", "\"nosuch\""]), "{p:#?}");
        assert!(has(&p, &["routing.dids.*", "routing.default"]), "{p:#?}");
        assert!(has(&p, &["routing.dids.60*1*", "only end"]), "{p:#?}");
        assert_eq!(p.len(), 4, "{p:#?}");
        let (p, _) = problems("[profiles.Sales]\ngreeting = \"x\"\n");
        assert!(has(&p, &["profiles.Sales", "lower-case"]), "{p:#?}");
        let (p, _) = problems("[routing]\ndefualt = \"x\"\n");
        assert!(has(&p, &["defualt"]), "{p:#?}");
    }

    #[test]
    fn profile_names() {
        for ok in ["sales", "after-hours", "line_2", "2nd"] {
            assert!(valid_profile_name(ok), "{ok}");
        }
        for bad in ["", "Sales", "-x", "a b", "a.b", "café"] {
            assert!(!valid_profile_name(bad), "{bad}");
        }
    }
}
