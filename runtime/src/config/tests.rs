//! Tests of the configuration: precedence, environment, errors naming keys, validation.

use super::env::known_keys;
use super::*;
use crate::error::HamokError;
use crate::raft::RaftConfig;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::Figment;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A TOML file in the temporary directory, removed on drop.
struct TempToml(PathBuf);

impl TempToml {
    fn new(contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hamok-config-test-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).expect("write temporary TOML file");
        TempToml(path)
    }
}

impl Drop for TempToml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load_with(toml: Option<&str>, vars: &[(&str, &str)]) -> Result<HamokConfig, HamokError> {
    let file = toml.map(TempToml::new);
    HamokConfig::from_figment(HamokConfig::figment_with_env(
        file.as_ref().map(|f| f.0.as_path()),
        env(vars),
    ))
}

fn key_of(result: Result<HamokConfig, HamokError>) -> String {
    match result {
        Err(HamokError::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

fn invalid_key(config: HamokConfig) -> String {
    match config.validate() {
        Err(HamokError::Config { key, .. }) => key,
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn defaults_validate() {
    let config = HamokConfig::default();
    config.validate().unwrap();
    assert_eq!(config.cluster_id, "hamok");
    assert_eq!(config.peer_id, None);
    assert_eq!(config.election_timeout_ms, 300);
    assert_eq!(config.heartbeat_interval_ms, 50);
    assert_eq!(config.tick_interval_ms, 5);
    assert_eq!(config.snapshot_after_bytes, 8 * 1024 * 1024);
    assert_eq!(config.raft_config(), RaftConfig::default());
    assert_eq!(load_with(None, &[]).unwrap(), config);
}

#[test]
fn serde_round_trip_and_partial_input() {
    let config = HamokConfig {
        peer_id: Some("p-1".into()),
        app_data: [("zone".to_owned(), "a".to_owned())].into(),
        ..HamokConfig::default()
    };
    let figment = Figment::from(Serialized::defaults(&config));
    assert_eq!(figment.extract::<HamokConfig>().unwrap(), config);
    // `#[serde(default)]`: a partial input fills the rest from the defaults.
    let partial: HamokConfig = Figment::from(Toml::string(
        "cluster_id = \"x\"\n[raft]\nmax_apply_batch = 7",
    ))
    .extract()
    .unwrap();
    assert_eq!(partial.cluster_id, "x");
    assert_eq!(partial.raft.max_apply_batch, 7);
    assert_eq!(
        partial.raft.max_inflight_appends,
        RaftLimits::default().max_inflight_appends
    );
    assert_eq!(partial.election_timeout_ms, 300);
}

#[test]
fn toml_overrides_defaults() {
    let config = load_with(
        Some(
            r#"
            cluster_id = "orders"
            peer_id = "007"
            election_timeout_ms = 500
            only_follower = true
            [raft]
            max_inflight_appends = 16
            [app_data]
            zone = "eu-1"
            "#,
        ),
        &[],
    )
    .unwrap();
    assert_eq!(config.cluster_id, "orders");
    assert_eq!(config.peer_id.as_deref(), Some("007"));
    assert_eq!(config.election_timeout_ms, 500);
    assert!(config.only_follower);
    assert_eq!(config.raft.max_inflight_appends, 16);
    assert_eq!(
        config.raft.max_apply_batch,
        RaftLimits::default().max_apply_batch
    );
    assert_eq!(
        config.app_data.get("zone").map(String::as_str),
        Some("eu-1")
    );
    assert_eq!(config.heartbeat_interval_ms, 50);
    assert_eq!(config.raft_config().election_timeout_ms, 500);
    assert_eq!(config.raft_config().limits.max_inflight_appends, 16);
}

#[test]
fn env_overrides_toml() {
    let config = load_with(
        Some("election_timeout_ms = 500\nheartbeat_interval_ms = 60\n[raft]\nmax_inflight_appends = 16"),
        &[
            ("HAMOK_ELECTION_TIMEOUT_MS", "400"),
            ("HAMOK_RAFT__MAX_INFLIGHT_APPENDS", "32"),
            ("HAMOK_ONLY_FOLLOWER", "true"),
            ("HAMOK_PEER_ID", "007"),
            ("HAMOK_CLUSTER_ID", "42"),
            ("HAMOK_APP_DATA__ZONE", "1.10"),
            ("hamok_join_max_retry", "5"),
        ],
    )
    .unwrap();
    assert_eq!(config.election_timeout_ms, 400);
    assert_eq!(
        config.heartbeat_interval_ms, 60,
        "not in the environment: from TOML"
    );
    assert_eq!(config.raft.max_inflight_appends, 32);
    assert!(config.only_follower);
    assert_eq!(
        config.peer_id.as_deref(),
        Some("007"),
        "string keys are verbatim"
    );
    assert_eq!(config.cluster_id, "42");
    assert_eq!(
        config.app_data.get("zone").map(String::as_str),
        Some("1.10")
    );
    assert_eq!(config.join_max_retry, 5);
}

#[test]
fn code_overrides_env() {
    let figment = HamokConfig::figment_with_env(
        None,
        env(&[
            ("HAMOK_ELECTION_TIMEOUT_MS", "400"),
            ("HAMOK_RAFT__MAX_INFLIGHT_APPENDS", "32"),
        ]),
    )
    .merge(Serialized::default("election_timeout_ms", 200))
    .merge(Serialized::default("raft.max_inflight_appends", 8));
    let config = HamokConfig::from_figment(figment).unwrap();
    assert_eq!(config.election_timeout_ms, 200);
    assert_eq!(config.raft.max_inflight_appends, 8);
}

#[test]
fn process_environment_is_read() {
    // A free-form `app_data` entry with a name no other test uses: concurrent loads are unaffected.
    const VAR: &str = "HAMOK_APP_DATA__CONFIG_RS_PROCESS_ENV_PROBE";
    std::env::set_var(VAR, "seen");
    let result = HamokConfig::load(None);
    std::env::remove_var(VAR);
    let config = result.unwrap();
    assert_eq!(
        config
            .app_data
            .get("config_rs_process_env_probe")
            .map(String::as_str),
        Some("seen")
    );
}

#[test]
fn unrelated_hamok_variables_are_ignored() {
    let config = load_with(
        None,
        &[
            ("HAMOK_SIM_SEEDS", "1,2,3"),
            ("HAMOK_NATS_URL", "nats://localhost:4222"),
            ("HAMOK_RAFT__NOT_A_LIMIT", "x"),
            ("HAMOK_APP_DATA__A__B", "nested"),
            ("HAMOK_", "empty"),
            ("HAMOKELECTION_TIMEOUT_MS", "1"),
            ("ELECTION_TIMEOUT_MS", "1"),
        ],
    )
    .unwrap();
    assert_eq!(config, HamokConfig::default());
}

#[test]
fn invalid_values_name_their_key() {
    assert_eq!(
        key_of(load_with(Some("election_timeout_ms = \"abc\""), &[])),
        "election_timeout_ms"
    );
    assert_eq!(
        key_of(load_with(Some("[raft]\nmax_inflight_appends = 0"), &[])),
        "raft.max_inflight_appends"
    );
    assert_eq!(
        key_of(load_with(Some("[raft]\nmax_inflight_appends = -3"), &[])),
        "raft.max_inflight_appends"
    );
    assert_eq!(
        key_of(load_with(Some("heartbeat_interval_ms = 0"), &[])),
        "heartbeat_interval_ms"
    );
    assert_eq!(
        key_of(load_with(None, &[("HAMOK_RAFT__MAX_APPLY_BATCH", "lots")])),
        "raft.max_apply_batch"
    );
    assert_eq!(
        key_of(load_with(None, &[("HAMOK_ONLY_FOLLOWER", "maybe")])),
        "only_follower"
    );
    assert_eq!(
        key_of(load_with(Some("election_timeout_msx = 3"), &[])),
        "election_timeout_msx",
        "misspelt keys are reported"
    );
    assert_eq!(
        key_of(load_with(Some("[raft]\ninflight = 3"), &[])),
        "raft.inflight"
    );
    match load_with(Some("election_timeout_ms = \"abc\""), &[]) {
        Err(HamokError::Config { reason, .. }) => {
            assert!(
                reason.contains("TOML file"),
                "reason names the source: {reason}"
            )
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn toml_file_errors_name_config_file() {
    let missing = std::env::temp_dir().join("hamok-config-test-does-not-exist.toml");
    assert_eq!(key_of(HamokConfig::load(Some(&missing))), CONFIG_FILE_KEY);
    assert_eq!(
        key_of(load_with(Some("this is = = not toml"), &[])),
        CONFIG_FILE_KEY
    );
}

#[test]
fn validate_checks_relations() {
    let base = HamokConfig::default;
    assert_eq!(
        invalid_key(HamokConfig {
            heartbeat_interval_ms: 0,
            ..base()
        }),
        "heartbeat_interval_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            election_timeout_ms: 99,
            ..base()
        }),
        "election_timeout_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            tick_interval_ms: 0,
            ..base()
        }),
        "tick_interval_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            tick_interval_ms: 51,
            ..base()
        }),
        "tick_interval_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            peer_max_idle_ms: 300,
            ..base()
        }),
        "peer_max_idle_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            hello_interval_ms: 0,
            ..base()
        }),
        "hello_interval_ms"
    );
    assert_eq!(
        invalid_key(HamokConfig {
            discovery_window_ms: 99,
            ..base()
        }),
        "discovery_window_ms"
    );
    for (key, config) in [
        (
            "request_timeout_ms",
            HamokConfig {
                request_timeout_ms: 0,
                ..base()
            },
        ),
        (
            "join_timeout_ms",
            HamokConfig {
                join_timeout_ms: 0,
                ..base()
            },
        ),
        (
            "snapshot_after_entries",
            HamokConfig {
                snapshot_after_entries: 0,
                ..base()
            },
        ),
        (
            "snapshot_after_bytes",
            HamokConfig {
                snapshot_after_bytes: 0,
                ..base()
            },
        ),
        (
            "max_inbound_frames",
            HamokConfig {
                max_inbound_frames: 0,
                ..base()
            },
        ),
        (
            "max_outbound_frames",
            HamokConfig {
                max_outbound_frames: 0,
                ..base()
            },
        ),
        (
            "max_pending_requests",
            HamokConfig {
                max_pending_requests: 0,
                ..base()
            },
        ),
        (
            "max_pending_requests",
            HamokConfig {
                max_pending_requests: MAX_PENDING_REQUESTS_LIMIT + 1,
                ..base()
            },
        ),
        (
            "max_frame_bytes",
            HamokConfig {
                max_frame_bytes: 0,
                ..base()
            },
        ),
        (
            "max_frame_bytes",
            HamokConfig {
                // Not larger than the largest command (512 KiB): such a command could never be sent.
                max_frame_bytes: 512 * 1024,
                ..base()
            },
        ),
    ] {
        assert_eq!(invalid_key(config), key);
    }
    let raft = |raft: RaftLimits| HamokConfig { raft, ..base() };
    let limits = RaftLimits::default;
    assert_eq!(
        invalid_key(raft(RaftLimits {
            max_snapshot_bytes: 0,
            ..limits()
        })),
        "raft.max_snapshot_bytes"
    );
    assert_eq!(
        invalid_key(raft(RaftLimits {
            max_command_bytes: 65 * 1024 * 1024,
            ..limits()
        })),
        "raft.max_command_bytes"
    );
    HamokConfig {
        join_max_retry: 0,
        ..base()
    }
    .validate()
    .unwrap();
    HamokConfig {
        election_timeout_ms: 100,
        peer_max_idle_ms: 101,
        ..base()
    }
    .validate()
    .unwrap();
}

