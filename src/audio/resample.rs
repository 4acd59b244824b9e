//! Sample-rate conversion: exact, streaming 2x from 8 to 16 kHz, and a linear one-shot
//! converter for fixtures.
//!
//! Calls arrive at 8 kHz (slin) or 16 kHz (slin16), and the VAD model only takes 16 kHz, so
//! 8 kHz calls are upsampled by two. The converter uses a 47-tap symmetric
//! half-band FIR (Kaiser-windowed sinc, beta 8, cut-off at a quarter of the 16 kHz rate):
//! flat within 0.2 dB to 3.4 kHz (the telephone band), -6 dB at 4 kHz, below -35 dB from
//! 4.6 kHz and below -90 dB from 5 kHz. A half-band filter has every second tap zero except
//! the centre, so the upsampler passes the original samples through untouched and computes
//! only the in-between ones. (A cut-off of ~3.6 kHz with ~31 taps would lose 3-4 dB at
//! 3.4 kHz; the half-band design keeps the band and costs about as much.)
//!
//! The converter carries its filter history between calls, so a signal processed in any
//! chunking gives bit-identical output to processing it in one go. Arithmetic is `f32`,
//! rounded to nearest and saturated to `i16`.
//!
//! # Group delay
//! [`Upsampler2x`]: 24 output samples at 16 kHz (12 input samples at 8 kHz) = 1.5 ms.

/// Taps at odd distances 1, 3, .., 23 from the centre (the centre tap is exactly 0.5 and
/// all other even-distance taps are zero). Scaled so these sum to 0.5 on each side pair,
/// which makes the interpolating branch exactly unity gain at DC. Verified against the
/// design formula by a test.
const TAPS: [f32; 12] = [
    3.1625918e-01,
    -1.0006114e-01,
    5.403246e-02,
    -3.2863517e-02,
    2.0519123e-02,
    -1.2637308e-02,
    7.4870774e-03,
    -4.174812e-03,
    2.135921e-03,
    -9.655609e-04,
    3.591704e-04,
    -9.059588e-05,
];

/// Group delay of [`Upsampler2x`], in output (16 kHz) samples.
pub const UPSAMPLER_DELAY_16K: usize = 24;

/// Inputs the upsampler keeps between calls: x[n-23] ..= x[n-1].
const UP_HISTORY: usize = 2 * TAPS.len() - 1;

fn saturate(v: f32) -> i16 {
    // `as` saturates, and NaN cannot occur with finite taps and inputs.
    v.round() as i16
}

/// Streaming 8 kHz to 16 kHz converter; see the module docs for response and delay.
#[derive(Debug, Clone)]
pub struct Upsampler2x {
    /// History (the last [`UP_HISTORY`] inputs) followed by the input being processed.
    buf: Vec<i16>,
}

impl Default for Upsampler2x {
    fn default() -> Self {
        Self::new()
    }
}

impl Upsampler2x {
    /// A converter whose past input is silence.
    pub fn new() -> Self {
        Self {
            buf: vec![0; UP_HISTORY],
        }
    }

    /// Converts `input` and appends exactly `2 * input.len()` samples to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        self.buf.extend_from_slice(input);
        out.reserve(2 * input.len());
        // Output pair for input x[n] at buf[p]: y[2n] = x[n-12] (the centre tap times the
        // gain of 2), y[2n+1] = 2 Σ TAPS[i] (x[n-11+i] + x[n-12-i]).
        let half = TAPS.len();
        for p in UP_HISTORY..self.buf.len() {
            out.push(self.buf[p - half]);
            let window = &self.buf[p - UP_HISTORY..=p];
            // Odd outputs sit between inputs, so the "odd distances" are the interleaved ones.
            let mut acc = 0.0f32;
            for (i, &c) in TAPS.iter().enumerate() {
                let a = window[half + i];
                let b = window[half - 1 - i];
                acc += c * (f32::from(a) + f32::from(b));
            }
            out.push(saturate(2.0 * acc));
        }
        let keep_from = self.buf.len() - UP_HISTORY;
        self.buf.drain(..keep_from);
    }
}

