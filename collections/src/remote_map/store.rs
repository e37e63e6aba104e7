//! The store a remote map's data lives in: the [`RemoteMap`] contract (apply and record the log index
//! atomically, only if it is above the last one), its mutations and outcomes, and [`MemoryRemoteMap`].

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use hamok_runtime::raft::LogIndex;
use hamok_runtime::HamokError;
use serde::{Deserialize, Serialize};

/// A mutation of a remote map; keys and values are encoded bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteOp {
    /// Set every entry; the outcome is the previous values ([`RemoteOutcome::Values`]).
    Set(Vec<(Bytes, Bytes)>),
    /// Set every absent key, never overwriting; the outcome is the existing values (`None` = inserted).
    Insert(Vec<(Bytes, Bytes)>),
    /// Remove every key; the outcome is the removed values.
    Remove(Vec<Bytes>),
    /// Set `key` to `new` if it holds `expected`; the outcome is whether it did ([`RemoteOutcome::Bool`]).
    UpdateIf {
        /// The key.
        key: Bytes,
        /// The new value.
        new: Bytes,
        /// The value it must hold.
        expected: Bytes,
    },
    /// Remove every entry ([`RemoteOutcome::Done`]).
    Clear,
}

/// What executing a [`RemoteOp`] produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteOutcome {
    /// One optional value per key of the operation, in order.
    Values(Vec<Option<Bytes>>),
    /// A condition's result.
    Bool(bool),
    /// Done, nothing to report.
    Done,
}

/// An external key-value store holding a remote map's data (keys and values are encoded bytes).
///
/// Mutations carry the log index that ordered them. An implementation must apply a mutation **and**
/// record its index atomically, and only if the index is greater than the last recorded one; otherwise
/// it must leave the store untouched and answer `Ok(None)`. That is what makes execution exactly-once
/// across leader changes (see the [module documentation](super)).
#[async_trait]
pub trait RemoteMap: Send + Sync + 'static {
    /// The value of `key`.
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError>;
    /// The values of `keys`, in order.
    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError>;
    /// Every key.
    async fn keys(&self) -> Result<Vec<Bytes>, HamokError>;
    /// Number of entries.
    async fn len(&self) -> Result<usize, HamokError>;
    /// Whether there is no entry.
    async fn is_empty(&self) -> Result<bool, HamokError> {
        Ok(self.len().await? == 0)
    }
    /// One page of entries from `cursor` (0 to start); the next cursor is 0 at the end. Pages may
    /// overlap if the map changes meanwhile.
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError>;
    /// The last log index executed.
    async fn applied_index(&self) -> Result<LogIndex, HamokError>;

    /// Sets every entry at log index `index`; previous values, or `None` if `index` was executed already.
    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Sets every absent key at `index`; existing values (`None` = inserted), or `None` if executed already.
    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Removes every key at `index`; removed values, or `None` if executed already.
    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError>;
    /// Compare-and-set at `index`; whether it set, or `None` if executed already.
    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError>;
    /// Removes every entry at `index`; `None` if executed already.
    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError>;

    /// The outcome recorded when `index` was executed, if the store still has it (`None` if it keeps
    /// no outcomes, the default). An executor that finds a mutation already executed — by a leader cut
    /// off before it could answer — uses it to answer the caller instead of letting it time out.
    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        let _ = index;
        Ok(None)
    }

    /// Sets one entry at `index` (see [`RemoteMap::set_all`]).
    async fn set(
        &self,
        index: LogIndex,
        key: Bytes,
        value: Bytes,
    ) -> Result<Option<Option<Bytes>>, HamokError> {
        Ok(self
            .set_all(index, &[(key, value)])
            .await?
            .map(|v| v.into_iter().next().flatten()))
    }

    /// Removes one key at `index` (see [`RemoteMap::remove_all`]).
    async fn remove(
        &self,
        index: LogIndex,
        key: Bytes,
    ) -> Result<Option<Option<Bytes>>, HamokError> {
        Ok(self
            .remove_all(index, &[key])
            .await?
            .map(|v| v.into_iter().next().flatten()))
    }

    /// Executes `op` at `index`: `None` if `index` was executed already.
    async fn execute(
        &self,
        index: LogIndex,
        op: &RemoteOp,
    ) -> Result<Option<RemoteOutcome>, HamokError> {
        Ok(match op {
            RemoteOp::Set(entries) => self
                .set_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Insert(entries) => self
                .insert_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Remove(keys) => self
                .remove_all(index, keys)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::UpdateIf { key, new, expected } => self
                .update_if(index, key, new, expected)
                .await?
                .map(RemoteOutcome::Bool),
            RemoteOp::Clear => self.clear(index).await?.map(|()| RemoteOutcome::Done),
        })
    }
}