#[test]
fn ids_are_checked() {
    let base = HamokConfig::default;
    for bad in [
        "",
        "a.b",
        "a b",
        "a*",
        "a>",
        "é",
        &"x".repeat(MAX_ID_BYTES + 1),
    ] {
        assert_eq!(
            invalid_key(HamokConfig {
                cluster_id: bad.to_owned(),
                ..base()
            }),
            "cluster_id",
            "{bad:?}"
        );
        assert_eq!(
            invalid_key(HamokConfig {
                peer_id: Some(bad.to_owned()),
                ..base()
            }),
            "peer_id",
            "{bad:?}"
        );
    }
    for good in ["a", "Orders_v2-eu", &"x".repeat(MAX_ID_BYTES)] {
        HamokConfig {
            cluster_id: good.to_owned(),
            peer_id: Some(good.to_owned()),
            ..base()
        }
        .validate()
        .unwrap();
    }
    assert_eq!(
        key_of(load_with(Some("cluster_id = \"my.cluster\""), &[])),
        "cluster_id"
    );
    assert_eq!(
        key_of(load_with(None, &[("HAMOK_CLUSTER_ID", "a b")])),
        "cluster_id"
    );
}

#[test]
fn known_keys_cover_every_field() {
    let keys = known_keys();
    for key in [
        "peer_id",
        "cluster_id",
        "election_timeout_ms",
        "tick_interval_ms",
        "max_frame_bytes",
        "app_data",
        "raft",
        "raft.max_inflight_appends",
        "raft.max_snapshot_bytes",
    ] {
        assert!(keys.contains(key), "{key}");
    }
    // Every string-valued default is read verbatim from the environment.
    if let Ok(Value::Dict(_, dict)) = Value::serialize(HamokConfig::default()) {
        for (key, value) in dict {
            if matches!(value, Value::String(..)) {
                assert!(ENV_STRING_KEYS.contains(&key.as_str()), "{key}");
            }
        }
    }
}

