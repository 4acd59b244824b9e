//! What a real phone line adds to the caller's audio, for benchmarking the echo guard: the
//! agent's own speech reflected back a little later and some dB down (the 2-wire hybrid's
//! echo, 6-20 dB down on real lines), and background noise. Sans-IO: fed the agent's frames
//! as they are read and the caller's frames before they are written.

use std::collections::VecDeque;
use std::time::Duration;

/// The frame length of an 8 kHz call.
const SPF: usize = 160;
/// Echo frames held beyond the delay (a burst of reads) before the oldest are dropped.
const ECHO_SLACK_FRAMES: usize = 10;

/// The colour of the line noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoiseColour {
    /// Flat spectrum (hiss).
    White,
    /// -3 dB per octave (hum and rumble weigh more), closer to a line's background.
    Pink,
}

/// Background noise on every frame the caller writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LineNoise {
    /// RMS level, dBFS (0 = full-scale square wave, as [`crate::audio::pcm::dbfs`]).
    pub dbfs: f64,
    /// White or pink.
    pub colour: NoiseColour,
}

/// How the line treats the caller's audio. The default is a clean line.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LineOptions {
    /// Send the agent's audio back this many dB down (e.g. -20), mixed into the caller's.
    pub echo_db: Option<f64>,
    /// The echo's delay behind the agent's frame as read (rounded to whole 20 ms frames).
    pub echo_delay: Duration,
    /// Noise added to everything the caller sends.
    pub noise: Option<LineNoise>,
}

impl LineOptions {
    /// Whether the line changes anything.
    pub fn is_clean(&self) -> bool {
        self.echo_db.is_none() && self.noise.is_none()
    }
}

/// The line's state over one call.
#[derive(Debug)]
pub(super) struct Line {
    echo_gain: Option<f64>,
    delay_frames: usize,
    /// The agent's samples read, not yet echoed.
    echo: VecDeque<i16>,
    noise: Option<(f64, NoiseColour)>,
    rng: u64,
    pink: [f64; 7],
}

impl Line {
    pub(super) fn new(opts: &LineOptions, seed: u64) -> Self {
        let delay_frames = (opts.echo_delay.as_millis() / 20) as usize;
        Self {
            echo_gain: opts.echo_db.map(|db| 10f64.powf(db / 20.0)),
            delay_frames,
            echo: VecDeque::new(),
            // RMS in sample units: a full-scale square wave (0 dBFS) has RMS 32768.
            noise: opts
                .noise
                .map(|n| (32768.0 * 10f64.powf(n.dbfs / 20.0), n.colour)),
            rng: seed | 1,
            pink: [0.0; 7],
        }
    }

    /// An agent frame was read.
    pub(super) fn heard(&mut self, samples: &[i16]) {
        if self.echo_gain.is_none() {
            return;
        }
        if self.echo.is_empty() {
            // The echo starts `delay` after the agent's audio does.
            self.echo
                .extend(std::iter::repeat_n(0, self.delay_frames * SPF));
        }
        self.echo.extend(samples);
        let cap = (self.delay_frames + ECHO_SLACK_FRAMES) * SPF;
        let excess = self.echo.len().saturating_sub(cap);
        self.echo.drain(..excess);
    }

    /// What goes down the line in place of the caller's frame `samples`.
    pub(super) fn send(&mut self, samples: &mut [i16]) {
        if let Some(gain) = self.echo_gain {
            let n = samples.len().min(self.echo.len());
            for (s, e) in samples.iter_mut().zip(self.echo.drain(..n)) {
                *s = clamp(f64::from(*s) + f64::from(e) * gain);
            }
        }
        if let Some((rms, colour)) = self.noise {
            for s in samples.iter_mut() {
                let n = match colour {
                    NoiseColour::White => self.white(),
                    NoiseColour::Pink => self.pink(),
                };
                *s = clamp(f64::from(*s) + n * rms);
            }
        }
    }

    /// Uniform noise of unit RMS (xorshift64*).
    fn white(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        // Uniform in [-1, 1) has RMS 1/sqrt(3).
        (x as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 3f64.sqrt()
    }

    /// Pink noise of about unit RMS (Paul Kellet's filter on white noise).
    fn pink(&mut self) -> f64 {
        let w = self.white();
        let b = &mut self.pink;
        b[0] = 0.99886 * b[0] + w * 0.0555179;
        b[1] = 0.99332 * b[1] + w * 0.0750759;
        b[2] = 0.96900 * b[2] + w * 0.1538520;
        b[3] = 0.86650 * b[3] + w * 0.3104856;
        b[4] = 0.55000 * b[4] + w * 0.5329522;
        b[5] = -0.7616 * b[5] - w * 0.0168980;
        let out = b[0] + b[1] + b[2] + b[3] + b[4] + b[5] + b[6] + w * 0.5362;
        b[6] = w * 0.115926;
        out / PINK_GAIN
    }
}

/// RMS of Kellet's pink filter's output for unit-RMS white input (measured over 10^6
/// samples).
const PINK_GAIN: f64 = 3.04;

fn clamp(x: f64) -> i16 {
    x.round().clamp(-32768.0, 32767.0) as i16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::pcm;

    #[test]
    fn noise_has_the_asked_level() {
        for colour in [NoiseColour::White, NoiseColour::Pink] {
            let opts = LineOptions {
                noise: Some(LineNoise {
                    dbfs: -45.0,
                    colour,
                }),
                ..LineOptions::default()
            };
            let mut line = Line::new(&opts, 7);
            let mut all = Vec::new();
            for _ in 0..500 {
                let mut f = [0i16; SPF];
                line.send(&mut f);
                all.extend_from_slice(&f);
            }
            let level = pcm::dbfs(&all);
            assert!((level + 45.0).abs() < 1.0, "{colour:?}: {level}");
        }
    }

    #[test]
    fn the_echo_is_the_agent_later_and_quieter() {
        let opts = LineOptions {
            echo_db: Some(-20.0),
            echo_delay: Duration::from_millis(40),
            noise: None,
        };
        let mut line = Line::new(&opts, 1);
        let agent = [10_000i16; SPF];
        line.heard(&agent);
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut f = [0i16; SPF];
            line.send(&mut f);
            out.push(f[0]);
        }
        // Two frames of delay, then the agent's frame 20 dB down.
        assert_eq!(out, [0, 0, 1000]);
        // The caller's own speech is kept; the echo's delay starts again with the agent.
        line.heard(&agent);
        let mut out = Vec::new();
        for _ in 0..3 {
            let mut f = [500i16; SPF];
            line.send(&mut f);
            out.push(f[0]);
        }
        assert_eq!(out, [500, 500, 1500]);
    }
}