/// One-shot conversion between any two rates by linear interpolation, for fixtures (e.g.
/// 22050 Hz `espeak-ng` output to 8 kHz). Output length is `floor(len * to / from)`.
///
/// There is no anti-alias filter: when converting down, content above the new Nyquist
/// folds back. Fine for speech fixtures fed to tests; use [`Upsampler2x`] on live audio.
/// A zero rate yields an empty output.
pub fn resample_linear(input: &[i16], from_hz: u32, to_hz: u32) -> Vec<i16> {
    if from_hz == 0 || to_hz == 0 || input.is_empty() {
        return Vec::new();
    }
    if from_hz == to_hz {
        return input.to_vec();
    }
    let (from, to) = (u64::from(from_hz), u64::from(to_hz));
    let out_len = input.len() as u64 * to / from;
    (0..out_len)
        .map(|i| {
            // Source position i * from / to, kept exact as an integer and a remainder.
            let num = i * from;
            let idx = (num / to) as usize;
            let frac = (num % to) as f64 / to as f64;
            let a = input.get(idx).copied().unwrap_or(0);
            let b = input.get(idx + 1).copied().unwrap_or(a);
            let v = f64::from(a) + (f64::from(b) - f64::from(a)) * frac;
            v.round() as i16
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sine(freq: f64, rate: f64, amp: f64, n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| {
                (amp * (2.0 * std::f64::consts::PI * freq * i as f64 / rate).sin()).round() as i16
            })
            .collect()
    }

    fn up(x: &[i16]) -> Vec<i16> {
        let mut out = Vec::new();
        Upsampler2x::new().process(x, &mut out);
        out
    }

    fn db(a: f64, b: f64) -> f64 {
        20.0 * (a / b).log10()
    }

    /// Power of one frequency (Goertzel), as an amplitude.
    fn tone_amplitude(x: &[i16], freq: f64, rate: f64) -> f64 {
        let w = 2.0 * std::f64::consts::PI * freq / rate;
        let (mut s1, mut s2) = (0.0, 0.0);
        for &v in x {
            let s = f64::from(v) + 2.0 * w.cos() * s1 - s2;
            s2 = s1;
            s1 = s;
        }
        let power = s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2;
        2.0 * power.sqrt() / x.len() as f64
    }

    #[test]
    fn taps_match_the_design() {
        fn i0(x: f64) -> f64 {
            let (mut sum, mut term) = (1.0, 1.0);
            for k in 1..60 {
                term *= (x / 2.0 / f64::from(k)).powi(2);
                sum += term;
            }
            sum
        }
        let beta = 8.0;
        let raw: Vec<f64> = (0..12)
            .map(|i| {
                let m = f64::from(2 * i + 1);
                let sinc = (std::f64::consts::FRAC_PI_2 * m).sin() / (std::f64::consts::PI * m);
                sinc * i0(beta * (1.0 - (m / 24.0).powi(2)).sqrt()) / i0(beta)
            })
            .collect();
        let total: f64 = 2.0 * raw.iter().sum::<f64>();
        for (t, r) in TAPS.iter().zip(&raw) {
            assert!(
                (f64::from(*t) - r * 0.5 / total).abs() < 1e-8,
                "{t} vs {}",
                r * 0.5 / total
            );
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(up(&[1; 7]).len(), 14);
        assert!(up(&[]).is_empty());
    }

    #[test]
    fn upsampler_passes_original_samples_through() {
        let x = sine(700.0, 8000.0, 12000.0, 400);
        let y = up(&x);
        for n in 0..x.len() - UPSAMPLER_DELAY_16K / 2 {
            assert_eq!(y[2 * n + UPSAMPLER_DELAY_16K], x[n]);
        }
    }

    #[test]
    fn dc_is_preserved_exactly() {
        let y = up(&[1000; 200]);
        assert!(y[60..].iter().all(|&v| v == 1000), "{:?}", &y[60..70]);
    }

    #[test]
    fn upsampler_rejects_the_image() {
        let y = up(&sine(1000.0, 8000.0, 16000.0, 4000));
        let wanted = tone_amplitude(&y[200..], 1000.0, 16000.0);
        let image = tone_amplitude(&y[200..], 7000.0, 16000.0);
        assert!((db(wanted, 16000.0)).abs() < 0.5, "{wanted}");
        assert!(
            db(image, wanted) < -60.0,
            "image at {} dB",
            db(image, wanted)
        );
    }

    #[test]
    fn saturates_instead_of_wrapping() {
        // A full-scale square wave overshoots (Gibbs); the output must clip, not wrap.
        let x: Vec<i16> = (0..400)
            .map(|i| if (i / 4) % 2 == 0 { i16::MAX } else { i16::MIN })
            .collect();
        let y = up(&x);
        assert!(y.contains(&i16::MAX) && y.contains(&i16::MIN));
        // In-between samples of two equal full-scale inputs overshoot and must clip to the
        // same sign (a wrap would flip it).
        let mut clipped = 0;
        for n in 20..380 {
            if x[n] == x[n + 1] {
                let got = y[2 * n + 1 + UPSAMPLER_DELAY_16K];
                assert_eq!(got.signum(), x[n].signum(), "at {n}");
                clipped += usize::from(got == x[n]);
            }
        }
        assert!(clipped > 100, "{clipped}");
    }

    #[test]
    fn linear_resampler() {
        assert!(resample_linear(&[1, 2, 3], 0, 8000).is_empty());
        assert_eq!(resample_linear(&[1, 2, 3], 8000, 8000), [1, 2, 3]);
        assert_eq!(
            resample_linear(&[0, 100, 200, 300], 8000, 16000),
            [0, 50, 100, 150, 200, 250, 300, 300]
        );
        assert_eq!(resample_linear(&[0, 100, 200, 300], 16000, 8000), [0, 200]);
        let x = sine(440.0, 22050.0, 10000.0, 22050);
        let y = resample_linear(&x, 22050, 8000);
        assert_eq!(y.len(), 8000);
        let change = db(crate::audio::pcm::rms(&y), crate::audio::pcm::rms(&x));
        assert!(change.abs() < 0.2, "{change} dB");
        assert!(tone_amplitude(&y, 440.0, 8000.0) > 9800.0);
    }

    fn chunked<F: FnMut(&[i16], &mut Vec<i16>)>(x: &[i16], cuts: &[usize], mut f: F) -> Vec<i16> {
        let mut out = Vec::new();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (x.len() + 1)).collect();
        points.sort_unstable();
        let mut start = 0;
        for p in points.into_iter().chain([x.len()]) {
            f(&x[start..p], &mut out);
            start = p;
        }
        out
    }

    proptest! {
        #[test]
        fn chunked_equals_one_shot(
            x in prop::collection::vec(any::<i16>(), 0..700),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut u = Upsampler2x::new();
            prop_assert_eq!(chunked(&x, &cuts, |c, o| u.process(c, o)), up(&x));
        }
    }
}
