//! Seeded randomness and hashing for the simulation. Everything here is a pure function of its inputs.

use crate::raft::SeededRng;

/// A seeded generator with the helpers the simulation needs. Each concern (network, workload, faults,
/// engine seeds) gets its own stream so that changing one knob does not shift the others.
#[derive(Clone, Debug)]
pub struct Rng(SeededRng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(SeededRng::new(mix64(seed)))
    }

    /// A generator for a named sub-stream of `seed`.
    pub fn stream(seed: u64, name: &str) -> Rng {
        Rng::new(seed ^ fnv64(name.as_bytes()))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// A number in `[low, high)`; `low` when the range is empty.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        self.0.range(low, high)
    }

    /// A number in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0.range(low, high.saturating_add(1))
    }

    /// An index in `[0, n)`; 0 when `n == 0`.
    pub fn index(&mut self, n: usize) -> usize {
        self.0.range(0, n as u64) as usize
    }

    /// A float in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.index(items.len())])
        }
    }

    /// Picks an index with probability proportional to its weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        if total == 0 {
            return 0;
        }
        let mut r = self.range(0, total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        weights.len() - 1
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.index(i + 1);
            items.swap(i, j);
        }
    }
}

/// SplitMix64 finalizer: a good 64-bit mixer.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over bytes, then mixed.
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix64(h)
}

/// The seeds a simulation runs, from the environment with variables named `{prefix}_SEED` (replay one:
/// the flag says so), `{prefix}_SEEDS` (how many, default `default_count`) and `{prefix}_FIRST_SEED`
/// (where they start, default 1).
pub fn seeds_from_env(prefix: &str, default_count: usize) -> (Vec<u64>, bool) {
    let var = |name: &str| {
        std::env::var(format!("{prefix}_{name}"))
            .ok()
            .filter(|s| !s.trim().is_empty())
    };
    if let Some(s) = var("SEED") {
        let seed = s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{prefix}_SEED={s} is not a number"));
        return (vec![seed], true);
    }
    let n: usize = var("SEEDS")
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{prefix}_SEEDS={s} is not a number"))
        })
        .unwrap_or(default_count);
    let first: u64 = var("FIRST_SEED")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1);
    ((first..first + n as u64).collect(), false)
}

/// Worker threads: `{prefix}_THREADS`, else the machine's parallelism (at most 8).
pub fn threads_from_env(prefix: &str) -> usize {
    std::env::var(format!("{prefix}_THREADS"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(8)
        })
        .max(1)
}

/// Runs `run` on every seed of `seeds` on `threads` workers, seeds taken in order; returns each outcome
/// with the seed's position, sorted by position. With `stop_at_first`, no new seed starts once one
/// failed (so every seed before the first failure has run).
pub fn run_seeds<R: Send, F: Send>(
    seeds: &[u64],
    threads: usize,
    stop_at_first: bool,
    run: &(dyn Fn(u64) -> Result<R, F> + Sync),
) -> Vec<(usize, Result<R, F>)> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1).min(seeds.len().max(1)) {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&seed) = seeds.get(i) else {
                    break;
                };
                let r = run(seed);
                if r.is_err() && stop_at_first {
                    stop.store(true, Ordering::SeqCst);
                }
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results
}
