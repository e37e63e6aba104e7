//! A linearizability checker for a key-value register history: the Wing–Gong search with Lowe's
//! memoization (the "WGL" algorithm, as in Lowe, "Testing for linearizability", 2017).
//!
//! Linearizability is compositional (local), so the history is split per key and each key is checked as a
//! single register whose initial value is "absent".
//!
//! Time stamps are a global, strictly increasing event counter of the simulation, so the real-time order of
//! any return and call is exact. An operation without a return (`ret == None`) is *pending*: it may have
//! taken effect at any point after its call, or never. Pending reads carry no information and should be
//! left out; pending writes/CAS are modelled with a return at +infinity, where linearizing them has no
//! visible effect, so the search may "place them at the end" (equivalent to them never happening).

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use super::kv::Value;

/// What an operation did, from the client's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Wrote `value`.
    Put { value: Value },
    /// Read `observed` (`None`: the key was absent).
    Get { observed: Option<Value> },
    /// Compare-and-set; `ok` is `None` when the outcome is unknown (pending).
    Cas {
        expected: Option<Value>,
        new: Value,
        ok: Option<bool>,
    },
}

/// One operation of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub id: u64,
    pub client: usize,
    pub key: u8,
    pub call: u64,
    /// `None`: pending (outcome unknown).
    pub ret: Option<u64>,
    pub kind: OpKind,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = match self.ret {
            Some(r) => r.to_string(),
            None => "pending".to_string(),
        };
        let v = |o: &Option<Value>| match o {
            Some(v) => v.to_string(),
            None => "absent".to_string(),
        };
        let what = match &self.kind {
            OpKind::Put { value } => format!("put({value})"),
            OpKind::Get { observed } => format!("get -> {}", v(observed)),
            OpKind::Cas { expected, new, ok } => {
                let ok = match ok {
                    Some(true) => "ok",
                    Some(false) => "failed",
                    None => "?",
                };
                format!("cas({} -> {new}) {ok}", v(expected))
            }
        };
        write!(
            f,
            "op#{} client {} key {} [{}, {}] {}",
            self.id, self.client, self.key, self.call, ret, what
        )
    }
}

/// Why a history was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinError {
    /// No linearization exists.
    NotLinearizable {
        key: u8,
        /// The longest linearizable prefix found, in order.
        best_prefix: Vec<Op>,
        /// The completed operations that could not be placed after that prefix.
        stuck: Vec<Op>,
        ops_of_key: usize,
    },
    /// The search explored more states than the budget allows.
    Inconclusive { key: u8, states: usize },
}

impl fmt::Display for LinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinError::NotLinearizable {
                key,
                best_prefix,
                stuck,
                ops_of_key,
            } => {
                writeln!(
                    f,
                    "history of key {key} ({ops_of_key} ops) is NOT linearizable; longest linearizable prefix has {} ops, its last ones:",
                    best_prefix.len()
                )?;
                for op in best_prefix.iter().rev().take(12).rev() {
                    writeln!(f, "    {op}")?;
                }
                writeln!(f, "  none of these completed ops can come next:")?;
                for op in stuck.iter().take(12) {
                    writeln!(f, "    {op}")?;
                }
                Ok(())
            }
            LinError::Inconclusive { key, states } => write!(
                f,
                "linearizability search for key {key} gave up after {states} states"
            ),
        }
    }
}

/// Statistics of a successful check.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinStats {
    pub keys: usize,
    pub ops: usize,
    pub pending: usize,
    pub states: usize,
}

/// Checks the whole history, key by key. `budget` bounds the memoized states per key.
pub fn check_history(ops: &[Op], budget: usize) -> Result<LinStats, LinError> {
    let mut by_key: BTreeMap<u8, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key).or_default().push(op.clone());
    }
    let mut stats = LinStats::default();
    for (key, ops) in by_key {
        stats.keys += 1;
        stats.ops += ops.len();
        stats.pending += ops.iter().filter(|o| o.ret.is_none()).count();
        stats.states += check_register(key, &ops, budget)?;
    }
    Ok(stats)
}

