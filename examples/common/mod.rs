//! What the in-process examples share: the replicas of one service, started together on one hub.
//! (Not an example itself: cargo only builds `examples/*.rs` and `examples/*/main.rs`.)

use hamok::prelude::*;
use hamok::runtime::transport::memory::InProcessHub;

/// Builds one peer per name on `hub`, in cluster `cluster`, with every collection kind registered and
/// `customize` applied (a remote map's store, timings), then joins them all at once, as replicas started
/// together do: they discover each other over the hub and elect a leader.
pub async fn start_replicas<N: AsRef<str>>(
    hub: &InProcessHub,
    cluster: &str,
    names: impl IntoIterator<Item = N>,
    customize: impl Fn(HamokBuilder) -> HamokBuilder,
) -> Result<Vec<Hamok>, HamokError> {
    let mut peers = Vec::new();
    for name in names {
        peers.push(
            customize(register_kinds(Hamok::builder()))
                .peer_id(name.as_ref())
                .cluster_id(cluster)
                .transport(hub.clone())
                .build()
                .await?,
        );
    }
    let joins: Vec<_> = peers
        .iter()
        .cloned()
        .map(|p| tokio::spawn(async move { p.join().await }))
        .collect();
    for j in joins {
        j.await.expect("join task")?;
    }
    Ok(peers)
}
