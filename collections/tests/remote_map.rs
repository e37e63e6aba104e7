//! The remote map over the in-memory store and over the real Redis at 127.0.0.1:6379
//! (`HAMOK_REDIS_URL` overrides), including exactly-once execution across a forced leader change.

#![cfg(feature = "redis")]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::*;
use hamok_collections::*;
use hamok_runtime::raft::LogIndex;
use hamok_runtime::HamokError;

fn redis_url() -> String {
    std::env::var("HAMOK_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string())
}

/// Deletes the test's hash when dropped.
struct DropKey(String);

impl Drop for DropKey {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(redis_url()) {
            if let Ok(mut conn) = client.get_connection() {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(&self.0)
                    .arg(format!("{}:hamok-outcomes", self.0))
                    .query(&mut conn);
            }
        }
    }
}

async fn cluster_with(name: &str, n: usize, id: &str, store: Arc<dyn RemoteMap>) -> Cluster {
    let id = id.to_string();
    Cluster::start_with(name, n, move |b| register_remote_map(b, &id, store.clone())).await
}

/// Every method, through a follower and the leader, against `store`.
async fn exercise(c: &Cluster) {
    let f = c.peers[c.follower()]
        .create_remote_map::<String, i64>("rm")
        .await
        .unwrap();
    let mut handles = Vec::new();
    for p in &c.peers {
        handles.push(
            p.get_or_create_remote_map::<String, i64>("rm")
                .await
                .unwrap(),
        );
    }
    let l = &handles[c.leader()];
    assert!(f.is_empty().await.unwrap());
    assert_eq!(f.set("a".into(), 0).await.unwrap(), None);
    assert_eq!(l.set("a".into(), 1).await.unwrap(), Some(0));
    assert_eq!(f.get(&"a".into()).await.unwrap(), Some(1));
    // insert never overwrites.
    assert_eq!(f.insert("a".into(), 9).await.unwrap(), Some(1));
    assert_eq!(f.get(&"a".into()).await.unwrap(), Some(1));
    assert_eq!(f.insert("b".into(), 2).await.unwrap(), None);
    let existing = l
        .insert_all([("b".into(), 7), ("c".into(), 3)])
        .await
        .unwrap();
    assert_eq!(existing, vec![("b".to_string(), 2)]);
    let olds = f.set_all([("c".into(), 4), ("d".into(), 5)]).await.unwrap();
    assert_eq!(olds, vec![("c".to_string(), 3)]);
    assert_eq!(f.len().await.unwrap(), 4);
    let mut keys = f.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, vec!["a", "b", "c", "d"]);
    let got = f
        .get_all([&"a".to_string(), &"zz".to_string()])
        .await
        .unwrap();
    assert_eq!(got, vec![("a".to_string(), 1)]);
    let mut entries = l.entries().await.unwrap();
    entries.sort();
    assert_eq!(
        entries,
        vec![
            ("a".to_string(), 1),
            ("b".to_string(), 2),
            ("c".to_string(), 4),
            ("d".to_string(), 5)
        ]
    );
    assert!(f.update_if("a".into(), 10, 1).await.unwrap());
    assert!(!f.update_if("a".into(), 11, 1).await.unwrap());
    assert!(!f.update_if("zz".into(), 11, 1).await.unwrap());
    assert!(f.delete("d".into()).await.unwrap());
    assert!(!f.delete("d".into()).await.unwrap());
    assert_eq!(f.remove("c".into()).await.unwrap(), Some(4));
    assert_eq!(f.remove("c".into()).await.unwrap(), None);
    f.set_all([("x".into(), 1), ("y".into(), 2)]).await.unwrap();
    assert_eq!(
        l.delete_all(["x".to_string(), "zz".to_string()])
            .await
            .unwrap(),
        vec!["x".to_string()]
    );
    assert_eq!(
        l.remove_all(["y".to_string()]).await.unwrap(),
        vec![("y".to_string(), 2)]
    );
    f.clear().await.unwrap();
    assert_eq!(f.len().await.unwrap(), 0);
    assert!(f.keys().await.unwrap().is_empty());
    // Large enough for several scan pages.
    l.set_all((0..600).map(|i| (format!("k{i}"), i)))
        .await
        .unwrap();
    assert_eq!(f.entries().await.unwrap().len(), 600);
    wait_until("every peer's pending list is pruned", WAIT, || {
        handles.iter().all(|h| h.pending() == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_map_methods_over_the_memory_store() {
    let store = Arc::new(MemoryRemoteMap::new());
    let c = cluster_with("rm-memory", 3, "rm", store.clone()).await;
    exercise(&c).await;
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_map_methods_over_redis() {
    let key = unique_id("hamok-test-rm");
    let _cleanup = DropKey(key.clone());
    let store = Arc::new(
        RedisRemoteMap::connect(&redis_url(), key.clone())
            .await
            .unwrap(),
    );
    let c = cluster_with("rm-redis", 3, "rm", store.clone()).await;
    exercise(&c).await;
    assert!(store.applied_index().await.unwrap() > 0);
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_executes_an_index_once() {
    let key = unique_id("hamok-test-once");
    let _cleanup = DropKey(key.clone());
    let store = RedisRemoteMap::connect(&redis_url(), key.clone())
        .await
        .unwrap();
    let k = Bytes::from_static(b"k");
    assert_eq!(
        store
            .set(5, k.clone(), Bytes::from_static(b"1"))
            .await
            .unwrap(),
        Some(None)
    );
    assert_eq!(
        store
            .set(5, k.clone(), Bytes::from_static(b"2"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .set(4, k.clone(), Bytes::from_static(b"3"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.get(&k).await.unwrap(), Some(Bytes::from_static(b"1")));
    assert_eq!(
        store.outcome(5).await.unwrap(),
        Some(RemoteOutcome::Values(vec![None]))
    );
    assert_eq!(
        store
            .set(7, k.clone(), Bytes::from_static(b"\x00:s"))
            .await
            .unwrap(),
        Some(Some(Bytes::from_static(b"1")))
    );
    assert_eq!(
        store.outcome(7).await.unwrap(),
        Some(RemoteOutcome::Values(vec![Some(Bytes::from_static(b"1"))]))
    );
    assert_eq!(store.outcome(6).await.unwrap(), None);
    assert_eq!(store.applied_index().await.unwrap(), 7);
    assert_eq!(store.clear(8).await.unwrap(), Some(()));
    assert_eq!(store.clear(8).await.unwrap(), None);
    assert_eq!(
        store.applied_index().await.unwrap(),
        8,
        "clear keeps the index"
    );
    assert_eq!(store.outcome(8).await.unwrap(), Some(RemoteOutcome::Done));
    assert_eq!(store.len().await.unwrap(), 0);
    // A key holding another type is a rejection that changes nothing.
    let other = unique_id("hamok-test-string");
    let _cleanup2 = DropKey(other.clone());
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(&other)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let wrong = RedisRemoteMap::new(conn, other);
    assert!(matches!(
        wrong.set(1, k.clone(), k.clone()).await,
        Err(HamokError::Rejected(_))
    ));
}

/// Wraps a store: slows every execution down (so a backlog of committed, unexecuted mutations exists
/// when the leader is cut off) and counts, per log index, how many executions took effect.
struct Counting {
    inner: Arc<dyn RemoteMap>,
    effective: Arc<Mutex<BTreeMap<LogIndex, u32>>>,
    skipped: Arc<Mutex<u64>>,
}

#[async_trait]
impl RemoteMap for Counting {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError> {
        self.inner.get(key).await
    }
    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError> {
        self.inner.get_all(keys).await
    }
    async fn keys(&self) -> Result<Vec<Bytes>, HamokError> {
        self.inner.keys().await
    }
    async fn len(&self) -> Result<usize, HamokError> {
        self.inner.len().await
    }
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError> {
        self.inner.scan(cursor, count).await
    }
    async fn applied_index(&self) -> Result<LogIndex, HamokError> {
        self.inner.applied_index().await
    }
    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        self.inner.set_all(index, entries).await
    }
    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        self.inner.insert_all(index, entries).await
    }
    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        self.inner.remove_all(index, keys).await
    }
    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError> {
        self.inner.update_if(index, key, new, expected).await
    }
    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError> {
        self.inner.clear(index).await
    }
    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        self.inner.outcome(index).await
    }
    async fn execute(
        &self,
        index: LogIndex,
        op: &RemoteOp,
    ) -> Result<Option<RemoteOutcome>, HamokError> {
        tokio::time::sleep(Duration::from_millis(3)).await;
        let out = self.inner.execute(index, op).await?;
        if out.is_some() {
            *self.effective.lock().unwrap().entry(index).or_default() += 1;
        } else {
            *self.skipped.lock().unwrap() += 1;
        }
        Ok(out)
    }
}

/// Mutations reach Redis exactly once even when the leader is cut off while it still has committed
/// mutations to execute (and keeps executing them for a while, believing it still leads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mutations_apply_exactly_once_across_a_leader_change() {
    const N: usize = 300;
    let key = unique_id("hamok-test-failover");
    let _cleanup = DropKey(key.clone());
    let redis = Arc::new(
        RedisRemoteMap::connect(&redis_url(), key.clone())
            .await
            .unwrap(),
    );
    let effective = Arc::new(Mutex::new(BTreeMap::new()));
    let skipped = Arc::new(Mutex::new(0));
    let store: Arc<dyn RemoteMap> = Arc::new(Counting {
        inner: redis.clone(),
        effective: effective.clone(),
        skipped: skipped.clone(),
    });
    let c = cluster_with("rm-failover", 3, "rm", store).await;
    let mut handles = Vec::new();
    for p in &c.peers {
        handles.push(
            p.get_or_create_remote_map::<String, u64>("rm")
                .await
                .unwrap(),
        );
    }
    let old_leader = c.leader();
    let writer = (0..3).find(|i| *i != old_leader).unwrap();
    let survivor = (0..3).find(|i| *i != old_leader && *i != writer).unwrap();
    let h = handles[writer].clone();
    // A counter advanced by compare-and-set (a double execution would break the chain) and one key per
    // write (so a lost execution shows).
    h.set("counter".into(), 0).await.unwrap();
    let writes = tokio::spawn(async move {
        let mut results = Vec::new();
        for i in 0..N as u64 {
            let set = h.set(format!("k{i}"), i).await;
            let cas = h.update_if("counter".into(), i + 1, i).await;
            results.push((set, cas));
        }
        results
    });
    // Concurrent writers from the other follower keep several mutations in flight, so some are
    // committed but not yet executed when the leader is cut off.
    const PARALLEL: usize = 6;
    const EACH: usize = 40;
    let mut parallel = Vec::new();
    for t in 0..PARALLEL {
        let h = handles[survivor].clone();
        parallel.push(tokio::spawn(async move {
            for i in 0..EACH {
                h.set(format!("s{t}-{i}"), i as u64).await.unwrap();
            }
        }));
    }
    // Let a backlog build up, then cut the leader off (it keeps its Redis connection).
    wait_until("some writes executed", WAIT, || {
        effective.lock().unwrap().len() > 40
    })
    .await;
    c.hub.isolate(c.peers[old_leader].local_peer_id());
    let results = tokio::time::timeout(Duration::from_secs(120), writes)
        .await
        .expect("writes finish")
        .unwrap();
    for p in parallel {
        tokio::time::timeout(Duration::from_secs(120), p)
            .await
            .expect("parallel writes finish")
            .unwrap();
    }
    let new_leader = c.peers[survivor].is_leader() || c.peers[writer].is_leader();
    assert!(new_leader, "a new leader among the connected peers");
    // The old leader executes mutations it can no longer answer for; the new leader answers them from
    // the outcomes Redis recorded. A timeout would mean a lost result (the mutation is applied anyway).
    let mut lost = 0;
    for (i, (set, cas)) in results.iter().enumerate() {
        match set {
            Ok(_) => {}
            Err(HamokError::Timeout { .. }) => lost += 1,
            Err(e) => panic!("set {i}: {e}"),
        }
        match cas {
            Ok(true) => {}
            Err(HamokError::Timeout { .. }) => lost += 1,
            other => panic!("cas {i}: {other:?}"),
        }
    }
    eprintln!(
        "executions skipped as already done: {}; results lost: {lost}",
        skipped.lock().unwrap()
    );
    assert_eq!(lost, 0, "results lost");
    // Every effective execution happened once, and every write is in Redis.
    let counts = effective.lock().unwrap().clone();
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "executed more than once: {twice:?}");
    let counter: Option<u64> = handles[writer].get(&"counter".into()).await.unwrap();
    assert_eq!(counter, Some(N as u64));
    for i in 0..N as u64 {
        assert_eq!(
            handles[survivor].get(&format!("k{i}")).await.unwrap(),
            Some(i)
        );
    }
    for t in 0..PARALLEL {
        for i in 0..EACH {
            let v = handles[writer].get(&format!("s{t}-{i}")).await.unwrap();
            assert_eq!(v, Some(i as u64));
        }
    }
    assert_eq!(
        handles[writer].len().await.unwrap(),
        N + 1 + PARALLEL * EACH
    );
    assert_eq!(
        redis.applied_index().await.unwrap(),
        *counts.keys().last().unwrap()
    );
    c.hub.heal();
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_map_events_reach_every_peer() {
    let store = Arc::new(MemoryRemoteMap::new());
    let c = cluster_with("rm-events", 3, "rm", store).await;
    let mut handles = Vec::new();
    let mut streams = Vec::new();
    for p in &c.peers {
        let h = p
            .get_or_create_remote_map::<String, u32>("rm")
            .await
            .unwrap();
        streams.push(h.events());
        handles.push(h);
    }
    let f = &handles[c.follower()];
    f.set("a".into(), 1).await.unwrap();
    f.set("a".into(), 2).await.unwrap();
    f.insert("b".into(), 3).await.unwrap();
    f.insert("b".into(), 4).await.unwrap(); // exists: no event
    f.update_if("b".into(), 5, 3).await.unwrap();
    f.update_if("b".into(), 6, 3).await.unwrap(); // mismatch: no event
    f.delete("a".into()).await.unwrap();
    f.clear().await.unwrap();
    let expected = vec![
        MapEvent::Insert {
            key: "a".to_string(),
            value: 1,
        },
        MapEvent::Update {
            key: "a".to_string(),
            old: 1,
            new: 2,
        },
        MapEvent::Insert {
            key: "b".to_string(),
            value: 3,
        },
        MapEvent::Update {
            key: "b".to_string(),
            old: 3,
            new: 5,
        },
        MapEvent::Remove {
            key: "a".to_string(),
            value: 2,
        },
        MapEvent::Clear,
    ];
    for (i, s) in streams.iter_mut().enumerate() {
        for e in &expected {
            assert_eq!(&next(s).await, e, "peer {i}");
        }
    }
    c.close().await;
}
