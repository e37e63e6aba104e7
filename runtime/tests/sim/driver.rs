//! The simulation's main loop: a virtual clock, the client workload, the fault schedule (network, crashes,
//! membership churn, leadership transfers), the final healed phase with its liveness bounds, and the final
//! linearizability check.

use std::collections::{BTreeMap, BTreeSet};

use crate::raft::{
    LogIndex, Membership, MembershipChange, PeerId, PersistedState, RaftConfig, RaftLimits,
    RaftNode, Role, Term,
};

use super::checks::{ensure, violation, Check, Registry};
use super::cluster::{
    Client, Cluster, DriverEv, OpRec, OpStatus, OpWhat, Phase, SlotStatus, Stats,
};
use super::kv::{Command, KEYS};
use super::linearizability::{check_history, LinError, LinStats, Op, OpKind};
use super::network::{NetConfig, Network};
use super::trace::Trace;
use super::util::{mix64, Rng};

/// Most messages in flight at once before a run is declared a message storm (a typical run has < 100).
const MAX_IN_FLIGHT: usize = 100_000;
/// Most events in one run (a typical run has ~20 000).
const MAX_EVENTS: u64 = 5_000_000;

/// The shape of one seed's run, drawn from the seed.
#[derive(Clone, Debug)]
pub struct Plan {
    pub initial_voters: usize,
    pub max_nodes: usize,
    pub clients: usize,
    pub chaos_ms: u64,
    pub fault_gap: (u64, u64),
    pub op_timeout: u64,
    pub leader_bound: u64,
    pub commit_bound: u64,
    pub converge_bound: u64,
    pub liveness_writes: usize,
    /// How long the ordinary workload runs on the healed cluster (from the heal) before draining.
    pub final_workload_ms: u64,
    pub drain_ms: u64,
}

/// Progress of the final (healed) phase.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// A leader that looks stable, since when (it must stay so for two election timeouts, so that a leader
    /// cut off before the heal has had its check-quorum round).
    pub candidate: Option<(PeerId, u64, u64)>,
    pub leader: Option<PeerId>,
    pub leader_at: Option<u64>,
    pub done: usize,
    pub current: Option<u64>,
    pub first_attempt: Option<u64>,
    pub converge: Option<(u64, u64)>,
    pub converged_at: Option<u64>,
    pub healed_at: Option<u64>,
    pub max_commit_latency: u64,
}

/// What a finished run measured.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub lin: LinStats,
    pub writes_ok: usize,
    pub writes_failed: usize,
    pub writes_unknown: usize,
    pub reads_ok: usize,
    pub cas_ok: usize,
    pub leader_after_heal_ms: u64,
    pub max_commit_latency_ms: u64,
}

/// The seed-derived engine configuration.
pub fn config_for(rng: &mut Rng) -> RaftConfig {
    let election_timeout_ms = rng.between(100, 300);
    let heartbeat_interval_ms = rng.between(20, 50);
    RaftConfig {
        election_timeout_ms,
        heartbeat_interval_ms,
        limits: RaftLimits {
            max_entries_per_append: rng.between(4, 64) as usize,
            max_bytes_per_append: rng.between(256, 4096) as usize,
            max_inflight_appends: rng.between(2, 8) as usize,
            max_uncommitted_entries: rng.between(32, 512) as usize,
            max_uncommitted_bytes: 1 << 20,
            max_apply_batch: rng.between(2, 64) as usize,
            snapshot_chunk_bytes: rng.between(64, 512) as usize,
            max_inflight_snapshot_chunks: rng.between(1, 4) as usize,
            max_snapshot_bytes: 1 << 20,
            max_pending_reads: rng.between(8, 256) as usize,
            max_command_bytes: 1024,
        },
        persist_async: false,
    }
}

impl Cluster {
    /// Builds the cluster of one seed (nothing runs yet).
    pub fn build(seed: u64, hook: Option<fn(&mut RaftNode)>, trace: Trace) -> (Cluster, Plan) {
        let mut plan_rng = Rng::stream(seed, "plan");
        let mut config = config_for(&mut plan_rng);
        // Half the seeds sync a leader's log in the background. Drawn apart from the plan's stream,
        // so the other half runs exactly as before this option existed.
        config.persist_async = mix64(seed ^ 0xa5c_5e1f) & 1 == 1;
        let eto = config.election_timeout_ms;
        let initial_voters = [3usize, 3, 4, 5, 5][plan_rng.index(5)];
        let plan = Plan {
            initial_voters,
            max_nodes: 7,
            clients: plan_rng.between(3, 8) as usize,
            chaos_ms: plan_rng.between(6_000, 14_000),
            fault_gap: (60, plan_rng.between(150, 500)),
            op_timeout: 4 * eto + 1_000,
            leader_bound: 20 * eto + 2_000,
            commit_bound: 10 * eto + 1_000,
            converge_bound: 20 * eto + 2_000,
            liveness_writes: 5,
            final_workload_ms: 1_500,
            drain_ms: 300,
        };
        let genesis =
            Membership::with_voters((1..=initial_voters).map(|i| PeerId::from(i.to_string())));
        let mut net_cfg = NetConfig::calm();
        net_cfg.max_delay = plan_rng.between(2, 20);
        let mut cluster = Cluster {
            seed,
            now: 0,
            config,
            hook,
            genesis: genesis.clone(),
            slots: BTreeMap::new(),
            network: Network::new(Rng::stream(seed, "network"), net_cfg),
            registry: Registry::default(),
            trace,
            history: BTreeMap::new(),
            clients: vec![Client::default(); plan.clients + 1],
            hseq: 0,
            next_op: 1,
            stats: Stats::default(),
            queue: BTreeMap::new(),
            qseq: 0,
            phase: Phase::Chaos,
            conf_ops: Vec::new(),
            next_peer: initial_voters as u32 + 1,
            rng: Rng::stream(seed, "workload"),
            fault_rng: Rng::stream(seed, "faults"),
            compact_min: plan_rng.between(4, 24),
            compact_max: plan_rng.between(24, 80),
            file_root: None,
        };
        for id in genesis.voters.iter() {
            cluster.add_slot(id.clone(), PersistedState::genesis(genesis.clone()));
        }
        (cluster, plan)
    }

