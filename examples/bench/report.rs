//! Measurements and their output: a lock-free latency histogram, the record of one result row, and its
//! rendering as a markdown table row and as JSON.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two: values are kept with a relative error below 1/64 (1.6%).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any `u64` nanosecond value.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB as usize;

/// A latency histogram in nanoseconds, log-linear (HDR-like) with 64 linear sub-buckets per power of
/// two, shared by every worker of a load through atomics: 30 KiB whatever the number of samples, so
/// recording a million latencies costs the measured process no memory (it matters in `memory`).
pub struct Hist {
    counts: Box<[AtomicU64]>,
    n: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

fn bucket(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS
    let m = (v >> (e - SUB_BITS)) - SUB; // in [0, SUB)
    ((e - SUB_BITS + 1) as u64 * SUB + m) as usize
}

/// The middle of bucket `i`.
fn bucket_value(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let e = i / SUB + SUB_BITS as u64 - 1;
    let m = i % SUB;
    let shift = e - SUB_BITS as u64;
    let low = (SUB + m) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Default for Hist {
    fn default() -> Self {
        Hist {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            n: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl Hist {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let v = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket(v)].fetch_add(1, Ordering::Relaxed);
        self.n.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }

    /// The value (ns) below or at which a fraction `q` of the samples lie.
    fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c.load(Ordering::Relaxed);
            if seen >= rank {
                return bucket_value(i).min(self.max.load(Ordering::Relaxed));
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    /// p50, p99, mean and max, in microseconds.
    pub fn summary(&self) -> Summary {
        let n = self.count();
        let us = |ns: u64| ns as f64 / 1e3;
        Summary {
            n,
            p50_us: us(self.quantile(0.50)),
            p99_us: us(self.quantile(0.99)),
            mean_us: if n == 0 {
                0.0
            } else {
                self.sum.load(Ordering::Relaxed) as f64 / n as f64 / 1e3
            },
            max_us: us(self.max.load(Ordering::Relaxed)),
        }
    }
}

/// What a histogram says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub n: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
    pub max_us: f64,
}

/// A value of an extra field or of the configuration of a record.
#[derive(Clone, Debug)]
pub enum Value {
    Int(u64),
    Num(f64),
    Str(String),
    Bool(bool),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Value::Int(v)
    }
}
impl From<usize> for Value {
    fn from(v: usize) -> Self {
        Value::Int(v as u64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Num(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}

impl Value {
    fn json(&self, out: &mut String) {
        match self {
            Value::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Value::Num(v) => json_num(*v, out),
            Value::Str(s) => json_str(s, out),
            Value::Bool(b) => {
                let _ = write!(out, "{b}");
            }
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Num(v) => {
                if v.abs() >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            }
            Value::Str(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

/// One result: a row of the table and a JSON record.
#[derive(Clone, Debug)]
pub struct Record {
    pub scenario: String,
    pub transport: String,
    /// Where the peers kept their Raft state: `memory`, `durable` (`--durable`), or `file` (the NATS
    /// KV baseline's bucket).
    pub storage: String,
    pub peers: usize,
    /// Where the operations were issued: `leader`, `follower`, `survivor`, `new peer`, `client`, `-`.
    pub from: String,
    pub concurrency: usize,
    /// Operations that failed (not counted in the latencies).
    pub errors: u64,
    pub summary: Summary,
    pub ops_per_s: f64,
    /// A short label shown in the table (what the row measures).
    pub what: String,
    /// Scenario-specific figures (RSS, other timings), in the JSON and in the table's notes.
    pub extra: Vec<(String, Value)>,
    /// The settings the row was measured with (JSON only).
    pub config: Vec<(String, Value)>,
}

impl Record {
    pub fn new(scenario: &str, transport: &str, peers: usize, from: &str, what: &str) -> Self {
        Record {
            scenario: scenario.to_string(),
            transport: transport.to_string(),
            storage: "memory".to_string(),
            peers,
            from: from.to_string(),
            concurrency: 1,
            errors: 0,
            summary: Summary::default(),
            ops_per_s: 0.0,
            what: what.to_string(),
            extra: Vec::new(),
            config: Vec::new(),
        }
    }

    pub fn extra(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.extra.push((key.to_string(), value.into()));
        self
    }

    pub fn config(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.config.push((key.to_string(), value.into()));
        self
    }

    pub fn table_header() -> String {
        "| scenario | what | transport | storage | peers | from | in flight | n | p50 | p99 | mean | max | ops/s | notes |\n\
         |---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
            .to_string()
    }

    pub fn table_row(&self) -> String {
        let s = &self.summary;
        let mut notes: Vec<String> = self
            .extra
            .iter()
            .map(|(k, v)| format!("{k}={}", v.text()))
            .collect();
        if self.errors > 0 {
            notes.insert(0, format!("errors={}", self.errors));
        }
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.scenario,
            self.what,
            self.transport,
            self.storage,
            self.peers,
            self.from,
            self.concurrency,
            group(s.n),
            human_us(s.p50_us),
            human_us(s.p99_us),
            human_us(s.mean_us),
            human_us(s.max_us),
            ops(self.ops_per_s),
            notes.join(", ")
        )
    }

    pub fn json(&self, out: &mut String) {
        let s = &self.summary;
        out.push('{');
        let field = |out: &mut String, key: &str, first: bool| {
            if !first {
                out.push_str(", ");
            }
            json_str(key, out);
            out.push_str(": ");
        };
        field(out, "scenario", true);
        json_str(&self.scenario, out);
        field(out, "what", false);
        json_str(&self.what, out);
        field(out, "transport", false);
        json_str(&self.transport, out);
        field(out, "storage", false);
        json_str(&self.storage, out);
        field(out, "peers", false);
        let _ = write!(out, "{}", self.peers);
        field(out, "from", false);
        json_str(&self.from, out);
        field(out, "concurrency", false);
        let _ = write!(out, "{}", self.concurrency);
        field(out, "n", false);
        let _ = write!(out, "{}", s.n);
        field(out, "errors", false);
        let _ = write!(out, "{}", self.errors);
        for (key, v) in [
            ("p50_us", s.p50_us),
            ("p99_us", s.p99_us),
            ("mean_us", s.mean_us),
            ("max_us", s.max_us),
            ("ops_per_s", self.ops_per_s),
        ] {
            field(out, key, false);
            json_num(v, out);
        }
        for (name, map) in [("extra", &self.extra), ("config", &self.config)] {
            field(out, name, false);
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                json_str(k, out);
                out.push_str(": ");
                v.json(out);
            }
            out.push('}');
        }
        out.push('}');
    }
}

/// `--durable`: each `durable` record next to the `memory` record of the same row (same scenario,
/// what, transport, peers, from and in-flight count), as a markdown table; `None` if none pair up.
pub fn comparison_table(records: &[Record]) -> Option<String> {
    let same_row = |a: &Record, b: &Record| {
        (
            &a.scenario,
            &a.what,
            &a.transport,
            a.peers,
            &a.from,
            a.concurrency,
        ) == (
            &b.scenario,
            &b.what,
            &b.transport,
            b.peers,
            &b.from,
            b.concurrency,
        )
    };
    let mut used = vec![false; records.len()];
    let mut rows = Vec::new();
    for durable in records.iter().filter(|r| r.storage == "durable") {
        let Some(i) = (0..records.len()).find(|&i| {
            !used[i] && records[i].storage == "memory" && same_row(&records[i], durable)
        }) else {
            continue;
        };
        used[i] = true;
        let memory = &records[i];
        let (m, d) = (&memory.summary, &durable.summary);
        let ratio = |num: f64, den: f64| {
            if num > 0.0 && den > 0.0 {
                format!("{:.2}", num / den)
            } else {
                "-".to_string()
            }
        };
        rows.push(format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            durable.scenario,
            durable.what,
            durable.transport,
            durable.peers,
            durable.from,
            durable.concurrency,
            human_us(m.p50_us),
            human_us(d.p50_us),
            human_us(m.p99_us),
            human_us(d.p99_us),
            ratio(d.p50_us, m.p50_us),
            ops(memory.ops_per_s),
            ops(durable.ops_per_s),
            ratio(durable.ops_per_s, memory.ops_per_s),
        ));
    }
    if rows.is_empty() {
        return None;
    }
    Some(format!(
        "| scenario | what | transport | peers | from | in flight | p50 memory | p50 durable | p99 memory | p99 durable | p50 durable/memory | ops/s memory | ops/s durable | ops/s durable/memory |\n\
         |---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n{}",
        rows.join("\n")
    ))
}

/// A JSON document holding `meta` and every record.
pub fn json_document(meta: &[(String, Value)], records: &[Record]) -> String {
    let mut out = String::from("{\n  \"meta\": {");
    for (i, (k, v)) in meta.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        json_str(k, &mut out);
        out.push_str(": ");
        v.json(&mut out);
    }
    out.push_str("},\n  \"records\": [");
    for (i, r) in records.iter().enumerate() {
        out.push_str(if i == 0 { "\n    " } else { ",\n    " });
        r.json(&mut out);
    }
    out.push_str("\n  ]\n}\n");
    out
}

fn json_num(v: f64, out: &mut String) {
    if v.is_finite() {
        let _ = write!(out, "{}", (v * 1000.0).round() / 1000.0);
    } else {
        out.push_str("null");
    }
}

fn json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A duration given in microseconds, in the unit that reads best.
pub fn human_us(us: f64) -> String {
    if us <= 0.0 {
        "-".to_string()
    } else if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Operations per second for a table cell (`-` when the row has none).
fn ops(ops_per_s: f64) -> String {
    if ops_per_s > 0.0 {
        group(ops_per_s.round() as u64)
    } else {
        "-".to_string()
    }
}

/// `1234567` as `1,234,567`.
pub fn group(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_two_percent() {
        for v in [0u64, 1, 63, 64, 65, 127, 128, 1_000, 123_456, 9_999_999_999] {
            let back = bucket_value(bucket(v));
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.02, "{v} -> {back}");
        }
        assert!(bucket(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles() {
        let h = Hist::default();
        for i in 1..=100u64 {
            h.record(Duration::from_micros(i));
        }
        let s = h.summary();
        assert!((s.p50_us - 50.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_us - 99.0).abs() < 2.0, "{s:?}");
        assert_eq!(s.max_us, 100.0);
    }

    #[test]
    fn durable_rows_pair_with_memory_rows() {
        let row = |storage: &str, concurrency: usize, ops_per_s: f64| {
            let mut r = Record::new("throughput", "memory", 3, "leader", "map.set");
            r.storage = storage.to_string();
            r.concurrency = concurrency;
            r.ops_per_s = ops_per_s;
            r
        };
        assert!(comparison_table(&[row("memory", 1, 100.0)]).is_none());
        let table = comparison_table(&[
            row("memory", 1, 1_000.0),
            row("memory", 100, 8_000.0),
            row("durable", 1, 250.0),
            row("durable", 100, 4_000.0),
        ])
        .unwrap();
        assert_eq!(table.lines().count(), 4, "{table}");
        assert!(
            table.contains("| 1 | - | - | - | - | - | 1,000 | 250 | 0.25 |"),
            "{table}"
        );
        assert!(
            table.contains("| 100 | - | - | - | - | - | 8,000 | 4,000 | 0.50 |"),
            "{table}"
        );
        let mut json = String::new();
        row("durable", 1, 1.0).json(&mut json);
        assert!(json.contains("\"storage\": \"durable\""), "{json}");
        assert_eq!(
            row("durable", 1, 1.0).table_row().split('|').nth(4),
            Some(" durable ")
        );
    }
}
