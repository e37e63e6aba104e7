//! A bounded trace of what happened in one seed's run: the tail goes into a failure report, the whole
//! (up to a large cap) is printed when a seed is replayed.

use std::collections::VecDeque;

/// Lines kept in normal runs.
pub const TRACE_LINES: usize = 3_000;
/// Lines kept when replaying one seed.
pub const REPLAY_TRACE_LINES: usize = 1_000_000;

/// A ring of trace lines, each stamped with the simulated time.
#[derive(Debug)]
pub struct Trace {
    lines: VecDeque<String>,
    cap: usize,
    dropped: u64,
    /// FNV-1a over every line ever noted (dropped ones included): two runs of a seed are identical
    /// exactly when their digests are.
    digest: u64,
}

impl Trace {
    /// An empty trace keeping at most `cap` lines.
    pub fn new(cap: usize) -> Self {
        Trace {
            lines: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
            digest: 0xCBF2_9CE4_8422_2325,
        }
    }

    /// Notes one line at `at_ms`.
    pub fn note(&mut self, at_ms: u64, line: impl AsRef<str>) {
        let line = format!("{at_ms:>7} ms  {}", line.as_ref());
        for b in line.bytes() {
            self.digest ^= u64::from(b);
            self.digest = self.digest.wrapping_mul(0x0000_0100_0000_01B3);
        }
        if self.lines.len() == self.cap {
            self.lines.pop_front();
            self.dropped += 1;
        }
        self.lines.push_back(line);
    }

    /// The digest of every line noted.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }

    /// Every line kept, with a note of how many were dropped.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        if self.dropped > 0 {
            s.push_str(&format!("({} earlier lines dropped)\n", self.dropped));
        }
        for l in &self.lines {
            s.push_str(l);
            s.push('\n');
        }
        s
    }
}
