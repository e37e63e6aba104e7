//! Collection kinds must be registered on every peer: an unknown kind is refused before it enters the log,
//! and a peer that meets a kind it lacks stops loudly rather than diverge.

use std::any::Any;
use std::time::Duration;

use bytes::Bytes;
use hamok_runtime::state_machine::{ApplyContext, StateMachine};
use hamok_runtime::transport::memory::InProcessHub;
use hamok_runtime::{Hamok, HamokError, HamokEvent};

#[derive(Default)]
struct Flag(bool);

impl StateMachine for Flag {
    fn kind(&self) -> &str {
        "flag"
    }
    fn apply(&mut self, _: &ApplyContext, _: &[u8]) -> Result<Bytes, HamokError> {
        self.0 = true;
        Ok(Bytes::new())
    }
    fn snapshot(&self) -> Result<Bytes, HamokError> {
        Ok(Bytes::from(vec![self.0 as u8]))
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), HamokError> {
        self.0 = data.first() == Some(&1);
        Ok(())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_kinds_are_refused_and_a_peer_missing_one_stops() {
    let hub = InProcessHub::new();
    let build = |id: &str, with_flag: bool| {
        let mut b = Hamok::builder()
            .peer_id(id)
            .cluster_id("kinds-test")
            .election_timeout_ms(150)
            .heartbeat_interval_ms(30)
            .transport(hub.clone());
        if with_flag {
            b = b.register_kind("flag", || Box::new(Flag::default()));
        }
        b.build()
    };
    let a = build("a", true).await.unwrap();
    let b = build("b", false).await.unwrap();
    let (ja, jb) = tokio::join!(a.join(), b.join());
    ja.unwrap();
    jb.unwrap();

    let refused = a.create_collection("x", "no-such-kind").await;
    assert!(
        matches!(refused, Err(HamokError::Rejected(_))),
        "{refused:?}"
    );

    let mut b_events = b.events();
    a.create_collection("f", "flag").await.unwrap();
    // `b` cannot build a `flag`: it reports why and stops instead of silently diverging.
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match b_events.recv().await {
                Ok(HamokEvent::Error(reason)) if reason.contains("flag") => return reason,
                Ok(_) => {}
                Err(e) => panic!("event stream ended: {e}"),
            }
        }
    })
    .await
    .expect("b reports the unknown kind");
    assert!(stopped.contains("cannot follow"), "{stopped}");
    tokio::time::timeout(Duration::from_secs(5), async {
        while !b.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("b stops");
    a.close().await;
}
