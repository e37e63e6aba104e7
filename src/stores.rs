//! [`Stores`]: the named stores behind the front doors (the `hamok` REPL and the HTTP gateway), one
//! fact in one place: tf-raft's key-value, hash and set commands, locks, shared config and queues, each a
//! replicated collection of one peer, opened once and kept.
//!
//! | store | collection | id |
//! |---|---|---|
//! | key-value (`SET`/`GET`/`DEL`) | `HamokMap<String, String>` | `kv` |
//! | hash `name` (`HSET`/`HGET`/`HDEL`) | `HamokMap<String, String>` | `hash:name` |
//! | set `name` (`SSET`/`SHAS`/`SDEL`) | `HamokSet<String>` | `set:name` |
//! | queue `name` (`QPUSH`/`QPOP`/`QTAKE`/`QACK`) | `HamokQueue<String>` | `queue:name` |
//! | config `name` (`CONFIG GET/SET/WATCH`) | `SharedConfig<String>` | `config:name` |
//! | locks (`LOCK`/`UNLOCK`) | `HamokLock` | `locks` |
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use hamok::prelude::*;
//! use hamok::stores::Stores;
//! let hamok = register_kinds(Hamok::builder().cluster_id("doc-stores")).build().await?;
//! hamok.join().await?;
//! let stores = Stores::new(hamok.clone());
//! stores.kv_set("my_key", "42").await?;
//! assert_eq!(stores.kv_get("my_key", true).await?, Some("42".to_string()));
//! hamok.close().await;
//! # Ok::<(), HamokError>(()) }).unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hamok_collections::{
    CasOutcome, ConfigWatch, Delivery, DeliveryId, HamokCollections, HamokLock, HamokMap,
    HamokQueue, HamokSet, LockGuard, LockOptions, SharedConfig, Versioned,
};
use hamok_runtime::{Hamok, HamokError};

/// Longest store name (hash, set, queue, config or lock name), in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Most collection handles kept open per kind: names come from users, so the cache is bounded (a name
/// beyond it is opened for each call instead).
const MAX_OPEN_HANDLES: usize = 4_096;
/// Most locks one peer holds through these stores at once.
pub const MAX_HELD_LOCKS: usize = 1_024;
/// The lease of a queue take that names none (the REPL's `QTAKE`, the gateway's `take`), in ms.
pub const DEFAULT_LEASE_MS: u64 = 30_000;

/// The stores of one peer. Cheap to clone (shared).
#[derive(Clone)]
pub struct Stores {
    inner: Arc<Inner>,
}

struct Inner {
    hamok: Hamok,
    maps: Mutex<HashMap<String, HamokMap<String, String>>>,
    sets: Mutex<HashMap<String, HamokSet<String>>>,
    queues: Mutex<HashMap<String, HamokQueue<String>>>,
    configs: Mutex<HashMap<String, SharedConfig<String>>>,
    locks: Mutex<Option<HamokLock>>,
    /// Locks taken through these stores, by name, until `unlock`.
    held: Mutex<BTreeMap<String, LockGuard>>,
    /// Names a `lock` call is waiting for right now (a second call for one of them answers `Busy`
    /// instead of queueing behind its own peer: locks are not reentrant).
    taking: Mutex<BTreeSet<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks a user-given name: not empty, at most [`MAX_NAME_BYTES`], no whitespace or control characters.
pub fn check_name(name: &str) -> Result<(), HamokError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(HamokError::Rejected(format!(
            "a name has 1 to {MAX_NAME_BYTES} bytes, not {}",
            name.len()
        )));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(HamokError::Rejected(format!(
            "a name has no spaces or control characters: {name:?}"
        )));
    }
    Ok(())
}

/// Opens (once) and caches the handle `id` of `cache`.
async fn cached<H, F, Fut>(
    cache: &Mutex<HashMap<String, H>>,
    id: String,
    open: F,
) -> Result<H, HamokError>
where
    H: Clone,
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<H, HamokError>>,
{
    if let Some(h) = lock(cache).get(&id) {
        return Ok(h.clone());
    }
    let handle = open(id.clone()).await?;
    let mut c = lock(cache);
    if c.len() < MAX_OPEN_HANDLES {
        c.entry(id).or_insert_with(|| handle.clone());
    }
    Ok(handle)
}

