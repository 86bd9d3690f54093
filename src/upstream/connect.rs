//! Connections to the upstream: TCP within `upstream.connect_timeout`, through the outbound
//! proxy when one applies, and TLS for `https://` and `wss://`. One connector serves the
//! pooled HTTP client, the raw HTTP/1 pool and WebSocket sessions.
//!
//! Which proxy applies is hyper-util's [`Matcher`]: `upstream.proxy` for every destination,
//! else the standard variables (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`), read
//! as curl reads them. The tunnels are hyper-util's too: HTTP `CONNECT` ([`Tunnel`]) and
//! SOCKS5 ([`SocksV5`]; `socks5h://` lets the proxy resolve the name). A plain `http://`
//! request through an HTTP proxy is forwarded in absolute form, as proxies expect; a
//! WebSocket always tunnels.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::{SocksV5, Tunnel};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::message::Io;

/// A boxed error from any stage of connecting.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a connection is for, which decides the TLS protocols offered and how an HTTP proxy
/// carries a plain `http://` destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Pooled HTTP requests: HTTP/2 by ALPN where offered; plain HTTP through an HTTP proxy
    /// in absolute form.
    Requests,
    /// A WebSocket session: HTTP/1.1 only, and always a tunnel through an HTTP proxy.
    WebSocket,
}

/// Makes upstream connections. Cheap to clone: the settings are shared.
#[derive(Clone)]
pub(crate) struct Connector {
    /// `upstream.connect_timeout`.
    connect_timeout: Duration,
    tcp: HttpConnector,
    /// TLS for HTTP requests (`h2`, `http/1.1`) and for WebSockets and proxies (`http/1.1`).
    tls_requests: tokio_rustls::TlsConnector,
    tls_http1: tokio_rustls::TlsConnector,
    proxies: Arc<Matcher>,
}

impl Connector {
    /// A connector with `connect_timeout` for each TCP connection, the proxy `proxy` (else the
    /// standard variables), and `tls`'s root certificates; `http2` offers HTTP/2 by ALPN to
    /// HTTPS upstreams.
    pub(crate) fn new(
        connect_timeout: Duration,
        proxy: Option<&url::Url>,
        tls: &rustls::ClientConfig,
        http2: bool,
    ) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        // The destination may be https:// or a proxy's socks5://: TLS and tunnels come after.
        tcp.enforce_http(false);
        let with_alpn = |protocols: &[&[u8]]| {
            let mut config = tls.clone();
            config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        };
        let proxies = match proxy {
            Some(proxy) => Matcher::builder().all(proxy.to_string()).build(),
            None => Matcher::from_env(),
        };
        Connector {
            connect_timeout,
            tcp,
            tls_requests: if http2 {
                with_alpn(&[b"h2", b"http/1.1"])
            } else {
                with_alpn(&[b"http/1.1"])
            },
            tls_http1: with_alpn(&[b"http/1.1"]),
            proxies: Arc::new(proxies),
        }
    }

    /// The proxy that carries requests to `dst`, if one applies.
    pub(crate) fn proxy_for(&self, dst: &Uri) -> Option<Intercept> {
        self.proxies.intercept(dst)
    }

    /// `upstream.connect_timeout`, for the messages that name it.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A TCP connection to `dst`'s host and port, with no proxy: for the raw HTTP/1
    /// transport, which is only used where no proxy applies. Its addresses are tried in
    /// turn, all within the connect timeout.
    ///
    /// Why not hyper-util's connector, as everything else: its connecting future is boxed,
    /// and when a thousand streams open at once the boxes, freed once connected, leave holes
    /// among what the streams keep (about 1 KiB of memory per open stream, measured).
    pub(crate) async fn tcp(&self, dst: &Uri) -> Result<TcpStream, BoxError> {
        let host = dst.host().ok_or("the URL has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = dst
            .port_u16()
            .unwrap_or(if dst.scheme_str() == Some("https") {
                443
            } else {
                80
            });
        let connecting = TcpStream::connect((host, port));
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(connected) => connected?,
            Err(_) => return Err(io::Error::from(io::ErrorKind::TimedOut).into()),
        };
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// TLS over `tcp` to `dst`, offering HTTP/1.1 only: for the raw transport.
    pub(crate) async fn tls_http1(
        &self,
        dst: &Uri,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, BoxError> {
        Ok(self.tls_http1.connect(server_name(dst)?, tcp).await?)
    }

    /// A connection to `dst` (scheme, host and port) for `purpose`: through a proxy when one
    /// applies, and TLS when `dst` is `https://` or `wss://`.
    pub(crate) async fn connect(&self, dst: &Uri, purpose: Purpose) -> Result<Dialed, BoxError> {
        let secure = matches!(dst.scheme_str(), Some("https" | "wss"));
        // The proxy rules and the tunnels speak http/https; ws/wss are the same destinations.
        let dst = with_port(&http_scheme(dst, secure)?)?;
        let (io, proxied) = match self.proxies.intercept(&dst) {
            None => (self.plain(&dst).await?, false),
            Some(proxy) => self.through(&proxy, &dst, secure, purpose).await?,
        };
        if !secure {
            return Ok(Dialed {
                io,
                proxied,
                h2: false,
            });
        }
        let tls = match purpose {
            Purpose::Requests => &self.tls_requests,
            Purpose::WebSocket => &self.tls_http1,
        };
        let tls = tls.connect(server_name(&dst)?, io).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Dialed {
            io: Box::new(tls),
            proxied: false,
            h2,
        })
    }

    async fn plain(&self, dst: &Uri) -> Result<Box<dyn Io>, BoxError> {
        let mut tcp = self.tcp.clone();
        Ok(Box::new(tcp.call(dst.clone()).await?.into_inner()))
    }

    /// A stream to `dst` through `proxy`, and whether requests on it go in absolute form.
    async fn through(
        &self,
        proxy: &Intercept,
        dst: &Uri,
        secure: bool,
        purpose: Purpose,
    ) -> Result<(Box<dyn Io>, bool), BoxError> {
        let hop = ProxyHop {
            tcp: self.tcp.clone(),
            tls: self.tls_http1.clone(),
        };
        let proxy_uri = with_port(proxy.uri())?;
        match proxy.uri().scheme_str() {
            Some(scheme @ ("socks5" | "socks5h")) => {
                let mut socks =
                    SocksV5::new(proxy_uri, self.tcp.clone()).local_dns(scheme == "socks5");
                if let Some((user, pass)) = proxy.raw_auth() {
                    socks = socks.with_auth(user.to_owned(), pass.to_owned());
                }
                Ok((Box::new(socks.call(dst.clone()).await?.into_inner()), false))
            }
            Some("http" | "https") if secure || purpose == Purpose::WebSocket => {
                let mut tunnel = Tunnel::new(proxy_uri, hop);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Ok((
                    Box::new(tunnel.call(dst.clone()).await?.0.into_inner()),
                    false,
                ))
            }
            Some("http" | "https") => {
                let mut hop = hop;
                Ok((Box::new(hop.call(proxy_uri).await?.0.into_inner()), true))
            }
            _ => Err("the proxy's scheme is not http, https, socks5 or socks5h".into()),
        }
    }
}

