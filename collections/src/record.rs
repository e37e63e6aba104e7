//! [`HamokRecord`]: a replicated struct, field by field.
//!
//! # Design: a struct as a map of its fields, with typed field descriptors
//!
//! `T` is any struct that serializes as a map (`#[derive(Serialize, Deserialize)]` on a struct with
//! named fields does). The record stores one encoded value per field name, so fields are set, inserted,
//! compared and deleted independently and every change is a per-field event, like the reference's
//! record. A field is named by a [`Field<T, F>`]: a `const` descriptor carrying the field's name and type,
//! so `record.set(NAME, &"x".to_string())` is type-checked against `F` and no derive macro is needed:
//!
//! ```
//! use hamok_collections::Field;
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Config { name: String, replicas: u32 }
//! const NAME: Field<Config, String> = Field::new("name");
//! const REPLICAS: Field<Config, u32> = Field::new("replicas");
//! ```
//!
//! The whole struct is rebuilt on demand ([`HamokRecord::instance`]) by deserializing the map of stored
//! fields; a struct with fields missing from the record decodes only if they have serde defaults.
//! Why not a derive: it would add a proc-macro crate to keep in step with serde, while the descriptor
//! costs one line per field and keeps every serde attribute (renames, defaults) working — the name in
//! the descriptor is the serialized name. Field values are encoded as MessagePack with field names
//! (`to_vec_named`), so a field holding a nested struct compares equal whether it came from
//! [`HamokRecord::set`] or from [`HamokRecord::insert_instance`].
//!
//! Multi-field conditions ([`HamokRecord::update_instance_if`]) and multi-field writes take a
//! [`Patch<T>`]: a set of fields with values, or marked absent.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use bytes::Bytes;
use hamok_runtime::state_machine::ApplyContext;
use hamok_runtime::HamokError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::common::{
    build_map, decode, encode, handle_basics, split_map, write_lock, Events, Handle, LogicHandle,
    Opened, Raw, ResyncReason,
};
use crate::machine::{Core, Logic, Machine};

/// The kind a record is registered under.
pub const RECORD_KIND: &str = "hamok.record";

fn encode_field<F: Serialize + ?Sized>(value: &F) -> Result<Bytes, HamokError> {
    Ok(Bytes::from(rmp_serde::to_vec_named(value)?))
}

/// A typed field of `T`: its serialized name and its type `F`.
pub struct Field<T, F> {
    name: &'static str,
    _types: PhantomData<fn() -> (T, F)>,
}

impl<T, F> Field<T, F> {
    /// The field named `name` (as serialized: mind `#[serde(rename)]`).
    pub const fn new(name: &'static str) -> Self {
        Field {
            name,
            _types: PhantomData,
        }
    }

    /// The field's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<T, F> Clone for Field<T, F> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, F> Copy for Field<T, F> {}

impl<T, F> std::fmt::Debug for Field<T, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Field({})", self.name)
    }
}

/// Some fields of `T`, each with a value or marked absent: the new values of a multi-field write (absent
/// = delete the field) or the expected values of a multi-field condition (absent = must be absent).
pub struct Patch<T> {
    fields: BTreeMap<String, Option<Bytes>>,
    error: Option<HamokError>,
    _types: PhantomData<fn() -> T>,
}

impl<T> Default for Patch<T> {
    fn default() -> Self {
        Patch {
            fields: BTreeMap::new(),
            error: None,
            _types: PhantomData,
        }
    }
}