/// A name in `Inner::taking` while a `lock` call waits for it; removed however the call ends
/// (answered, failed, or its future dropped).
struct Taking<'a> {
    names: &'a Mutex<BTreeSet<String>>,
    name: String,
}

impl<'a> Taking<'a> {
    fn start(names: &'a Mutex<BTreeSet<String>>, name: &str) -> Result<Self, HamokError> {
        if !lock(names).insert(name.to_string()) {
            return Err(HamokError::Busy(
                "this peer is already waiting for that lock",
            ));
        }
        Ok(Taking {
            names,
            name: name.to_string(),
        })
    }
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        lock(self.names).remove(&self.name);
    }
}

impl Stores {
    /// The stores of `hamok` (a peer built with [`register_kinds`](hamok_collections::register_kinds);
    /// collections open when first used, which needs the peer joined).
    pub fn new(hamok: Hamok) -> Self {
        Stores {
            inner: Arc::new(Inner {
                hamok,
                maps: Mutex::default(),
                sets: Mutex::default(),
                queues: Mutex::default(),
                configs: Mutex::default(),
                locks: Mutex::default(),
                held: Mutex::default(),
                taking: Mutex::default(),
            }),
        }
    }

    /// The peer.
    pub fn hamok(&self) -> &Hamok {
        &self.inner.hamok
    }

    async fn map(&self, id: String) -> Result<HamokMap<String, String>, HamokError> {
        let hamok = self.inner.hamok.clone();
        cached(&self.inner.maps, id, |id| async move {
            hamok.get_or_create_map::<String, String>(&id).await
        })
        .await
    }

    async fn hash(&self, name: &str) -> Result<HamokMap<String, String>, HamokError> {
        check_name(name)?;
        self.map(format!("hash:{name}")).await
    }

    async fn set(&self, name: &str) -> Result<HamokSet<String>, HamokError> {
        check_name(name)?;
        let hamok = self.inner.hamok.clone();
        cached(&self.inner.sets, format!("set:{name}"), |id| async move {
            hamok.get_or_create_set::<String>(&id).await
        })
        .await
    }

    async fn queue(&self, name: &str) -> Result<HamokQueue<String>, HamokError> {
        check_name(name)?;
        let hamok = self.inner.hamok.clone();
        cached(
            &self.inner.queues,
            format!("queue:{name}"),
            |id| async move { hamok.get_or_create_queue::<String>(&id).await },
        )
        .await
    }

    async fn config(&self, name: &str) -> Result<SharedConfig<String>, HamokError> {
        check_name(name)?;
        let hamok = self.inner.hamok.clone();
        cached(
            &self.inner.configs,
            format!("config:{name}"),
            |id| async move { hamok.get_or_create_config::<String>(&id).await },
        )
        .await
    }

    async fn locks(&self) -> Result<HamokLock, HamokError> {
        if let Some(t) = lock(&self.inner.locks).as_ref() {
            return Ok(t.clone());
        }
        let table = self.inner.hamok.get_or_create_lock_table("locks").await?;
        *lock(&self.inner.locks) = Some(table.clone());
        Ok(table)
    }

    // ---------------------------------------------------------------------------------------------
    // Key-value

    /// The value of `key` (`linearizable`: confirmed with the leader first).
    pub async fn kv_get(
        &self,
        key: &str,
        linearizable: bool,
    ) -> Result<Option<String>, HamokError> {
        let map = self.map("kv".into()).await?;
        if linearizable {
            map.get_linearizable(&key.to_string()).await
        } else {
            map.get(&key.to_string())
        }
    }

    /// Sets `key`; returns the previous value.
    pub async fn kv_set(&self, key: &str, value: &str) -> Result<Option<String>, HamokError> {
        self.map("kv".into())
            .await?
            .set(key.to_string(), value.to_string())
            .await
    }

    /// Sets `key` only if its value is `expected` (`None`: only if absent); whether it did.
    pub async fn kv_compare_and_set(
        &self,
        key: &str,
        expected: Option<&str>,
        value: &str,
    ) -> Result<bool, HamokError> {
        let map = self.map("kv".into()).await?;
        match expected {
            Some(old) => {
                map.update_if(key.to_string(), value.to_string(), old.to_string())
                    .await
            }
            None => Ok(map
                .insert(key.to_string(), value.to_string())
                .await?
                .is_none()),
        }
    }

