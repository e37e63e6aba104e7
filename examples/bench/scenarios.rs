//! The scenarios of issue 6. Each builds its own clusters (fresh cluster ids, a fresh in-process hub
//! for `memory`), emits its rows, and closes every peer before returning.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hamok::collections::HamokCollections;
use hamok::runtime::Hamok;

use crate::cluster::{
    key, proc_status_mib, reset_peak_rss, run_load, value, Cluster, LoadResult, Map, Net,
    PeerProcess, Progress, Res, TransportKind, WAIT,
};
use crate::report::{Hist, Record, Value};

/// The scenarios, in the order `all` runs them. `memory` goes first so that its peak RSS is not
/// inflated by what earlier scenarios left in the allocator.
pub const ALL: &[&str] = &[
    "memory",
    "election",
    "latency",
    "throughput",
    "read",
    "failover",
    "catchup",
    "scale",
    "locks",
    "queue",
];

/// Operation counts: the issue's, or much smaller ones with `--quick`.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub election_reps: u64,
    pub latency_n: u64,
    pub warmup_n: u64,
    pub throughput_n: u64,
    pub concurrency: Vec<usize>,
    pub failover_reps: u64,
    /// (entries, repetitions)
    pub catchup: Vec<(u64, u64)>,
    pub memory_writes: u64,
    pub memory_keys: u64,
    pub read_local_n: u64,
    pub read_lin_n: u64,
    pub read_lin_conc_n: u64,
    pub scale_peers: Vec<usize>,
    /// `throughput_n` for the rows of `scale`.
    pub scale_throughput_n: u64,
    /// `queue`: operations of its rows at 1 in flight (`push_one`, `pop`, `take+ack`).
    pub queue_latency_n: u64,
    /// `queue`: operations of its rows at 10 and 100 in flight (items for `take_many`).
    pub queue_throughput_n: u64,
    /// `--nats-cluster`: round trips of each `rtt` row.
    pub rtt_n: u64,
}

impl Sizes {
    pub fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                election_reps: 5,
                latency_n: 300,
                warmup_n: 50,
                throughput_n: 5_000,
                concurrency: vec![1, 10, 100, 1_000],
                failover_reps: 3,
                catchup: vec![(10_000, 2), (100_000, 1)],
                memory_writes: 50_000,
                memory_keys: 10_000,
                read_local_n: 100_000,
                read_lin_n: 1_000,
                read_lin_conc_n: 5_000,
                scale_peers: vec![3, 5, 7],
                scale_throughput_n: 2_000,
                queue_latency_n: 200,
                queue_throughput_n: 2_000,
                rtt_n: 2_000,
            }
        } else {
            Sizes {
                election_reps: 20,
                latency_n: 1_000,
                warmup_n: 200,
                throughput_n: 100_000,
                concurrency: vec![1, 10, 100, 1_000],
                failover_reps: 10,
                catchup: vec![(10_000, 5), (1_000_000, 1)],
                memory_writes: 1_000_000,
                memory_keys: 10_000,
                read_local_n: 1_000_000,
                read_lin_n: 10_000,
                read_lin_conc_n: 100_000,
                scale_peers: vec![3, 5, 7],
                scale_throughput_n: 100_000,
                queue_latency_n: 1_000,
                queue_throughput_n: 50_000,
                rtt_n: 5_000,
            }
        }
    }
}

/// Everything a scenario needs, and where its rows go.
pub struct Ctx {
    pub kind: TransportKind,
    pub peers: usize,
    pub quick: bool,
    pub threads: usize,
    /// Broker transports only: the peers other than the measured one run in child processes
    /// (`latency`, `throughput`, `scale`).
    pub processes: bool,
    pub value_bytes: usize,
    /// `--durable`, in the durable pass: every peer keeps its Raft state in its own directory under
    /// this one. `None`: peers keep it in memory.
    pub storage: Option<PathBuf>,
    pub sizes: Sizes,
    /// `--nats-cluster`: the client URLs of the local NATS cluster's servers (peer `p<i>` on server
    /// `i`, the KV baseline with 3 replicas, its clients spread the same way); empty: one server.
    pub nats_servers: Vec<String>,
    /// `--nats-cluster`: the cluster itself (its monitors say where each peer is connected). The
    /// run holds the other reference: the servers stop when both are dropped.
    pub nats_cluster: Option<Arc<hamok_testkit::nats_cluster::NatsCluster>>,
    /// `--nats-cluster`: where the peers of the cluster being measured are connected (`p0@0, ...`),
    /// added to the configuration of its rows.
    pub placement: Option<String>,
    pub records: Vec<Record>,
    /// Called with each record as it is emitted (prints the row).
    pub on_record: Box<dyn Fn(&Record) + Send + Sync>,
}

