//! The connectivity timeline of one run: which peers were up and which could reach each other, over
//! time. It answers one question for the checks: was a peer continuously up and reachable from another
//! for a whole interval (so that a removal for silence would be a bug)?

use std::collections::{BTreeMap, BTreeSet};

/// Loss above this rate counts as "not reliably reachable" (a silence could be bad luck).
pub const RELIABLE_LOSS: f64 = 0.35;

/// The network faults in force from some instant on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetState {
    /// Groups that only reach each other; `None`: no partition. A peer in no group reaches nobody.
    pub groups: Option<Vec<BTreeSet<String>>>,
    /// Random loss rate.
    pub loss: f64,
}

impl NetState {
    fn reaches(&self, a: &str, b: &str) -> bool {
        if self.loss > RELIABLE_LOSS {
            return false;
        }
        match &self.groups {
            None => true,
            Some(groups) => groups.iter().any(|g| g.contains(a) && g.contains(b)),
        }
    }
}

#[derive(Clone, Debug)]
enum Change {
    Net(NetState),
    Up(String),
    Down(String),
}

/// Every connectivity change with its time (ms), in order.
#[derive(Clone, Debug, Default)]
pub struct NetLog {
    changes: Vec<(u64, Change)>,
}

impl NetLog {
    /// The faults changed at `at_ms`.
    pub fn net(&mut self, at_ms: u64, state: NetState) {
        self.changes.push((at_ms, Change::Net(state)));
    }

    /// `peer` came up (started, restarted) at `at_ms`.
    pub fn up(&mut self, at_ms: u64, peer: &str) {
        self.changes.push((at_ms, Change::Up(peer.to_string())));
    }

    /// `peer` went down (crashed, left) at `at_ms`.
    pub fn down(&mut self, at_ms: u64, peer: &str) {
        self.changes.push((at_ms, Change::Down(peer.to_string())));
    }

    /// Whether `a` and `b` were both up and could reach each other at every instant of
    /// `[from_ms, to_ms]`.
    pub fn connected_throughout(&self, a: &str, b: &str, from_ms: u64, to_ms: u64) -> bool {
        let mut net = NetState::default();
        let mut up: BTreeMap<String, bool> = BTreeMap::new();
        let ok = |net: &NetState, up: &BTreeMap<String, bool>| {
            up.get(a).copied().unwrap_or(false)
                && up.get(b).copied().unwrap_or(false)
                && net.reaches(a, b)
        };
        let mut i = 0;
        // The state at `from_ms`: every change up to and including that instant.
        while i < self.changes.len() && self.changes[i].0 <= from_ms {
            apply(&mut net, &mut up, &self.changes[i].1);
            i += 1;
        }
        if !ok(&net, &up) {
            return false;
        }
        while i < self.changes.len() && self.changes[i].0 <= to_ms {
            apply(&mut net, &mut up, &self.changes[i].1);
            if !ok(&net, &up) {
                return false;
            }
            i += 1;
        }
        true
    }
}

fn apply(net: &mut NetState, up: &mut BTreeMap<String, bool>, change: &Change) {
    match change {
        Change::Net(state) => *net = state.clone(),
        Change::Up(p) => {
            up.insert(p.clone(), true);
        }
        Change::Down(p) => {
            up.insert(p.clone(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connectivity_over_an_interval() {
        let mut log = NetLog::default();
        log.up(0, "a");
        log.up(0, "b");
        log.net(
            100,
            NetState {
                groups: Some(vec![
                    ["a".to_string()].into(),
                    ["b".to_string(), "c".to_string()].into(),
                ]),
                loss: 0.0,
            },
        );
        log.net(200, NetState::default());
        log.down(300, "b");
        assert!(log.connected_throughout("a", "b", 0, 99));
        assert!(!log.connected_throughout("a", "b", 50, 150));
        assert!(log.connected_throughout("a", "b", 200, 299));
        assert!(!log.connected_throughout("a", "b", 250, 350));
        assert!(!log.connected_throughout("a", "x", 0, 10));
    }
}
