//! Splits streamed LLM text into clauses for TTS, so speech starts after the first few
//! words instead of after the whole reply.
//!
//! The first chunk is released as early as a natural break allows (a comma after a few
//! words), and never later than its fifth word, wherever the model puts its first comma: TTS
//! starts speaking about six tokens after the first one. Later clauses go at clause and
//! sentence ends; by the time the first chunk has been spoken the rest has long arrived. The
//! ElevenLabs websocket keeps one generation context per reply, so a first chunk cut
//! mid-sentence keeps the sentence's prosody there.

/// Breaks that end a sentence.
const SENTENCE_END: &[char] = &['.', '!', '?', '。', '…'];
/// Breaks that end a clause.
const CLAUSE_END: &[char] = &[',', ';', ':', '—'];

/// Sans-IO clause splitter: push text deltas, take clauses.
#[derive(Debug, Clone)]
pub struct ClauseSplitter {
    buf: String,
    emitted: usize,
    first_min_chars: usize,
    first_max_words: usize,
    min_chars: usize,
    max_chars: usize,
}

impl Default for ClauseSplitter {
    fn default() -> Self {
        Self::new(12, 40, 220).with_first_max_words(5)
    }
}

impl ClauseSplitter {
    /// `first_min_chars`: shortest first clause; `min_chars`: shortest later clause (shorter
    /// ones wait for more text unless a sentence ends); `max_chars`: force a break at a space.
    pub fn new(first_min_chars: usize, min_chars: usize, max_chars: usize) -> Self {
        Self {
            buf: String::new(),
            emitted: 0,
            first_min_chars,
            first_max_words: usize::MAX,
            min_chars,
            max_chars,
        }
    }

    /// Releases the first chunk after this many whole words even without a break.
    pub fn with_first_max_words(mut self, words: usize) -> Self {
        self.first_max_words = words.max(1);
        self
    }

    /// Adds streamed text; returns the clauses now complete, each ending with a space.
    pub fn push(&mut self, delta: &str) -> Vec<String> {
        self.buf.push_str(delta);
        let mut out = Vec::new();
        while let Some(cut) = self.find_cut() {
            let clause: String = self.buf.drain(..cut).collect();
            let clause = clause.trim();
            if !clause.is_empty() {
                out.push(format!("{clause} "));
                self.emitted += 1;
            }
            let trimmed = self.buf.trim_start().len();
            let start = self.buf.len() - trimmed;
            self.buf.drain(..start);
        }
        out
    }

    /// The end of the reply: whatever is left.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let rest = rest.trim();
        (!rest.is_empty()).then(|| {
            self.emitted += 1;
            format!("{rest} ")
        })
    }

    fn find_cut(&self) -> Option<usize> {
        let min = if self.emitted == 0 {
            self.first_min_chars
        } else {
            self.min_chars
        };
        let mut last_space = None;
        let mut chars = self.buf.char_indices().peekable();
        let mut count = 0;
        let mut words = 0;
        let mut in_word = false;
        while let Some((i, c)) = chars.next() {
            count += 1;
            if c.is_whitespace() {
                if in_word {
                    words += 1;
                    if self.emitted == 0 && words >= self.first_max_words {
                        return Some(i);
                    }
                }
                in_word = false;
            } else {
                in_word = true;
            }
            let next = chars.peek().map(|&(_, n)| n);
            // A break needs the following whitespace to have arrived (so "3.5" is not split).
            let followed_by_space = next.is_some_and(char::is_whitespace);
            if followed_by_space {
                let end = i + c.len_utf8();
                if SENTENCE_END.contains(&c)
                    && (count >= min.min(self.first_min_chars) || self.emitted == 0 && count >= 4)
                {
                    return Some(end);
                }
                if CLAUSE_END.contains(&c) && count >= min {
                    return Some(end);
                }
            }
            if c.is_whitespace() {
                last_space = Some(i);
            }
            if c == '\n' && count > 1 {
                return Some(i + 1);
            }
            if count >= self.max_chars {
                return last_space.map(|s| s + 1);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(deltas: &[&str]) -> Vec<String> {
        let mut s = ClauseSplitter::default();
        let mut out: Vec<String> = deltas.iter().flat_map(|d| s.push(d)).collect();
        out.extend(s.finish());
        out
    }

    #[test]
    fn first_clause_is_released_early() {
        let mut s = ClauseSplitter::default();
        assert!(
            s.push("Baiklah,").is_empty(),
            "too short, and the break is not confirmed yet"
        );
        assert!(s.push(" harga pakej").is_empty());
        let got = s.push(" kami bermula, dan");
        assert_eq!(got, vec!["Baiklah, harga pakej kami bermula, ".to_string()]);
    }

    #[test]
    fn a_long_first_sentence_without_commas_starts_after_five_words() {
        let sentence = "Pakej asas kami yang paling popular di kalangan pelanggan di seluruh Malaysia \
                        termasuk data tanpa had dan panggilan percuma ke semua rangkaian tempatan \
                        sepanjang bulan";
        let mut s = ClauseSplitter::default();
        let mut released_at = None;
        for (n, token) in sentence.split_inclusive(' ').enumerate() {
            if !s.push(token).is_empty() && released_at.is_none() {
                released_at = Some(n + 1);
            }
        }
        // The fifth word is known to be whole once the sixth token starts with a space.
        assert_eq!(released_at, Some(5), "tokens before the first chunk");
    }

    #[test]
    fn sentences_split_and_join_back() {
        let text = "Terima kasih kerana menelefon. Harga pakej asas ialah tiga puluh ringgit sebulan, termasuk data tanpa had. Ada apa-apa lagi?";
        let deltas: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
        let refs: Vec<&str> = deltas.iter().map(String::as_str).collect();
        let clauses = split_all(&refs);
        assert_eq!(clauses[0], "Terima kasih kerana menelefon. ");
        assert!(clauses.len() >= 3, "{clauses:?}");
        assert_eq!(clauses.concat().trim_end(), text);
        assert!(clauses.iter().all(|c| c.ends_with(' ')));
    }

    #[test]
    fn decimals_are_not_split() {
        let clauses = split_all(&["Harganya RM3", ".50 sahaja hari ini untuk anda semua."]);
        assert_eq!(
            clauses,
            vec!["Harganya RM3.50 sahaja hari ini ", "untuk anda semua. "]
        );
    }

    #[test]
    fn long_run_without_punctuation_breaks_at_a_space() {
        let text = "kata ".repeat(100);
        let clauses = split_all(&[&text]);
        assert!(clauses.len() > 1);
        assert!(clauses.iter().all(|c| c.len() <= 221));
        assert_eq!(clauses.concat().split_whitespace().count(), 100);
    }

    #[test]
    fn any_chunking_gives_the_same_words() {
        let text = "Ya, boleh. Saya akan semak sekarang; sila tunggu sebentar! Terima kasih.";
        for size in 1..8 {
            let chunks: Vec<String> = text
                .chars()
                .collect::<Vec<_>>()
                .chunks(size)
                .map(|c| c.iter().collect())
                .collect();
            let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
            let clauses = split_all(&refs);
            assert_eq!(clauses.concat().trim_end(), text, "chunk size {size}");
        }
    }
}