impl Ctx {
    /// The transport column of hamok's rows: `nats-cluster` with `--nats-cluster`.
    pub fn transport(&self) -> &'static str {
        if self.kind == TransportKind::Nats && !self.nats_servers.is_empty() {
            crate::multi_server::TRANSPORT
        } else {
            self.kind.name()
        }
    }

    /// Where the peers keep their Raft state: `memory`, or `durable` (`--durable`'s second pass).
    pub fn storage_label(&self) -> &'static str {
        if self.storage.is_some() {
            "durable"
        } else {
            "memory"
        }
    }

    /// A fresh network for a scenario's clusters, durable in the durable pass (each peer on its own
    /// server with `--nats-cluster`).
    pub fn net(&self) -> Net {
        Net::new(self.kind, self.storage.clone()).with_nats_servers(&self.nats_servers)
    }

    /// A record of this run with the common configuration filled in.
    pub fn record(&self, scenario: &str, peers: usize, from: &str, what: &str) -> Record {
        let defaults = hamok::runtime::HamokConfig::default();
        let mut r = Record::new(scenario, self.transport(), peers, from, what);
        r.storage = self.storage_label().to_string();
        let r = if self.storage.is_some() {
            r.config("storage_sync", crate::cluster::sync_policy_name())
        } else {
            r
        };
        let r = match &self.placement {
            Some(p) => r.config("nats_placement", p.as_str()),
            None => r,
        };
        r.config("value_bytes", self.value_bytes)
            .config("election_timeout_ms", defaults.election_timeout_ms)
            .config("heartbeat_interval_ms", defaults.heartbeat_interval_ms)
            .config("snapshot_after_entries", defaults.snapshot_after_entries)
            .config("runtime_threads", self.threads)
            .config("quick", self.quick)
    }

    fn emit(&mut self, r: Record) {
        (self.on_record)(&r);
        self.records.push(r);
    }

    /// A record of a load run.
    fn load_record(
        &self,
        scenario: &str,
        peers: usize,
        from: &str,
        what: &str,
        concurrency: usize,
        load: &LoadResult,
    ) -> Record {
        let r = self.record(scenario, peers, from, what);
        self.load_record_of(r, concurrency, load)
    }

    pub async fn run(&mut self, scenario: &str) -> Res<()> {
        match scenario {
            "election" => self.election().await,
            "latency" => {
                self.map_suite("latency", self.peers, true, false).await?;
                // The baseline is measured once, in the in-memory pass (its bucket is on file either way).
                if self.kind == TransportKind::Nats && self.storage.is_none() {
                    crate::kv::kv_rows(self, "latency").await?;
                }
                Ok(())
            }
            "throughput" => {
                self.map_suite("throughput", self.peers, false, true)
                    .await?;
                if self.kind == TransportKind::Nats && self.storage.is_none() {
                    crate::kv::kv_rows(self, "throughput").await?;
                }
                Ok(())
            }
            "failover" => self.failover().await,
            "catchup" => self.catchup().await,
            "memory" => self.memory().await,
            "scale" => {
                for peers in self.sizes.scale_peers.clone() {
                    self.map_suite("scale", peers, true, true).await?;
                }
                Ok(())
            }
            "read" => self.read().await,
            "locks" => self.locks().await,
            "queue" => crate::queue::queue(self).await,
            other => Err(format!("unknown scenario {other:?}").into()),
        }
    }

    /// `locks`: uncontended `lock` + `unlock` from the leader and from a follower; the hand-over to a
    /// waiter on another peer when the holder unlocks and when its peer crashes (closes without
    /// leaving: the cluster removes it after `peer_max_idle_ms`); a leader job's failover when its
    /// runner's peer crashes.
    async fn locks(&mut self) -> Res<()> {
        if self.peers < 3 {
            eprintln!("  locks: skipped, it needs at least 3 peers");
            return Ok(());
        }
        let net = self.net();
        let (cluster, _) = Cluster::start(&net, "locks", self.peers).await?;
        let mut tables = Vec::new();
        for p in &cluster.peers {
            tables.push(p.get_or_create_lock_table("bench").await?);
        }
        let leader = cluster.leader_index();
        let follower = cluster.follower_index();
        let n = (self.sizes.latency_n / 2).max(50);
        for (from, at) in [("leader", leader), ("follower", follower)] {
            let hist = Hist::default();
            let progress = Progress::new(n, &format!("locks: uncontended, from {from}"));
            for _ in 0..n {
                let started = Instant::now();
                let guard = tables[at].lock("uncontended").await?;
                hist.record(started.elapsed());
                guard.unlock().await?;
                progress.inc(1);
            }
            progress.finish();
            let mut r = self
                .record("locks", self.peers, from, "lock() uncontended")
                .config("metric", "lock() call to guard; each followed by unlock()");
            r.summary = hist.summary();
            self.emit(r);
        }
        // Hand-over on unlock: holder on the leader, waiter on a follower.
        let hist = Hist::default();
        let reps = (n / 5).max(10);
        for _ in 0..reps {
            let guard = tables[leader].lock("handover").await?;
            let waiter = tables[follower].clone();
            let granted = tokio::spawn(async move {
                let g = waiter.lock("handover").await;
                (Instant::now(), g)
            });
            while tables[leader].waiting("handover") == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let started = Instant::now();
            guard.unlock().await?;
            let (at, g) = granted.await?;
            hist.record(at.saturating_duration_since(started));
            g?.unlock().await?;
        }
        let mut r = self
            .record("locks", self.peers, "follower", "hand-over on unlock")
            .config(
                "metric",
                "holder's unlock() call to the waiter's grant (holder: leader)",
            );
        r.summary = hist.summary();
        self.emit(r);
        cluster.close().await;

        // Hand-over when the holder's peer crashes, and a leader job's failover.
        let idle = hamok::runtime::HamokConfig::default().peer_max_idle_ms;
        for what in [
            "hand-over on holder crash",
            "leader job failover on runner crash",
        ] {
            let hist = Hist::default();
            let progress = Progress::new(self.sizes.failover_reps, &format!("locks: {what}"));
            for _ in 0..self.sizes.failover_reps {
                let (cluster, _) = Cluster::start(&net, "locks-crash", self.peers).await?;
                let mut tables = Vec::new();
                for p in &cluster.peers {
                    tables.push(p.get_or_create_lock_table("bench").await?);
                }
                let victim = cluster.follower_index();
                let other = (0..cluster.peers.len())
                    .find(|i| *i != victim && *i != cluster.leader_index())
                    .unwrap_or(cluster.leader_index());
                let took_over = if what.starts_with("hand-over") {
                    let guard = tables[victim].lock("crash").await?;
                    std::mem::forget(guard); // a crashed process releases nothing
                    let waiter = tables[other].clone();
                    let next = tokio::spawn(async move { waiter.lock("crash").await });
                    while tables[other].waiting("crash") == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let started = Instant::now();
                    cluster.peers[victim].close().await;
                    let _granted = next.await??;
                    started.elapsed()
                } else {
                    let runner = hamok::collections::LeaderJob::start(
                        &tables[victim],
                        "job",
                        |ctx| async move {
                            ctx.cancelled().await;
                        },
                    );
                    runner.wait_running().await;
                    let standby = hamok::collections::LeaderJob::start(
                        &tables[other],
                        "job",
                        |ctx| async move {
                            ctx.cancelled().await;
                        },
                    );
                    let started = Instant::now();
                    cluster.peers[victim].close().await;
                    standby.wait_running().await;
                    let elapsed = started.elapsed();
                    standby.stop().await;
                    drop(runner);
                    elapsed
                };
                hist.record(took_over);
                cluster.close().await;
                progress.inc(1);
            }
            progress.finish();
            let mut r = self
                .record("locks", self.peers, "survivor", what)
                .config("peer_max_idle_ms", idle)
                .config(
                    "metric",
                    "the holder's peer closes without leaving, to the grant on another peer (the \
                     cluster removes the silent peer after peer_max_idle_ms and releases its locks in \
                     that log entry)",
                );
            r.summary = hist.summary();
            self.emit(r);
        }
        Ok(())
    }

    /// `election`: cold start of N peers to the first leader, repeated.
    async fn election(&mut self) -> Res<()> {
        let net = self.net();
        let first = Hist::default();
        let all = Hist::default();
        let progress = Progress::new(self.sizes.election_reps, "election: cold starts");
        for _ in 0..self.sizes.election_reps {
            let (cluster, cold) = Cluster::start(&net, "election", self.peers).await?;
            first.record(cold.first_leader);
            all.record(cold.all_joined);
            cluster.close().await;
            progress.inc(1);
        }
        progress.finish();
        let all = all.summary();
        let mut r = self
            .record("election", self.peers, "-", "join() to first leader")
            .extra("all_joined_p50_ms", all.p50_us / 1e3)
            .extra("all_joined_max_ms", all.max_us / 1e3);
        r.summary = first.summary();
        self.emit(r);
        Ok(())
    }

    /// The `latency` and/or `throughput` rows of `map.set` on a cluster of `peers`.
    async fn map_suite(
        &mut self,
        scenario: &str,
        peers: usize,
        latency: bool,
        throughput: bool,
    ) -> Res<()> {
        if self.processes && peers > 1 {
            return self
                .map_suite_processes(scenario, peers, latency, throughput)
                .await;
        }
        let net = self.net();
        let (cluster, _) = Cluster::start(&net, scenario, peers).await?;
        self.placement = crate::multi_server::placement(self, &cluster.id).await;
        let result = async {
            let maps = cluster.open_map("bench").await?;
            let mut sources = vec![(maps[cluster.leader_index()].clone(), "leader")];
            if peers > 1 {
                sources.push((maps[cluster.follower_index()].clone(), "follower"));
            }
            let before = self.records.len();
            let rows = self
                .map_rows(
                    &sources,
                    &cluster.peers,
                    scenario,
                    peers,
                    latency,
                    throughput,
                )
                .await;
            if self.records[before..].iter().any(|r| r.errors > 0) {
                dump_stats(&cluster);
            }
            rows
        }
        .await;
        self.placement = None;
        cluster.close().await;
        result
    }

    /// [`Ctx::map_suite`] with every peer but the measured one in its own OS process: one cluster
    /// where the local peer leads (it founds the cluster, the others join it), one where it follows
    /// (the others found it, it joins last).
    async fn map_suite_processes(
        &mut self,
        scenario: &str,
        peers: usize,
        latency: bool,
        throughput: bool,
    ) -> Res<()> {
        for lead in [true, false] {
            let net = self.net();
            let id = crate::cluster::cluster_id(scenario);
            let mut children = Vec::new();
            let result = async {
                let local = if lead {
                    let local = net.builder(&id, "p0")?.build().await?;
                    local.join().await?;
                    local.wait_until_leader(WAIT).await?;
                    for i in 1..peers {
                        children.push(PeerProcess::spawn(&net, &id, &format!("p{i}")).await?);
                    }
                    local
                } else {
                    for i in 0..peers - 1 {
                        children.push(PeerProcess::spawn(&net, &id, &format!("p{i}")).await?);
                    }
                    let local = net
                        .builder(&id, &format!("p{}", peers - 1))?
                        .build()
                        .await?;
                    local.join().await?;
                    local
                };
                let outcome = async {
                    let deadline = Instant::now() + WAIT;
                    while local.remote_peer_ids().len() + 1 < peers || local.leader_id().is_none() {
                        if Instant::now() > deadline {
                            return Err::<(), crate::cluster::BoxError>(
                                format!("cluster {id} did not form").into(),
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let map = local.get_or_create_map::<String, String>("bench").await?;
                    let from = if local.is_leader() {
                        "leader"
                    } else {
                        "follower"
                    };
                    if lead != local.is_leader() {
                        eprintln!("  {scenario}: the local peer is the {from}, not as planned");
                    }
                    self.placement = crate::multi_server::placement(self, &id).await;
                    let rows = self
                        .map_rows(&[(map, from)], &[], scenario, peers, latency, throughput)
                        .await;
                    self.placement = None;
                    rows
                }
                .await;
                local.close().await;
                outcome
            }
            .await;
            for c in &mut children {
                c.stop().await;
            }
            result?;
        }
        Ok(())
    }

    /// The rows of [`Ctx::map_suite`] for each `(map, from)` source. With every peer of the cluster in
    /// `counted` (all in this process), a throughput row notes the frames the peers sent per write.
    async fn map_rows(
        &mut self,
        sources: &[(Map, &str)],
        counted: &[Hamok],
        scenario: &str,
        peers: usize,
        latency: bool,
        throughput: bool,
    ) -> Res<()> {
        let keys = self.sizes.memory_keys;
        let val = value(self.value_bytes);
        // Warm up every path (connections, allocator, the follower's forwarding).
        for (map, _) in sources {
            set_load(
                map,
                self.sizes.warmup_n,
                1,
                keys,
                &val,
                &Progress::new(0, ""),
            )
            .await?;
        }
        let placement = if self.processes && peers > 1 {
            "one OS process per peer"
        } else {
            "all peers in this process"
        };
        if latency {
            for (map, from) in sources {
                let n = self.sizes.latency_n;
                let progress = Progress::new(n, &format!("{scenario}: {peers} peers, from {from}"));
                let load = set_load(map, n, 1, keys, &val, &progress).await?;
                progress.finish();
                let r = self
                    .load_record(scenario, peers, from, "map.set sequential", 1, &load)
                    .config("keys", keys)
                    .config("placement", placement);
                self.emit(self.placed(r, peers));
            }
        }
        if throughput {
            for (map, from) in sources {
                for c in self.sizes.concurrency.clone() {
                    let n = if scenario == "scale" {
                        self.sizes.scale_throughput_n
                    } else {
                        self.sizes.throughput_n
                    };
                    let progress = Progress::new(
                        n,
                        &format!("{scenario}: {peers} peers, from {from}, {c} in flight"),
                    );
                    let frames_before = frames_out(counted);
                    let load = set_load(map, n, c, keys, &val, &progress).await?;
                    progress.finish();
                    let mut r = self
                        .load_record(scenario, peers, from, "map.set", c, &load)
                        .config("keys", keys)
                        .config("placement", placement);
                    if counted.len() == peers {
                        let frames = frames_out(counted) - frames_before;
                        r = r.extra("frames_per_write", frames as f64 / n as f64);
                    }
                    self.emit(self.placed(r, peers));
                }
            }
        }
        Ok(())
    }

    /// `failover`: how long writes stop when the leader crashes (`close()` without `leave()`) and when
    /// it leaves gracefully (`leave()`), seen by a writer on a surviving peer.
    async fn failover(&mut self) -> Res<()> {
        if self.peers < 2 {
            eprintln!("  failover: skipped, it needs at least 2 peers");
            return Ok(());
        }
        let net = self.net();
        for crash in [true, false] {
            let gap = Hist::default();
            let first = Hist::default();
            let after_call = Hist::default();
            let call = Hist::default();
            let mut failed = 0u64;
            let mut moved = 0u64;
            let label = if crash { "crash" } else { "leave" };
            let progress = Progress::new(self.sizes.failover_reps, &format!("failover: {label}"));
            for _ in 0..self.sizes.failover_reps {
                let (cluster, _) = Cluster::start(&net, "failover", self.peers).await?;
                let outcome = self.one_failover(&cluster, crash).await;
                cluster.close().await;
                let o = outcome?;
                gap.record(o.max_gap);
                first.record(o.first_write);
                after_call.record(o.write_after_call);
                call.record(o.call);
                failed += o.failed_writes;
                moved += u64::from(o.new_leader);
                progress.inc(1);
            }
            progress.finish();
            let what = if crash {
                "leader crash: writes stop for"
            } else {
                "leader leave(): writes stop for"
            };
            let ms = |h: &Hist| h.summary().p50_us / 1e3;
            let mut r = self
                .record("failover", self.peers, "survivor", what)
                .extra("first_write_after_event_p50_ms", ms(&first))
                .extra(
                    if crash {
                        "close_call_p50_ms"
                    } else {
                        "leave_call_p50_ms"
                    },
                    ms(&call),
                )
                .extra("write_after_call_returned_p50_ms", ms(&after_call))
                .extra("failed_writes", failed)
                .extra(
                    "new_leader",
                    format!("{moved}/{}", self.sizes.failover_reps),
                )
                .config(
                    "metric",
                    "longest time without a successful write completing, from the event until a \
                     write issued after the call returned succeeds (one sequential writer on a \
                     surviving follower)",
                );
            r.summary = gap.summary();
            self.emit(r);
        }
        Ok(())
    }

    /// One failover on `cluster` (see [`FailoverOutcome`]).
    async fn one_failover(&self, cluster: &Cluster, crash: bool) -> Res<FailoverOutcome> {
        if cluster.peers.len() < 2 {
            return Err("failover needs at least 2 peers".into());
        }
        let maps = cluster.open_map("bench").await?;
        let leader = cluster.leader_index();
        let writer_idx = cluster.follower_index();
        let old_leader = cluster.peers[leader].local_peer_id().clone();
        let map = maps[writer_idx].clone();
        let val = value(self.value_bytes);
        let event: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let call_done: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
        let (event_seen, call_seen) = (event.clone(), call_done.clone());
        // One sequential writer: the gaps between its successful completions are the unavailability.
        let writer = tokio::spawn(async move {
            let mut failed = 0u64;
            let mut i = 0u64;
            let mut last_ok: Option<Instant> = None;
            let mut max_gap = Duration::ZERO;
            let mut first_write = None;
            let deadline = Instant::now() + WAIT;
            loop {
                let started = Instant::now();
                let result = map.set(key(i, 1_000), val.clone()).await;
                let done = Instant::now();
                i += 1;
                match result {
                    Ok(_) => {
                        if let Some(&at) = event_seen.get() {
                            let since = last_ok.map_or(at, |l| l.max(at));
                            max_gap = max_gap.max(done.saturating_duration_since(since));
                            if started >= at && first_write.is_none() {
                                first_write = Some(done - at);
                            }
                            if let Some(&returned) = call_seen.get() {
                                if started >= returned {
                                    return Ok::<_, String>(WriterOutcome {
                                        max_gap,
                                        first_write: first_write.unwrap_or(done - at),
                                        write_after_call: done - at,
                                        failed,
                                    });
                                }
                            }
                        }
                        last_ok = Some(done);
                    }
                    Err(e) => {
                        failed += 1;
                        if done > deadline {
                            return Err(format!("no successful write after the failover: {e}"));
                        }
                        // A failed write usually failed fast: do not spin.
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
            }
        });
        // Let the writer run for a while before the event.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let at = Instant::now();
        let _ = event.set(at);
        if crash {
            cluster.peers[leader].close().await;
        } else {
            cluster.peers[leader].leave().await?;
        }
        let returned = Instant::now();
        let _ = call_done.set(returned);
        let w = writer.await??;
        let new_leader = cluster.peers[writer_idx]
            .leader_id()
            .is_some_and(|l| l != old_leader);
        Ok(FailoverOutcome {
            max_gap: w.max_gap,
            first_write: w.first_write,
            write_after_call: w.write_after_call,
            call: returned - at,
            failed_writes: w.failed,
            new_leader,
        })
    }

    /// `catchup`: a new peer joins a cluster whose map holds many entries; time from its `join()` to its
    /// map holding all of them.
    async fn catchup(&mut self) -> Res<()> {
        for (entries, reps) in self.sizes.catchup.clone() {
            let net = self.net();
            let (mut cluster, _) = Cluster::start(&net, "catchup", self.peers).await?;
            let result = self.catchup_on(&mut cluster, entries, reps).await;
            cluster.close().await;
            result?;
        }
        Ok(())
    }

    async fn catchup_on(&mut self, cluster: &mut Cluster, entries: u64, reps: u64) -> Res<()> {
        let maps = cluster.open_map("bench").await?;
        let leader = cluster.leader_index();
        // As many entries per `set_all` as fit well within one command (`raft.max_command_bytes`).
        let max_command = hamok::runtime::HamokConfig::default()
            .raft
            .max_command_bytes;
        let batch = ((max_command / 2 / (self.value_bytes + 32)) as u64)
            .clamp(1, 5_000)
            .min(entries);
        let val = value(self.value_bytes);
        let progress = Progress::new(entries, &format!("catchup: populating {entries}"));
        let populated = Instant::now();
        let mut next = 0;
        while next < entries {
            let end = (next + batch).min(entries);
            maps[leader]
                .set_all((next..end).map(|i| (key(i, entries), val.clone())))
                .await?;
            progress.inc(end - next);
            next = end;
        }
        progress.finish();
        let populate_s = populated.elapsed().as_secs_f64();
        for m in &maps {
            wait_len(m, entries).await?;
        }
        let hist = Hist::default();
        let join_call = Hist::default();
        let mut installed = 0;
        for _ in 0..reps {
            let peer = cluster.new_peer().await?;
            let started = Instant::now();
            let outcome = async {
                peer.join().await?;
                join_call.record(started.elapsed());
                let map = peer.get_or_create_map::<String, String>("bench").await?;
                wait_len(&map, entries).await?;
                Ok::<_, crate::cluster::BoxError>(started.elapsed())
            }
            .await;
            installed += peer.stats().counters.snapshots_installed;
            let _ = tokio::time::timeout(WAIT, peer.leave()).await;
            peer.close().await;
            hist.record(outcome?);
        }
        let jc = join_call.summary();
        let mut r = self
            .record(
                "catchup",
                self.peers,
                "new peer",
                &format!("join() to {} entries", crate::report::group(entries)),
            )
            .extra("join_call_p50_ms", jc.p50_us / 1e3)
            .extra("snapshots_installed", installed)
            .extra("populate_s", populate_s)
            .config("entries", entries)
            .config("set_all_batch", batch);
        r.summary = hist.summary();
        self.emit(r);
        Ok(())
    }

    /// `memory`: peak (VmHWM) and steady (VmRSS) resident memory of the whole process (every peer and
    /// the harness) after many writes to few keys.
    async fn memory(&mut self) -> Res<()> {
        let hwm_reset = reset_peak_rss();
        let baseline = proc_status_mib("VmRSS").unwrap_or(0.0);
        let net = self.net();
        let (cluster, _) = Cluster::start(&net, "memory", self.peers).await?;
        let idle = proc_status_mib("VmRSS").unwrap_or(0.0);
        let result = async {
            let maps = cluster.open_map("bench").await?;
            let leader = cluster.leader_index();
            let n = self.sizes.memory_writes;
            let keys = self.sizes.memory_keys;
            let progress = Progress::new(n, "memory: writes");
            let load = set_load(
                &maps[leader],
                n,
                100,
                keys,
                &value(self.value_bytes),
                &progress,
            )
            .await?;
            progress.finish();
            let peak_after_writes = proc_status_mib("VmHWM").unwrap_or(0.0);
            // Let the followers apply and every peer compact, then read the steady state.
            for m in &maps {
                wait_len(m, keys.min(n) as usize as u64).await?;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let steady = proc_status_mib("VmRSS").unwrap_or(0.0);
            let peak = proc_status_mib("VmHWM").unwrap_or(0.0);
            let stats: Vec<_> = cluster.peers.iter().map(|p| p.stats()).collect();
            let log_entries_max = stats
                .iter()
                .map(|s| s.status.log_entries)
                .max()
                .unwrap_or(0);
            let log_mib_max = stats.iter().map(|s| s.status.log_bytes).max().unwrap_or(0) as f64
                / (1024.0 * 1024.0);
            let snapshots: u64 = stats.iter().map(|s| s.counters.snapshots_taken).sum();
            let installed: u64 = stats.iter().map(|s| s.counters.snapshots_installed).sum();
            let r = self
                .load_record(
                    "memory",
                    self.peers,
                    "leader",
                    "RSS after map.set",
                    100,
                    &load,
                )
                .extra("peak_rss_mib", peak)
                .extra("steady_rss_mib", steady)
                .extra("baseline_rss_mib", baseline)
                .extra("idle_cluster_rss_mib", idle)
                .extra("peak_during_writes_mib", peak_after_writes)
                .extra("log_entries_max", log_entries_max)
                .extra("log_mib_max", log_mib_max)
                .extra("snapshots_taken", snapshots)
                .extra("snapshots_installed", installed)
                .config("keys", keys)
                .config("peak_reset", hwm_reset)
                .config("scope", "whole process: every peer and the harness");
            Ok::<_, crate::cluster::BoxError>(r)
        }
        .await;
        cluster.close().await;
        let r = result?;
        self.emit(r);
        Ok(())
    }

    /// `read`: local `get` and `get_linearizable`, from the leader and from a follower.
    async fn read(&mut self) -> Res<()> {
        let net = self.net();
        let (cluster, _) = Cluster::start(&net, "read", self.peers).await?;
        let result = self.read_on(&cluster).await;
        cluster.close().await;
        result
    }

    async fn read_on(&mut self, cluster: &Cluster) -> Res<()> {
        let maps = cluster.open_map("bench").await?;
        let keys = self.sizes.memory_keys;
        let val = value(self.value_bytes);
        let leader = cluster.leader_index();
        for start in (0..keys).step_by(1_000) {
            let end = (start + 1_000).min(keys);
            maps[leader]
                .set_all((start..end).map(|i| (key(i, keys), val.clone())))
                .await?;
        }
        for m in &maps {
            wait_len(m, keys).await?;
        }
        let mut sources = vec![(leader, "leader")];
        if cluster.peers.len() > 1 {
            sources.push((cluster.follower_index(), "follower"));
        }
        let key_list: Arc<Vec<String>> = Arc::new((0..keys).map(|i| key(i, keys)).collect());
        for &(idx, from) in &sources {
            let n = self.sizes.read_local_n;
            let (map, key_list) = (maps[idx].clone(), key_list.clone());
            // Synchronous reads: one spawned task, timed per call, then an untimed pass for ops/s.
            let (hist, elapsed) = tokio::spawn(async move {
                let hist = Hist::default();
                for i in 0..n {
                    let k = &key_list[(i % key_list.len() as u64) as usize];
                    let t = Instant::now();
                    let v = map.get(k);
                    hist.record(t.elapsed());
                    black_box(v.ok());
                }
                let t = Instant::now();
                for i in 0..n {
                    let k = &key_list[(i % key_list.len() as u64) as usize];
                    black_box(map.get(k).ok());
                }
                (hist, t.elapsed())
            })
            .await?;
            let mut r = self
                .record("read", cluster.peers.len(), from, "map.get (local)")
                .config("keys", keys)
                .config("ops_per_s_from", "untimed second pass");
            r.summary = hist.summary();
            r.ops_per_s = n as f64 / elapsed.as_secs_f64().max(1e-9);
            self.emit(r);
        }
        for (n, c) in [
            (self.sizes.read_lin_n, 1usize),
            (self.sizes.read_lin_conc_n, 100),
        ] {
            for &(idx, from) in &sources {
                let map = maps[idx].clone();
                let key_list = key_list.clone();
                let progress =
                    Progress::new(n, &format!("read: linearizable from {from}, {c} in flight"));
                let load = run_load(n, c, &progress, move |i| {
                    let (map, key_list) = (map.clone(), key_list.clone());
                    async move {
                        let k = &key_list[(i % key_list.len() as u64) as usize];
                        map.get_linearizable(k).await.map(|v| {
                            black_box(v);
                        })
                    }
                })
                .await?;
                progress.finish();
                let r = self
                    .load_record(
                        "read",
                        cluster.peers.len(),
                        from,
                        "map.get_linearizable",
                        c,
                        &load,
                    )
                    .config("keys", keys);
                self.emit(r);
            }
        }
        Ok(())
    }

    /// Marks a row measured with the other peers in child processes.
    fn placed(&self, r: Record, peers: usize) -> Record {
        if self.processes && peers > 1 {
            r.extra("other_peers_in", "own processes")
        } else {
            r
        }
    }

    /// A record for rows that are not hamok's (the baseline): `nats-kv (baseline)`, or with
    /// `--nats-cluster` `nats-kv R3 (baseline)` on as many replicas as servers.
    pub fn baseline_record(&self, scenario: &str, what: &str) -> Record {
        let (transport, replicas) = if self.nats_servers.is_empty() {
            ("nats-kv (baseline)", 1)
        } else {
            (
                crate::multi_server::KV_CLUSTER_TRANSPORT,
                self.nats_servers.len(),
            )
        };
        let mut r = Record::new(scenario, transport, replicas, "client", what);
        r.storage = "file".to_string();
        r.config("value_bytes", self.value_bytes)
            .config("runtime_threads", self.threads)
            .config("quick", self.quick)
    }

    pub fn emit_record(&mut self, r: Record) {
        self.emit(r)
    }

    pub fn load_record_of(&self, r: Record, concurrency: usize, load: &LoadResult) -> Record {
        let mut r = r;
        r.concurrency = concurrency;
        r.summary = load.hist.summary();
        r.ops_per_s = load.ops_per_s();
        r.errors = load.errors;
        if let Some(e) = &load.first_error {
            eprintln!("  {}: {} errors, first: {e}", r.what, load.errors);
            r.extra.push(("first_error".into(), Value::Str(e.clone())));
        }
        r
    }
}

/// What the writer of a failover saw.
struct WriterOutcome {
    max_gap: Duration,
    first_write: Duration,
    write_after_call: Duration,
    failed: u64,
}

/// What one failover measured.
struct FailoverOutcome {
    /// Longest time without a successful write, from the event until a write issued after the
    /// `close()`/`leave()` call returned succeeded: the unavailability.
    max_gap: Duration,
    /// From the event to the first successful write issued at or after it.
    first_write: Duration,
    /// From the event to the first successful write issued after the call returned.
    write_after_call: Duration,
    /// How long the `close()`/`leave()` call took.
    call: Duration,
    /// Writes that failed meanwhile.
    failed_writes: u64,
    /// Whether the writer's peer ended up knowing another leader.
    new_leader: bool,
}

/// `n` `map.set` on `map`, `concurrency` in flight, over `keys` keys.
async fn set_load(
    map: &Map,
    n: u64,
    concurrency: usize,
    keys: u64,
    val: &str,
    progress: &Progress,
) -> Res<LoadResult> {
    let map = map.clone();
    let val: Arc<str> = Arc::from(val);
    run_load(n, concurrency, progress, move |i| {
        let (map, val) = (map.clone(), val.clone());
        async move { map.set(key(i, keys), val.to_string()).await.map(|_| ()) }
    })
    .await
}

/// Prints every peer's counters to stderr (after failed operations: drops, retries, duplicates).
/// The frames `peers` sent, in total.
fn frames_out(peers: &[Hamok]) -> u64 {
    peers.iter().map(|p| p.stats().counters.frames_out).sum()
}

fn dump_stats(cluster: &Cluster) {
    for p in &cluster.peers {
        let s = p.stats();
        eprintln!(
            "  stats {}: role {:?}, term {}, commit {}, applied {}, frames in/out {}/{}, dropped inbound_full {} outbound {} malformed {}, requests_retried {}, duplicates_skipped {}, pending {}",
            s.status.raft.id,
            s.status.raft.role,
            s.status.raft.term,
            s.status.raft.commit_index,
            s.status.raft.applied_index,
            s.counters.frames_in,
            s.counters.frames_out,
            s.counters.dropped_inbound_full,
            s.counters.dropped_outbound,
            s.counters.dropped_malformed,
            s.counters.requests_retried,
            s.counters.duplicates_skipped,
            s.status.pending_requests,
        );
    }
}

/// Waits until `map` holds at least `len` entries (polled every millisecond).
async fn wait_len(map: &Map, len: u64) -> Res<()> {
    let deadline = Instant::now() + WAIT * 4;
    while (map.len() as u64) < len {
        if Instant::now() > deadline {
            return Err(format!("map has {} entries, expected {len}", map.len()).into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
