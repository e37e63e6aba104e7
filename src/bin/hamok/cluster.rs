//! Building peers: N in-process peers on one [`InProcessHub`], or one peer on a NATS / RabbitMQ broker;
//! and, in process, closing one (`KILL`) and rebuilding it with the same id (`RESTART`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use hamok::stores::Stores;

/// Every request of a peer through the log or the leader is bounded by this (a little under the
/// REPL's per-command timeout, so the peer's own, more precise, error comes first).
const REQUEST_TIMEOUT_MS: u64 = 4_500;
/// Bound of `leave` when quitting a broker peer.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the peers talk to each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportKind {
    /// In-process peers on one hub (no broker).
    Memory,
    /// NATS.
    Nats,
    /// RabbitMQ (AMQP 0-9-1).
    Rabbitmq,
}

/// How to build a peer.
#[derive(Clone)]
pub struct PeerSpec {
    /// The transport.
    pub transport: TransportKind,
    /// The cluster id.
    pub cluster: String,
    /// The broker URL(s), comma-separated (default: the transport's own default).
    pub url: Option<String>,
    /// Storage directory: in memory mode the parent of one directory per peer, else the peer's own.
    pub durable: Option<PathBuf>,
    /// The peer's id on a broker (in memory mode the peers are `p1..pN`).
    pub peer_id: Option<String>,
    /// The in-process hub (memory mode).
    pub hub: InProcessHub,
}

impl PeerSpec {
    /// Builds (does not join) a peer, `id` or a random one.
    pub async fn build(&self, id: Option<&str>) -> Result<Hamok, HamokError> {
        let mut b = register_kinds(Hamok::builder())
            .cluster_id(self.cluster.clone())
            .request_timeout_ms(REQUEST_TIMEOUT_MS);
        if let Some(id) = id {
            b = b.peer_id(id);
        }
        if let Some(dir) = &self.durable {
            b = match (self.transport, id) {
                (TransportKind::Memory, Some(id)) => b.storage_dir(dir.join(id)),
                _ => b.storage_dir(dir.clone()),
            };
        }
        b = match self.transport {
            TransportKind::Memory => b.transport(self.hub.clone()),
            TransportKind::Nats => {
                let mut t = hamok::transports::NatsTransport::builder();
                if let Some(url) = &self.url {
                    t = t.servers(url.split(',').map(str::to_string));
                }
                b.transport(t.build()?)
            }
            TransportKind::Rabbitmq => {
                let mut t = hamok::transports::AmqpTransport::builder();
                if let Some(url) = &self.url {
                    t = t.urls(url.split(',').map(str::to_string));
                }
                b.transport(t.build()?)
            }
        };
        b.build().await
    }
}

/// The peers of this process, by id (`None`: killed).
pub struct Cluster {
    /// How they are built.
    pub spec: PeerSpec,
    /// Each peer's stores, `None` while it is down.
    pub peers: BTreeMap<String, Option<Stores>>,
}

/// Joins every peer at the same moment; the first failure.
async fn join_all(peers: &[Hamok]) -> Result<(), HamokError> {
    let tasks: Vec<_> = peers
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { p.join().await }))
        .collect();
    for t in tasks {
        t.await
            .map_err(|_| HamokError::Interrupted("join task panicked"))??;
    }
    Ok(())
}

impl Cluster {
    /// Starts `n` in-process peers `p1..pn` (memory) or one peer on the broker, and joins them.
    pub async fn start(spec: PeerSpec, n: usize) -> Result<Self, HamokError> {
        let mut built = Vec::new();
        if spec.transport == TransportKind::Memory {
            for i in 1..=n {
                built.push(spec.build(Some(&format!("p{i}"))).await?);
            }
        } else {
            built.push(spec.build(spec.peer_id.as_deref()).await?);
        }
        join_all(&built).await?;
        let peers = built
            .into_iter()
            .map(|h| (h.local_peer_id().to_string(), Some(Stores::new(h))))
            .collect();
        Ok(Cluster { spec, peers })
    }

    /// Whether peers can be killed and restarted here.
    pub fn in_process(&self) -> bool {
        self.spec.transport == TransportKind::Memory
    }

    /// The stores of peer `id` if it is up.
    pub fn stores(&self, id: &str) -> Option<&Stores> {
        self.peers.get(id).and_then(Option::as_ref)
    }

    /// The first peer that is up.
    pub fn first_up(&self) -> Option<String> {
        self.peers
            .iter()
            .find(|(_, s)| s.is_some())
            .map(|(id, _)| id.clone())
    }

    /// Closes peer `id` (it does not leave: the others remove it once it is silent).
    pub async fn kill(&mut self, id: &str) -> Result<(), String> {
        let slot = self
            .peers
            .get_mut(id)
            .ok_or_else(|| format!("no peer '{id}'"))?;
        let stores = slot
            .take()
            .ok_or_else(|| format!("peer '{id}' is already down"))?;
        stores.hamok().close().await;
        Ok(())
    }

    /// Rebuilds peer `id` (closing it first if up) with the same id (and directory) and joins it.
    pub async fn restart(&mut self, id: &str) -> Result<(), String> {
        if !self.peers.contains_key(id) {
            return Err(format!("no peer '{id}'"));
        }
        if let Some(old) = self.peers.get_mut(id).and_then(Option::take) {
            old.hamok().close().await;
        }
        let hamok = self.spec.build(Some(id)).await.map_err(|e| e.to_string())?;
        if let Err(e) = hamok.join().await {
            hamok.close().await;
            return Err(format!("peer '{id}' did not rejoin: {e}"));
        }
        self.peers.insert(id.to_string(), Some(Stores::new(hamok)));
        Ok(())
    }

    /// Closes every peer: in process, without leaving (a durable cluster then resumes as it was);
    /// a broker peer leaves first (bounded), so the others need not wait to remove it.
    pub async fn shutdown(&mut self) {
        let leave = !self.in_process();
        for stores in self.peers.values_mut().filter_map(Option::take) {
            if leave {
                let _ = tokio::time::timeout(LEAVE_TIMEOUT, stores.hamok().leave()).await;
            }
            stores.hamok().close().await;
        }
    }
}