#[test]
fn storage_is_in_memory_unless_a_directory_is_given() {
    let config = load_with(None, &[]).unwrap();
    assert_eq!(config.storage.dir, None);
    let config = load_with(
        Some("[storage]\ndir = \"/var/lib/x\"\nsync = \"interval\"\nsync_interval_ms = 20"),
        &[],
    )
    .unwrap();
    assert_eq!(
        config.storage.dir.as_deref(),
        Some(std::path::Path::new("/var/lib/x"))
    );
    assert_eq!(config.storage.sync, crate::store::SyncPolicy::Interval);
    assert_eq!(config.storage.sync_interval_ms, 20);
    assert!(!config.storage.background_sync, "off unless asked");
    let config = load_with(None, &[("HAMOK_STORAGE__BACKGROUND_SYNC", "true")]).unwrap();
    assert!(config.storage.background_sync);
    // From the environment, a directory named like a number stays a path.
    let config = load_with(
        None,
        &[
            ("HAMOK_STORAGE__DIR", "2024"),
            ("HAMOK_STORAGE__SYNC", "never"),
        ],
    )
    .unwrap();
    assert_eq!(
        config.storage.dir.as_deref(),
        Some(std::path::Path::new("2024"))
    );
    assert_eq!(config.storage.sync, crate::store::SyncPolicy::Never);
}

#[test]
fn invalid_storage_settings_name_their_key() {
    assert_eq!(
        key_of(load_with(Some("[storage]\nsync = \"sometimes\""), &[])),
        "storage.sync"
    );
    assert_eq!(
        key_of(load_with(
            Some("[storage]\nsync = \"interval\"\nsync_interval_ms = 0"),
            &[]
        )),
        "storage.sync_interval_ms"
    );
    assert_eq!(
        key_of(load_with(Some("[storage]\ndir = \"\""), &[])),
        "storage.dir"
    );
}