    /// Deletes `key`; returns the value it had.
    pub async fn kv_del(&self, key: &str) -> Result<Option<String>, HamokError> {
        self.map("kv".into()).await?.remove(key.to_string()).await
    }

    // ---------------------------------------------------------------------------------------------
    // Hashes

    /// Sets fields of hash `name`, atomically (one log entry: every peer sees all of them or none,
    /// and an error leaves none set unless it says the write may have taken effect); returns how
    /// many were new. A field named twice takes its last value and counts once.
    pub async fn hash_set(
        &self,
        name: &str,
        fields: &[(String, String)],
    ) -> Result<usize, HamokError> {
        let map = self.hash(name).await?;
        let had_value = map.set_all(fields.iter().cloned()).await?;
        Ok(fields.len() - had_value.len())
    }

    /// One field of hash `name`.
    pub async fn hash_get(
        &self,
        name: &str,
        field: &str,
        linearizable: bool,
    ) -> Result<Option<String>, HamokError> {
        let map = self.hash(name).await?;
        if linearizable {
            map.get_linearizable(&field.to_string()).await
        } else {
            map.get(&field.to_string())
        }
    }

    /// Every field of hash `name`, sorted.
    pub async fn hash_all(&self, name: &str) -> Result<Vec<(String, String)>, HamokError> {
        let mut all = self.hash(name).await?.entries()?;
        all.sort();
        Ok(all)
    }

    /// Deletes fields of hash `name`, atomically (one log entry); returns how many existed.
    pub async fn hash_del(&self, name: &str, fields: &[String]) -> Result<usize, HamokError> {
        let map = self.hash(name).await?;
        Ok(map.delete_all(fields.iter().cloned()).await?.len())
    }

    // ---------------------------------------------------------------------------------------------
    // Sets

    /// Adds members to set `name`; returns how many were new.
    pub async fn set_add(&self, name: &str, members: &[String]) -> Result<usize, HamokError> {
        self.set(name).await?.add(members.iter().cloned()).await
    }

    /// Whether `member` is in set `name`.
    pub async fn set_has(
        &self,
        name: &str,
        member: &str,
        linearizable: bool,
    ) -> Result<bool, HamokError> {
        let set = self.set(name).await?;
        if linearizable {
            set.contains_linearizable(&member.to_string()).await
        } else {
            set.contains(&member.to_string())
        }
    }

    /// Removes members from set `name`; returns how many were there.
    pub async fn set_del(&self, name: &str, members: &[String]) -> Result<usize, HamokError> {
        self.set(name).await?.remove(members.iter().cloned()).await
    }

    // ---------------------------------------------------------------------------------------------
    // Queues

    /// Appends to queue `name`; returns its length after.
    pub async fn queue_push(&self, name: &str, values: &[String]) -> Result<u64, HamokError> {
        self.queue(name).await?.push(values.iter().cloned()).await
    }

    /// Takes the head of queue `name` (at most once: see `HamokQueue::pop`).
    pub async fn queue_pop(&self, name: &str) -> Result<Option<String>, HamokError> {
        self.queue(name).await?.pop().await
    }

    /// Leases the head of queue `name` to this peer for `lease` (at least once: see
    /// `HamokQueue::take`).
    pub async fn queue_take(
        &self,
        name: &str,
        lease: Duration,
    ) -> Result<Option<Delivery<String>>, HamokError> {
        self.queue(name).await?.take(lease).await
    }

    /// Acknowledges delivery `id` of queue `name`: whether it was still held.
    pub async fn queue_ack(&self, name: &str, id: DeliveryId) -> Result<bool, HamokError> {
        self.queue(name).await?.ack(id).await
    }

    // ---------------------------------------------------------------------------------------------
    // Config

    /// The value of config `name` with its revision.
    pub async fn config_get(
        &self,
        name: &str,
        linearizable: bool,
    ) -> Result<Option<Versioned<String>>, HamokError> {
        let config = self.config(name).await?;
        if linearizable {
            config.get_linearizable().await
        } else {
            config.get()
        }
    }

