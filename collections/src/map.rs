//! [`HamokMap`]: a replicated key-value map.
//!
//! Keys and values are any `Serialize + DeserializeOwned` types, encoded with rmp-serde; the state
//! machine keeps the encoded bytes in a `BTreeMap` (deterministic iteration on every peer). Every
//! mutation is one log entry (a batch is atomic). Conditional operations ([`HamokMap::update_if`],
//! [`HamokMap::remove_if`]) compare encoded bytes at apply time, so they are decided in log order on
//! every peer alike: a mismatch answers `false` at once (never a timeout). No value is special: `0`,
//! `""`, `false` and `None` are values like any other.
//!
//! Encoded bytes are compared, so a value type whose encoding is not canonical (a `HashMap`, whose
//! iteration order varies) can fail a compare-and-set with an equal value: prefer `BTreeMap`.

use std::collections::BTreeMap;

use bytes::Bytes;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};

use crate::common::{
    decode, encode, handle_basics, plain_opened, write_lock, Events, Handle, Raw, ResyncReason,
    Types,
};
use crate::machine::{Core, Logic, Machine};

/// The kind a map is registered under.
pub const MAP_KIND: &str = "hamok.map";

/// The replicated content of a map.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct MapState {
    pub(crate) entries: BTreeMap<Bytes, Bytes>,
}

/// Per-key parts of a command or response: most carry one, held inline (no allocation). Encoded as
/// the `Vec` they replaced: an array either way. A command's are decoded with [`per_key`].
type PerKey<T> = SmallVec<[T; 1]>;

/// Most elements a decoded [`PerKey`] reserves room for before they arrive.
const MAX_RESERVED_PER_KEY: usize = 1024;

