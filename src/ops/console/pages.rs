//! The console's HTML, rendered on the server. Every value that comes from a call (names and
//! numbers from the PBX, what the caller said, error texts) goes through [`esc`]; the live
//! view's script builds its rows with `textContent`, never `innerHTML`.

use std::fmt::Write as _;

use super::{CallDetail, CallFilter, CallRow, DayTotals};
use crate::ops::live::LiveCall;
use crate::ops::records::TurnTiming;

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2630;background:#f6f7f9}
header{background:#1d2630;color:#fff;padding:.6em 1.2em;display:flex;gap:1.5em;align-items:baseline}
header a{color:#cfe3ff;text-decoration:none}header a.on{color:#fff;font-weight:600}
header .brand{font-weight:700;color:#fff}
main{padding:1em 1.2em;max-width:1200px}
table{border-collapse:collapse;background:#fff;margin:.5em 0 1.5em;min-width:40%}
th,td{border:1px solid #d5dae0;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#eef1f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.state-speaking{color:#0a7a2f;font-weight:600}.state-thinking{color:#a15c00;font-weight:600}
.state-listening{color:#245fb0}
.muted{color:#6b7785}.err{color:#a10000}
form.filters{display:flex;flex-wrap:wrap;gap:.6em;align-items:end;background:#fff;padding:.6em;border:1px solid #d5dae0}
form.filters label{display:flex;flex-direction:column;font-size:12px}
.bar{display:flex;height:12px;width:420px;background:#eef1f4}
.bar span{display:block;height:12px}
.s0{background:#7aa6e0}.s1{background:#e0b44a}.s2{background:#b07ad6}.s3{background:#5fbf7f}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{color:#6b7785}dd{margin:0}
"#;

/// The page around a body.
pub(super) fn layout(title: &str, active: &str, body: &str, script: Option<&str>) -> String {
    let nav = |href: &str, name: &str, key: &str| {
        let class = if key == active { " class=\"on\"" } else { "" };
        format!("<a href=\"{href}\"{class}>{name}</a>")
    };
    let mut out = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} · sifucall</title><style>{STYLE}</style></head><body>\
         <header><span class=\"brand\">sifucall</span>{}{}</header><main>{body}</main>",
        esc(title),
        nav("/console", "Live calls", "live"),
        nav("/console/calls", "History", "calls"),
    );
    if let Some(s) = script {
        let _ = write!(out, "<script>{s}</script>");
    }
    out.push_str("</body></html>\n");
    out
}

/// `Name (number)`, or whichever is known.
pub(super) fn caller_label(name: Option<&str>, number: Option<&str>) -> String {
    let name = name.map(str::trim).filter(|s| !s.is_empty());
    let number = number.map(str::trim).filter(|s| !s.is_empty());
    match (name, number) {
        (Some(n), Some(x)) => format!("{n} ({x})"),
        (Some(n), None) => n.to_owned(),
        (None, Some(x)) => x.to_owned(),
        (None, None) => "unknown".to_owned(),
    }
}

/// `m:ss` (or `h:mm:ss`).
pub(super) fn duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// A time into the call, `m:ss.s`.
fn offset(ms: u64) -> String {
    format!("{}:{:04.1}", ms / 60_000, (ms % 60_000) as f64 / 1000.0)
}

fn money(amount: Option<f64>, currency: &str) -> String {
    match amount {
        Some(a) => format!("{a:.4} {}", esc(currency)),
        None => "–".into(),
    }
}

fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "–".into(), esc)
}

/// The start time without the date's noise: `2026-12-01 09:30:00`.
fn when(rfc3339: &str) -> String {
    let t = rfc3339.replace('T', " ");
    esc(t.get(..19).unwrap_or(&t))
}

// ---- live ---------------------------------------------------------------------------------

const LIVE_SCRIPT: &str = r#"
(function(){
  var body=document.querySelector('#live tbody'),count=document.getElementById('live-count');
  function dur(ms){var s=Math.floor(ms/1000),m=Math.floor(s/60);s=s%60;return m+':'+(s<10?'0':'')+s;}
  function label(c){var n=(c.caller_name||'').trim(),x=(c.caller_number||'').trim();
    return n&&x?n+' ('+x+')':(n||x||'unknown');}
  function cell(tr,text,cls){var td=document.createElement('td');td.textContent=text;if(cls)td.className=cls;tr.appendChild(td);return td;}
  function render(calls){
    while(body.firstChild)body.removeChild(body.firstChild);
    calls.forEach(function(c){
      var tr=document.createElement('tr');tr.setAttribute('data-call-id',c.call_id);
      cell(tr,label(c));cell(tr,c.did||'–');cell(tr,c.profile||'default');
      cell(tr,dur(c.duration_ms),'num');cell(tr,c.state,'state-'+c.state);
      cell(tr,c.last_turn_latency_ms==null?'–':c.last_turn_latency_ms+' ms','num');
      cell(tr,String(c.turns),'num');cell(tr,c.call_id,'muted');
      body.appendChild(tr);
    });
    count.textContent=calls.length+(calls.length==1?' call':' calls')+' in progress';
    document.body.setAttribute('data-refreshed',new Date().toISOString());
  }
  function tick(){
    fetch('/api/live',{credentials:'same-origin',headers:{'Accept':'application/json'}})
      .then(function(r){if(!r.ok)throw new Error(r.status);return r.json();})
      .then(function(j){render(j.calls);})
      .catch(function(e){count.textContent='refresh failed: '+e.message;});
  }
  tick();setInterval(tick,2000);
})();
"#;

/// `/console`: the calls in progress (refreshed by the page's script every 2 s).
pub(super) fn live(calls: &[LiveCall], others: &[CallRow]) -> String {
    let mut rows = String::new();
    for c in calls {
        let _ = write!(
            rows,
            "<tr data-call-id=\"{id}\"><td>{caller}</td><td>{did}</td><td>{profile}</td>\
             <td class=\"num\">{dur}</td><td class=\"state-{state}\">{state}</td>\
             <td class=\"num\">{last}</td><td class=\"num\">{turns}</td><td class=\"muted\">{id}</td></tr>",
            id = esc(&c.call_id.to_string()),
            caller = esc(&caller_label(
                c.caller_name.as_deref(),
                c.caller_number.as_deref()
            )),
            did = opt(c.did.as_deref()),
            profile = esc(c.profile.as_deref().unwrap_or("default")),
            dur = duration(c.duration_ms),
            state = c.state.as_str(),
            last = c
                .last_turn_latency_ms
                .map_or_else(|| "–".into(), |ms| format!("{ms} ms")),
            turns = c.turns,
        );
    }
    let n = calls.len();
    let mut elsewhere = String::new();
    if !others.is_empty() {
        let mut rows = String::new();
        for c in others {
            let id = esc(&c.call_id.to_string());
            let _ = write!(
                rows,
                "<tr data-call-id=\"{id}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
                opt(c.node.as_deref()),
                esc(&caller_label(
                    c.caller_name.as_deref(),
                    c.caller_number.as_deref()
                )),
                opt(c.did.as_deref()),
                esc(c.profile.as_deref().unwrap_or("default")),
                when(&c.started_at),
                duration(c.duration_ms),
            );
        }
        let _ = write!(
            elsewhere,
            "<h2>On other daemons</h2><p class=\"muted\">Calls the shared records database has open under another daemon's name \
             (in progress, or that daemon stopped without closing them and has not started again). \
             Shown as of this page's load.</p><table id=\"other-nodes\"><thead><tr><th>Node</th><th>Caller</th><th>DID</th>\
             <th>Profile</th><th>Started (UTC)</th><th>Duration</th></tr></thead><tbody>{rows}</tbody></table>"
        );
    }
    let body = format!(
        "<h1>Live calls</h1><p id=\"live-count\">{n} {} in progress</p>\
         <table id=\"live\"><thead><tr><th>Caller</th><th>DID</th><th>Profile</th><th>Duration</th>\
         <th>State</th><th>Last turn</th><th>Turns</th><th>Call id</th></tr></thead><tbody>{rows}</tbody></table>\
         <p class=\"muted\">Calls on this daemon; refreshed every 2 s. Finished calls are in the \
         <a href=\"/console/calls\">history</a>.</p>{elsewhere}",
        if n == 1 { "call" } else { "calls" }
    );
    layout("Live calls", "live", &body, Some(LIVE_SCRIPT))
}

// ---- history ------------------------------------------------------------------------------

const OUTCOMES: [&str; 8] = [
    "completed",
    "transfer",
    "fallback",
    "abandoned",
    "refused",
    "error",
    "interrupted",
    "open",
];

fn filter_form(f: &CallFilter) -> String {
    let input = |name: &str, label: &str, value: &Option<String>, placeholder: &str| {
        format!(
            "<label>{label}<input name=\"{name}\" value=\"{}\" placeholder=\"{placeholder}\"></label>",
            esc(value.as_deref().unwrap_or(""))
        )
    };
    let mut outcome =
        String::from("<label>Outcome<select name=\"outcome\"><option value=\"\">any</option>");
    for o in OUTCOMES {
        let sel = if f.outcome.as_deref() == Some(o) {
            " selected"
        } else {
            ""
        };
        let _ = write!(outcome, "<option{sel}>{o}</option>");
    }
    outcome.push_str("</select></label>");
    format!(
        "<form class=\"filters\" method=\"get\" action=\"/console/calls\">{}{}{}{}{}{outcome}\
         <button type=\"submit\">Filter</button> <a href=\"/console/calls\">clear</a></form>",
        input("from", "From (UTC)", &f.from, "2026-12-01"),
        input("to", "To (UTC)", &f.to, "2026-12-31"),
        input("caller", "Caller", &f.caller, "number or name"),
        input("did", "DID", &f.did, ""),
        input("profile", "Profile", &f.profile, ""),
    )
}

/// `/console/calls`: the filter, per-day totals and the calls.
pub(super) fn history(
    filter: &CallFilter,
    calls: &[CallRow],
    totals: &[DayTotals],
    source: &str,
) -> String {
    let mut t = String::new();
    for d in totals {
        let _ = write!(
            t,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td></tr>",
            esc(&d.day),
            d.calls,
            d.minutes,
            money(Some(d.cost), &d.currency)
        );
    }
    if totals.is_empty() {
        t.push_str("<tr><td colspan=\"4\" class=\"muted\">no calls</td></tr>");
    }
    let mut rows = String::new();
    for c in calls {
        let id = esc(&c.call_id.to_string());
        let _ = write!(
            rows,
            "<tr data-call-id=\"{id}\"><td><a href=\"/console/calls/{id}\">{}</a></td><td>{}</td><td>{}</td>\
             <td>{}</td><td class=\"num\">{}</td><td class=\"outcome\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"muted\">{}</td></tr>",
            when(&c.started_at),
            esc(&caller_label(
                c.caller_name.as_deref(),
                c.caller_number.as_deref()
            )),
            opt(c.did.as_deref()),
            esc(c.profile.as_deref().unwrap_or("default")),
            duration(c.duration_ms),
            esc(&c.outcome),
            c.turns,
            money(c.cost, &c.currency),
            opt(c.node.as_deref()),
        );
    }
    if calls.is_empty() {
        rows.push_str("<tr><td colspan=\"9\" class=\"muted\">no calls match</td></tr>");
    }
    let body = format!(
        "<h1>Call history</h1>{}\
         <h2>Per day</h2><p class=\"muted\">The last 31 days unless <em>From</em> says otherwise; the other filters apply too where the history allows.</p><table id=\"totals\"><thead><tr><th>Day (UTC)</th><th>Calls</th><th>Minutes</th>\
         <th>Cost</th></tr></thead><tbody>{t}</tbody></table>\
         <h2>Calls</h2><table id=\"calls\"><thead><tr><th>Started (UTC)</th><th>Caller</th><th>DID</th>\
         <th>Profile</th><th>Duration</th><th>Outcome</th><th>Turns</th><th>Cost</th><th>Node</th></tr></thead>\
         <tbody>{rows}</tbody></table><p class=\"muted\">Newest first, at most {}. Source: {}.</p>",
        filter_form(filter),
        filter.limit(),
        esc(source),
    );
    layout("Call history", "calls", &body, None)
}

// ---- one call -----------------------------------------------------------------------------

/// The marks of a turn in pipeline order, with their names.
fn marks(t: &TurnTiming) -> [(&'static str, Option<u64>); 5] {
    [
        ("speech end", t.speech_end_ms),
        ("STT final", t.stt_final_ms),
        ("first token", t.llm_first_token_ms),
        ("first TTS audio", t.tts_first_audio_ms),
        ("first frame", t.first_frame_ms),
    ]
}

fn waterfall(turns: &[TurnTiming]) -> String {
    // One scale for every turn, so turns compare at a glance.
    let span = turns
        .iter()
        .filter_map(|t| {
            let m = marks(t);
            let first = m.iter().find_map(|(_, v)| *v)?;
            let last = m.iter().rev().find_map(|(_, v)| *v)?;
            Some(last.saturating_sub(first))
        })
        .max()
        .unwrap_or(0)
        .max(1);
    let mut rows = String::new();
    for (i, t) in turns.iter().enumerate() {
        let m = marks(t);
        let origin = m.iter().find_map(|(_, v)| *v);
        let mut cells = String::new();
        let mut bar = String::new();
        let mut prev: Option<u64> = None;
        for (k, (name, v)) in m.iter().enumerate() {
            match (v, origin) {
                (Some(v), Some(o)) => {
                    let step = prev.map(|p| v.saturating_sub(p));
                    let _ = write!(
                        cells,
                        "<td class=\"num\" title=\"{name}\">+{} ms{}</td>",
                        v - o,
                        step.map_or(String::new(), |s| format!(
                            " <span class=\"muted\">(Δ{s})</span>"
                        ))
                    );
                    if let Some(s) = step {
                        let pct = s as f64 * 100.0 / span as f64;
                        let _ = write!(
                            bar,
                            "<span class=\"s{}\" style=\"width:{pct:.2}%\" title=\"{name}: {s} ms\"></span>",
                            k - 1
                        );
                    }
                    prev = Some(*v);
                }
                _ => cells.push_str("<td class=\"num muted\">–</td>"),
            }
        }
        let total = match (origin, t.first_frame_ms) {
            (Some(o), Some(f)) => format!("{} ms", f.saturating_sub(o)),
            _ => "–".into(),
        };
        let _ = write!(
            rows,
            "<tr class=\"turn\"><td class=\"num\">{}</td><td class=\"num\">{}</td>{cells}\
             <td class=\"num total\">{total}</td><td><div class=\"bar\">{bar}</div></td></tr>",
            i + 1,
            origin.map_or("–".into(), offset),
        );
    }
    if turns.is_empty() {
        rows.push_str("<tr><td colspan=\"9\" class=\"muted\">no answered turns</td></tr>");
    }
    format!(
        "<table id=\"waterfall\"><thead><tr><th>Turn</th><th>At</th><th>Speech end</th><th>STT final</th>\
         <th>First token</th><th>First TTS audio</th><th>First frame</th><th>Speech end → first frame</th>\
         <th><span class=\"bar\" style=\"display:inline-flex;width:auto\"><span class=\"s0\" style=\"width:10px\"></span></span> STT \
         <span class=\"bar\" style=\"display:inline-flex;width:auto\"><span class=\"s1\" style=\"width:10px\"></span></span> LLM \
         <span class=\"bar\" style=\"display:inline-flex;width:auto\"><span class=\"s2\" style=\"width:10px\"></span></span> TTS \
         <span class=\"bar\" style=\"display:inline-flex;width:auto\"><span class=\"s3\" style=\"width:10px\"></span></span> wire</th>\
         </tr></thead><tbody>{rows}</tbody></table>"
    )
}

/// `/console/calls/{id}`: everything about one call.
pub(super) fn call(d: &CallDetail) -> String {
    let r = &d.row;
    let id = esc(&r.call_id.to_string());
    let mut summary = String::new();
    let mut item = |k: &str, v: String| {
        let _ = write!(summary, "<dt>{k}</dt><dd>{v}</dd>");
    };
    item(
        "Caller",
        esc(&caller_label(
            r.caller_name.as_deref(),
            r.caller_number.as_deref(),
        )),
    );
    item("DID", opt(r.did.as_deref()));
    item("Profile", esc(r.profile.as_deref().unwrap_or("default")));
    item("Started (UTC)", when(&r.started_at));
    item("Duration", duration(r.duration_ms));
    item(
        "Outcome",
        format!("<span id=\"outcome\">{}</span>", esc(&r.outcome)),
    );
    item("Ended by", esc(&r.end_reason));
    if let Some(t) = &d.transfer_target {
        item("Transferred to", esc(t));
    }
    item("Turns", r.turns.to_string());
    item(
        "Cost",
        format!(
            "<span id=\"cost\">{}</span>{}",
            money(r.cost, &r.currency),
            d.total_myr.map_or(String::new(), |m| format!(
                " <span class=\"muted\">(RM {m:.4})</span>"
            ))
        ),
    );
    if let Some(n) = &r.node {
        item("Node", esc(n));
    }
    item("Call id", format!("<code>{id}</code>"));

    let mut transcript = String::new();
    for l in &d.transcript {
        let _ = write!(
            transcript,
            "<tr class=\"{role}\"><td class=\"num\">{start}</td><td class=\"num\">{end}</td><td>{role}</td><td>{text}{cut}</td></tr>",
            role = esc(&l.role),
            start = offset(l.start_ms),
            end = l.end_ms.map_or("–".into(), offset),
            text = esc(&l.text),
            cut = if l.interrupted {
                " <span class=\"muted\">(interrupted)</span>"
            } else {
                ""
            },
        );
    }
    if d.transcript.is_empty() {
        transcript.push_str("<tr><td colspan=\"4\" class=\"muted\">nothing was said</td></tr>");
    }

    let mut tools = String::new();
    for t in &d.tool_calls {
        let _ = write!(
            tools,
            "<tr><td class=\"num\">{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            t.at_ms.map_or("–".into(), offset),
            esc(&t.name),
            esc(&t.arguments),
            opt(t.result.as_deref()),
        );
    }
    if d.tool_calls.is_empty() {
        tools.push_str("<tr><td colspan=\"4\" class=\"muted\">none</td></tr>");
    }

    let errors = if d.errors.is_empty() {
        "<p class=\"muted\">none</p>".to_owned()
    } else {
        let mut e = String::from("<ul id=\"errors\">");
        for x in &d.errors {
            let _ = write!(e, "<li class=\"err\">{}</li>", esc(x));
        }
        e.push_str("</ul>");
        e
    };

    let mut cost = String::new();
    for c in &d.cost_items {
        let _ = write!(
            cost,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"muted\">{}</td></tr>",
            esc(&c.component),
            money(Some(c.amount), &r.currency),
            esc(&c.detail)
        );
    }
    let _ = write!(
        cost,
        "<tr><th>total</th><th class=\"num\">{}</th><th></th></tr>",
        money(r.cost, &r.currency)
    );

    let recording = if d.recording.is_some() {
        format!(
            "<audio id=\"recording\" controls preload=\"none\" src=\"/api/calls/{id}/recording\"></audio>\
             <p class=\"muted\">Stereo: caller left, agent right. <a href=\"/api/calls/{id}/recording\">Download</a></p>"
        )
    } else {
        "<p class=\"muted\">This call was not recorded.</p>".to_owned()
    };

    let body = format!(
        "<h1>Call {caller}</h1><dl id=\"summary\">{summary}</dl>\
         <h2>Transcript</h2><table id=\"transcript\"><thead><tr><th>From</th><th>To</th><th>Who</th><th>What</th></tr></thead>\
         <tbody>{transcript}</tbody></table>\
         <h2>Latency per turn</h2>{wf}\
         <h2>Tool calls</h2><table id=\"tools\"><thead><tr><th>At</th><th>Tool</th><th>Arguments</th><th>Result</th></tr></thead>\
         <tbody>{tools}</tbody></table>\
         <h2>Errors</h2>{errors}\
         <h2>Cost</h2><table id=\"cost-items\"><tbody>{cost}</tbody></table>\
         <h2>Recording</h2>{recording}\
         <p><a href=\"/api/calls/{id}\">JSON</a></p>",
        caller = esc(&caller_label(
            r.caller_name.as_deref(),
            r.caller_number.as_deref()
        )),
        wf = waterfall(&d.turn_timings),
    );
    layout("Call", "calls", &body, None)
}

/// A page that says why there is nothing to show.
pub(super) fn message(title: &str, text: &str) -> String {
    layout(
        title,
        "",
        &format!("<h1>{}</h1><p>{}</p>", esc(title), esc(text)),
        None,
    )
}

/// The login form (a token is set and the browser has no cookie yet).
pub(super) fn login(failed: bool) -> String {
    let note = if failed {
        "<p class=\"err\">That is not the admin token.</p>"
    } else {
        ""
    };
    layout(
        "Sign in",
        "",
        &format!(
            "<h1>Sign in</h1>{note}<form method=\"post\" action=\"/console/login\">\
             <label>Admin token <input type=\"password\" name=\"token\" autocomplete=\"current-password\"></label> \
             <button type=\"submit\">Sign in</button></form>"
        ),
        None,
    )
}
