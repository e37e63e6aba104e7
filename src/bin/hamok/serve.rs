//! `hamok serve`: one peer and the HTTP gateway over its stores, until Ctrl-C (then it leaves).

use std::time::Duration;

use hamok::stores::Stores;

use crate::ServeArgs;

/// Bound of `leave` on Ctrl-C.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the peer and the gateway; the exit code.
pub async fn run(args: ServeArgs) -> i32 {
    let spec = args.cluster.spec();
    let id = spec.peer_id.clone();
    let hamok = match spec.build(id.as_deref()).await {
        Ok(h) => h,
        Err(e) => return fail("cannot build the peer", e),
    };
    if let Err(e) = hamok.join().await {
        hamok.close().await;
        return fail(
            &format!("cannot join cluster '{}'", args.cluster.cluster),
            e,
        );
    }
    let listener = match tokio::net::TcpListener::bind(&args.http).await {
        Ok(l) => l,
        Err(e) => {
            hamok.close().await;
            return fail(&format!("cannot listen on {}", args.http), e);
        }
    };
    eprintln!(
        "hamok: peer {} serving on http://{}",
        hamok.local_peer_id(),
        args.http
    );
    let options = hamok::gateway::GatewayOptions {
        redirect: args.redirect,
        advertise: args.advertise.clone(),
        ..Default::default()
    };
    let code = tokio::select! {
        r = hamok::gateway::serve(Stores::new(hamok.clone()), listener, options) => match r {
            Ok(()) => 0,
            Err(e) => fail("the gateway stopped", e),
        },
        _ = tokio::signal::ctrl_c() => 0,
    };
    let _ = tokio::time::timeout(LEAVE_TIMEOUT, hamok.leave()).await;
    hamok.close().await;
    code
}

fn fail(what: &str, e: impl std::fmt::Display) -> i32 {
    eprintln!("hamok: {what}: {e}");
    1
}
