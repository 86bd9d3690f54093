//! Accepting connections, deciding which engine serves each, and stopping gracefully.
//!
//! A plain connection starts in the fast engine and goes to hyper at the first request the
//! fast engine does not take; a TLS connection goes to hyper. The connection loop is ours
//! rather than poem's built-in server, because a proxy needs two things that one does not
//! give: a body error must abort the client's
//! connection (poem re-polls a finished connection, which then ends the chunked body cleanly,
//! hiding an upstream failure), and a client that goes away must drop its response at once,
//! so the upstream request is cancelled.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use poem::endpoint::DynEndpoint;
use poem::web::{LocalAddr, RemoteAddr};

use super::fast;
use super::tls::{Tls, ACME_TLS_ALPN};
use super::Serving;
use crate::config::ServerConfig;
use crate::realtime::Sessions;
use std::pin::Pin;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

type ResponseBody = http_body_util::combinators::BoxBody<Bytes, io::Error>;

/// How long realtime sessions get to send their 1001 close frames at the end of the grace.
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(6);

/// A bound listening socket, so callers (and tests on port 0) learn the address before serving.
pub struct Listener {
    listener: TcpListener,
    local: SocketAddr,
    tls: Option<Arc<Tls>>,
    /// Which of the app's per-worker endpoints this listener's connections use.
    worker: usize,
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> io::Result<Listener> {
        Listener::new(TcpListener::bind(addr).await?, 0)
    }

    fn new(listener: TcpListener, worker: usize) -> io::Result<Listener> {
        let local = listener.local_addr()?;
        Ok(Listener {
            listener,
            local,
            tls: None,
            worker,
        })
    }

