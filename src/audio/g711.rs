//! G.711 µ-law and A-law, bit-exact with the ITU-T reference software (G.191 STL `g711.c`).
//!
//! G.711 appears only at the provider edge: ElevenLabs can stream `ulaw_8000`, and some
//! trunks hand us A-law. Everything inside the daemon is 16-bit linear PCM.
//!
//! # Conventions
//! Decoding is a 256-entry table built at compile time from the classic formulas (µ-law:
//! bias `0x84`; A-law: even bits inverted with `0x55`). The results are left-justified 16-bit
//! values: µ-law spans ±32124, A-law ±32256.
//!
//! Encoding follows G.191: the 16-bit input is truncated to 14 bits (µ-law) or 13 bits
//! (A-law), and a negative input `x` is coded by the magnitude `!x` (one's complement), so the
//! quantiser is symmetric about -0.5, exactly like the two's complement range itself. The
//! old Sun Microsystems `g711.c` (and `sox`, Python `audioop`) agree for A-law, but for µ-law
//! they take the magnitude as `-x`, which codes the 127 negative inputs that sit exactly on a
//! decision value one step further from zero. Both decode through the same tables; this
//! module follows the ITU software. µ-law magnitudes above 32635 (`0x7f7b`, i.e. 8158 in
//! 14 bits) clip to the top code.

/// µ-law bias in 16-bit units (33 in 14-bit units).
const ULAW_BIAS: i32 = 0x84;
/// Largest 14-bit µ-law magnitude before the bias is added (32635 >> 2).
const ULAW_CLIP_14: i32 = 32635 >> 2;
/// Upper end of each µ-law segment, on the biased 14-bit magnitude.
const ULAW_SEG_END: [i32; 8] = [0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff];
/// Upper end of each A-law segment, on the 13-bit magnitude.
const ALAW_SEG_END: [i32; 8] = [0x1f, 0x3f, 0x7f, 0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff];

const fn ulaw_to_linear(code: u8) -> i16 {
    let u = !code;
    let mut t = (((u & 0x0f) as i32) << 3) + ULAW_BIAS;
    t <<= (u & 0x70) >> 4;
    (if u & 0x80 != 0 {
        ULAW_BIAS - t
    } else {
        t - ULAW_BIAS
    }) as i16
}

