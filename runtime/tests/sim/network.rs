//! The simulated network: per-message loss, duplication, delay (hence reordering) and directed link
//! blocking (symmetric and asymmetric partitions). Messages to peers that are down are dropped on delivery.

use std::collections::{BTreeMap, BTreeSet};

use crate::raft::{Message, PeerId};

use super::util::Rng;

/// How the network behaves right now.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub dup: f64,
    /// Usual one-way delay range, in ms.
    pub min_delay: u64,
    pub max_delay: u64,
    /// Probability that a message is much slower than usual (up to `slow_max` ms): strong reordering.
    pub slow_chance: f64,
    pub slow_max: u64,
}

impl NetConfig {
    /// A calm network: no loss, no duplication, short delays.
    pub fn calm() -> NetConfig {
        NetConfig {
            loss: 0.0,
            dup: 0.0,
            min_delay: 1,
            max_delay: 5,
            slow_chance: 0.0,
            slow_max: 5,
        }
    }
}

/// Counters for the summary.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetStats {
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub blocked: u64,
    pub dead: u64,
    pub duplicated: u64,
}

/// What happened to a message handed to the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    Queued { at: u64, duplicated: bool },
    Lost,
    Blocked,
}

pub struct Network {
    pub cfg: NetConfig,
    /// By (delivery time, sequence); boxed so the map's nodes shift pointers, not messages.
    queue: BTreeMap<(u64, u64), Box<Message>>,
    seq: u64,
    blocked: BTreeSet<(PeerId, PeerId)>,
    rng: Rng,
    pub stats: NetStats,
}

impl Network {
    pub fn new(rng: Rng, cfg: NetConfig) -> Network {
        Network {
            cfg,
            queue: BTreeMap::new(),
            seq: 0,
            blocked: BTreeSet::new(),
            rng,
            stats: NetStats::default(),
        }
    }

    fn delay(&mut self) -> u64 {
        if self.rng.chance(self.cfg.slow_chance) {
            self.rng.between(
                self.cfg.max_delay,
                self.cfg.slow_max.max(self.cfg.max_delay),
            )
        } else {
            self.rng.between(
                self.cfg.min_delay,
                self.cfg.max_delay.max(self.cfg.min_delay),
            )
        }
    }

    fn enqueue(&mut self, at: u64, msg: Message) {
        self.seq += 1;
        self.queue.insert((at, self.seq), Box::new(msg));
    }

    /// Hands a message to the network at time `now`.
    pub fn send(&mut self, now: u64, msg: Message) -> SendOutcome {
        self.stats.sent += 1;
        if self.is_blocked(&msg.from, &msg.to) {
            self.stats.blocked += 1;
            return SendOutcome::Blocked;
        }
        if self.rng.chance(self.cfg.loss) {
            self.stats.lost += 1;
            return SendOutcome::Lost;
        }
        let duplicated = self.rng.chance(self.cfg.dup);
        let at = now + self.delay().max(1);
        if duplicated {
            self.stats.duplicated += 1;
            let again = now + self.delay().max(1);
            self.enqueue(again, msg.clone());
        }
        self.enqueue(at, msg);
        SendOutcome::Queued { at, duplicated }
    }

    /// Puts a message back to be delivered at `at` (its receiver is paused).
    pub fn requeue(&mut self, at: u64, msg: Message) {
        self.enqueue(at, msg);
    }

    /// When the next message is due.
    pub fn next_time(&self) -> Option<u64> {
        self.queue.keys().next().map(|(t, _)| *t)
    }

    /// Removes and returns the earliest message due at or before `now`.
    pub fn pop_due(&mut self, now: u64) -> Option<Message> {
        let key = *self.queue.keys().next()?;
        if key.0 > now {
            return None;
        }
        self.queue.remove(&key).map(|m| *m)
    }

    pub fn is_blocked(&self, from: &PeerId, to: &PeerId) -> bool {
        !self.blocked.is_empty() && self.blocked.contains(&(from.clone(), to.clone()))
    }

    pub fn set_blocked(&mut self, links: BTreeSet<(PeerId, PeerId)>) {
        self.blocked = links;
    }

    pub fn blocked_links(&self) -> usize {
        self.blocked.len()
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}
