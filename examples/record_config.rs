//! A replicated configuration record: typed fields, per-field events on every replica, a late
//! replica that opens the record with an initial object (which fills only the missing fields), and a
//! multi-field compare-and-set for a coordinated change.
//!
//! ```text
//! cargo run --example record_config
//! ```

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Config {
    log_level: String,
    max_connections: u32,
    maintenance: bool,
    #[serde(default)]
    banner: Option<String>,
}

const LOG_LEVEL: Field<Config, String> = Field::new("log_level");
const MAX_CONNECTIONS: Field<Config, u32> = Field::new("max_connections");
const MAINTENANCE: Field<Config, bool> = Field::new("maintenance");
const BANNER: Field<Config, Option<String>> = Field::new("banner");

fn defaults() -> Config {
    Config {
        log_level: "info".into(),
        max_connections: 100,
        maintenance: false,
        banner: None,
    }
}

#[tokio::main]
async fn main() -> Result<(), HamokError> {
    let hub = InProcessHub::new();
    let build = |name: &str| {
        register_kinds(Hamok::builder())
            .peer_id(name)
            .cluster_id("record-config")
            .transport(hub.clone())
            .build()
    };
    let a = build("svc-a").await?;
    let b = build("svc-b").await?;
    let (ja, jb) = tokio::join!(a.join(), b.join());
    ja?;
    jb?;

    let config_a = a.get_or_create_record_with("config", defaults()).await?;
    let config_b = b.get_or_create_record::<Config>("config").await?;
    let mut events = config_b.events();

    // An operator raises the connection limit on replica A; B sees the field change.
    config_a.set(MAX_CONNECTIONS, &250).await?;
    config_a.set(LOG_LEVEL, &"debug".into()).await?;
    for _ in 0..2 {
        match events.recv().await.expect("an event") {
            RecordEvent::Update { field, old, new } if field == MAX_CONNECTIONS.name() => {
                println!(
                    "B sees {field}: {} -> {}",
                    old.get(MAX_CONNECTIONS)?,
                    new.get(MAX_CONNECTIONS)?
                );
            }
            RecordEvent::Update { field, old, new } if field == LOG_LEVEL.name() => {
                println!(
                    "B sees {field}: {} -> {}",
                    old.get(LOG_LEVEL)?,
                    new.get(LOG_LEVEL)?
                );
            }
            other => println!("B sees {other:?}"),
        }
    }
    config_b.sync().await?;
    assert_eq!(config_b.get(MAX_CONNECTIONS)?, Some(250));

    // A replica started later opens the record with the defaults: it overwrites nothing.
    let c = build("svc-c").await?;
    c.join().await?;
    let config_c = c.get_or_create_record_with("config", defaults()).await?;
    let seen = config_c.instance()?;
    println!("C starts with {seen:?}");
    assert_eq!(seen.max_connections, 250);

    // Enter maintenance only if nobody else did and the level is still `debug`: both fields are checked
    // when the change applies, so two operators cannot both win.
    let entered = config_c
        .update_instance_if(
            Patch::new()
                .with(MAINTENANCE, &true)
                .with(BANNER, &Some("back soon".into())),
            Patch::new()
                .with(MAINTENANCE, &false)
                .with(LOG_LEVEL, &"debug".into()),
        )
        .await?;
    let again = config_a
        .update_instance_if(
            Patch::new().with(MAINTENANCE, &true),
            Patch::new().with(MAINTENANCE, &false),
        )
        .await?;
    println!("C entered maintenance: {entered}; A entered too: {again}");
    assert!(entered && !again);
    println!(
        "final config on A: {:?}",
        config_a.instance_linearizable().await?
    );
    for p in [&a, &b, &c] {
        p.close().await;
    }
    Ok(())
}
