//! [`RedisRemoteMap`]: a [`RemoteMap`] stored in one Redis hash.
//!
//! Each entry is a hash field (encoded key) with its value (encoded value). The last executed log
//! index is kept in the same hash, in the field [`APPLIED_INDEX_FIELD`] (no encoded key can equal it:
//! MessagePack never encodes a key as those bare bytes). Keeping it in the same hash means one Redis key,
//! so a mutation and its index are written by one Lua script — atomic on a single server and in a
//! cluster alike — and `DEL` of the data cannot lose it (`clear` rewrites it).
//!
//! Every mutation runs one script that reads the stored index, returns `0` without touching anything if
//! the mutation's index is not above it, else applies the mutation, stores the index and returns
//! `{1, results...}`. The script checks the keys' types before writing, so a rejected mutation never
//! half-applies.
//!
//! The same script records the mutation's outcome (old values, a condition's result) in a sorted set
//! `<key>:hamok-outcomes`, scored by log index and pruned to the last [`OUTCOME_WINDOW`] indices, so an
//! executor that finds a mutation already executed (by a leader that was cut off before it could
//! answer) still delivers its result ([`RemoteMap::outcome`]). In a Redis Cluster both keys must hash to
//! one slot: give the map a key with a hash tag, e.g. `{sessions}`.

use async_trait::async_trait;
use bytes::Bytes;
use hamok_runtime::raft::LogIndex;
use hamok_runtime::HamokError;
use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::remote_map::{RemoteMap, RemoteOutcome};

/// The hash field holding the last executed log index.
pub const APPLIED_INDEX_FIELD: &str = "__hamok_applied_index";

/// How many log indices back outcomes are kept for executors that find a mutation already executed.
pub const OUTCOME_WINDOW: u64 = 100_000;

/// Common head of every mutation script: `KEYS[1]` = hash, `KEYS[2]` = outcomes, `ARGV[1]` = log
/// index.
const PRELUDE: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' and t ~= 'none' then
  return redis.error_reply('HAMOK_REJECTED key ' .. KEYS[1] .. ' holds a ' .. t .. ', not a hash')
end
local t2 = redis.call('TYPE', KEYS[2])['ok']
if t2 ~= 'zset' and t2 ~= 'none' then
  return redis.error_reply('HAMOK_REJECTED key ' .. KEYS[2] .. ' holds a ' .. t2 .. ', not a zset')
end
local applied = tonumber(redis.call('HGET', KEYS[1], '__hamok_applied_index') or '0')
local index = tonumber(ARGV[1])
if index <= applied then return 0 end
local function values_outcome(out)
  local parts = {'V'}
  for i = 2, #out do
    local v = out[i]
    if v then
      parts[#parts + 1] = 's' .. string.format('%010d', #v) .. v
    else
      parts[#parts + 1] = 'n'
    end
  end
  return table.concat(parts)
end
"#;

/// Records the index and the outcome (`outcome`, set by the body), prunes old outcomes.
const EPILOGUE: &str = r#"
redis.call('HSET', KEYS[1], '__hamok_applied_index', ARGV[1])
redis.call('ZADD', KEYS[2], index, ARGV[1] .. ':' .. outcome)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. string.format('%d', index - OUTCOME_WINDOW))
return out
"#;

/// `ARGV[2..]` = k1, v1, k2, v2, ...
const SET_ALL: &str = r#"
local out = {1}
for i = 2, #ARGV, 2 do
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i])
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local outcome = values_outcome(out)
"#;

