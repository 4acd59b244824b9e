//! WAV files for fixtures, recordings and the synthetic caller: 16-bit mono PCM only.

use std::path::Path;

/// A WAV file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WavError {
    /// The file is not 16-bit integer PCM (mono or stereo).
    #[error("{path}: unsupported WAV format ({detail}); need 16-bit PCM")]
    Unsupported {
        /// The file.
        path: String,
        /// What it is instead.
        detail: String,
    },
    /// I/O or parse error.
    #[error("{path}: {source}")]
    Hound {
        /// The file.
        path: String,
        /// The underlying error.
        source: hound::Error,
    },
}

/// Mono 16-bit audio and its rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonoPcm {
    /// Samples per second.
    pub rate: u32,
    /// The samples.
    pub samples: Vec<i16>,
}

/// Reads a 16-bit PCM WAV; stereo is mixed down to mono.
pub fn read(path: &Path) -> Result<MonoPcm, WavError> {
    let p = path.display().to_string();
    let r = hound::WavReader::open(path).map_err(|source| WavError::Hound {
        path: p.clone(),
        source,
    })?;
    decode(r, p)
}

/// Reads a WAV held in memory (e.g. a fixture compiled into the binary).
pub fn read_bytes(bytes: &[u8], name: &str) -> Result<MonoPcm, WavError> {
    let r =
        hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|source| WavError::Hound {
            path: name.to_owned(),
            source,
        })?;
    decode(r, name.to_owned())
}

fn decode<R: std::io::Read>(mut r: hound::WavReader<R>, p: String) -> Result<MonoPcm, WavError> {
    let spec = r.spec();
    if spec.sample_format != hound::SampleFormat::Int
        || spec.bits_per_sample != 16
        || spec.channels > 2
    {
        return Err(WavError::Unsupported {
            path: p,
            detail: format!(
                "{:?} {} bits, {} channels",
                spec.sample_format, spec.bits_per_sample, spec.channels
            ),
        });
    }
    let raw: Vec<i16> = r
        .samples::<i16>()
        .collect::<Result<_, _>>()
        .map_err(|source| WavError::Hound { path: p, source })?;
    let samples = if spec.channels == 2 {
        raw.chunks_exact(2)
            .map(|c| ((i32::from(c[0]) + i32::from(c[1])) / 2) as i16)
            .collect()
    } else {
        raw
    };
    Ok(MonoPcm {
        rate: spec.sample_rate,
        samples,
    })
}

/// Writes two tracks as a 16-bit stereo file (left, right); the shorter is padded with
/// silence.
pub fn write_stereo(path: &Path, rate: u32, left: &[i16], right: &[i16]) -> Result<(), WavError> {
    let frames = left.len().max(right.len());
    let interleaved = (0..frames).flat_map(|i| {
        [
            left.get(i).copied().unwrap_or(0),
            right.get(i).copied().unwrap_or(0),
        ]
    });
    write_interleaved(path, rate, 2, interleaved)
}

/// Writes 16-bit mono PCM.
pub fn write(path: &Path, rate: u32, samples: &[i16]) -> Result<(), WavError> {
    write_interleaved(path, rate, 1, samples.iter().copied())
}

fn write_interleaved(
    path: &Path,
    rate: u32,
    channels: u16,
    samples: impl Iterator<Item = i16>,
) -> Result<(), WavError> {
    let p = path.display().to_string();
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let map = |source| WavError::Hound {
        path: p.clone(),
        source,
    };
    let mut w = hound::WavWriter::create(path, spec).map_err(map)?;
    for s in samples {
        w.write_sample(s).map_err(map)?;
    }
    w.finalize().map_err(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let path = std::env::temp_dir().join(format!("sifucall-wav-{}.wav", std::process::id()));
        let samples: Vec<i16> = (0..800).map(|i| (i * 37 % 2000 - 1000) as i16).collect();
        write(&path, 8000, &samples).unwrap();
        let back = read(&path).unwrap();
        assert_eq!(
            back,
            MonoPcm {
                rate: 8000,
                samples
            }
        );
        std::fs::remove_file(&path).ok();
    }
}