impl<T> Clone for Patch<T> {
    fn clone(&self) -> Self {
        Patch {
            fields: self.fields.clone(),
            error: self.error.clone(),
            _types: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Patch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patch")
            .field("fields", &self.fields.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<T> Patch<T> {
    /// No fields.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `field` with `value`.
    pub fn with<F: Serialize>(mut self, field: Field<T, F>, value: &F) -> Self {
        match encode_field(value) {
            Ok(v) => {
                self.fields.insert(field.name.to_string(), Some(v));
            }
            Err(e) => self.error = Some(e),
        }
        self
    }

    /// Adds `field` marked absent.
    pub fn without<F>(mut self, field: Field<T, F>) -> Self {
        self.fields.insert(field.name.to_string(), None);
        self
    }

    /// Every field of `instance`.
    pub fn from_instance(instance: &T) -> Result<Self, HamokError>
    where
        T: Serialize,
    {
        let bytes = rmp_serde::to_vec_named(instance)?;
        Ok(Patch {
            fields: split_map(&bytes)?
                .into_iter()
                .map(|(k, v)| (k, Some(v)))
                .collect(),
            error: None,
            _types: PhantomData,
        })
    }

    /// The value of `field` in the patch: `None` if it is not in the patch or marked absent.
    pub fn get<F: DeserializeOwned>(&self, field: Field<T, F>) -> Result<Option<F>, HamokError> {
        match self.fields.get(field.name) {
            Some(Some(v)) => Ok(Some(decode(v)?)),
            _ => Ok(None),
        }
    }

    /// Whether `field` is in the patch (with a value or marked absent).
    pub fn contains<F>(&self, field: Field<T, F>) -> bool {
        self.fields.contains_key(field.name)
    }

    /// The names of the fields in the patch.
    pub fn field_names(&self) -> impl Iterator<Item = &str> {
        self.fields.keys().map(String::as_str)
    }

    /// Number of fields in the patch.
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    /// Whether the patch has no fields.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// Builds a `T` from the fields with a value (fields missing from the patch need serde defaults).
    pub fn to_instance(&self) -> Result<T, HamokError>
    where
        T: DeserializeOwned,
    {
        let present: Vec<(&str, &[u8])> = self
            .fields
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.as_str(), &v[..])))
            .collect();
        decode(&build_map(present.into_iter()))
    }

    fn into_parts(self) -> Result<Vec<(String, Option<Bytes>)>, HamokError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.fields.into_iter().collect()),
        }
    }
}

/// The replicated content of a record.
#[derive(Default, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct RecordState {
    fields: BTreeMap<String, Bytes>,
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RecordCmd {
    /// Set (`Some`) or delete (`None`) each field; answers the previous values.
    Set(Vec<(String, Option<Bytes>)>),
    /// Set each absent field; answers the existing values (`None` = inserted).
    Insert(Vec<(String, Bytes)>),
    /// Apply `new` (as `Set`) if every field of `expected` matches; answers whether it did.
    UpdateIf {
        new: Vec<(String, Option<Bytes>)>,
        expected: Vec<(String, Option<Bytes>)>,
    },
    Clear,
}

/// What is particular to a record's state machine ([`Machine`]`<RecordLogic>`).
#[derive(Default)]
pub(crate) struct RecordLogic;

/// The state machine of a record.
pub(crate) type RecordMachine = Machine<RecordLogic>;

fn set_fields(
    fields: &mut BTreeMap<String, Bytes>,
    new: Vec<(String, Option<Bytes>)>,
    events: &mut Option<Vec<Raw>>,
) -> Vec<Option<Bytes>> {
    let mut olds = Vec::with_capacity(new.len());
    for (name, value) in new {
        let key = Bytes::from(name.clone().into_bytes());
        let old = match value {
            Some(value) => {
                let old = fields.insert(name, value.clone());
                if let Some(ev) = events {
                    ev.push(match &old {
                        Some(old) => Raw::Update {
                            key,
                            old: old.clone(),
                            new: value,
                        },
                        None => Raw::Insert { key, value },
                    });
                }
                old
            }
            None => {
                let old = fields.remove(&name);
                if let (Some(ev), Some(value)) = (events.as_mut(), &old) {
                    ev.push(Raw::Remove {
                        key,
                        value: value.clone(),
                    });
                }
                old
            }
        };
        olds.push(old);
    }
    olds
}

impl Logic for RecordLogic {
    type State = RecordState;
    type Extra = ();
    type Command = RecordCmd;

    fn kind(&self) -> &str {
        RECORD_KIND
    }

    fn exec(
        &self,
        core: &Core<RecordState, ()>,
        _ctx: &ApplyContext,
        cmd: RecordCmd,
    ) -> Result<Bytes, HamokError> {
        let mut events = core.listening().then(Vec::new);
        let response = {
            let mut state = write_lock(&core.state);
            let fields = &mut state.fields;
            match cmd {
                RecordCmd::Set(new) => encode(&set_fields(fields, new, &mut events)),
                RecordCmd::Insert(new) => {
                    let mut existing = Vec::with_capacity(new.len());
                    let mut to_set = Vec::new();
                    for (name, value) in new {
                        match fields.get(&name) {
                            Some(v) => existing.push(Some(v.clone())),
                            None if to_set.iter().any(|(n, _)| *n == name) => {
                                existing.push(None) // a duplicate name in one batch: first wins
                            }
                            None => {
                                existing.push(None);
                                to_set.push((name, Some(value)));
                            }
                        }
                    }
                    set_fields(fields, to_set, &mut events);
                    encode(&existing)
                }
                RecordCmd::UpdateIf { new, expected } => {
                    let hit = expected
                        .iter()
                        .all(|(name, value)| fields.get(name) == value.as_ref());
                    if hit {
                        set_fields(fields, new, &mut events);
                    }
                    encode(&hit)
                }
                RecordCmd::Clear => {
                    fields.clear();
                    if let Some(ev) = events.as_mut() {
                        ev.push(Raw::Clear);
                    }
                    encode(&())
                }
            }
        };
        core.emit(events.unwrap_or_default());
        response
    }
}