const fn alaw_to_linear(code: u8) -> i16 {
    let a = code ^ 0x55;
    let mut t = ((a & 0x0f) as i32) << 4;
    let seg = (a & 0x70) >> 4;
    match seg {
        0 => t += 8,
        1 => t += 0x108,
        _ => {
            t += 0x108;
            t <<= seg - 1;
        }
    }
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

const fn build_table(alaw: bool) -> [i16; 256] {
    let mut table = [0i16; 256];
    let mut i = 0;
    while i < 256 {
        table[i] = if alaw {
            alaw_to_linear(i as u8)
        } else {
            ulaw_to_linear(i as u8)
        };
        i += 1;
    }
    table
}

/// Linear value of every µ-law code, indexed by the code.
pub const ULAW_TABLE: [i16; 256] = build_table(false);
/// Linear value of every A-law code, indexed by the code.
pub const ALAW_TABLE: [i16; 256] = build_table(true);

/// Decodes one µ-law byte to 16-bit linear PCM.
#[inline]
pub fn ulaw_decode(code: u8) -> i16 {
    ULAW_TABLE[usize::from(code)]
}

/// Decodes one A-law byte to 16-bit linear PCM.
#[inline]
pub fn alaw_decode(code: u8) -> i16 {
    ALAW_TABLE[usize::from(code)]
}

/// Segment number: the first segment whose upper end is at least `v` (8 if none).
fn segment(v: i32, ends: &[i32; 8]) -> u8 {
    ends.iter().position(|&end| v <= end).map_or(8, |s| s as u8)
}

/// Encodes one 16-bit linear sample as µ-law.
pub fn ulaw_encode(sample: i16) -> u8 {
    let x = i32::from(sample);
    // `mask` also carries the sign: positive codes have the top bit set after inversion.
    let (mag, mask) = if x < 0 {
        ((!x) >> 2, 0x7f)
    } else {
        (x >> 2, 0xff)
    };
    let biased = mag.min(ULAW_CLIP_14) + (ULAW_BIAS >> 2);
    let seg = segment(biased, &ULAW_SEG_END);
    let code = if seg >= 8 {
        0x7f
    } else {
        (seg << 4) | ((biased >> (seg + 1)) & 0x0f) as u8
    };
    code ^ mask
}

/// Encodes one 16-bit linear sample as A-law.
pub fn alaw_encode(sample: i16) -> u8 {
    let x = i32::from(sample);
    let (mag, mask) = if x < 0 {
        ((!x) >> 3, 0x55)
    } else {
        (x >> 3, 0xd5)
    };
    let seg = segment(mag, &ALAW_SEG_END);
    let code = if seg >= 8 {
        0x7f
    } else {
        let shift = if seg < 2 { 1 } else { seg };
        (seg << 4) | ((mag >> shift) & 0x0f) as u8
    };
    code ^ mask
}

#[cfg(test)]
mod tests {
    use super::*;
    use audio_codec_algorithms as oracle;

    #[test]
    fn decode_matches_oracle_for_all_codes() {
        for code in 0..=255u8 {
            assert_eq!(
                ulaw_decode(code),
                oracle::decode_ulaw(code),
                "µ-law 0x{code:02x}"
            );
            assert_eq!(
                alaw_decode(code),
                oracle::decode_alaw(code),
                "A-law 0x{code:02x}"
            );
        }
    }

    #[test]
    fn encode_matches_oracle_for_all_inputs() {
        for x in i16::MIN..=i16::MAX {
            assert_eq!(ulaw_encode(x), oracle::encode_ulaw(x), "µ-law {x}");
            assert_eq!(alaw_encode(x), oracle::encode_alaw(x), "A-law {x}");
        }
    }

    /// Values from the published G.711 tables (and the G.191 decoder), independent of the oracle.
    #[test]
    fn published_values() {
        // µ-law: 0xff and 0x7f are +0 and -0; 0x80/0x00 are the extremes.
        assert_eq!(ulaw_decode(0xff), 0);
        assert_eq!(ulaw_decode(0x7f), 0);
        assert_eq!(ulaw_decode(0x00), -32124);
        assert_eq!(ulaw_decode(0x80), 32124);
        assert_eq!(ulaw_decode(0xfe), 8);
        assert_eq!(ulaw_decode(0xef), 132);
        assert_eq!(ulaw_decode(0xf0), 120);
        // A-law: 0xd5/0x55 are the smallest levels ±8 (the half step of segment 0).
        assert_eq!(alaw_decode(0xd5), 8);
        assert_eq!(alaw_decode(0x55), -8);
        assert_eq!(alaw_decode(0xaa), 32256);
        assert_eq!(alaw_decode(0x2a), -32256);
        assert_eq!(alaw_decode(0x80), 5504);
        // Encoder fixed points.
        assert_eq!(ulaw_encode(0), 0xff);
        assert_eq!(ulaw_encode(-1), 0x7f);
        assert_eq!(ulaw_encode(i16::MAX), 0x80);
        assert_eq!(ulaw_encode(i16::MIN), 0x00);
        assert_eq!(ulaw_encode(32635), 0x80);
        assert_eq!(ulaw_encode(32124), 0x80);
        assert_eq!(ulaw_encode(-32124), 0x00);
        assert_eq!(alaw_encode(0), 0xd5);
        assert_eq!(alaw_encode(-1), 0x55);
        assert_eq!(alaw_encode(i16::MAX), 0xaa);
        assert_eq!(alaw_encode(i16::MIN), 0x2a);
    }

    #[test]
    fn tables_are_odd_symmetric() {
        for code in 0..=127u8 {
            assert_eq!(ulaw_decode(code), -ulaw_decode(code | 0x80));
            assert_eq!(alaw_decode(code), -alaw_decode(code | 0x80));
        }
    }

    /// Every decoded level is a fixed point of encode-then-decode, and encoding any input
    /// lands on the nearest-or-equal level of its segment (error bounded by the step size).
    #[test]
    fn round_trip() {
        for code in 0..=255u8 {
            let u = ulaw_decode(code);
            assert_eq!(ulaw_decode(ulaw_encode(u)), u, "µ-law 0x{code:02x}");
            let a = alaw_decode(code);
            assert_eq!(alaw_decode(alaw_encode(a)), a, "A-law 0x{code:02x}");
        }
        for x in i16::MIN..=i16::MAX {
            let xi = i32::from(x);
            let eu = (i32::from(ulaw_decode(ulaw_encode(x))) - xi).abs();
            // Largest µ-law step is 1024 (half-step error 512, plus clipping above 32124).
            let bound = if xi.abs() > 32124 {
                32768 - 32124
            } else {
                512 + 4
            };
            assert!(eu <= bound, "µ-law {x}: error {eu}");
            let ea = (i32::from(alaw_decode(alaw_encode(x))) - xi).abs();
            let bound = if xi.abs() > 32256 {
                32768 - 32256
            } else {
                512 + 8
            };
            assert!(ea <= bound, "A-law {x}: error {ea}");
        }
    }

    /// Documents the one place where the old Sun `g711.c` µ-law encoder (magnitude `-x`)
    /// differs from G.191 (magnitude `!x`): negative inputs on a decision value.
    #[test]
    fn sun_ulaw_differs_only_on_negative_decision_values() {
        fn sun_linear2ulaw(pcm: i16) -> u8 {
            let (mut v, mask) = if pcm < 0 {
                (ULAW_BIAS - i32::from(pcm), 0x7f)
            } else {
                (i32::from(pcm) + ULAW_BIAS, 0xff)
            };
            v = v.min(32767);
            let seg = [0xff, 0x1ff, 0x3ff, 0x7ff, 0xfff, 0x1fff, 0x3fff, 0x7fff]
                .iter()
                .position(|&e| v <= e)
                .unwrap_or(8) as u8;
            let code = if seg >= 8 {
                0x7f
            } else {
                (seg << 4) | ((v >> (seg + 3)) & 0xf) as u8
            };
            code ^ mask
        }
        let mut differ = 0;
        for x in i16::MIN..=i16::MAX {
            let (sun, itu) = (sun_linear2ulaw(x), ulaw_encode(x));
            if sun != itu {
                differ += 1;
                assert!(x < 0, "{x}");
                // Sun codes one level further from zero.
                assert!(ulaw_decode(sun) < ulaw_decode(itu), "{x}");
            }
        }
        // One input per negative decision value (8 segments x 16 levels, less the clip level).
        assert_eq!(differ, 127);
    }
}
