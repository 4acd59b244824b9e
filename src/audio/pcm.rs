//! Conversions between little-endian byte buffers and `i16` samples, and level measures.

/// Decodes little-endian 16-bit samples; a trailing odd byte is ignored.
pub fn le_bytes_to_samples(bytes: &[u8]) -> Vec<i16> {
    bytes.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect()
}

/// Appends samples as little-endian bytes.
pub fn samples_to_le_bytes(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

/// Root-mean-square level of a block, 0.0 for an empty block.
pub fn rms(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: f64 = samples.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / samples.len() as f64).sqrt()
}

/// Level in dBFS (0 = full scale square wave); silence is clamped to -120.
pub fn dbfs(samples: &[i16]) -> f64 {
    let r = rms(samples);
    if r <= 0.0 { -120.0 } else { (20.0 * (r / 32768.0).log10()).max(-120.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = vec![0i16, 1, -1, i16::MAX, i16::MIN];
        let mut b = Vec::new();
        samples_to_le_bytes(&s, &mut b);
        assert_eq!(b[2..4], [1, 0]);
        assert_eq!(le_bytes_to_samples(&b), s);
    }

    #[test]
    fn levels() {
        assert_eq!(rms(&[]), 0.0);
        assert_eq!(dbfs(&[0; 10]), -120.0);
        assert!((dbfs(&[i16::MAX, i16::MIN]) - 0.0).abs() < 0.01);
    }
}