/// The register's sequential specification: the next state, or `None` if `kind` cannot happen in `state`.
fn step(state: Option<Value>, kind: &OpKind) -> Option<Option<Value>> {
    match kind {
        OpKind::Put { value } => Some(Some(*value)),
        OpKind::Get { observed } => (state == *observed).then_some(state),
        OpKind::Cas { expected, new, ok } => {
            let matches = state == *expected;
            match ok {
                Some(true) => matches.then_some(Some(*new)),
                Some(false) => (!matches).then_some(state),
                None => Some(if matches { Some(*new) } else { state }),
            }
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// WGL over one register. Returns the number of memoized states.
fn check_register(key: u8, ops: &[Op], budget: usize) -> Result<usize, LinError> {
    let n = ops.len();
    if n == 0 {
        return Ok(0);
    }
    // Events: 2 per op. Node 0 is the head sentinel, node 2n+1 the tail sentinel; event nodes are 1..=2n.
    // Node 1 + 2*i is op i's call, node 2 + 2*i its return.
    let mut order: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        order.push((op.call, 0, i));
        order.push((op.ret.unwrap_or(u64::MAX), 1, i));
    }
    // At equal times calls come first (more concurrency: more permissive; times are unique anyway).
    order.sort();
    let head = 0usize;
    let tail = 2 * n + 1;
    let mut next = vec![tail; 2 * n + 2];
    let mut prev = vec![head; 2 * n + 2];
    let mut last = head;
    for (_, is_ret, i) in &order {
        let node = if *is_ret == 0 { 1 + 2 * i } else { 2 + 2 * i };
        next[last] = node;
        prev[node] = last;
        last = node;
    }
    next[last] = tail;
    prev[tail] = last;

    let op_of = |node: usize| (node - 1) / 2;
    let is_call = |node: usize| node % 2 == 1;

    let mut remaining = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut linearized = Bits::new(n);
    let mut cache: HashSet<(Bits, Option<Value>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<Value>)> = Vec::new();
    let mut state: Option<Value> = None;
    let mut best: Vec<usize> = Vec::new();
    let mut entry = next[head];

    loop {
        if remaining == 0 {
            return Ok(cache.len());
        }
        debug_assert!(entry != tail, "a completed op's return must be ahead");
        if is_call(entry) {
            let i = op_of(entry);
            let mut placed = false;
            if let Some(new_state) = step(state, &ops[i].kind) {
                let mut lin = linearized.clone();
                lin.set(i);
                if cache.insert((lin.clone(), new_state)) {
                    if cache.len() > budget {
                        return Err(LinError::Inconclusive {
                            key,
                            states: cache.len(),
                        });
                    }
                    stack.push((entry, state));
                    state = new_state;
                    linearized = lin;
                    // Lift the call and its return out of the list.
                    let ret = entry + 1;
                    for node in [entry, ret] {
                        next[prev[node]] = next[node];
                        prev[next[node]] = prev[node];
                    }
                    if ops[i].ret.is_some() {
                        remaining -= 1;
                    }
                    if stack.len() > best.len() {
                        best = stack.iter().map(|(e, _)| op_of(*e)).collect();
                    }
                    entry = next[head];
                    placed = true;
                }
            }
            if !placed {
                entry = next[entry];
            }
        } else {
            // A return: the op it belongs to cannot be linearized later than here. Backtrack.
            let Some((call, prev_state)) = stack.pop() else {
                return Err(not_linearizable(key, ops, &best));
            };
            let i = op_of(call);
            state = prev_state;
            linearized.clear(i);
            // Unlift in reverse order: the return first, then the call.
            let ret = call + 1;
            for node in [ret, call] {
                next[prev[node]] = node;
                prev[next[node]] = node;
            }
            if ops[i].ret.is_some() {
                remaining += 1;
            }
            entry = next[call];
        }
    }
}

fn not_linearizable(key: u8, ops: &[Op], best: &[usize]) -> LinError {
    let best_prefix: Vec<Op> = best.iter().map(|i| ops[*i].clone()).collect();
    let placed: HashSet<usize> = best.iter().copied().collect();
    // The completed ops left over whose return is earliest: one of them had to come next.
    let mut stuck: Vec<Op> = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| !placed.contains(i) && o.ret.is_some())
        .map(|(_, o)| o.clone())
        .collect();
    stuck.sort_by_key(|o| o.ret);
    let first_ret = stuck.first().and_then(|o| o.ret).unwrap_or(u64::MAX);
    // Everything called before that return is a candidate for the next position.
    let mut candidates: Vec<Op> = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| !placed.contains(i) && o.call < first_ret)
        .map(|(_, o)| o.clone())
        .collect();
    candidates.sort_by_key(|o| o.call);
    LinError::NotLinearizable {
        key,
        best_prefix,
        stuck: candidates,
        ops_of_key: ops.len(),
    }
}