/// The encoded value of a field in a [`RecordEvent`]; decode it with the field's type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldValue(Bytes);

impl FieldValue {
    /// Decodes the value as `F`.
    pub fn decode<F: DeserializeOwned>(&self) -> Result<F, HamokError> {
        decode(&self.0)
    }

    /// Decodes the value as the type of `field`.
    pub fn get<T, F: DeserializeOwned>(&self, _field: Field<T, F>) -> Result<F, HamokError> {
        decode(&self.0)
    }
}

/// A per-field event of a record on this peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordEvent {
    /// `field` was absent and now holds `value`.
    Insert {
        /// The field's name.
        field: String,
        /// Its value.
        value: FieldValue,
    },
    /// `field` held `old` and now holds `new`.
    Update {
        /// The field's name.
        field: String,
        /// The previous value.
        old: FieldValue,
        /// The new value.
        new: FieldValue,
    },
    /// `field`, holding `value`, was deleted.
    Remove {
        /// The field's name.
        field: String,
        /// The value it held.
        value: FieldValue,
    },
    /// Every field was deleted.
    Clear,
    /// The stream could not deliver some events (see [`ResyncReason`]): the record holds exactly
    /// `fields` now (by name; absent fields are not set), and the events after this one continue from
    /// there.
    Resync {
        /// Every set field: its name and value.
        fields: Vec<(String, FieldValue)>,
        /// Why the events in between were skipped.
        reason: ResyncReason,
    },
    /// The handle (or its peer) was closed.
    Close,
}

impl RecordEvent {
    /// The field the event is about (`None` for `Clear`, `Resync` and `Close`).
    pub fn field(&self) -> Option<&str> {
        match self {
            RecordEvent::Insert { field, .. }
            | RecordEvent::Update { field, .. }
            | RecordEvent::Remove { field, .. } => Some(field),
            RecordEvent::Clear | RecordEvent::Resync { .. } | RecordEvent::Close => None,
        }
    }
}

fn field_name(key: &[u8]) -> Result<String, HamokError> {
    String::from_utf8(key.to_vec()).map_err(|_| HamokError::codec("field name not UTF-8", None))
}

fn decode_event(raw: Raw) -> Result<RecordEvent, HamokError> {
    Ok(match raw {
        Raw::Insert { key, value } => RecordEvent::Insert {
            field: field_name(&key)?,
            value: FieldValue(value),
        },
        Raw::Update { key, old, new } => RecordEvent::Update {
            field: field_name(&key)?,
            old: FieldValue(old),
            new: FieldValue(new),
        },
        Raw::Remove { key, value } => RecordEvent::Remove {
            field: field_name(&key)?,
            value: FieldValue(value),
        },
        Raw::Clear | Raw::Empty | Raw::NotEmpty => RecordEvent::Clear,
        Raw::Close => RecordEvent::Close,
        Raw::Resync { state, reason } => RecordEvent::Resync {
            fields: decode::<RecordState>(&state)?
                .fields
                .into_iter()
                .map(|(name, value)| (name, FieldValue(value)))
                .collect(),
            reason,
        },
    })
}

