//! The conversation as the model sees it: entries with stable ids (so a reply can be
//! rewritten to what the caller actually heard, or withdrawn, without index bookkeeping),
//! and a budget on what each request carries, so a long call neither slows down nor
//! overflows the model's context. The call record keeps the whole transcript separately.

use crate::providers::llm::ChatMessage;

/// Identifies one entry for the life of the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryId(u64);

/// Who said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The caller (speech or keypad).
    Caller,
    /// The agent.
    Agent,
}

#[derive(Debug, Clone)]
struct Entry {
    id: EntryId,
    speaker: Speaker,
    text: String,
}

/// What each request may carry besides the system prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryBudget {
    /// Most recent entries kept (caller and agent lines each count one).
    pub max_entries: usize,
    /// Estimated tokens kept (about four characters a token, rounded up per entry).
    pub max_tokens: usize,
}

impl Default for HistoryBudget {
    fn default() -> Self {
        Self {
            max_entries: 40,
            max_tokens: 3000,
        }
    }
}

/// The conversation of one call.
#[derive(Debug, Default)]
pub struct History {
    entries: Vec<Entry>,
    next_id: u64,
}

/// A rough token estimate: good enough to bound a request, no tokenizer needed.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(4) + 4
}

impl History {
    /// Adds an entry at the end.
    pub fn push(&mut self, speaker: Speaker, text: impl Into<String>) -> EntryId {
        self.next_id += 1;
        let id = EntryId(self.next_id);
        self.entries.push(Entry {
            id,
            speaker,
            text: text.into(),
        });
        id
    }

    /// Replaces an entry's text (e.g. with the part of a reply the caller heard).
    pub fn set_text(&mut self, id: EntryId, text: impl Into<String>) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.text = text.into();
        }
    }

    /// Appends to an entry's text.
    pub fn append(&mut self, id: EntryId, text: &str) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.text.push_str(text);
        }
    }

    /// An entry's text.
    pub fn text(&self, id: EntryId) -> Option<&str> {
        self.entries
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.text.as_str())
    }

    /// Removes an entry (a reply nobody heard, a turn merged into the next).
    pub fn remove(&mut self, id: EntryId) {
        self.entries.retain(|e| e.id != id);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The request's messages: the system prompt always, then the most recent non-empty
    /// entries that fit the budget, oldest first. The first kept entry is a caller line
    /// where possible (models answer oddly to a conversation that opens mid-reply).
    pub fn for_model(&self, system_prompt: &str, budget: HistoryBudget) -> Vec<ChatMessage> {
        let mut kept: Vec<&Entry> = Vec::new();
        let mut tokens = 0;
        for e in self
            .entries
            .iter()
            .rev()
            .filter(|e| !e.text.trim().is_empty())
        {
            let t = estimate_tokens(&e.text);
            if kept.len() >= budget.max_entries
                || (tokens + t > budget.max_tokens && !kept.is_empty())
            {
                break;
            }
            tokens += t;
            kept.push(e);
        }
        kept.reverse();
        let full = kept.len()
            == self
                .entries
                .iter()
                .filter(|e| !e.text.trim().is_empty())
                .count();
        if !full {
            while kept.len() > 1 && kept[0].speaker == Speaker::Agent {
                kept.remove(0);
            }
        }
        let mut messages = Vec::with_capacity(kept.len() + 1);
        messages.push(ChatMessage::new("system", system_prompt));
        messages.extend(kept.into_iter().map(|e| {
            let role = match e.speaker {
                Speaker::Caller => "user",
                Speaker::Agent => "assistant",
            };
            ChatMessage::new(role, e.text.clone())
        }));
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_addressed_by_id_not_position() {
        let mut h = History::default();
        let a = h.push(Speaker::Agent, "Selamat datang.");
        let u = h.push(Speaker::Caller, "Berapa harga?");
        let r = h.push(Speaker::Agent, "");
        h.remove(u);
        h.append(r, "Harga ialah RM99.");
        assert_eq!(h.text(a), Some("Selamat datang."));
        assert_eq!(h.text(r), Some("Harga ialah RM99."));
        assert_eq!(h.text(u), None);
    }

    #[test]
    fn the_system_prompt_is_always_first_and_empty_entries_are_skipped() {
        let mut h = History::default();
        h.push(Speaker::Agent, "");
        h.push(Speaker::Caller, "Hai");
        let m = h.for_model("Anda pembantu.", HistoryBudget::default());
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "Hai");
    }

    #[test]
    fn a_long_call_stays_within_the_budget() {
        let mut h = History::default();
        let budget = HistoryBudget {
            max_entries: 12,
            max_tokens: 400,
        };
        for turn in 0..60 {
            h.push(
                Speaker::Caller,
                format!("Soalan nombor {turn} tentang pakej internet saya."),
            );
            h.push(
                Speaker::Agent,
                format!("Jawapan nombor {turn}: pakej asas kami bermula dari sembilan puluh sembilan ringgit sebulan."),
            );
            let m = h.for_model("Anda pembantu.", budget);
            assert_eq!(m[0].role, "system");
            assert!(m.len() <= 13);
            let tokens: usize = m[1..].iter().map(|m| estimate_tokens(&m.content)).sum();
            assert!(tokens <= 400, "turn {turn}: {tokens} tokens");
            assert_eq!(m[1].role, "user", "a trimmed history opens with the caller");
            assert!(
                m.last()
                    .unwrap()
                    .content
                    .contains(&format!("Jawapan nombor {turn}:"))
            );
        }
        assert_eq!(h.len(), 120, "the whole conversation is kept");
    }

    #[test]
    fn one_huge_entry_is_still_sent() {
        let mut h = History::default();
        h.push(Speaker::Caller, "x".repeat(100_000));
        let m = h.for_model("s", HistoryBudget::default());
        assert_eq!(m.len(), 2);
    }
}
