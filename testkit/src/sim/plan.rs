//! The shape of one seed's run, drawn from the seed: cluster size, timings, workload and the fault mix.

use hamok_runtime::raft::SeededRng;

/// Seeded randomness with the helpers the simulation needs; each concern gets its own stream, so
/// changing one knob does not shift the others.
#[derive(Clone, Debug)]
pub struct Rng(SeededRng);

impl Rng {
    /// A generator for the named sub-stream of `seed`.
    pub fn stream(seed: u64, name: &str) -> Rng {
        Rng(SeededRng::new(mix64(seed ^ fnv64(name.as_bytes()))))
    }

    /// A number in `[low, high]`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0.range(low, high.saturating_add(1))
    }

    /// An index in `[0, n)`; 0 when `n == 0`.
    pub fn index(&mut self, n: usize) -> usize {
        self.0.range(0, n as u64) as usize
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.0.chance(p)
    }

    /// A float in `[low, high)`.
    pub fn float(&mut self, low: f64, high: f64) -> f64 {
        let unit = (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        low + unit * (high - low)
    }

    /// Picks an index with probability proportional to its weight.
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let total: u64 = weights.iter().sum();
        let mut r = self.0.range(0, total.max(1));
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i;
            }
            r -= w;
        }
        weights.len().saturating_sub(1)
    }

    /// A raw 64-bit number.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

/// SplitMix64's finalizer.
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

/// Timings and sizes of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Peers started together at the beginning (ids `p1`..).
    pub initial_peers: usize,
    /// Index (0-based) of an initial peer that is `only_follower`, if any.
    pub only_follower: Option<usize>,
    /// Most peers up at once (new peers join up to it).
    pub max_peers: usize,
    /// The initial peers join at the same instant (else staggered by up to a discovery window).
    pub simultaneous_start: bool,
    pub election_timeout_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub peer_max_idle_ms: u64,
    pub request_timeout_ms: u64,
    pub hello_interval_ms: u64,
    pub discovery_window_ms: u64,
    pub tick_interval_ms: u64,
    pub snapshot_after_entries: u64,
    pub clients: usize,
    /// How long faults are injected.
    pub chaos_ms: u64,
    /// Gap between two faults.
    pub fault_gap_ms: (u64, u64),
    /// After the heal, every peer that is up must be a joined member with the others within this.
    pub rejoin_bound_ms: u64,
}

impl Plan {
    /// The plan of `seed`.
    pub fn draw(seed: u64) -> Plan {
        let mut rng = Rng::stream(seed, "plan");
        let initial_peers = [3usize, 3, 4, 5, 5][rng.index(5)];
        let election_timeout_ms = rng.between(100, 250);
        let heartbeat_interval_ms = rng.between(election_timeout_ms / 6, election_timeout_ms / 3);
        let peer_max_idle_ms = election_timeout_ms * rng.between(4, 8);
        let hello_interval_ms = rng.between(20, 50);
        Plan {
            initial_peers,
            only_follower: (initial_peers >= 4 && rng.chance(0.4))
                .then(|| rng.index(initial_peers)),
            max_peers: 7,
            simultaneous_start: rng.chance(0.7),
            election_timeout_ms,
            heartbeat_interval_ms,
            peer_max_idle_ms,
            request_timeout_ms: rng.between(4, 8) * election_timeout_ms,
            hello_interval_ms,
            discovery_window_ms: hello_interval_ms * 4,
            tick_interval_ms: 5,
            snapshot_after_entries: rng.between(20, 400),
            clients: rng.between(2, 5) as usize,
            chaos_ms: rng.between(5_000, 10_000),
            fault_gap_ms: (100, rng.between(300, 900)),
            rejoin_bound_ms: peer_max_idle_ms + 40 * election_timeout_ms + 3_000,
        }
    }
}