/// A replicated `T`, field by field. Cheap to clone. Writes go through the log; reads are local.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use hamok_collections::{register_kinds, Field, HamokCollections, Patch};
/// use hamok_runtime::Hamok;
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct Job { state: String, owner: Option<String> }
/// const STATE: Field<Job, String> = Field::new("state");
/// const OWNER: Field<Job, Option<String>> = Field::new("owner");
///
/// let hamok = register_kinds(Hamok::builder().cluster_id("doc-record")).build().await?;
/// hamok.join().await?;
/// let job = hamok.create_record::<Job>("job-1").await?;
/// job.insert_instance(&Job { state: "pending".into(), owner: None }).await?;
/// // Claim the job only if it is still pending and unowned: both fields are checked at apply time.
/// let claimed = job
///     .update_instance_if(
///         Patch::new().with(STATE, &"running".into()).with(OWNER, &Some("me".into())),
///         Patch::new().with(STATE, &"pending".into()).with(OWNER, &None),
///     )
///     .await?;
/// assert!(claimed);
/// assert_eq!(job.get(OWNER)?, Some(Some("me".to_string())));
/// assert_eq!(job.instance()?, Job { state: "running".into(), owner: Some("me".into()) });
/// hamok.close().await;
/// # Ok::<(), hamok_runtime::HamokError>(()) }).unwrap();
/// ```
pub struct HamokRecord<T> {
    handle: Handle<RecordState, ()>,
    initial: Option<Arc<T>>,
}

impl<T> Clone for HamokRecord<T> {
    fn clone(&self) -> Self {
        HamokRecord {
            handle: self.handle.clone(),
            initial: self.initial.clone(),
        }
    }
}

impl<T> std::fmt::Debug for HamokRecord<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HamokRecord")
            .field("id", &self.handle.local.id)
            .finish()
    }
}

impl<T> Opened for HamokRecord<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Logic = RecordLogic;
    /// The initial object (`get_or_create_record_with`).
    type Options = Option<T>;

    fn kind(_id: &str) -> String {
        RECORD_KIND.to_string()
    }

    fn extra(_id: &str) {}

    async fn finish(
        handle: LogicHandle<RecordLogic>,
        initial: Option<T>,
    ) -> Result<Self, HamokError> {
        let record = HamokRecord::new(handle, initial);
        if let Some(initial) = record.initial_object() {
            record.insert_instance(initial).await?;
        }
        Ok(record)
    }
}

handle_basics!(HamokRecord<T>);

impl<T> HamokRecord<T> {
    /// The initial object this handle was opened with (inserted, field by field where absent, when the
    /// handle was opened; see [`HamokCollections::get_or_create_record_with`](crate::HamokCollections)).
    pub fn initial_object(&self) -> Option<&T> {
        self.initial.as_deref()
    }

    /// Deletes every field.
    pub async fn clear(&self) -> Result<(), HamokError> {
        self.handle.submit(RecordCmd::Clear).await
    }

    /// Number of fields present (local).
    pub fn len(&self) -> usize {
        self.handle.local.read(|s| s.fields.len())
    }

    /// Whether no field is present (local).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The names of the fields present (local).
    pub fn field_names(&self) -> Vec<String> {
        self.handle
            .local
            .read(|s| s.fields.keys().cloned().collect())
    }

    /// Waits until local reads reflect every write acknowledged before the call.
    pub async fn sync(&self) -> Result<(), HamokError> {
        self.handle.sync().await
    }

    /// Subscribes to the record's per-field events on this peer. Events come in log order. The stream
    /// never skips silently: after a [`RecordEvent::Resync`] its `fields` are the whole record at that
    /// point of the log, and the events that follow continue from exactly that state (replaying
    /// `Resync`, then the events, reproduces the record).
    pub fn events(&self) -> Events<RecordEvent> {
        self.handle.events(decode_event)
    }

    /// Closes this peer's handles (subscribers get [`RecordEvent::Close`]).
    pub fn close(&self) {
        self.handle.local.close();
    }

    /// The fields present, as a patch (local).
    pub fn patch(&self) -> Patch<T> {
        Patch {
            fields: self.handle.local.read(|s| {
                s.fields
                    .iter()
                    .map(|(k, v)| (k.clone(), Some(v.clone())))
                    .collect()
            }),
            error: None,
            _types: PhantomData,
        }
    }
}

impl<T: Serialize + DeserializeOwned> HamokRecord<T> {
    pub(crate) fn new(handle: Handle<RecordState, ()>, initial: Option<T>) -> Self {
        HamokRecord {
            handle,
            initial: initial.map(Arc::new),
        }
    }

    /// Sets `field` to `value`; returns the previous value.
    pub async fn set<F: Serialize + DeserializeOwned>(
        &self,
        field: Field<T, F>,
        value: &F,
    ) -> Result<Option<F>, HamokError> {
        let olds: Vec<Option<Bytes>> = self
            .handle
            .submit(RecordCmd::Set(vec![(
                field.name.to_string(),
                Some(encode_field(value)?),
            )]))
            .await?;
        first(olds)
    }