/// Decodes a [`PerKey`] without trusting the length its array header claims: smallvec's own decoding
/// reserves whatever the header says (a garbage command claiming 10⁸ entries would reserve gigabytes
/// before failing on the missing data); this reserves at most [`MAX_RESERVED_PER_KEY`] and grows with
/// the elements that really come, as serde's `Vec` does.
fn per_key<'de, D, T>(deserializer: D) -> Result<PerKey<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Visitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
        type Value = PerKey<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<PerKey<T>, A::Error> {
            let mut out = PerKey::new();
            out.reserve(seq.size_hint().unwrap_or(0).min(MAX_RESERVED_PER_KEY));
            while let Some(element) = seq.next_element()? {
                out.push(element);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_seq(Visitor(std::marker::PhantomData))
}

#[derive(Serialize, Deserialize)]
pub(crate) enum MapCmd {
    Set(#[serde(deserialize_with = "per_key")] PerKey<(Bytes, Bytes)>),
    Insert(#[serde(deserialize_with = "per_key")] PerKey<(Bytes, Bytes)>),
    Delete(#[serde(deserialize_with = "per_key")] PerKey<Bytes>),
    Remove(#[serde(deserialize_with = "per_key")] PerKey<Bytes>),
    UpdateIf {
        key: Bytes,
        new: Bytes,
        expected: Bytes,
    },
    RemoveIf {
        key: Bytes,
        expected: Bytes,
    },
    Clear,
    Import(Vec<(Bytes, Bytes)>),
}

/// What is particular to a map's state machine ([`Machine`]`<MapLogic>`).
#[derive(Default)]
pub(crate) struct MapLogic;

/// The state machine of a map.
pub(crate) type MapMachine = Machine<MapLogic>;

impl Logic for MapLogic {
    type State = MapState;
    type Extra = ();
    type Command = MapCmd;

    fn kind(&self) -> &str {
        MAP_KIND
    }

    fn exec(
        &self,
        core: &Core<MapState, ()>,
        _ctx: &ApplyContext,
        cmd: MapCmd,
    ) -> Result<Bytes, HamokError> {
        let listening = core.listening();
        let mut events = Vec::new();
        let mut ev = |e: Raw| {
            if listening {
                events.push(e)
            }
        };
        let response = {
            let mut state = write_lock(&core.state);
            let map = &mut state.entries;
            match cmd {
                MapCmd::Set(entries) => {
                    let mut olds = PerKey::<Option<Bytes>>::with_capacity(entries.len());
                    for (key, value) in entries {
                        if !listening {
                            // Nobody to tell: move the bytes in rather than share them.
                            olds.push(map.insert(key, value));
                            continue;
                        }
                        let old = map.insert(key.clone(), value.clone());
                        ev(match &old {
                            Some(old) => Raw::Update {
                                key,
                                old: old.clone(),
                                new: value,
                            },
                            None => Raw::Insert { key, value },
                        });
                        olds.push(old);
                    }
                    encode(&olds)
                }
                MapCmd::Insert(entries) => {
                    let mut existing = PerKey::<Option<Bytes>>::with_capacity(entries.len());
                    for (key, value) in entries {
                        match map.get(&key) {
                            Some(v) => existing.push(Some(v.clone())),
                            None => {
                                map.insert(key.clone(), value.clone());
                                ev(Raw::Insert { key, value });
                                existing.push(None);
                            }
                        }
                    }
                    encode(&existing)
                }
                MapCmd::Delete(keys) => {
                    let mut deleted = PerKey::<bool>::with_capacity(keys.len());
                    for key in keys {
                        let old = map.remove(&key);
                        deleted.push(old.is_some());
                        if let Some(value) = old {
                            ev(Raw::Remove { key, value });
                        }
                    }
                    encode(&deleted)
                }
                MapCmd::Remove(keys) => {
                    let mut removed = PerKey::<Option<Bytes>>::with_capacity(keys.len());
                    for key in keys {
                        let old = map.remove(&key);
                        if let Some(value) = &old {
                            ev(Raw::Remove {
                                key,
                                value: value.clone(),
                            });
                        }
                        removed.push(old);
                    }
                    encode(&removed)
                }
                MapCmd::UpdateIf { key, new, expected } => {
                    let hit = map.get(&key) == Some(&expected);
                    if hit {
                        map.insert(key.clone(), new.clone());
                        ev(Raw::Update {
                            key,
                            old: expected,
                            new,
                        });
                    }
                    encode(&hit)
                }
                MapCmd::RemoveIf { key, expected } => {
                    let hit = map.get(&key) == Some(&expected);
                    if hit {
                        map.remove(&key);
                        ev(Raw::Remove {
                            key,
                            value: expected,
                        });
                    }
                    encode(&hit)
                }
                MapCmd::Clear => {
                    map.clear();
                    ev(Raw::Clear);
                    encode(&())
                }
                MapCmd::Import(entries) => {
                    map.clear();
                    ev(Raw::Clear);
                    for (key, value) in entries {
                        map.insert(key.clone(), value.clone());
                        ev(Raw::Insert { key, value });
                    }
                    encode(&())
                }
            }
        };
        core.emit(events);
        response
    }
}

/// An event of a map, as applied on this peer (every peer sees the same events in the same order).
#[derive(Clone, Debug, PartialEq)]
pub enum MapEvent<K, V> {
    /// `key` was absent and now holds `value`.
    Insert {
        /// The key.
        key: K,
        /// Its value.
        value: V,
    },
    /// `key` held `old` and now holds `new`.
    Update {
        /// The key.
        key: K,
        /// The previous value.
        old: V,
        /// The new value.
        new: V,
    },
    /// `key`, holding `value`, was removed.
    Remove {
        /// The key.
        key: K,
        /// The value it held.
        value: V,
    },
    /// The map was cleared.
    Clear,
    /// The stream could not deliver some events (see [`ResyncReason`]): the map holds exactly
    /// `entries` now (in key order), and the events after this one continue from there.
    Resync {
        /// Every entry of the map.
        entries: Vec<(K, V)>,
        /// Why the events in between were skipped.
        reason: ResyncReason,
    },
    /// The handle (or its peer) was closed; no further events.
    Close,
}

pub(crate) fn decode_event<K: DeserializeOwned, V: DeserializeOwned>(
    raw: Raw,
) -> Result<MapEvent<K, V>, HamokError> {
    Ok(match raw {
        Raw::Insert { key, value } => MapEvent::Insert {
            key: decode(&key)?,
            value: decode(&value)?,
        },
        Raw::Update { key, old, new } => MapEvent::Update {
            key: decode(&key)?,
            old: decode(&old)?,
            new: decode(&new)?,
        },
        Raw::Remove { key, value } => MapEvent::Remove {
            key: decode(&key)?,
            value: decode(&value)?,
        },
        Raw::Clear | Raw::Empty | Raw::NotEmpty => MapEvent::Clear,
        Raw::Close => MapEvent::Close,
        Raw::Resync { state, reason } => MapEvent::Resync {
            entries: decode::<MapState>(&state)?
                .entries
                .iter()
                .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
                .collect::<Result<_, HamokError>>()?,
            reason,
        },
    })
}

/// A map's content as exported by [`HamokMap::export`]: encoded entries, serializable, to be given to
/// [`HamokMap::import`] (of this or another map with the same key and value types).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapSnapshot {
    /// Encoded (key, value) pairs in the map's order.
    pub entries: Vec<(Bytes, Bytes)>,
}

/// A replicated map of `K` to `V`. Cheap to clone; every clone (and every handle opened on the same id on
/// this peer) shares the same local state and events.
///
/// Writes go through the Raft log and resolve once applied on this peer (so this peer reads its own
/// writes). Reads without a suffix are local: this peer's applied state, fast, possibly behind the
/// leader; [`HamokMap::get_linearizable`] and [`HamokMap::sync`] give linearizable reads.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use hamok_collections::{register_kinds, HamokCollections};
/// use hamok_runtime::Hamok;
/// let hamok = register_kinds(Hamok::builder().cluster_id("doc-map")).build().await?;
/// hamok.join().await?;
/// let map = hamok.create_map::<String, u32>("scores").await?;
/// assert_eq!(map.set("ann".into(), 0).await?, None);
/// assert_eq!(map.insert("ann".into(), 7).await?, Some(0)); // 0 is a value like any other
/// assert!(map.update_if("ann".into(), 1, 0).await?);
/// assert!(!map.remove_if("ann".into(), 5).await?); // a mismatch is `false`, at once
/// assert_eq!(map.get(&"ann".into())?, Some(1));
/// hamok.close().await;
/// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
/// ```
pub struct HamokMap<K, V> {
    handle: Handle<MapState, ()>,
    _types: Types<(K, V)>,
}

impl<K, V> Clone for HamokMap<K, V> {
    fn clone(&self) -> Self {
        HamokMap {
            handle: self.handle.clone(),
            _types: Types::default(),
        }
    }
}

impl<K, V> std::fmt::Debug for HamokMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokMap")
            .field("id", &self.handle.local.id)
            .field("len", &self.len())
            .finish()
    }
}

fn pairs<K: Serialize, V: Serialize>(
    entries: impl IntoIterator<Item = (K, V)>,
) -> Result<PerKey<(Bytes, Bytes)>, HamokError> {
    entries
        .into_iter()
        .map(|(k, v)| Ok((encode(&k)?, encode(&v)?)))
        .collect()
}

plain_opened!(HamokMap<K, V>, MapLogic, MAP_KIND);
handle_basics!(HamokMap<K, V>);

impl<K, V> HamokMap<K, V> {
    /// Number of entries (local).
    pub fn len(&self) -> usize {
        self.handle.local.read(|s| s.entries.len())
    }

    /// Whether the map is empty (local).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Subscribes to the map's events on this peer. Events come in log order. The stream never skips
    /// silently: after a [`MapEvent::Resync`] its `entries` are the whole map at that point of the log,
    /// and the events that follow continue from exactly that state (replaying `Resync`, then the
    /// events, reproduces the map).
    pub fn events(&self) -> Events<MapEvent<K, V>>
    where
        K: DeserializeOwned,
        V: DeserializeOwned,
    {
        self.handle.events(decode_event::<K, V>)
    }

    /// Closes this peer's handles of the map: their calls fail with [`HamokError::Closed`] and their
    /// subscribers get [`MapEvent::Close`]. The replicated map is untouched.
    pub fn close(&self) {
        self.handle.local.close();
    }

    /// Whether the handles were closed (by [`HamokMap::close`] or by closing the peer).
    pub fn is_closed(&self) -> bool {
        self.handle.local.is_closed()
    }

    /// Waits until this peer has applied every write acknowledged (anywhere) before the call, so the
    /// local reads that follow are linearizable.
    pub async fn sync(&self) -> Result<(), HamokError> {
        self.handle.sync().await
    }

    /// The content, encoded, as a [`MapSnapshot`] (local).
    pub fn export(&self) -> MapSnapshot {
        MapSnapshot {
            entries: self.handle.local.read(|s| {
                s.entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }),
        }
    }

    /// Replaces the whole content with `snapshot`, atomically, through the log (emits `Clear` then an
    /// `Insert` per entry).
    pub async fn import(&self, snapshot: MapSnapshot) -> Result<(), HamokError> {
        self.handle.submit(MapCmd::Import(snapshot.entries)).await
    }

    /// Removes every entry.
    pub async fn clear(&self) -> Result<(), HamokError> {
        self.handle.submit(MapCmd::Clear).await
    }
}

impl<K, V> HamokMap<K, V>
where
    K: Serialize + DeserializeOwned,
    V: Serialize + DeserializeOwned,
{
    pub(crate) fn new(handle: Handle<MapState, ()>) -> Self {
        HamokMap {
            handle,
            _types: Types::default(),
        }
    }

    /// Sets `key` to `value`; returns the previous value.
    pub async fn set(&self, key: K, value: V) -> Result<Option<V>, HamokError> {
        let olds: Vec<Option<Bytes>> = self
            .handle
            .submit(MapCmd::Set(smallvec![(encode(&key)?, encode(&value)?)]))
            .await?;
        first_value(olds)
    }

    /// Sets every entry, atomically (one log entry); returns the entries that had a previous value,
    /// with that value.
    pub async fn set_all(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let entries = pairs(entries)?;
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        let olds: Vec<Option<Bytes>> = self.handle.submit(MapCmd::Set(entries)).await?;
        zip_some(keys, olds)
    }

    /// Sets `key` to `value` only if `key` is absent; returns the existing value if there was one (and
    /// then nothing changed).
    pub async fn insert(&self, key: K, value: V) -> Result<Option<V>, HamokError> {
        let existing: Vec<Option<Bytes>> = self
            .handle
            .submit(MapCmd::Insert(smallvec![(encode(&key)?, encode(&value)?)]))
            .await?;
        first_value(existing)
    }

    /// [`HamokMap::insert`] for every entry, atomically; returns the entries that already existed (not
    /// inserted), with their existing values.
    pub async fn insert_all(
        &self,
        entries: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let entries = pairs(entries)?;
        let keys: Vec<Bytes> = entries.iter().map(|(k, _)| k.clone()).collect();
        let existing: Vec<Option<Bytes>> = self.handle.submit(MapCmd::Insert(entries)).await?;
        zip_some(keys, existing)
    }

    /// Deletes `key`; returns whether it existed.
    pub async fn delete(&self, key: K) -> Result<bool, HamokError> {
        let deleted: Vec<bool> = self
            .handle
            .submit(MapCmd::Delete(smallvec![encode(&key)?]))
            .await?;
        Ok(deleted.first().copied().unwrap_or(false))
    }

    /// Deletes every key, atomically; returns the keys that existed.
    pub async fn delete_all(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<K>, HamokError> {
        let keys: Vec<Bytes> = keys
            .into_iter()
            .map(|k| encode(&k))
            .collect::<Result<_, _>>()?;
        let deleted: Vec<bool> = self
            .handle
            .submit(MapCmd::Delete(keys.clone().into()))
            .await?;
        keys.iter()
            .zip(deleted)
            .filter(|(_, d)| *d)
            .map(|(k, _)| decode(k))
            .collect()
    }

    /// Removes `key`; returns the value it held.
    pub async fn remove(&self, key: K) -> Result<Option<V>, HamokError> {
        let removed: Vec<Option<Bytes>> = self
            .handle
            .submit(MapCmd::Remove(smallvec![encode(&key)?]))
            .await?;
        first_value(removed)
    }

    /// Removes every key, atomically; returns the removed entries.
    pub async fn remove_all(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<(K, V)>, HamokError> {
        let keys: Vec<Bytes> = keys
            .into_iter()
            .map(|k| encode(&k))
            .collect::<Result<_, _>>()?;
        let removed: Vec<Option<Bytes>> = self
            .handle
            .submit(MapCmd::Remove(keys.clone().into()))
            .await?;
        zip_some(keys, removed)
    }

    /// Sets `key` to `new` only if it currently holds `expected` (compared as encoded bytes when the
    /// command applies). Returns whether it did; a mismatch (or an absent key) is `false`.
    pub async fn update_if(&self, key: K, new: V, expected: V) -> Result<bool, HamokError> {
        self.handle
            .submit(MapCmd::UpdateIf {
                key: encode(&key)?,
                new: encode(&new)?,
                expected: encode(&expected)?,
            })
            .await
    }

    /// Removes `key` only if it currently holds `expected`. Returns whether it did; a mismatch is
    /// `false` (the reference library timed out instead).
    pub async fn remove_if(&self, key: K, expected: V) -> Result<bool, HamokError> {
        self.handle
            .submit(MapCmd::RemoveIf {
                key: encode(&key)?,
                expected: encode(&expected)?,
            })
            .await
    }

    /// The value of `key` on this peer (local read).
    pub fn get(&self, key: &K) -> Result<Option<V>, HamokError> {
        let k = encode(key)?;
        match self.handle.local.read(|s| s.entries.get(&k).cloned()) {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The value of `key` as of a linearizable read: it reflects every write acknowledged anywhere
    /// before the call.
    pub async fn get_linearizable(&self, key: &K) -> Result<Option<V>, HamokError> {
        self.handle.sync().await?;
        self.get(key)
    }

    /// Whether `key` is present (local).
    pub fn contains_key(&self, key: &K) -> Result<bool, HamokError> {
        let k = encode(key)?;
        Ok(self.handle.local.read(|s| s.entries.contains_key(&k)))
    }

    /// The entries of the present keys among `keys` (local).
    pub fn get_all<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a K>,
    ) -> Result<Vec<(K, V)>, HamokError>
    where
        K: 'a,
    {
        let keys: Vec<Bytes> = keys
            .into_iter()
            .map(|k| encode(k))
            .collect::<Result<_, _>>()?;
        let found: Vec<(Bytes, Bytes)> = self.handle.local.read(|s| {
            keys.into_iter()
                .filter_map(|k| s.entries.get(&k).map(|v| (k.clone(), v.clone())))
                .collect()
        });
        found
            .into_iter()
            .map(|(k, v)| Ok((decode(&k)?, decode(&v)?)))
            .collect()
    }

    /// Every key (local), in the map's order (by encoded bytes).
    pub fn keys(&self) -> Result<Vec<K>, HamokError> {
        let keys: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.entries.keys().cloned().collect());
        keys.iter().map(|k| decode(k)).collect()
    }

    /// Every value (local), in the map's order.
    pub fn values(&self) -> Result<Vec<V>, HamokError> {
        let values: Vec<Bytes> = self
            .handle
            .local
            .read(|s| s.entries.values().cloned().collect());
        values.iter().map(|v| decode(v)).collect()
    }

    /// Every entry (local), in the map's order.
    pub fn entries(&self) -> Result<Vec<(K, V)>, HamokError> {
        let raw = self.export().entries;
        raw.iter()
            .map(|(k, v)| Ok((decode(k)?, decode(v)?)))
            .collect()
    }

    /// Iterates over a copy of the entries taken now (local); entries that fail to decode are skipped.
    pub fn iter(&self) -> impl Iterator<Item = (K, V)> {
        self.export()
            .entries
            .into_iter()
            .filter_map(|(k, v)| Some((decode(&k).ok()?, decode(&v).ok()?)))
    }
}

fn first_value<V: DeserializeOwned>(values: Vec<Option<Bytes>>) -> Result<Option<V>, HamokError> {
    match values.into_iter().next().flatten() {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}

fn zip_some<K: DeserializeOwned, V: DeserializeOwned>(
    keys: Vec<Bytes>,
    values: Vec<Option<Bytes>>,
) -> Result<Vec<(K, V)>, HamokError> {
    keys.iter()
        .zip(values)
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .map(|(k, v)| Ok((decode(k)?, decode(&v)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands and responses held inline encode and decode as the `Vec`s earlier builds wrote: logs,
    /// snapshots (they cache responses) and peers of either build read each other's.
    #[test]
    fn per_key_parts_are_encoded_as_vecs() {
        for n in [0usize, 1, 3] {
            let entries: Vec<(Bytes, Bytes)> = (0..n)
                .map(|i| (encode(&i).unwrap(), encode(&format!("v{i}")).unwrap()))
                .collect();
            let olds: Vec<Option<Bytes>> = (0..n).map(|i| (i % 2 == 0).then(Bytes::new)).collect();
            let inline = PerKey::from_vec(entries.clone());
            assert_eq!(encode(&inline).unwrap(), encode(&entries).unwrap(), "{n}");
            assert_eq!(
                encode(&PerKey::from_vec(olds.clone())).unwrap(),
                encode(&olds).unwrap(),
                "{n}"
            );
            let Ok(MapCmd::Set(back)) =
                decode::<MapCmd>(&encode(&MapCmd::Set(inline.clone())).unwrap())
            else {
                panic!("{n}: a set");
            };
            assert_eq!(back, inline, "{n}");
        }
    }

    /// What a decoded command reserves is bounded, not taken from the length its encoding claims: an
    /// array claiming 2⁴⁰ elements that holds two decodes to two, with room for at most
    /// `MAX_RESERVED_PER_KEY` (smallvec's own decoding would reserve a terabyte).
    #[test]
    fn a_claimed_length_is_not_trusted() {
        struct Claims(u64);
        impl<'de> serde::de::SeqAccess<'de> for Claims {
            type Error = serde::de::value::Error;
            fn next_element_seed<T: serde::de::DeserializeSeed<'de>>(
                &mut self,
                seed: T,
            ) -> Result<Option<T::Value>, Self::Error> {
                if self.0 == 0 {
                    return Ok(None);
                }
                self.0 -= 1;
                seed.deserialize(serde::de::value::BoolDeserializer::new(true))
                    .map(Some)
            }
            fn size_hint(&self) -> Option<usize> {
                Some(1 << 40)
            }
        }
        struct Lying;
        impl<'de> serde::Deserializer<'de> for Lying {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: serde::de::Visitor<'de>>(
                self,
                visitor: V,
            ) -> Result<V::Value, Self::Error> {
                visitor.visit_seq(Claims(2))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map struct
                enum identifier ignored_any
            }
        }
        let decoded: PerKey<bool> = per_key(Lying).unwrap();
        assert_eq!(decoded.as_slice(), [true, true]);
        assert!(decoded.capacity() <= MAX_RESERVED_PER_KEY);
        // And a real command cut short after such a claim is refused.
        let mut bytes = encode(&MapCmd::Delete(smallvec![Bytes::from_static(b"k")]))
            .unwrap()
            .to_vec();
        let header = bytes.iter().rposition(|b| *b == 0x91).expect("fixarray(1)");
        bytes.splice(header..=header, [0xdd, 0x05, 0xf5, 0xe1, 0x00]);
        assert!(decode::<MapCmd>(&bytes).is_err());
    }
}