    fn liveness_client(&self) -> usize {
        self.clients.len() - 1
    }

    /// Runs the whole scenario. Errors are safety or liveness violations.
    pub fn run(&mut self, plan: &Plan, live: &mut Liveness) -> Check<Outcome> {
        let c = &self.config;
        let s = format!(
            "seed {}: {} voters, {} clients, chaos {} ms, election timeout {} ms, heartbeat {} ms, \
             max_entries_per_append {}, max_inflight {}, snapshot chunk {} B, apply batch {}, compaction every {}..{}, persist_async {}",
            self.seed,
            plan.initial_voters,
            plan.clients,
            plan.chaos_ms,
            c.election_timeout_ms,
            c.heartbeat_interval_ms,
            c.limits.max_entries_per_append,
            c.limits.max_inflight_appends,
            c.limits.snapshot_chunk_bytes,
            c.limits.max_apply_batch,
            self.compact_min,
            self.compact_max,
            c.persist_async
        );
        self.note(s);
        for id in self.genesis.voters.clone() {
            self.start_node(&id)?;
        }
        for c in 0..plan.clients {
            let at = self.rng.between(1, 50);
            self.schedule(at, DriverEv::ClientWake(c));
        }
        let first_fault = self.fault_rng.between(plan.fault_gap.0, plan.fault_gap.1);
        self.schedule(first_fault, DriverEv::Fault);
        self.schedule(plan.chaos_ms, DriverEv::ChaosEnd);
        self.schedule(25, DriverEv::Sweep);
        let hard_end = plan.chaos_ms
            + plan.leader_bound
            + plan.commit_bound * (plan.liveness_writes as u64 + 1)
            + plan.converge_bound
            + plan.final_workload_ms
            + plan.drain_ms
            + plan.commit_bound
            + 2_000;

        loop {
            if let Phase::Drain { until } = self.phase {
                // Let the operations in flight finish (bounded: they time out or must commit in time).
                let cap = until + plan.commit_bound + 1_000;
                if self.now >= cap
                    || (self.now >= until
                        && !self
                            .history
                            .values()
                            .any(|o| o.status == OpStatus::InFlight))
                {
                    self.phase = Phase::Done;
                }
            }
            if self.phase == Phase::Done {
                break;
            }
            let t_msg = self.network.next_time();
            let t_tick = self
                .slots
                .values()
                .filter_map(|s| {
                    s.live
                        .as_ref()
                        .map(|l| (l.deadline.max(s.paused_until), &s.id))
                })
                .min()
                .map(|(t, id)| (t, id.clone()));
            let t_drv = self.queue.keys().next().map(|(t, _)| *t);
            let t = [t_msg, t_tick.as_ref().map(|(t, _)| *t), t_drv]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(self.now + 1);
            if t > hard_end {
                return Err(violation(
                    "liveness",
                    format!(
                        "the run did not finish by {hard_end} ms (phase {:?})",
                        self.phase
                    ),
                ));
            }
            self.now = self.now.max(t);
            self.stats.events += 1;
            // Runaway guards: a message storm or a livelock at one instant would otherwise eat the
            // machine's memory or never end.
            if self.network.in_flight() > MAX_IN_FLIGHT || self.stats.events > MAX_EVENTS {
                return Err(violation(
                    "runaway",
                    format!(
                        "{} messages in flight, {} events so far (limits {MAX_IN_FLIGHT}, {MAX_EVENTS})\n{}",
                        self.network.in_flight(),
                        self.stats.events,
                        self.describe_nodes()
                    ),
                ));
            }
            if t_msg == Some(t) {
                let msg = self.network.pop_due(t).expect("a due message");
                self.deliver(msg)?;
            } else if let Some((_, id)) = t_tick.filter(|(d, _)| *d == t) {
                self.tick_node(&id)?;
            } else {
                let key = *self.queue.keys().next().expect("a driver event");
                let ev = self.queue.remove(&key).expect("the event");
                self.driver_event(ev, plan, live)?;
            }
        }
        self.check_all()?;
        self.finish(plan, live)
    }

    /// A leader's background sync completed (unless its peer crashed since: that incarnation's
    /// writes are then whatever the crash left). A paused peer hears of it when it resumes.
    fn on_synced(&mut self, id: &PeerId, incarnation: u32, index: LogIndex, term: Term) -> Check {
        let now = self.now;
        let Some(slot) = self.slots.get(id) else {
            return Ok(());
        };
        if slot.incarnation != incarnation || slot.live.is_none() {
            return Ok(());
        }
        if slot.paused_until > now {
            let at = slot.paused_until;
            self.schedule(
                at,
                DriverEv::Synced {
                    id: id.clone(),
                    incarnation,
                    index,
                    term,
                },
            );
            return Ok(());
        }
        self.with_slot(id, |c, slot| {
            if slot.durable.term_at(index) == Some(term) {
                if let Some(from) = slot.unsynced_from {
                    if from <= index {
                        slot.unsynced_from =
                            (index < slot.durable.last_index()).then_some(index + 1);
                    }
                }
            }
            slot.live.as_mut().unwrap().node.on_persisted(index, term);
            c.drain_node(slot)
        })
        .unwrap_or(Ok(()))
    }

