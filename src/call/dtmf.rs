//! Keypad entry: digits collected until `#` or a pause, then handed to the model as one
//! caller turn. Sans-IO: fed digits and `now`, asked for its deadline.

use std::time::{Duration, Instant};

use crate::audiosocket::Digit;

/// Collects one keypad entry at a time.
#[derive(Debug)]
pub struct DtmfCollector {
    timeout: Duration,
    digits: String,
    deadline: Option<Instant>,
}

impl DtmfCollector {
    /// An entry ends `timeout` after its last digit, or at `#`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            digits: String::new(),
            deadline: None,
        }
    }

    /// A digit; returns the entry if this digit completed it (`#`).
    pub fn push(&mut self, digit: Digit, now: Instant) -> Option<String> {
        if digit.as_char() == '#' {
            self.deadline = None;
            return self.take();
        }
        self.digits.push(digit.as_char());
        self.deadline = Some(now + self.timeout);
        None
    }

    /// When the pending entry ends by itself.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The entry, if its pause has run out by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<String> {
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            return self.take();
        }
        None
    }

    fn take(&mut self) -> Option<String> {
        (!self.digits.is_empty()).then(|| std::mem::take(&mut self.digits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: u8) -> Digit {
        Digit::new(c).unwrap()
    }

    #[test]
    fn hash_ends_an_entry_and_a_pause_ends_another() {
        let t0 = Instant::now();
        let mut c = DtmfCollector::new(Duration::from_secs(2));
        assert_eq!(c.push(d(b'1'), t0), None);
        assert_eq!(c.push(d(b'2'), t0), None);
        assert_eq!(c.push(d(b'#'), t0), Some("12".into()));
        assert_eq!(c.deadline(), None);
        c.push(d(b'9'), t0);
        assert_eq!(c.poll(t0 + Duration::from_millis(1999)), None);
        assert_eq!(c.poll(t0 + Duration::from_secs(2)), Some("9".into()));
        assert_eq!(c.push(d(b'#'), t0), None, "a lone # is not an entry");
    }
}
