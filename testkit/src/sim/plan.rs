//! The shape of one seed's run, drawn from the seed: cluster size, timings, workload and the fault mix.

pub use super::util::{fnv64, mix64, Rng};

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
