//! Sliding-window replay filter for data packet counters (RFC 6479), the same filter as
//! `session/replay.py`.
//!
//! Theory of operation. The filter remembers `highest`, the largest counter accepted so
//! far, and one bit per counter in the window of `REPLAY_WINDOW` counters ending at it.
//! Anything above `highest` is new and slides the window forward; anything at or below
//! the window's low edge is refused, seen or not. The bits live in a ring of 64-bit
//! words with one spare word, so sliding only zeroes the words the window enters and
//! every call is O(1). `check` changes nothing (drop replays before paying for the AEAD);
//! `update` marks a counter and is called only once the packet authenticated.

pub const REPLAY_WINDOW: u64 = 4096;
const WORD_BITS: u64 = 64;
const WORD_SHIFT: u32 = 6;
const BIT_MASK: u64 = WORD_BITS - 1;
const RING_WORDS: usize = (REPLAY_WINDOW / WORD_BITS) as usize + 1;

#[derive(Clone, Debug)]
pub struct ReplayWindow {
    ring: [u64; RING_WORDS],
    highest: u64,
    empty: bool,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow { ring: [0; RING_WORDS], highest: 0, empty: true }
    }

    /// The largest counter accepted so far (None before the first).
    pub fn highest(&self) -> Option<u64> {
        if self.empty {
            None
        } else {
            Some(self.highest)
        }
    }

    /// Would `update(counter)` accept it? Changes nothing.
    pub fn check(&self, counter: u64) -> bool {
        if counter > self.highest {
            return true;
        }
        if self.highest - counter >= REPLAY_WINDOW {
            return false;
        }
        let word = self.ring[((counter >> WORD_SHIFT) % RING_WORDS as u64) as usize];
        (word >> (counter & BIT_MASK)) & 1 == 0
    }

    /// Mark `counter` as seen; false if it is a duplicate or too old.
    pub fn update(&mut self, counter: u64) -> bool {
        let block = counter >> WORD_SHIFT;
        if counter > self.highest {
            let current = self.highest >> WORD_SHIFT;
            let slide = (block - current).min(RING_WORDS as u64);
            for i in current + 1..=current + slide {
                self.ring[(i % RING_WORDS as u64) as usize] = 0;
            }
            self.highest = counter;
        } else if self.highest - counter >= REPLAY_WINDOW {
            return false;
        }
        let index = (block % RING_WORDS as u64) as usize;
        let bit = 1u64 << (counter & BIT_MASK);
        if self.ring[index] & bit != 0 {
            return false;
        }
        self.ring[index] |= bit;
        self.empty = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    /// The obvious model: remember everything.
    fn model_accepts(seen: &BTreeSet<u64>, highest: Option<u64>, c: u64) -> bool {
        !seen.contains(&c) && highest.is_none_or(|h| c > h || h - c < REPLAY_WINDOW)
    }

    proptest! {
        #[test]
        fn matches_the_model(steps in proptest::collection::vec((0u64..3, 0u64..20_000), 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut highest = None;
            let mut base = 0u64;
            for (jump, off) in steps {
                if jump == 0 { base = base.saturating_add(off * 7); }
                let c = base.saturating_add(off) ;
                let want = model_accepts(&seen, highest, c);
                prop_assert_eq!(w.check(c), want);
                prop_assert_eq!(w.update(c), want);
                if want {
                    seen.insert(c);
                    highest = Some(highest.map_or(c, |h: u64| h.max(c)));
                }
                prop_assert_eq!(w.highest(), highest);
            }
        }
    }

    #[test]
    fn extremes() {
        let mut w = ReplayWindow::new();
        assert!(w.update(0));
        assert!(!w.update(0));
        assert!(w.update(u64::MAX));
        assert!(!w.check(u64::MAX - REPLAY_WINDOW));
        assert!(w.check(u64::MAX - REPLAY_WINDOW + 1));
        assert!(!w.update(5));
    }
}