/// `ARGV[2..]` = k1, v1, k2, v2, ...
const INSERT_ALL: &str = r#"
local out = {1}
for i = 2, #ARGV, 2 do
  local existing = redis.call('HGET', KEYS[1], ARGV[i])
  out[#out + 1] = existing
  if not existing then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
local outcome = values_outcome(out)
"#;

/// `ARGV[2..]` = k1, k2, ...
const REMOVE_ALL: &str = r#"
local out = {1}
for i = 2, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  out[#out + 1] = old
  if old then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
local outcome = values_outcome(out)
"#;

/// `ARGV[2]` = key, `ARGV[3]` = new, `ARGV[4]` = expected
const UPDATE_IF: &str = r#"
local out = {1, 0}
if redis.call('HGET', KEYS[1], ARGV[2]) == ARGV[4] then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  out[2] = 1
end
local outcome = 'B' .. out[2]
"#;

const CLEAR: &str = r#"
local out = {1}
redis.call('DEL', KEYS[1])
local outcome = 'D'
"#;

const LEN: &str = r#"
local n = redis.call('HLEN', KEYS[1])
if redis.call('HEXISTS', KEYS[1], '__hamok_applied_index') == 1 then n = n - 1 end
return n
"#;

fn redis_error(e: redis::RedisError) -> HamokError {
    let text = e.to_string();
    if text.contains("HAMOK_REJECTED") || text.contains("WRONGTYPE") {
        HamokError::Rejected(format!("redis: {text}"))
    } else {
        HamokError::Transport {
            context: format!("redis: {text}"),
            source: None,
        }
    }
}

fn bad_reply(what: &str) -> HamokError {
    HamokError::Transport {
        context: format!("redis: unexpected reply to {what}"),
        source: None,
    }
}

fn opt_bytes(v: Value) -> Result<Option<Bytes>, HamokError> {
    match v {
        Value::Nil | Value::Boolean(false) => Ok(None),
        Value::BulkString(b) => Ok(Some(Bytes::from(b))),
        Value::SimpleString(s) => Ok(Some(Bytes::from(s.into_bytes()))),
        _ => Err(bad_reply("a value")),
    }
}

/// The results of a mutation script: `None` if it was skipped (index already executed).
fn script_results(v: Value) -> Result<Option<Vec<Value>>, HamokError> {
    match v {
        Value::Int(0) => Ok(None),
        Value::Array(mut items) if matches!(items.first(), Some(Value::Int(1))) => {
            items.remove(0);
            Ok(Some(items))
        }
        _ => Err(bad_reply("a mutation script")),
    }
}

/// Parses an outcome as the scripts record it: `V` + per value `n` (none) or `s` + 10-digit length +
/// bytes; `B0`/`B1`; `D`.
fn parse_outcome(s: &[u8]) -> Result<RemoteOutcome, HamokError> {
    let bad = || bad_reply("a recorded outcome");
    match s.first() {
        Some(b'D') => Ok(RemoteOutcome::Done),
        Some(b'B') => Ok(RemoteOutcome::Bool(s.get(1) == Some(&b'1'))),
        Some(b'V') => {
            let mut values = Vec::new();
            let mut at = 1;
            while at < s.len() {
                match s[at] {
                    b'n' => {
                        values.push(None);
                        at += 1;
                    }
                    b's' => {
                        let digits = s.get(at + 1..at + 11).ok_or_else(bad)?;
                        let len: usize = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|d| d.parse().ok())
                            .ok_or_else(bad)?;
                        let value = s.get(at + 11..at + 11 + len).ok_or_else(bad)?;
                        values.push(Some(Bytes::copy_from_slice(value)));
                        at += 11 + len;
                    }
                    _ => return Err(bad()),
                }
            }
            Ok(RemoteOutcome::Values(values))
        }
        _ => Err(bad()),
    }
}

/// A [`RemoteMap`] in the Redis hash `key`.
///
/// ```no_run
/// # async fn f() -> Result<(), hamok_runtime::HamokError> {
/// use std::sync::Arc;
/// use hamok_collections::{register_remote_map, RedisRemoteMap};
/// let store = RedisRemoteMap::connect("redis://127.0.0.1:6379", "sessions").await?;
/// let builder = register_remote_map(hamok_runtime::Hamok::builder(), "sessions", Arc::new(store));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisRemoteMap {
    conn: MultiplexedConnection,
    key: String,
    outcomes_key: String,
}

impl std::fmt::Debug for RedisRemoteMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisRemoteMap")
            .field("key", &self.key)
            .finish()
    }
}

impl RedisRemoteMap {
    /// Connects to the Redis at `url` (e.g. `redis://127.0.0.1:6379`) and uses the hash `key`.
    pub async fn connect(url: &str, key: impl Into<String>) -> Result<Self, HamokError> {
        let client = redis::Client::open(url).map_err(redis_error)?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(redis_error)?;
        Ok(Self::new(conn, key))
    }

    /// Uses an existing connection (it reconnects by itself) and the hash `key`.
    pub fn new(conn: MultiplexedConnection, key: impl Into<String>) -> Self {
        let key = key.into();
        RedisRemoteMap {
            conn,
            outcomes_key: format!("{key}:hamok-outcomes"),
            key,
        }
    }

    /// The key of the sorted set holding recent outcomes.
    pub fn outcomes_key(&self) -> &str {
        &self.outcomes_key
    }