    /// Sets every field of `instance` (fields of the record that `instance` does not serialize stay).
    pub async fn set_instance(&self, instance: &T) -> Result<(), HamokError> {
        let patch = Patch::from_instance(instance)?;
        let _: Vec<Option<Bytes>> = self
            .handle
            .submit(RecordCmd::Set(patch.into_parts()?))
            .await?;
        Ok(())
    }

    /// Applies `patch`: fields with a value are set, fields marked absent are deleted, atomically.
    pub async fn apply_patch(&self, patch: Patch<T>) -> Result<(), HamokError> {
        let _: Vec<Option<Bytes>> = self
            .handle
            .submit(RecordCmd::Set(patch.into_parts()?))
            .await?;
        Ok(())
    }

    /// Sets `field` to `value` only if it is absent; returns the existing value if there was one.
    pub async fn insert<F: Serialize + DeserializeOwned>(
        &self,
        field: Field<T, F>,
        value: &F,
    ) -> Result<Option<F>, HamokError> {
        let existing: Vec<Option<Bytes>> = self
            .handle
            .submit(RecordCmd::Insert(vec![(
                field.name.to_string(),
                encode_field(value)?,
            )]))
            .await?;
        first(existing)
    }

    /// Inserts every field of `instance` that is absent, atomically; returns the fields that already
    /// existed, with their existing values (an empty patch when every field was inserted).
    pub async fn insert_instance(&self, instance: &T) -> Result<Patch<T>, HamokError> {
        let fields: Vec<(String, Bytes)> = Patch::from_instance(instance)?
            .into_parts()?
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect();
        let names: Vec<String> = fields.iter().map(|(k, _)| k.clone()).collect();
        let existing: Vec<Option<Bytes>> = self.handle.submit(RecordCmd::Insert(fields)).await?;
        Ok(Patch {
            fields: names
                .into_iter()
                .zip(existing)
                .filter_map(|(k, v)| v.map(|v| (k, Some(v))))
                .collect(),
            error: None,
            _types: PhantomData,
        })
    }

    /// Sets `field` to `new` only if it currently holds `expected`; returns whether it did.
    pub async fn update_if<F: Serialize>(
        &self,
        field: Field<T, F>,
        new: &F,
        expected: &F,
    ) -> Result<bool, HamokError> {
        self.update_instance_if(
            Patch::new().with(field, new),
            Patch::new().with(field, expected),
        )
        .await
    }

    /// Applies `new` (set the fields with a value, delete those marked absent) only if every field of
    /// `expected` currently matches (equal value, or absent when marked absent), atomically at apply time.
    /// Fields not in `expected` are not checked. Returns whether it applied.
    pub async fn update_instance_if(
        &self,
        new: Patch<T>,
        expected: Patch<T>,
    ) -> Result<bool, HamokError> {
        self.handle
            .submit(RecordCmd::UpdateIf {
                new: new.into_parts()?,
                expected: expected.into_parts()?,
            })
            .await
    }

    /// Deletes `field`; returns whether it was present.
    pub async fn delete<F>(&self, field: Field<T, F>) -> Result<bool, HamokError> {
        let olds: Vec<Option<Bytes>> = self
            .handle
            .submit(RecordCmd::Set(vec![(field.name.to_string(), None)]))
            .await?;
        Ok(olds.into_iter().next().flatten().is_some())
    }

    /// The value of `field` (local).
    pub fn get<F: DeserializeOwned>(&self, field: Field<T, F>) -> Result<Option<F>, HamokError> {
        match self
            .handle
            .local
            .read(|s| s.fields.get(field.name).cloned())
        {
            Some(v) => Ok(Some(decode(&v)?)),
            None => Ok(None),
        }
    }

    /// The whole `T` from the fields present (local). Fails with [`HamokError::Codec`] if a field `T`
    /// requires is absent (give it a serde default to make it optional).
    pub fn instance(&self) -> Result<T, HamokError> {
        self.patch().to_instance()
    }

    /// [`HamokRecord::instance`] after a linearizable read barrier.
    pub async fn instance_linearizable(&self) -> Result<T, HamokError> {
        self.handle.sync().await?;
        self.instance()
    }
}

fn first<F: DeserializeOwned>(values: Vec<Option<Bytes>>) -> Result<Option<F>, HamokError> {
    match values.into_iter().next().flatten() {
        Some(v) => Ok(Some(decode(&v)?)),
        None => Ok(None),
    }
}