    /// A listener for `worker` that shares its port with the other workers' (`SO_REUSEPORT`:
    /// the kernel spreads new connections across them). Call inside the worker's runtime.
    #[cfg(unix)]
    pub fn bind_shared(addr: SocketAddr, worker: usize) -> io::Result<Listener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        Listener::new(socket.listen(1024)?, worker)
    }

    /// Wraps a bound, non-blocking std listener. Call inside the serving runtime.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<Listener> {
        Listener::new(TcpListener::from_std(listener)?, 0)
    }

    /// Serves HTTPS with `tls` instead of plain HTTP.
    pub fn with_tls(mut self, tls: Option<Arc<Tls>>) -> Listener {
        self.tls = tls;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// Serves `app` until `shutdown` resolves, then stops accepting and lets in-flight requests
/// and streams finish for up to `server.shutdown_grace` before dropping them.
pub async fn serve(
    listener: Listener,
    app: Arc<Serving>,
    shutdown: impl Future<Output = ()>,
    settings: ServerConfig,
) -> io::Result<()> {
    let settings = Arc::new(settings);
    let builder = hyper_builder(&settings);
    // At max_connections, stop accepting: new clients wait in the listen backlog instead of
    // exhausting file descriptors.
    let connection_slots = settings
        .max_connections
        .map(|n| Arc::new(tokio::sync::Semaphore::new(n.get() as usize)));
    let graceful = GracefulShutdown::new();
    // Started when the server stops accepting: fast-engine connections close between requests,
    // as hyper's do under `graceful`.
    let drain = Arc::new(fast::Drain::default());
    // Flipped when the grace period is over: connections still open are dropped.
    let (hard_stop, hard_stopped) = watch::channel(false);
    let local = LocalAddr(listener.local.into());
    tokio::pin!(shutdown);
    while let Some((stream, remote, slot)) =
        accept(&listener, connection_slots.as_ref(), shutdown.as_mut()).await
    {
        let connection = Accepted {
            app: Arc::clone(&app),
            worker: listener.worker,
            builder: builder.clone(),
            local: local.clone(),
            remote,
            watcher: graceful.watcher(),
            hard_stopped: hard_stopped.clone(),
        };
        let tls = listener.tls.as_ref().map(|tls| tls.acceptor());
        connection.spawn(stream, slot, tls, &settings, &drain);
    }
    let worker = listener.worker;
    drop(listener);
    drain.start();
    let stopping = Stopping {
        worker,
        sessions: app.sessions.clone(),
        grace: settings.shutdown_grace,
    };
    stopping.finish(graceful, hard_stop).await;
    Ok(())
}

/// hyper's server for `settings`. A client gets `header_read_timeout` to send its request
/// head (slowloris), and a head may not outgrow `max_header_bytes` (hyper answers 431).
fn hyper_builder(settings: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let max_header_bytes = usize::try_from(settings.max_header_bytes).unwrap_or(usize::MAX);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// The next connection, with its place under `max_connections`; `None` once `shutdown` has
/// resolved.
async fn accept(
    listener: &Listener,
    slots: Option<&Arc<Semaphore>>,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> Option<(TcpStream, SocketAddr, Option<OwnedSemaphorePermit>)> {
    let slot = match slots {
        Some(slots) => tokio::select! {
            () = shutdown.as_mut() => return None,
            permit = Arc::clone(slots).acquire_owned() => permit.ok(),
        },
        None => None,
    };
    loop {
        let accepted = tokio::select! {
            () = shutdown.as_mut() => return None,
            accepted = listener.listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                // Events must leave the moment they are written, not wait for Nagle to
                // coalesce them. A socket that refuses still works, only slower.
                let _ = stream.set_nodelay(true);
                return Some((stream, remote, slot));
            }
            Err(err) => {
                // Out of file descriptors or similar: retrying at once would spin, so pause
                // and let in-flight requests free what they hold.
                tracing::warn!(error = %err, "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A worker that has stopped accepting, letting what is in flight finish.
struct Stopping {
    worker: usize,
    sessions: Sessions,
    grace: Duration,
}

impl Stopping {
    /// Waits for every connection and realtime session to end, for up to the grace; past
    /// it, sessions close with 1001 and `hard_stop` drops the connections still open.
    async fn finish(self, graceful: GracefulShutdown, hard_stop: watch::Sender<bool>) {
        let Stopping {
            worker,
            sessions,
            grace,
        } = self;
        sessions.stop_accepting();
        tracing::info!(
            worker,
            grace = %humantime::format_duration(grace),
            realtime_sessions = sessions.open(),
            "no longer accepting; waiting for in-flight requests"
        );
        let everything = futures_util::future::join(graceful.shutdown(), sessions.finished());
        tokio::select! {
            _ = everything => tracing::info!(worker, "all connections finished"),
            () = tokio::time::sleep(grace) => {
                tracing::warn!(
                    realtime_sessions = sessions.open(),
                    "server.shutdown_grace expired; closing the remaining connections"
                );
                // Realtime sessions close both sides with 1001 (going away) before they end.
                sessions.close_all();
                let _ = tokio::time::timeout(SESSION_CLOSE_WAIT, sessions.finished()).await;
                let _ = hard_stop.send(true);
            }
        }
    }
}

/// Everything one accepted connection needs to be served.
struct Accepted {
    app: Arc<Serving>,
    worker: usize,
    builder: auto::Builder<TokioExecutor>,
    local: LocalAddr,
    remote: SocketAddr,
    watcher: hyper_util::server::graceful::Watcher,
    hard_stopped: watch::Receiver<bool>,
}

impl Accepted {
    /// Serves the connection in a task of its own, holding its place under `max_connections`
    /// (`slot`): a plain one in the fast engine first, one for `tls` after its handshake.
    fn spawn(
        self,
        stream: TcpStream,
        slot: Option<OwnedSemaphorePermit>,
        tls: Option<Arc<TlsAcceptor>>,
        settings: &Arc<ServerConfig>,
        drain: &Arc<fast::Drain>,
    ) {
        let settings = Arc::clone(settings);
        match tls {
            None => {
                let drain = Arc::clone(drain);
                tokio::spawn(async move {
                    let _slot = slot;
                    self.serve_plain(stream, &settings, &drain).await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    self.serve_tls(stream, &acceptor, settings.header_read_timeout)
                        .await;
                });
            }
        }
    }

    /// Serves a TLS connection with hyper once its handshake is done, within
    /// `server.header_read_timeout`.
    async fn serve_tls(self, stream: TcpStream, acceptor: &TlsAcceptor, timeout: Duration) {
        let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out (server.header_read_timeout)");
                return;
            }
        };
        // An ACME TLS-ALPN-01 validation only needs the handshake.
        if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
            return;
        }
        self.serve(stream, http::uri::Scheme::HTTPS).await;
    }

    /// Serves a plain TCP connection: in the fast engine while its requests qualify, then, from
    /// the first that does not, with hyper.
    async fn serve_plain(
        self,
        mut stream: TcpStream,
        settings: &ServerConfig,
        drain: &fast::Drain,
    ) {
        if self.app.fast(self.worker).is_none() {
            return self.serve(stream, http::uri::Scheme::HTTP).await;
        }
        let (app, worker) = (Arc::clone(&self.app), self.worker);
        let mut hard_stopped = self.hard_stopped.clone();
        // The graceful-shutdown watcher stays with the connection meanwhile, so shutdown
        // waits for the fast engine's request in flight as for hyper's.
        let ended = tokio::select! {
            ended = fast::serve(&mut stream, self.remote, settings, drain, || app.fast(worker)) => ended,
            _ = hard_stopped.wait_for(|stop| *stop) => return,
        };
        match ended {
            fast::Ended::Handover(read) => {
                self.app.metrics.count_fast_engine_handover();
                self.serve(Rewind::new(read, stream), http::uri::Scheme::HTTP)
                    .await;
            }
            // A FIN after the last answer, not a reset that could overtake it.
            fast::Ended::Closed => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
            }
        }
    }

    async fn serve<I>(self, io: I, scheme: http::uri::Scheme)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Accepted {
            app,
            worker,
            builder,
            local,
            remote,
            watcher,
            mut hard_stopped,
        } = self;
        let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            // The endpoint of the manifest loaded now: a reload between two requests on one
            // connection serves the second with the new routes.
            let worker = app.worker(worker);
            let request: poem::Request = (
                req,
                local.clone(),
                RemoteAddr(remote.into()),
                scheme.clone(),
            )
                .into();
            async move {
                // Straight to the boxed endpoint: poem's `get_response` and its `Arc`/`Box`
                // forwarding impls would each keep a copy of the request in this future, which
                // hyper holds for the connection's lifetime.
                let response = match DynEndpoint::call(&*worker.endpoint, request).await {
                    Ok(response) => response,
                    Err(err) => err.into_response(),
                };
                Ok::<_, Infallible>(hyper::Response::<ResponseBody>::from(response))
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = watcher.watch(connection);
        tokio::select! {
            result = connection => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
            }
            _ = hard_stopped.wait_for(|stop| *stop) => {}
        }
    }
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

/// A connection with bytes already read from it in front: what the fast engine read of the
/// request it hands to hyper.
struct Rewind<S> {
    read: bytes::BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(read: bytes::BytesMut, inner: S) -> Rewind<S> {
        Rewind { read, inner }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