    /// Sets config `name` (only over revision `expected` when given; `Some(0)`: only if never set):
    /// [`CasOutcome::Set`] with the new revision, or [`CasOutcome::Conflict`] with the revision that
    /// is there instead (nothing changed).
    pub async fn config_set(
        &self,
        name: &str,
        value: &str,
        expected: Option<u64>,
    ) -> Result<CasOutcome, HamokError> {
        let config = self.config(name).await?;
        match expected {
            None => config.set(value.to_string()).await.map(CasOutcome::Set),
            Some(revision) => config.compare_and_set(revision, value.to_string()).await,
        }
    }

    /// A watch of config `name` (latest value first, then every change).
    pub async fn config_watch(&self, name: &str) -> Result<ConfigWatch<String>, HamokError> {
        Ok(self.config(name).await?.watch())
    }

    // ---------------------------------------------------------------------------------------------
    // Locks

    /// Takes lock `name` for this peer (waiting at most `wait`); returns its fencing token. Held until
    /// [`Stores::unlock`] (or until this peer leaves the cluster).
    pub async fn lock(&self, name: &str, wait: Duration) -> Result<u64, HamokError> {
        check_name(name)?;
        if let Some(g) = lock(&self.inner.held).get(name) {
            if !g.is_lost() {
                return Ok(g.token());
            }
        }
        if lock(&self.inner.held).len() >= MAX_HELD_LOCKS {
            return Err(HamokError::Busy("too many locks held through this peer"));
        }
        let _taking = Taking::start(&self.inner.taking, name)?;
        let options = LockOptions {
            wait_timeout: Some(wait),
            ..LockOptions::default()
        };
        let guard = self.locks().await?.lock_with(name, options).await?;
        let token = guard.token();
        lock(&self.inner.held).insert(name.to_string(), guard);
        Ok(token)
    }

    /// Releases lock `name` if this peer took it here; whether it was still held.
    pub async fn unlock(&self, name: &str) -> Result<bool, HamokError> {
        let guard = lock(&self.inner.held).remove(name);
        match guard {
            Some(g) => g.unlock().await,
            None => Ok(false),
        }
    }

    /// The token of lock `name` if this peer holds it through these stores.
    pub fn held_token(&self, name: &str) -> Option<u64> {
        lock(&self.inner.held)
            .get(name)
            .filter(|g| !g.is_lost())
            .map(|g| g.token())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;

    /// A multi-field `HSET` or `HDEL` is one log entry (so no reader and no failure sees half of
    /// it), and counts like Redis: new fields, existing fields, a repeated field once.
    #[tokio::test]
    async fn hash_writes_of_several_fields_are_one_log_entry() {
        let hamok = register_kinds(Hamok::builder().cluster_id("stores-hash-atomic"))
            .build()
            .await
            .unwrap();
        hamok.join().await.unwrap();
        let stores = Stores::new(hamok.clone());
        let pairs = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // Opens (creates) the hash first: creating it is an entry of its own.
        assert_eq!(
            stores.hash_set("h", &pairs(&[("a", "0")])).await.unwrap(),
            1
        );
        // What this peer has applied, read by the node itself after a ReadIndex round.
        let applied = || async {
            hamok
                .wait_until_linearizable(Duration::from_secs(5))
                .await
                .unwrap()
        };
        let before = applied().await;
        let added = stores
            .hash_set(
                "h",
                &pairs(&[("a", "1"), ("b", "2"), ("c", "3"), ("b", "4")]),
            )
            .await
            .unwrap();
        assert_eq!(added, 2, "b and c are new, a existed, b counts once");
        assert_eq!(applied().await, before + 1, "one log entry");
        assert_eq!(
            stores.hash_get("h", "b", true).await.unwrap().as_deref(),
            Some("4")
        );
        let before = applied().await;
        let fields: Vec<String> = ["a", "zz", "c", "a"]
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(
            stores.hash_del("h", &fields).await.unwrap(),
            2,
            "a and c existed"
        );
        assert_eq!(applied().await, before + 1, "one log entry");
        assert_eq!(stores.hash_all("h").await.unwrap(), pairs(&[("b", "4")]));
        hamok.close().await;
    }
}
