//! Stereo call recordings: the caller on the left as the daemon received them, the agent on
//! the right as it sent them, each chunk placed at the time it passed the socket (so a gap
//! on one side stays a gap rather than shifting the other). Held in memory during the call
//! (bounded) and written as a WAV file once it ends, off the call's task.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::call::CallContext;

/// The longest recording kept; beyond it the rest of the call is not recorded.
pub const MAX_RECORDING: Duration = Duration::from_secs(2 * 3600);

/// Whether a call is recorded: `record_all`, or the context's `record` variable.
pub fn wanted(record_all: bool, ctx: &CallContext) -> bool {
    record_all
        || ctx.vars.get("record").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "yes" | "true" | "on"
            )
        })
}

/// Where a call's recording goes: `DIR/YYYY-MM-DD/CALL_ID.wav` (UTC day of its start).
pub fn path_for(dir: &Path, call_id: Uuid, started: std::time::SystemTime) -> PathBuf {
    let day = &super::rfc3339_utc(started)[..10];
    dir.join(day).join(format!("{call_id}.wav"))
}

/// One call's two channels.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    started: Instant,
    rate: Option<u32>,
    caller: Vec<i16>,
    agent: Vec<i16>,
    max_samples: usize,
}

impl Recorder {
    /// A recording that will be written to `path`; times are counted from `started`.
    pub fn new(path: PathBuf, started: Instant) -> Self {
        Self {
            path,
            started,
            rate: None,
            caller: Vec::new(),
            agent: Vec::new(),
            max_samples: 0,
        }
    }

    /// Where it will be written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn place(
        channel: &mut Vec<i16>,
        rate: u32,
        started: Instant,
        at: Instant,
        pcm: &[i16],
        max: usize,
    ) {
        // The chunk ends at `at`: it starts one chunk earlier on the call's clock.
        let end = (at.saturating_duration_since(started).as_micros() as u64 * u64::from(rate)
            / 1_000_000) as usize;
        let start = end.saturating_sub(pcm.len());
        if start > channel.len() {
            channel.resize(start.min(max), 0);
        }
        let room = max.saturating_sub(channel.len());
        channel.extend_from_slice(&pcm[..pcm.len().min(room)]);
    }

    fn rate_ok(&mut self, rate: u32) -> bool {
        match self.rate {
            None => {
                self.rate = Some(rate);
                self.max_samples = (MAX_RECORDING.as_secs() * u64::from(rate)) as usize;
                true
            }
            Some(r) => r == rate,
        }
    }

    /// Caller audio received at `at`.
    pub fn caller(&mut self, rate: u32, pcm: &[i16], at: Instant) {
        if self.rate_ok(rate) {
            Self::place(
                &mut self.caller,
                rate,
                self.started,
                at,
                pcm,
                self.max_samples,
            );
        }
    }

    /// Agent audio sent at `at`.
    pub fn agent(&mut self, rate: u32, pcm: &[i16], at: Instant) {
        if self.rate_ok(rate) {
            Self::place(
                &mut self.agent,
                rate,
                self.started,
                at,
                pcm,
                self.max_samples,
            );
        }
    }

    /// Writes the file (directories created, mode 0640); `None` when nothing was recorded
    /// or the write failed (logged).
    pub fn write(mut self) -> Option<PathBuf> {
        let rate = self.rate?;
        let len = self.caller.len().max(self.agent.len());
        self.caller.resize(len, 0);
        self.agent.resize(len, 0);
        if let Some(dir) = self.path.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::error!(path = %self.path.display(), error = %e, "cannot create the recordings directory");
                return None;
            }
        }
        match crate::audio::wav::write_stereo(&self.path, rate, &self.caller, &self.agent) {
            Ok(()) => {
                use std::os::unix::fs::PermissionsExt as _;
                let _ =
                    std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o640));
                Some(self.path)
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), error = %e, "cannot write the call recording");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_land_at_their_time_on_each_channel() {
        let t0 = Instant::now();
        let dir = std::env::temp_dir().join(format!("sifucall-rec-{}", Uuid::new_v4()));
        let mut r = Recorder::new(dir.join("a.wav"), t0);
        let ms = Duration::from_millis;
        r.caller(8000, &[1; 160], t0 + ms(20));
        r.caller(8000, &[2; 160], t0 + ms(40));
        // The agent speaks from 100 ms: 80 ms of silence before it on the right.
        r.agent(8000, &[3; 160], t0 + ms(120));
        r.caller(16000, &[9; 320], t0 + ms(60)); // another rate: ignored
        assert_eq!(r.caller.len(), 320);
        assert_eq!(r.agent.len(), 960);
        assert!(r.agent[..800].iter().all(|&s| s == 0));
        assert!(r.agent[800..].iter().all(|&s| s == 3));
        let path = r.write().unwrap();
        let bytes = std::fs::metadata(&path).unwrap().len();
        assert_eq!(bytes, 44 + 960 * 2 * 2);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_context_flag_or_record_all_asks_for_a_recording() {
        let mut ctx = CallContext::default();
        assert!(!wanted(false, &ctx));
        assert!(wanted(true, &ctx));
        ctx.vars.insert("record".into(), "Yes".into());
        assert!(wanted(false, &ctx));
    }
}