/// An upstream connection, ready for HTTP or a WebSocket handshake.
pub(crate) struct Dialed {
    io: Box<dyn Io>,
    /// Requests go in absolute form to an HTTP proxy.
    proxied: bool,
    /// TLS negotiated HTTP/2.
    h2: bool,
}

impl Dialed {
    pub(crate) fn into_io(self) -> Box<dyn Io> {
        self.io
    }
}

impl Service<Uri> for Connector {
    type Response = HyperDialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HyperDialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connector = self.clone();
        Box::pin(async move {
            let conn = connector.connect(&dst, Purpose::Requests).await?;
            Ok(HyperDialed(TokioIo::new(conn)))
        })
    }
}

/// An upstream connection as hyper's client takes it. It reports no connection details
/// beyond proxying and HTTP/2: hyper-util would copy addresses into every response's
/// extensions (a map, a box and a table per request) that the gateway never reads.
pub(crate) struct HyperDialed(TokioIo<Dialed>);

impl Connection for HyperDialed {
    fn connected(&self) -> Connected {
        let conn = self.0.inner();
        let connected = Connected::new().proxy(conn.proxied);
        if conn.h2 {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

/// The first hop to an HTTP or HTTPS proxy, as hyper-util's [`Tunnel`] takes it.
#[derive(Clone)]
struct ProxyHop {
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
}

impl Service<Uri> for ProxyHop {
    type Response = HyperDialed;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<HyperDialed, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, proxy: Uri) -> Self::Future {
        let ProxyHop { mut tcp, tls } = self.clone();
        Box::pin(async move {
            let stream = tcp.call(proxy.clone()).await?.into_inner();
            let io: Box<dyn Io> = if proxy.scheme_str() == Some("https") {
                Box::new(tls.connect(server_name(&proxy)?, stream).await?)
            } else {
                Box::new(stream)
            };
            Ok(HyperDialed(TokioIo::new(Dialed {
                io,
                proxied: false,
                h2: false,
            })))
        })
    }
}

/// `dst` with `ws`/`wss` read as `http`/`https`.
fn http_scheme(dst: &Uri, secure: bool) -> Result<Uri, BoxError> {
    if matches!(dst.scheme_str(), Some("http" | "https")) {
        return Ok(dst.clone());
    }
    let mut parts = dst.clone().into_parts();
    parts.scheme = Some(if secure {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    Ok(Uri::from_parts(parts)?)
}

/// `uri` with its port spelled out (the scheme's default otherwise; 1080 for SOCKS), as the
/// tunnels need: they would take 443 for any URI without one.
fn with_port(uri: &Uri) -> Result<Uri, BoxError> {
    let host = uri.host().ok_or("the URL has no host")?;
    let port = match (uri.port_u16(), uri.scheme_str()) {
        (Some(port), _) => port,
        (None, Some("https" | "wss")) => 443,
        (None, Some("socks5" | "socks5h")) => 1080,
        (None, _) => 80,
    };
    let scheme = uri.scheme_str().unwrap_or("http");
    Ok(format!("{scheme}://{host}:{port}").parse()?)
}

fn server_name(uri: &Uri) -> Result<rustls::pki_types::ServerName<'static>, BoxError> {
    let host = uri.host().ok_or("the URL has no host")?;
    Ok(rustls::pki_types::ServerName::try_from(
        host.trim_matches(['[', ']']).to_owned(),
    )?)
}

impl AsyncRead for Dialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Read for HyperDialed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for HyperDialed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_spelled_out_for_the_tunnels() {
        let port = |uri: &str| with_port(&uri.parse().unwrap()).unwrap().to_string();
        assert_eq!(port("http://proxy"), "http://proxy:80/");
        assert_eq!(
            port("https://api.openai.com"),
            "https://api.openai.com:443/"
        );
        assert_eq!(port("socks5h://proxy"), "socks5h://proxy:1080/");
        assert_eq!(port("http://[::1]:3128"), "http://[::1]:3128/");
    }
}