    /// The hash's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Deletes the whole hash (data and applied index) and the outcomes. Only for a map no cluster uses any more: a
    /// running cluster would re-execute nothing it already did, but its next mutations would apply to
    /// an empty hash.
    pub async fn destroy(&self) -> Result<(), HamokError> {
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(&self.key)
            .arg(&self.outcomes_key)
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_error)
    }

    async fn eval(&self, body: &str, args: Vec<&[u8]>) -> Result<Value, HamokError> {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(body).arg(2).arg(&self.key).arg(&self.outcomes_key);
        for a in args {
            cmd.arg(a);
        }
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(redis_error)
    }

    async fn mutation(
        &self,
        body: &str,
        index: LogIndex,
        args: Vec<&[u8]>,
    ) -> Result<Option<Vec<Value>>, HamokError> {
        let epilogue = EPILOGUE.replace("OUTCOME_WINDOW", &OUTCOME_WINDOW.to_string());
        let script = format!("{PRELUDE}{body}{epilogue}");
        let index = index.to_string();
        let mut all: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
        all.push(index.as_bytes());
        all.extend(args);
        script_results(self.eval(&script, all).await?)
    }

    async fn values_mutation(
        &self,
        body: &str,
        index: LogIndex,
        args: Vec<&[u8]>,
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        match self.mutation(body, index, args).await? {
            Some(values) => Ok(Some(
                values
                    .into_iter()
                    .map(opt_bytes)
                    .collect::<Result<_, _>>()?,
            )),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl RemoteMap for RedisRemoteMap {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>, HamokError> {
        if key == APPLIED_INDEX_FIELD.as_bytes() {
            return Ok(None);
        }
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("HGET")
            .arg(&self.key)
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        opt_bytes(v)
    }

    async fn get_all(&self, keys: &[Bytes]) -> Result<Vec<Option<Bytes>>, HamokError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&self.key);
        for k in keys {
            cmd.arg(&k[..]);
        }
        let v: Value = cmd.query_async(&mut conn).await.map_err(redis_error)?;
        match v {
            Value::Array(items) => items
                .into_iter()
                .zip(keys)
                .map(|(v, k)| {
                    if &k[..] == APPLIED_INDEX_FIELD.as_bytes() {
                        Ok(None)
                    } else {
                        opt_bytes(v)
                    }
                })
                .collect(),
            _ => Err(bad_reply("HMGET")),
        }
    }

    async fn keys(&self) -> Result<Vec<Bytes>, HamokError> {
        let mut conn = self.conn.clone();
        let keys: Vec<Vec<u8>> = redis::cmd("HKEYS")
            .arg(&self.key)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(keys
            .into_iter()
            .filter(|k| k != APPLIED_INDEX_FIELD.as_bytes())
            .map(Bytes::from)
            .collect())
    }

    async fn len(&self) -> Result<usize, HamokError> {
        match self.eval(LEN, Vec::new()).await? {
            Value::Int(n) => Ok(n.max(0) as usize),
            _ => Err(bad_reply("HLEN")),
        }
    }

    async fn scan(
        &self,
        cursor: u64,
        count: usize,
    ) -> Result<(u64, Vec<(Bytes, Bytes)>), HamokError> {
        let mut conn = self.conn.clone();
        let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
            .arg(&self.key)
            .arg(cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut page = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            if k != APPLIED_INDEX_FIELD.as_bytes() {
                page.push((Bytes::from(k), Bytes::from(v)));
            }
        }
        Ok((next, page))
    }

    async fn applied_index(&self) -> Result<LogIndex, HamokError> {
        let mut conn = self.conn.clone();
        let v: Option<String> = redis::cmd("HGET")
            .arg(&self.key)
            .arg(APPLIED_INDEX_FIELD)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        match v {
            None => Ok(0),
            Some(s) => s.parse().map_err(|_| bad_reply("the applied index")),
        }
    }

    async fn outcome(&self, index: LogIndex) -> Result<Option<RemoteOutcome>, HamokError> {
        let mut conn = self.conn.clone();
        let found: Vec<Vec<u8>> = redis::cmd("ZRANGEBYSCORE")
            .arg(&self.outcomes_key)
            .arg(index)
            .arg(index)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let Some(member) = found.first() else {
            return Ok(None);
        };
        let colon = member
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| bad_reply("a recorded outcome"))?;
        parse_outcome(&member[colon + 1..]).map(Some)
    }

    async fn set_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        let args = entries.iter().flat_map(|(k, v)| [&k[..], &v[..]]).collect();
        self.values_mutation(SET_ALL, index, args).await
    }

    async fn insert_all(
        &self,
        index: LogIndex,
        entries: &[(Bytes, Bytes)],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        let args = entries.iter().flat_map(|(k, v)| [&k[..], &v[..]]).collect();
        self.values_mutation(INSERT_ALL, index, args).await
    }

    async fn remove_all(
        &self,
        index: LogIndex,
        keys: &[Bytes],
    ) -> Result<Option<Vec<Option<Bytes>>>, HamokError> {
        let args = keys.iter().map(|k| &k[..]).collect();
        self.values_mutation(REMOVE_ALL, index, args).await
    }

    async fn update_if(
        &self,
        index: LogIndex,
        key: &[u8],
        new: &[u8],
        expected: &[u8],
    ) -> Result<Option<bool>, HamokError> {
        match self
            .mutation(UPDATE_IF, index, vec![key, new, expected])
            .await?
        {
            Some(values) => match values.first() {
                Some(Value::Int(n)) => Ok(Some(*n == 1)),
                _ => Err(bad_reply("update_if")),
            },
            None => Ok(None),
        }
    }

    async fn clear(&self, index: LogIndex) -> Result<Option<()>, HamokError> {
        Ok(self.mutation(CLEAR, index, Vec::new()).await?.map(|_| ()))
    }
}
