//! The `HAMOK_*` environment as a figment provider.

use std::collections::BTreeSet;

use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::{HamokConfig, ENV_PREFIX, ENV_SEPARATOR, ENV_STRING_KEYS, ENV_STRING_MAPS};

/// Provider of the `HAMOK_*` environment variables that name a known key of [`HamokConfig`].
///
/// Unlike `figment::providers::Env` it keeps the values of string keys verbatim, and it drops variables of
/// other components sharing the prefix.
pub(super) struct EnvProvider {
    /// `(dotted key, value)` pairs, already filtered.
    entries: Vec<(String, Value)>,
}

impl EnvProvider {
    pub(super) fn new(vars: impl IntoIterator<Item = (String, String)>) -> Self {
        let known = known_keys();
        let mut entries: Vec<(String, Value)> = vars
            .into_iter()
            .filter_map(|(name, value)| {
                let name = name.trim();
                let rest = name.get(..ENV_PREFIX.len()).and_then(|prefix| {
                    prefix
                        .eq_ignore_ascii_case(ENV_PREFIX)
                        .then(|| &name[ENV_PREFIX.len()..])
                })?;
                let key = rest.to_ascii_lowercase().replace(ENV_SEPARATOR, ".");
                let verbatim = ENV_STRING_KEYS.contains(&key.as_str())
                    || key.split_once('.').is_some_and(|(map, entry)| {
                        ENV_STRING_MAPS.contains(&map) && !entry.is_empty() && !entry.contains('.')
                    });
                if verbatim {
                    Some((key, Value::from(value)))
                } else if known.contains(key.as_str()) {
                    let Ok(parsed) = value.parse::<Value>();
                    Some((key, parsed))
                } else {
                    None
                }
            })
            .collect();
        // Deterministic result whatever the environment's order.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        EnvProvider { entries }
    }
}

/// Every dotted key an environment variable may set without being a free-form map entry: the top-level
/// fields and the fields of nested tables (`raft.max_inflight_appends`), taken from the serialized defaults
/// so the list cannot drift from the struct.
pub(super) fn known_keys() -> BTreeSet<String> {
    fn walk(prefix: &str, dict: &Dict, keys: &mut BTreeSet<String>) {
        for (name, value) in dict {
            let key = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            if let Value::Dict(_, inner) = value {
                walk(&key, inner, keys);
            }
            keys.insert(key);
        }
    }
    let mut keys = BTreeSet::new();
    if let Ok(Value::Dict(_, dict)) = Value::serialize(HamokConfig::default()) {
        walk("", &dict, &mut keys);
    }
    keys
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}` environment variable(s)")).interpolater(
            |_: &Profile, keys: &[&str]| {
                let keys: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
                format!("{ENV_PREFIX}{}", keys.join(ENV_SEPARATOR))
            },
        )
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, value) in &self.entries {
            if let Value::Dict(_, nested) = figment::util::nest(key, value.clone()) {
                dict = merge_dicts(dict, nested);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Recursively merges `right` into `left`, `right` winning on conflicts.
fn merge_dicts(mut left: Dict, right: Dict) -> Dict {
    for (key, value) in right {
        let merged = match (left.remove(&key), value) {
            (Some(Value::Dict(_, l)), Value::Dict(tag, r)) => Value::Dict(tag, merge_dicts(l, r)),
            (_, value) => value,
        };
        left.insert(key, merged);
    }
    left
}
