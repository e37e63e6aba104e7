//! The replicated state machine of the simulation: a tiny key-value store with Put and compare-and-set,
//! plus a running hash chain over every applied entry so that two replicas at the same applied index can be
//! compared in O(1), and a window of recently applied operations that makes snapshots span several chunks.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::raft::{Entry, EntryPayload, LogIndex, Membership, Snapshot, Term};

use super::util::{fnv64, mix64};

/// Number of keys the workload uses.
pub const KEYS: u8 = 4;
/// How many recently applied operation ids a replica keeps (and serializes into snapshots).
const RECENT: usize = 48;
const MAGIC: u32 = 0x4B56_5331; // "KVS1"

pub type Value = u64;

/// A client command as carried in a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Sets `key` to `value` (values are unique per run: the op id).
    Put { op: u64, key: u8, value: Value },
    /// Sets `key` to `new` if it currently holds `expected`.
    Cas {
        op: u64,
        key: u8,
        expected: Option<Value>,
        new: Value,
    },
}

impl Command {
    pub fn op(&self) -> u64 {
        match self {
            Command::Put { op, .. } | Command::Cas { op, .. } => *op,
        }
    }

    /// Encodes the command, followed by `pad` filler bytes (to vary entry sizes).
    pub fn encode(&self, pad: usize) -> Bytes {
        let mut out = Vec::with_capacity(28 + pad);
        match self {
            Command::Put { op, key, value } => {
                out.push(1);
                out.push(*key);
                out.extend_from_slice(&op.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
                out.push(0);
                out.extend_from_slice(&0u64.to_le_bytes());
            }
            Command::Cas {
                op,
                key,
                expected,
                new,
            } => {
                out.push(2);
                out.push(*key);
                out.extend_from_slice(&op.to_le_bytes());
                out.extend_from_slice(&new.to_le_bytes());
                out.push(u8::from(expected.is_some()));
                out.extend_from_slice(&expected.unwrap_or(0).to_le_bytes());
            }
        }
        let pad = pad.min(255);
        out.push(pad as u8);
        out.extend(std::iter::repeat_n(0xA5u8, pad));
        Bytes::from(out)
    }

    pub fn decode(b: &[u8]) -> Result<Command, String> {
        if b.len() < 28 {
            return Err(format!("command too short: {} bytes", b.len()));
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let (tag, key, op, value, has_exp, exp) = (b[0], b[1], u(2), u(10), b[18], u(19));
        let pad = b[27] as usize;
        if b.len() != 28 + pad {
            return Err(format!(
                "command length {} does not match its padding {pad}",
                b.len()
            ));
        }
        match tag {
            1 => Ok(Command::Put { op, key, value }),
            2 => Ok(Command::Cas {
                op,
                key,
                expected: (has_exp == 1).then_some(exp),
                new: value,
            }),
            t => Err(format!("unknown command tag {t}")),
        }
    }
}

/// What applying one command did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyResult {
    pub op: u64,
    /// For a compare-and-set: whether it took effect.
    pub cas_ok: Option<bool>,
}

/// A digest of an entry's payload.
pub fn payload_digest(p: &EntryPayload) -> u64 {
    match p {
        EntryPayload::Noop => mix64(0x4E4F_4F50),
        EntryPayload::Command(b) => fnv64(b) ^ 0x1111,
        EntryPayload::Membership(m) => membership_digest(m),
    }
}

pub fn membership_digest(m: &Membership) -> u64 {
    let mut s = String::from("V:");
    for v in &m.voters {
        s.push_str(v.as_str());
        s.push(',');
    }
    s.push_str("L:");
    for l in &m.learners {
        s.push_str(l.as_str());
        s.push(',');
    }
    fnv64(s.as_bytes()) ^ 0x2222
}

/// One replica of the key-value store.
#[derive(Clone, Debug)]
pub struct Kv {
    pub map: BTreeMap<u8, Value>,
    recent: VecDeque<u64>,
    /// Hash chain over every applied entry (index, term, payload).
    pub chain: u64,
    pub applied: LogIndex,
    pub applied_term: Term,
    /// The configuration of the last applied membership entry (or of the snapshot).
    pub membership: Membership,
}

impl Kv {
    pub fn empty(membership: Membership) -> Kv {
        Kv {
            map: BTreeMap::new(),
            recent: VecDeque::new(),
            chain: 0,
            applied: 0,
            applied_term: 0,
            membership,
        }
    }

    pub fn get(&self, key: u8) -> Option<Value> {
        self.map.get(&key).copied()
    }

