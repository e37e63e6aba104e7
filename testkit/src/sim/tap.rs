//! A transport that wraps the in-process hub and keeps the last frames sent, so a failure report (a
//! message storm above all) can say what the peers were telling each other.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hamok_runtime::raft::PeerId;
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::transport::{BoxFuture, Inbound, Link, Transport};
use hamok_runtime::wire::{Frame, HamokMessage};
use hamok_runtime::HamokError;

/// Frames kept (raw; decoded only when shown).
const KEEP: usize = 400;

/// Every frame sent, with the instant it was sent.
type FrameLog = Arc<Mutex<Vec<(tokio::time::Instant, Bytes)>>>;

/// The hub plus a ring of the last frames sent through it.
#[derive(Clone)]
pub struct Tap {
    hub: InProcessHub,
    ring: Arc<Mutex<VecDeque<Bytes>>>,
    /// Every frame with its simulated time, when `HAMOK_PEER_SIM_FRAMES` is set (for replays).
    all: Option<FrameLog>,
}

impl Tap {
    pub fn new(hub: InProcessHub) -> Self {
        let all =
            std::env::var_os("HAMOK_PEER_SIM_FRAMES").map(|_| Arc::new(Mutex::new(Vec::new())));
        Tap {
            hub,
            ring: Arc::new(Mutex::new(VecDeque::with_capacity(KEEP))),
            all,
        }
    }

    /// Every frame sent, with the time it was sent relative to `t0`, when recording all.
    pub fn all_since(&self, t0: tokio::time::Instant) -> Vec<(u64, String)> {
        let Some(all) = &self.all else {
            return Vec::new();
        };
        let all = all.lock().unwrap_or_else(|e| e.into_inner());
        all.iter()
            .map(|(t, b)| (t.duration_since(t0).as_millis() as u64, describe(b)))
            .collect()
    }

    /// The last `n` frames sent, one line each.
    pub fn last(&self, n: usize) -> Vec<String> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let skip = ring.len().saturating_sub(n);
        ring.iter().skip(skip).map(|b| describe(b)).collect()
    }
}

fn describe(bytes: &[u8]) -> String {
    match rmp_serde::from_slice::<Frame>(bytes) {
        Ok(f) => {
            let to = f.to.map(|p| p.to_string()).unwrap_or_else(|| "all".into());
            let body = match f.body {
                HamokMessage::Raft(m) => {
                    let mut s = format!("{:?}", m.body);
                    s.truncate(160);
                    format!("raft term {} {s}", m.term)
                }
                HamokMessage::Submit { requests } => {
                    let seqs: Vec<u64> = requests.iter().map(|r| r.seq).collect();
                    format!("Submit seqs {seqs:?}")
                }
                HamokMessage::Direct { channel, .. } => format!("Direct {channel}"),
                other => format!("{other:?}"),
            };
            format!("{} -> {to}: {body}", f.from)
        }
        Err(_) => format!("({} undecodable bytes)", bytes.len()),
    }
}

struct TapLink {
    inner: Arc<dyn Link>,
    ring: Arc<Mutex<VecDeque<Bytes>>>,
    all: Option<FrameLog>,
}

impl TapLink {
    fn keep(&self, frame: &Bytes) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(frame.clone());
        if let Some(all) = &self.all {
            all.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((tokio::time::Instant::now(), frame.clone()));
        }
    }
}

impl Link for TapLink {
    fn send(&self, to: &PeerId, frame: Bytes) -> Result<(), HamokError> {
        self.keep(&frame);
        self.inner.send(to, frame)
    }
    fn broadcast(&self, frame: Bytes) -> Result<(), HamokError> {
        self.keep(&frame);
        self.inner.broadcast(frame)
    }
    fn closed(&self) -> BoxFuture<String> {
        self.inner.closed()
    }
    fn close(&self) {
        self.inner.close()
    }
}

impl Transport for Tap {
    fn connect(
        &self,
        cluster: &str,
        local: PeerId,
        inbound: Inbound,
    ) -> BoxFuture<Result<Arc<dyn Link>, HamokError>> {
        let connecting = self.hub.connect(cluster, local, inbound);
        let ring = self.ring.clone();
        let all = self.all.clone();
        Box::pin(async move {
            let inner = connecting.await?;
            Ok(Arc::new(TapLink { inner, ring, all }) as Arc<dyn Link>)
        })
    }
}
