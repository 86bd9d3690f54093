//! Accepting connections and stopping gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use poem::listener::Acceptor;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Endpoint, Server};
use tokio::net::{TcpListener, TcpStream};

/// A TCP acceptor that turns Nagle's algorithm off on every connection, so a streamed event
/// leaves the moment it is written instead of waiting for more bytes to coalesce.
pub struct NodelayAcceptor {
    listener: TcpListener,
    local: SocketAddr,
}

impl NodelayAcceptor {
    pub async fn bind(addr: SocketAddr) -> io::Result<NodelayAcceptor> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        Ok(NodelayAcceptor { listener, local })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Acceptor for NodelayAcceptor {
    type Io = TcpStream;

    fn local_addr(&self) -> Vec<LocalAddr> {
        vec![LocalAddr(self.local.into())]
    }

    async fn accept(
        &mut self,
    ) -> io::Result<(TcpStream, LocalAddr, RemoteAddr, http::uri::Scheme)> {
        loop {
            match self.listener.accept().await {
                Ok((stream, remote)) => {
                    // Best effort: a socket that refuses NODELAY still works, only slower.
                    let _ = stream.set_nodelay(true);
                    return Ok((
                        stream,
                        LocalAddr(self.local.into()),
                        RemoteAddr(remote.into()),
                        http::uri::Scheme::HTTP,
                    ));
                }
                Err(err) => {
                    // Out of file descriptors or similar: poem would retry at once and spin,
                    // so pause briefly and let in-flight requests free what they hold.
                    tracing::warn!(error = %err, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Serves `app` until `shutdown` resolves, then stops accepting and lets in-flight requests
/// and streams finish for up to `grace` before dropping them.
pub async fn serve<E>(
    acceptor: NodelayAcceptor,
    app: E,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) -> io::Result<()>
where
    E: Endpoint + 'static,
{
    Server::new_with_acceptor(acceptor)
        .run_with_graceful_shutdown(app, shutdown, Some(grace))
        .await
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}