/// A [`RemoteMap`] in this process's memory: for tests and examples, and to show the contract. It
/// keeps the outcomes of the last 10,000 executed indices.
#[derive(Default)]
pub struct MemoryRemoteMap {
    inner: Mutex<(LogIndex, BTreeMap<Bytes, Bytes>)>,
    outcomes: Mutex<BTreeMap<LogIndex, RemoteOutcome>>,
}

impl MemoryRemoteMap {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(
        &self,
        index: LogIndex,
        f: impl FnOnce(&mut BTreeMap<Bytes, Bytes>) -> R,
    ) -> Option<R> {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if index <= inner.0 {
            return None;
        }
        inner.0 = index;
        Some(f(&mut inner.1))
    }

    fn read<R>(&self, f: impl FnOnce(&BTreeMap<Bytes, Bytes>) -> R) -> R {
        f(&self.inner.lock().unwrap_or_else(PoisonError::into_inner).1)
    }
}

#[async_trait]
impl RemoteMap for MemoryRemoteMap {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError> {
        Ok(self.read(|m| m.get(key).cloned()))
    }
    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError> {
        Ok(self.read(|m| keys.iter().map(|k| m.get(k).cloned()).collect()))
    }
    async fn keys(&self) -> Result<Vec<Bytes>, HamokError> {
        Ok(self.read(|m| m.keys().cloned().collect()))
    }
    async fn len(&self) -> Result<usize, HamokError> {
        Ok(self.read(|m| m.len()))
    }
    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError> {
        let count = count.max(1);
        Ok(self.read(|m| {
            let page: Vec<(Bytes, Bytes)> = m
                .iter()
                .skip(cursor as usize)
                .take(count)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let next = cursor + page.len() as u64;
            let next = if next as usize >= m.len() { 0 } else { next };
            (next, page)
        }))
    }
    async fn applied_index(&self) -> Result<LogIndex, HamokError> {
        Ok(self.inner.lock().unwrap_or_else(PoisonError::into_inner).0)
    }
    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| {
            entries
                .iter()
                .map(|(k, v)| m.insert(k.clone(), v.clone()))
                .collect()
        }))
    }
    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| {
            entries
                .iter()
                .map(|(k, v)| match m.get(k) {
                    Some(existing) => Some(existing.clone()),
                    None => {
                        m.insert(k.clone(), v.clone());
                        None
                    }
                })
                .collect()
        }))
    }
    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        Ok(self.with(index, |m| keys.iter().map(|k| m.remove(k)).collect()))
    }
    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError> {
        Ok(self.with(index, |m| {
            let hit = m.get(key).is_some_and(|v| v[..] == *expected);
            if hit {
                m.insert(Bytes::copy_from_slice(key), Bytes::copy_from_slice(new));
            }
            hit
        }))
    }
    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError> {
        Ok(self.with(index, |m| m.clear()))
    }
    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        Ok(self
            .outcomes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&index)
            .cloned())
    }
    async fn execute(
        &self,
        index: LogIndex,
        op: &RemoteOp,
    ) -> Result<Option<RemoteOutcome>, HamokError> {
        let outcome = match op {
            RemoteOp::Set(entries) => self
                .set_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Insert(entries) => self
                .insert_all(index, entries)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::Remove(keys) => self
                .remove_all(index, keys)
                .await?
                .map(RemoteOutcome::Values),
            RemoteOp::UpdateIf { key, new, expected } => self
                .update_if(index, key, new, expected)
                .await?
                .map(RemoteOutcome::Bool),
            RemoteOp::Clear => self.clear(index).await?.map(|()| RemoteOutcome::Done),
        };
        if let Some(outcome) = &outcome {
            let mut outcomes = self.outcomes.lock().unwrap_or_else(PoisonError::into_inner);
            outcomes.insert(index, outcome.clone());
            let keep = outcomes.split_off(&index.saturating_sub(10_000));
            *outcomes = keep;
        }
        Ok(outcome)
    }
}