    /// Rebuilds a replica from a snapshot (index 0 with no data is the genesis state).
    pub fn from_snapshot(snap: &Snapshot) -> Result<Kv, String> {
        let meta = &snap.meta;
        if snap.data.is_empty() {
            if meta.last_index != 0 {
                return Err(format!("snapshot at index {} has no data", meta.last_index));
            }
            return Ok(Kv::empty(meta.membership.clone()));
        }
        let mut kv = Kv::deserialize(&snap.data)?;
        if kv.applied != meta.last_index || kv.applied_term != meta.last_term {
            return Err(format!(
                "snapshot meta ({}, {}) does not match its data ({}, {})",
                meta.last_index, meta.last_term, kv.applied, kv.applied_term
            ));
        }
        kv.membership = meta.membership.clone();
        Ok(kv)
    }

    /// Applies the next entry. Returns the command's outcome for command entries.
    pub fn apply(&mut self, e: &Entry) -> Result<Option<ApplyResult>, String> {
        if e.index != self.applied + 1 {
            return Err(format!(
                "apply out of order: entry {} after applied {}",
                e.index, self.applied
            ));
        }
        let digest = payload_digest(&e.payload);
        self.chain = mix64(self.chain ^ mix64(e.index) ^ mix64(e.term.rotate_left(17)) ^ digest);
        self.applied = e.index;
        self.applied_term = e.term;
        match &e.payload {
            EntryPayload::Noop => Ok(None),
            EntryPayload::Membership(m) => {
                self.membership = Membership::clone(m);
                Ok(None)
            }
            EntryPayload::Command(b) => {
                let cmd = Command::decode(b)?;
                self.recent.push_back(cmd.op());
                while self.recent.len() > RECENT {
                    self.recent.pop_front();
                }
                match cmd {
                    Command::Put { op, key, value } => {
                        self.map.insert(key, value);
                        Ok(Some(ApplyResult { op, cas_ok: None }))
                    }
                    Command::Cas {
                        op,
                        key,
                        expected,
                        new,
                    } => {
                        let ok = self.get(key) == expected;
                        if ok {
                            self.map.insert(key, new);
                        }
                        Ok(Some(ApplyResult {
                            op,
                            cas_ok: Some(ok),
                        }))
                    }
                }
            }
        }
    }

    /// The replica's state as snapshot bytes (deterministic: sorted keys).
    pub fn serialize(&self) -> Bytes {
        self.serialize_into(Vec::new())
    }

    /// [`serialize`](Self::serialize) into `out` (cleared first): the engine's last snapshot buffer
    /// when it hands it over (`RaftNode::take_snapshot_buffer`), as the runtime does.
    pub fn serialize_into(&self, mut out: Vec<u8>) -> Bytes {
        out.clear();
        out.reserve(32 + self.map.len() * 9 + self.recent.len() * 8);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&self.applied.to_le_bytes());
        out.extend_from_slice(&self.applied_term.to_le_bytes());
        out.extend_from_slice(&self.chain.to_le_bytes());
        out.push(self.map.len() as u8);
        for (k, v) in &self.map {
            out.push(*k);
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.push(self.recent.len() as u8);
        for op in &self.recent {
            out.extend_from_slice(&op.to_le_bytes());
        }
        Bytes::from(out)
    }

    fn deserialize(b: &[u8]) -> Result<Kv, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if at + n > b.len() {
                return Err(format!("snapshot data truncated ({} bytes)", b.len()));
            }
            let s = &b[at..at + n];
            at += n;
            Ok(s)
        };
        let magic = u32::from_le_bytes(take(4)?.try_into().unwrap());
        if magic != MAGIC {
            return Err(format!("snapshot data has bad magic {magic:#x}"));
        }
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap());
        let applied = u64_of(take(8)?);
        let applied_term = u64_of(take(8)?);
        let chain = u64_of(take(8)?);
        let n = take(1)?[0] as usize;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let k = take(1)?[0];
            let v = u64_of(take(8)?);
            map.insert(k, v);
        }
        let r = take(1)?[0] as usize;
        let mut recent = VecDeque::new();
        for _ in 0..r {
            recent.push_back(u64_of(take(8)?));
        }
        if at != b.len() {
            return Err(format!("snapshot data has {} trailing bytes", b.len() - at));
        }
        Ok(Kv {
            map,
            recent,
            chain,
            applied,
            applied_term,
            membership: Membership::default(),
        })
    }
}