    fn driver_event(&mut self, ev: DriverEv, plan: &Plan, live: &mut Liveness) -> Check {
        match ev {
            DriverEv::ClientWake(c) => {
                if matches!(self.phase, Phase::Chaos | Phase::Final { .. })
                    && c != self.liveness_client()
                    && self.clients[c].current.is_none()
                {
                    self.new_op(c, plan, false)?;
                }
            }
            DriverEv::Retry(op) => self.attempt_op(op, plan, live)?,
            DriverEv::OpTimeout(op) => self.on_op_timeout(op),
            DriverEv::Fault => {
                if self.phase == Phase::Chaos {
                    let extra = self.fault(plan)?;
                    let gap = self.fault_rng.between(plan.fault_gap.0, plan.fault_gap.1);
                    self.schedule(self.now + gap + extra, DriverEv::Fault);
                }
            }
            DriverEv::HealPartition(generation) => {
                if generation == self.stats.partitions && self.phase == Phase::Chaos {
                    self.network.heal();
                    self.note("network: partition healed".to_string());
                }
            }
            DriverEv::Restart(id) => {
                let crashed = self
                    .slots
                    .get(&id)
                    .is_some_and(|s| s.status == SlotStatus::Crashed);
                if crashed {
                    self.stats.restarts += 1;
                    self.start_node(&id)?;
                }
            }
            DriverEv::Stop(id) => {
                if self
                    .slots
                    .get(&id)
                    .is_some_and(|s| s.status != SlotStatus::Stopped)
                {
                    self.crash(&id, true);
                }
            }
            DriverEv::ChaosEnd => {
                self.phase = Phase::Final { since: self.now };
                self.network.heal();
                self.network.cfg = NetConfig::calm();
                self.note("=== faults healed: partitions healed, loss/duplication off, crashed peers restart ===".to_string());
                for slot in self.slots.values_mut() {
                    slot.paused_until = 0;
                }
                let crashed: Vec<PeerId> = self
                    .slots
                    .values()
                    .filter(|s| s.status == SlotStatus::Crashed)
                    .map(|s| s.id.clone())
                    .collect();
                for id in crashed {
                    self.stats.restarts += 1;
                    self.start_node(&id)?;
                }
                self.schedule(self.now + 5, DriverEv::FinalStep);
            }
            DriverEv::FinalStep => {
                self.liveness_step(plan, live)?;
                if self.phase != Phase::Done {
                    self.schedule(self.now + 5, DriverEv::FinalStep);
                }
            }
            DriverEv::Synced {
                id,
                incarnation,
                index,
                term,
            } => self.on_synced(&id, incarnation, index, term)?,
            DriverEv::Sweep => {
                self.check_all()?;
                self.resolve_conf_ops();
                self.schedule(self.now + 25, DriverEv::Sweep);
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- workload

    fn new_op(&mut self, c: usize, plan: &Plan, liveness: bool) -> Check<u64> {
        let id = self.next_op;
        self.next_op += 1;
        let key = if liveness {
            (id % u64::from(KEYS)) as u8
        } else {
            self.rng.range(0, u64::from(KEYS)) as u8
        };
        let r = self.rng.unit();
        let what = if liveness || r < 0.45 {
            OpWhat::Put { value: id }
        } else if r < 0.80 {
            OpWhat::Get { observed: None }
        } else {
            let seen = self.clients[c].seen.get(&key).copied().flatten();
            let expected = if self.rng.chance(0.2) { None } else { seen };
            OpWhat::Cas {
                expected,
                new: id,
                ok: None,
            }
        };
        self.history.insert(
            id,
            OpRec {
                id,
                client: c,
                key,
                what,
                status: OpStatus::Attempting,
                call: 0,
                ret: None,
                call_ms: 0,
                ret_ms: 0,
                node: None,
                slot: None,
                attempts: 0,
                liveness,
                excused: false,
            },
        );
        self.clients[c].current = Some(id);
        self.attempt_op(id, plan, &Liveness::default())?;
        Ok(id)
    }

    fn retry_later(&mut self, op: u64) {
        let at = self.now + self.rng.between(10, 40);
        self.schedule(at, DriverEv::Retry(op));
    }

    /// Gives up on an operation that never started.
    fn give_up(&mut self, op: u64) {
        if let Some(rec) = self.history.get_mut(&op) {
            rec.status = OpStatus::Dropped;
        }
        self.free_client(op);
    }

    fn attempt_op(&mut self, op: u64, plan: &Plan, live: &Liveness) -> Check {
        if matches!(self.phase, Phase::Drain { .. } | Phase::Done) {
            if let Some(rec) = self.history.get(&op) {
                if rec.status == OpStatus::Attempting {
                    self.give_up(op);
                }
            }
            return Ok(());
        }
        let Some(rec) = self.history.get_mut(&op) else {
            return Ok(());
        };
        let write = rec.is_write();
        let retryable_read = !write && rec.status == OpStatus::InFlight;
        if rec.status != OpStatus::Attempting && !retryable_read {
            return Ok(());
        }
        rec.attempts += 1;
        if rec.attempts > 60 {
            if rec.status == OpStatus::Attempting {
                self.give_up(op);
            } else {
                self.drop_read(op);
            }
            return Ok(());
        }
        let liveness = rec.liveness;
        let key = rec.key;
        let what = rec.what.clone();
        let running = self.available_ids();
        let target = if liveness {
            live.leader.clone().or_else(|| self.best_leader())
        } else if write && self.rng.chance(0.85) {
            self.best_leader()
        } else {
            self.rng.pick(&running).cloned()
        };
        let Some(target) = target.filter(|t| self.is_available(t)) else {
            self.retry_later(op);
            return Ok(());
        };
        let now = self.now;
        if write {
            let cmd = match what {
                OpWhat::Put { value } => Command::Put { op, key, value },
                OpWhat::Cas { expected, new, .. } => Command::Cas {
                    op,
                    key,
                    expected,
                    new,
                },
                OpWhat::Get { .. } => unreachable!(),
            };
            let pad = self.rng.range(0, 48) as usize;
            let bytes = cmd.encode(pad);
            let call = self.next_seq();
            let slot = self.slots.get_mut(&target).unwrap();
            let lv = slot.live.as_mut().unwrap();
            match lv.node.propose(now, bytes) {
                Ok((index, term)) => {
                    lv.pending_writes.entry(index).or_default().push((op, term));
                    let rec = self.history.get_mut(&op).unwrap();
                    rec.status = OpStatus::InFlight;
                    rec.call = call;
                    rec.call_ms = now;
                    rec.node = Some(target.clone());
                    rec.slot = Some((index, term));
                    let s = format!(
                        "client {}: op#{op} {cmd:?} proposed on {target} at ({index}, {term})",
                        rec.client
                    );
                    self.note(s);
                    self.schedule(now + self.op_timeout(plan), DriverEv::OpTimeout(op));
                }
                Err(_) => self.retry_later(op),
            }
        } else {
            let first = self.history[&op].status == OpStatus::Attempting;
            let call = self.next_seq();
            let slot = self.slots.get_mut(&target).unwrap();
            let lv = slot.live.as_mut().unwrap();
            // Register before the engine can answer (it may answer in the very next Ready).
            lv.reads.insert(op, None);
            match lv.node.read_index(now, op) {
                Ok(()) => {
                    let rec = self.history.get_mut(&op).unwrap();
                    if first {
                        rec.status = OpStatus::InFlight;
                        rec.call = call;
                        rec.call_ms = now;
                        self.schedule(now + self.op_timeout(plan), DriverEv::OpTimeout(op));
                    }
                    let rec = self.history.get_mut(&op).unwrap();
                    rec.node = Some(target.clone());
                    let s = format!(
                        "client {}: op#{op} get key {key} via read_index on {target}",
                        rec.client
                    );
                    self.note(s);
                }
                Err(_) => {
                    lv.reads.remove(&op);
                    self.retry_later(op);
                }
            }
        }
        self.with_slot(&target, |c, slot| c.drain_node(slot))
            .unwrap_or(Ok(()))
    }

    /// How long a client waits for an operation before giving up on it: short while faults rage, longer
    /// than the liveness bound once they healed (so that the bound, not the client, judges).
    fn op_timeout(&self, plan: &Plan) -> u64 {
        if self.phase == Phase::Chaos {
            plan.op_timeout
        } else {
            plan.commit_bound + 500
        }
    }

    fn on_op_timeout(&mut self, op: u64) {
        let Some(rec) = self.history.get(&op) else {
            return;
        };
        if rec.status != OpStatus::InFlight || rec.liveness {
            return;
        }
        if rec.is_write() {
            // Keep it registered on its proposer: if that peer applies it later, it still resolves.
            self.abandon_write(op);
        } else {
            if let Some(node) = rec.node.clone() {
                if let Some(lv) = self.slots.get_mut(&node).and_then(|s| s.live.as_mut()) {
                    lv.reads.remove(&op);
                }
            }
            self.drop_read(op);
        }
    }

    // ---------------------------------------------------------------- faults

    /// Injects one fault. Returns extra quiet time before the next one.
    fn fault(&mut self, plan: &Plan) -> Check<u64> {
        // net, sym partition, asym partition, heal, crash, crash leader, isolate leader, churn, transfer,
        // nothing, pause, pause leader, calm window
        let weights = [12, 9, 6, 7, 9, 4, 5, 18, 8, 2, 4, 3, 4];
        match self.fault_rng.weighted(&weights) {
            0 => self.fault_network(),
            1 => {
                let mut ids = self.present_ids();
                if ids.len() >= 2 {
                    self.fault_rng.shuffle(&mut ids);
                    let k = self.fault_rng.between(1, ids.len() as u64 - 1) as usize;
                    let side: BTreeSet<PeerId> = ids[..k].iter().cloned().collect();
                    self.partition(&side, "symmetric");
                }
            }
            2 => self.fault_asymmetric(),
            3 => {
                self.network.heal();
                self.note("network: all partitions healed".to_string());
            }
            4 => {
                let ids = self.running_ids();
                if let Some(id) = self.fault_rng.pick(&ids).cloned() {
                    self.fault_crash(&id);
                }
            }
            5 => {
                if let Some(id) = self.best_leader() {
                    if self.config.persist_async && self.fault_rng.chance(0.5) {
                        self.fault_power_cut(&id);
                    } else {
                        self.fault_crash(&id);
                    }
                }
            }
            6 => {
                if let Some(id) = self.best_leader() {
                    let side: BTreeSet<PeerId> = [id].into_iter().collect();
                    self.partition(&side, "leader isolated");
                }
            }
            7 => self.fault_churn(plan)?,
            8 => self.fault_transfer()?,
            10 => {
                let ids = self.available_ids();
                if let Some(id) = self.fault_rng.pick(&ids).cloned() {
                    self.fault_pause(&id);
                }
            }
            11 => {
                if let Some(id) = self.best_leader() {
                    self.fault_pause(&id);
                }
            }
            12 => {
                self.network.heal();
                self.network.cfg = NetConfig::calm();
                let quiet = self.fault_rng.between(300, 2_000);
                self.note(format!("network: calm for {quiet} ms"));
                return Ok(quiet);
            }
            _ => {}
        }
        Ok(0)
    }

    /// Freezes a peer for a while: no ticks, no messages handled (they queue up), no client calls.
    fn fault_pause(&mut self, id: &PeerId) {
        let eto = self.config.election_timeout_ms;
        let until = self.now + self.fault_rng.between(50, 3 * eto);
        if let Some(slot) = self.slots.get_mut(id) {
            slot.paused_until = until;
        }
        self.note(format!("{id}: paused until {until} ms"));
    }

    fn fault_network(&mut self) {
        let eto = self.config.election_timeout_ms;
        let r = &mut self.fault_rng;
        let max_delay = r.between(2, 30);
        let cfg = NetConfig {
            loss: if r.chance(0.3) { 0.0 } else { r.unit() * 0.3 },
            dup: if r.chance(0.5) { 0.0 } else { r.unit() * 0.1 },
            min_delay: r.between(1, max_delay / 2 + 1),
            max_delay,
            slow_chance: if r.chance(0.5) { 0.0 } else { r.unit() * 0.05 },
            slow_max: r.between(eto / 2, 4 * eto),
        };
        let s = format!(
            "network: loss {:.0}%, dup {:.0}%, delay {}..{} ms, slow {:.1}% up to {} ms",
            cfg.loss * 100.0,
            cfg.dup * 100.0,
            cfg.min_delay,
            cfg.max_delay,
            cfg.slow_chance * 100.0,
            cfg.slow_max
        );
        self.network.cfg = cfg;
        self.note(s);
    }

    fn partition(&mut self, side: &BTreeSet<PeerId>, what: &str) {
        let ids = self.present_ids();
        let mut links = BTreeSet::new();
        for a in &ids {
            for b in &ids {
                if side.contains(a) != side.contains(b) {
                    links.insert((a.clone(), b.clone()));
                }
            }
        }
        self.install_partition(links, format!("{what} partition {side:?} | rest"));
    }

    fn install_partition(&mut self, links: BTreeSet<(PeerId, PeerId)>, what: String) {
        self.stats.partitions += 1;
        let n = links.len();
        self.network.set_blocked(links);
        let heal_at = self.now + self.fault_rng.between(200, 3_000);
        self.schedule(heal_at, DriverEv::HealPartition(self.stats.partitions));
        self.note(format!("network: {what} ({n} directed links cut)"));
    }

    fn fault_asymmetric(&mut self) {
        let ids = self.present_ids();
        let Some(a) = self.fault_rng.pick(&ids).cloned() else {
            return;
        };
        let mut links = BTreeSet::new();
        let mode = self.fault_rng.index(3);
        for x in &ids {
            for y in &ids {
                if x == y {
                    continue;
                }
                let cut = match mode {
                    0 => *x == a,                    // a cannot send
                    1 => *y == a,                    // a cannot receive
                    _ => self.fault_rng.chance(0.3), // random directed links
                };
                if cut {
                    links.insert((x.clone(), y.clone()));
                }
            }
        }
        let what = match mode {
            0 => format!("asymmetric: {a} cannot send"),
            1 => format!("asymmetric: {a} cannot receive"),
            _ => "asymmetric: random directed links".to_string(),
        };
        self.install_partition(links, what);
    }

    fn fault_crash(&mut self, id: &PeerId) {
        let members = self.registry.current_membership(&self.genesis).clone();
        let down_voters = members
            .voters
            .iter()
            .filter(|v| !self.is_running(v))
            .count();
        // Usually keep a majority of voters up; sometimes not (the cluster must then stall safely).
        if members.is_voter(id)
            && down_voters + 1 > (members.voters.len() - 1) / 2
            && !self.fault_rng.chance(0.1)
        {
            return;
        }
        self.stats.crashes += 1;
        self.crash(id, false);
        let at = self.now + self.fault_rng.between(100, 3_000);
        self.schedule(at, DriverEv::Restart(id.clone()));
    }

    /// A power cut takes down the leader and another running peer at once (seeds with
    /// `persist_async`, where the leader may lose entries no sync covered yet): a majority may be
    /// down; they come back at different times.
    fn fault_power_cut(&mut self, leader: &PeerId) {
        let others: Vec<PeerId> = self
            .running_ids()
            .into_iter()
            .filter(|id| id != leader)
            .collect();
        let mut down = vec![leader.clone()];
        down.extend(self.fault_rng.pick(&others).cloned());
        self.note(format!("power cut: {down:?}"));
        for id in down {
            self.stats.crashes += 1;
            self.crash(&id, false);
            let at = self.now + self.fault_rng.between(100, 3_000);
            self.schedule(at, DriverEv::Restart(id));
        }
    }

    fn fault_transfer(&mut self) -> Check {
        let Some(leader) = self.best_leader() else {
            return Ok(());
        };
        let voters: Vec<PeerId> = self
            .node(&leader)
            .map(|n| {
                n.membership()
                    .voters
                    .iter()
                    .filter(|v| **v != leader)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let Some(target) = self.fault_rng.pick(&voters).cloned() else {
            return Ok(());
        };
        let now = self.now;
        let r = {
            let lv = self.slots.get_mut(&leader).unwrap().live.as_mut().unwrap();
            lv.node.transfer_leadership(now, target.clone())
        };
        self.stats.transfers += 1;
        self.note(format!("transfer leadership {leader} -> {target}: {r:?}"));
        self.with_slot(&leader, |c, slot| c.drain_node(slot))
            .unwrap_or(Ok(()))
    }

    fn fault_churn(&mut self, plan: &Plan) -> Check {
        let Some(leader) = self.best_leader() else {
            return Ok(());
        };
        let (m, commit, matches) = {
            let n = self.node(&leader).unwrap();
            if n.membership() != n.latest_membership() {
                return Ok(());
            }
            let m = n.membership().clone();
            let matches: BTreeMap<PeerId, Option<u64>> = m
                .learners
                .iter()
                .map(|l| (l.clone(), n.match_index(l)))
                .collect();
            (m, n.commit_index(), matches)
        };
        let present = self.present_ids().len();
        let mut options: Vec<(u64, MembershipChange)> = Vec::new();
        for (l, mi) in &matches {
            if mi.is_some_and(|mi| mi >= commit) {
                options.push((8, MembershipChange::Promote(l.clone())));
            }
        }
        if present < plan.max_nodes && m.voters.len() + m.learners.len() < plan.max_nodes {
            let id = PeerId::from(format!("n{}", self.next_peer));
            options.push((5, MembershipChange::AddLearner(id)));
        }
        if m.voters.len() > 3 {
            let voters: Vec<PeerId> = m.voters.iter().cloned().collect();
            let target = if self.fault_rng.chance(0.35) {
                leader.clone()
            } else {
                self.fault_rng.pick(&voters).cloned().unwrap()
            };
            options.push((5, MembershipChange::Remove(target)));
        }
        if let Some(l) = m.learners.iter().next() {
            options.push((1, MembershipChange::Remove(l.clone())));
        }
        if options.is_empty() {
            return Ok(());
        }
        let weights: Vec<u64> = options.iter().map(|(w, _)| *w).collect();
        let change = options.swap_remove(self.fault_rng.weighted(&weights)).1;
        if let MembershipChange::AddLearner(id) = &change {
            self.next_peer += 1;
            self.add_slot(id.clone(), PersistedState::default());
            self.start_node(id)?;
        }
        let now = self.now;
        let r = {
            let lv = self.slots.get_mut(&leader).unwrap().live.as_mut().unwrap();
            lv.node.propose_membership(now, change.clone())
        };
        self.note(format!("membership: {leader} proposes {change:?}: {r:?}"));
        match r {
            Ok((index, term)) => {
                self.stats.conf_proposed += 1;
                self.conf_ops.push(super::cluster::ConfOp {
                    change,
                    index,
                    term,
                    resolved: false,
                });
            }
            Err(_) => {
                if let MembershipChange::AddLearner(id) = &change {
                    self.crash(id, true);
                }
            }
        }
        self.with_slot(&leader, |c, slot| c.drain_node(slot))
            .unwrap_or(Ok(()))
    }

    /// Settles proposed membership changes once their index is applied somewhere.
    pub fn resolve_conf_ops(&mut self) {
        let eto = self.config.election_timeout_ms;
        let mut actions: Vec<(u64, DriverEv)> = Vec::new();
        let mut notes = Vec::new();
        for op in self.conf_ops.iter_mut().filter(|o| !o.resolved) {
            let Some(rec) = self.registry.applied.get(&op.index) else {
                continue;
            };
            op.resolved = true;
            if rec.term == op.term {
                self.stats.conf_committed += 1;
                notes.push(format!(
                    "membership: {:?} committed at {}",
                    op.change, op.index
                ));
                if let MembershipChange::Remove(id) = &op.change {
                    let at = self.now + self.rng.between(2 * eto, 4 * eto);
                    actions.push((at, DriverEv::Stop(id.clone())));
                }
            } else {
                notes.push(format!(
                    "membership: {:?} failed at {}",
                    op.change, op.index
                ));
                if let MembershipChange::AddLearner(id) = &op.change {
                    actions.push((self.now, DriverEv::Stop(id.clone())));
                }
            }
        }
        for n in notes {
            self.note(n);
        }
        for (at, ev) in actions {
            self.schedule(at, ev);
        }
    }

    // ---------------------------------------------------------------- final phase

    /// A leader every healthy member agrees on: highest term among members, its configuration settled, and
    /// an entry of its own term committed.
    fn stable_leader(&self) -> Option<PeerId> {
        let members = self.members();
        let max_term = members
            .iter()
            .filter_map(|id| self.node(id))
            .map(|n| n.term())
            .max()?;
        members.iter().find_map(|id| {
            let n = self.node(id)?;
            let ok = n.role() == Role::Leader
                && self.is_available(id)
                && !n.transfer_in_progress()
                && n.term() == max_term
                && n.membership() == n.latest_membership()
                && n.membership().is_voter(id)
                && n.term_at(n.commit_index()) == Some(n.term());
            ok.then(|| id.clone())
        })
    }

    fn liveness_step(&mut self, plan: &Plan, live: &mut Liveness) -> Check {
        self.resolve_conf_ops();
        let Phase::Final { since } = self.phase else {
            return Ok(());
        };
        live.healed_at = Some(since);
        let candidate = self
            .stable_leader()
            .map(|id| (id.clone(), self.node(&id).map_or(0, |n| n.term())));
        live.candidate = match (candidate, live.candidate.take()) {
            (Some((id, term)), Some((p, t, at))) if id == p && term == t => Some((p, t, at)),
            (Some((id, term)), _) => Some((id, term, self.now)),
            (None, _) => None,
        };
        if live
            .leader
            .as_ref()
            .is_none_or(|l| self.node(l).is_none_or(|n| n.role() != Role::Leader))
        {
            let confirm = 2 * self.config.election_timeout_ms;
            live.leader = live
                .candidate
                .as_ref()
                .filter(|(_, _, at)| self.now >= at + confirm)
                .map(|(id, _, _)| id.clone());
            if let Some(l) = &live.leader {
                if live.leader_at.is_none() {
                    live.leader_at = Some(self.now);
                }
                let s = format!("liveness: stable leader {l} after {} ms", self.now - since);
                self.note(s);
            } else if live.leader_at.is_none() && self.now > since + plan.leader_bound {
                return Err(violation(
                    "liveness",
                    format!(
                        "no stable leader {} ms after the faults healed\n{}",
                        plan.leader_bound,
                        self.describe_nodes()
                    ),
                ));
            }
        }
        if let Some(op) = live.current {
            let status = self.history[&op].status;
            match status {
                OpStatus::Done => {
                    let rec = &self.history[&op];
                    live.max_commit_latency = live
                        .max_commit_latency
                        .max(rec.ret_ms - live.first_attempt.unwrap_or(rec.ret_ms));
                    live.done += 1;
                    live.current = None;
                    live.first_attempt = None;
                }
                OpStatus::InFlight | OpStatus::Attempting => {}
                _ => live.current = None,
            }
        }
        if let Some(first) = live.first_attempt {
            if self.now > first + plan.commit_bound {
                return Err(violation(
                    "liveness",
                    format!(
                        "a proposal to the healed cluster (op#{:?}) did not commit within {} ms\n{}",
                        live.current,
                        plan.commit_bound,
                        self.describe_nodes()
                    ),
                ));
            }
        }
        if live.leader.is_none() {
            return Ok(());
        }
        if live.current.is_none() && live.done < plan.liveness_writes {
            if live.first_attempt.is_none() {
                live.first_attempt = Some(self.now);
            }
            let c = self.liveness_client();
            if self.clients[c].current.is_none() {
                // new_op attempts with an empty liveness record; retries use the real one.
                let op = self.new_op_liveness(c, plan, live)?;
                live.current = Some(op);
            }
        }
        if live.done >= plan.liveness_writes {
            let (target, started) = match live.converge {
                Some(x) => x,
                None => {
                    let l = live.leader.clone().unwrap();
                    let target = self.node(&l).map_or(0, |n| n.commit_index());
                    live.converge = Some((target, self.now));
                    (target, self.now)
                }
            };
            let members = self.members();
            let lagging: Vec<String> = members
                .iter()
                .filter_map(|id| {
                    let applied = self.node(id).map(|n| n.applied_index());
                    (applied.is_none_or(|a| a < target))
                        .then(|| format!("{id} (applied {applied:?})"))
                })
                .collect();
            if lagging.is_empty() {
                if live.converged_at.is_none() {
                    live.converged_at = Some(self.now);
                    self.note(format!("liveness: all members applied {target}"));
                }
                if self.now >= since + plan.final_workload_ms {
                    self.note("=== drain: no new operations ===".to_string());
                    self.phase = Phase::Drain {
                        until: self.now + plan.drain_ms,
                    };
                }
            } else if live.converged_at.is_none() && self.now > started + plan.converge_bound {
                return Err(violation(
                    "liveness",
                    format!(
                        "members did not catch up to index {target} within {} ms: {}\n{}",
                        plan.converge_bound,
                        lagging.join(", "),
                        self.describe_nodes()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn new_op_liveness(&mut self, c: usize, plan: &Plan, live: &Liveness) -> Check<u64> {
        let id = self.next_op;
        self.next_op += 1;
        let key = (id % u64::from(KEYS)) as u8;
        self.history.insert(
            id,
            OpRec {
                id,
                client: c,
                key,
                what: OpWhat::Put { value: id },
                status: OpStatus::Attempting,
                call: 0,
                ret: None,
                call_ms: 0,
                ret_ms: 0,
                node: None,
                slot: None,
                attempts: 0,
                liveness: true,
                excused: false,
            },
        );
        self.clients[c].current = Some(id);
        self.attempt_op(id, plan, live)?;
        Ok(id)
    }

    /// One line per peer, for failure messages.
    pub fn describe_nodes(&self) -> String {
        let mut out = String::new();
        let members = self.registry.current_membership(&self.genesis);
        out.push_str(&format!(
            "  committed membership: voters {:?} learners {:?}\n",
            members.voters, members.learners
        ));
        for s in self.slots.values() {
            match &s.live {
                Some(l) => {
                    let n = &l.node;
                    out.push_str(&format!(
                        "  {}: {:?} term {} leader {:?} commit {} applied {} last {} snapshot {} membership {:?}/{:?}\n",
                        s.id,
                        n.role(),
                        n.term(),
                        n.leader_id(),
                        n.commit_index(),
                        n.applied_index(),
                        n.last_index(),
                        n.snapshot_index(),
                        n.membership().voters,
                        n.membership().learners
                    ));
                }
                None => out.push_str(&format!("  {}: {:?}\n", s.id, s.status)),
            }
        }
        out
    }

    // ---------------------------------------------------------------- the end

    fn finish(&mut self, plan: &Plan, live: &Liveness) -> Check<Outcome> {
        let mut out = Outcome {
            leader_after_heal_ms: 0,
            max_commit_latency_ms: live.max_commit_latency,
            ..Outcome::default()
        };
        if let (Some(at), Some(heal)) = (live.leader_at, live.healed_at) {
            out.leader_after_heal_ms = at - heal;
        }
        // Liveness: once the healed cluster had a stable leader, every operation it accepted must complete
        // within the commit bound (unless its peer was stopped or crashed under it).
        if let Some(healthy) = live.leader_at {
            for rec in self.history.values() {
                if rec.status == OpStatus::Attempting || rec.call_ms < healthy || rec.excused {
                    continue;
                }
                let ok =
                    rec.status == OpStatus::Done && rec.ret_ms <= rec.call_ms + plan.commit_bound;
                ensure(ok, "liveness", || {
                    format!(
                        "op#{} ({:?} on key {} via peer {:?}, log slot {:?}) was accepted by the healed cluster at {} ms \
                         but ended {:?} at {} ms (bound {} ms; stable leader since {healthy} ms)\n{}",
                        rec.id,
                        rec.what,
                        rec.key,
                        rec.node,
                        rec.slot,
                        rec.call_ms,
                        rec.status,
                        rec.ret_ms,
                        plan.commit_bound,
                        self.describe_nodes()
                    )
                })?;
            }
        }
        let mut ops = Vec::new();
        for rec in self.history.values() {
            let kind = match (&rec.what, rec.status) {
                (_, OpStatus::Attempting | OpStatus::Failed | OpStatus::Dropped) => {
                    if rec.is_write() && rec.status == OpStatus::Failed {
                        out.writes_failed += 1;
                    }
                    continue;
                }
                (OpWhat::Get { observed }, OpStatus::Done) => {
                    out.reads_ok += 1;
                    OpKind::Get {
                        observed: observed.ok_or_else(|| {
                            violation(
                                "harness",
                                format!("read op#{} done without a value", rec.id),
                            )
                        })?,
                    }
                }
                (OpWhat::Get { .. }, _) => continue,
                (OpWhat::Put { value }, _) => OpKind::Put { value: *value },
                (OpWhat::Cas { expected, new, ok }, _) => OpKind::Cas {
                    expected: *expected,
                    new: *new,
                    ok: *ok,
                },
            };
            let mut op = Op {
                id: rec.id,
                client: rec.client,
                key: rec.key,
                call: rec.call,
                ret: rec.ret,
                kind,
            };
            if rec.is_write() && rec.status != OpStatus::Done {
                // Outcome unknown to its client: settle it through what was applied, if anything was.
                let (index, term) = rec.slot.expect("an in-flight write has a slot");
                match self.registry.applied.get(&index) {
                    Some(a) if a.term == term => {
                        ensure(
                            a.result.map(|r| r.op) == Some(rec.id),
                            "log matching",
                            || {
                                format!(
                                "op#{} was proposed at ({index}, {term}) but that entry carries {:?}",
                                rec.id, a.result
                            )
                            },
                        )?;
                        op.ret = Some(a.first_seq);
                        if let OpKind::Cas { ok, .. } = &mut op.kind {
                            *ok = a.result.and_then(|r| r.cas_ok);
                        }
                    }
                    Some(_) => {
                        out.writes_failed += 1;
                        continue;
                    }
                    None => {
                        out.writes_unknown += 1;
                        op.ret = None;
                        if let OpKind::Cas { ok, .. } = &mut op.kind {
                            *ok = None;
                        }
                    }
                }
            }
            if let Some(r) = op.ret {
                ensure(r > op.call, "harness", || {
                    format!("op#{} returns before its call", op.id)
                })?;
                if rec.is_write() {
                    out.writes_ok += 1;
                    if let OpKind::Cas { ok: Some(true), .. } = op.kind {
                        out.cas_ok += 1;
                    }
                }
            }
            ops.push(op);
        }
        out.lin = check_history(&ops, 2_000_000).map_err(|e| {
            let mut detail = e.to_string();
            if let LinError::NotLinearizable {
                best_prefix, stuck, ..
            } = &e
            {
                detail.push_str("  details (time in ms, peer, log slot):\n");
                let shown = best_prefix
                    .iter()
                    .rev()
                    .take(12)
                    .rev()
                    .chain(stuck.iter().take(12));
                for op in shown {
                    if let Some(r) = self.history.get(&op.id) {
                        detail.push_str(&format!(
                            "    op#{}: called {} ms, returned {} ms, peer {:?}, slot {:?}, {:?}\n",
                            r.id, r.call_ms, r.ret_ms, r.node, r.slot, r.status
                        ));
                    }
                }
            }
            violation("linearizability", detail)
        })?;
        Ok(out)
    }
}
