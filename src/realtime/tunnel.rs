//! TCP to the upstream for WebSocket sessions, directly or through the outbound proxy.
//!
//! reqwest handles proxies for plain HTTP; a WebSocket needs a raw byte stream, so this opens
//! one through an HTTP proxy (`CONNECT`, RFC 9110 §9.3.6) or a SOCKS5 proxy (RFC 1928, with
//! RFC 1929 username/password). `socks5h://` lets the proxy resolve the name; `socks5://`
//! resolves it here.

use std::io;
use std::net::IpAddr;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

/// Where the upstream's TCP connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Direct,
    Proxy(Url),
}

/// The proxy for `host` when no `upstream.proxy` is set: the standard variables, as reqwest
/// reads them for plain requests (`HTTPS_PROXY`/`HTTP_PROXY` by scheme, then `ALL_PROXY`,
/// with `NO_PROXY` exceptions).
pub fn route_from_env(secure: bool, host: &str) -> Route {
    let var = |name: &str| {
        std::env::var(name)
            .or_else(|_| std::env::var(name.to_ascii_lowercase()))
            .ok()
            .filter(|value| !value.trim().is_empty())
    };
    let no_proxy = var("NO_PROXY").unwrap_or_default();
    if bypasses(&no_proxy, host) {
        return Route::Direct;
    }
    let chosen = if secure {
        var("HTTPS_PROXY")
    } else {
        var("HTTP_PROXY")
    }
    .or_else(|| var("ALL_PROXY"));
    match chosen.and_then(|value| Url::parse(&value).ok()) {
        Some(url) => Route::Proxy(url),
        None => Route::Direct,
    }
}

/// `NO_PROXY` semantics: `*`, exact host names, and domain suffixes (`.example.com` or
/// `example.com` both cover `api.example.com`).
fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .any(|entry| {
            let entry = entry.trim_start_matches('.');
            entry == "*"
                || host.eq_ignore_ascii_case(entry)
                || host
                    .to_ascii_lowercase()
                    .ends_with(&format!(".{}", entry.to_ascii_lowercase()))
        })
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Opens a TCP stream to `host:port` along `route`.
pub async fn connect(route: &Route, host: &str, port: u16) -> io::Result<TcpStream> {
    let stream = match route {
        Route::Direct => TcpStream::connect((host.trim_matches(['[', ']']), port)).await?,
        Route::Proxy(proxy) => {
            let proxy_host = proxy
                .host_str()
                .ok_or_else(|| invalid("the proxy URL has no host"))?;
            let proxy_port =
                proxy
                    .port_or_known_default()
                    .unwrap_or(if proxy.scheme().starts_with("socks") {
                        1080
                    } else {
                        8080
                    });
            let mut stream =
                TcpStream::connect((proxy_host.trim_matches(['[', ']']), proxy_port)).await?;
            stream.set_nodelay(true)?;
            match proxy.scheme() {
                "http" => http_connect(&mut stream, proxy, host, port).await?,
                "socks5" => socks5_connect(&mut stream, proxy, host, port, false).await?,
                "socks5h" => socks5_connect(&mut stream, proxy, host, port, true).await?,
                other => {
                    return Err(invalid(format!(
                        "WebSocket sessions cannot use a {other}:// proxy; use http://, socks5:// or socks5h://"
                    )))
                }
            }
            stream
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn http_connect(
    stream: &mut TcpStream,
    proxy: &Url,
    host: &str,
    port: u16,
) -> io::Result<()> {
    let mut request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if !proxy.username().is_empty() {
        let credentials = format!(
            "{}:{}",
            percent_encoding::percent_decode_str(proxy.username()).decode_utf8_lossy(),
            percent_encoding::percent_decode_str(proxy.password().unwrap_or(""))
                .decode_utf8_lossy()
        );
        let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;

    // Read the proxy's answer head byte by byte, so nothing of the tunnel is consumed.
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return Err(invalid("the proxy's CONNECT answer is too long"));
        }
        let byte = stream.read_u8().await?;
        head.push(byte);
    }
    let status_line = String::from_utf8_lossy(&head);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    if status != "200" {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the proxy refused CONNECT with status {status}"),
        ));
    }
    Ok(())
}

async fn socks5_connect(
    stream: &mut TcpStream,
    proxy: &Url,
    host: &str,
    port: u16,
    remote_dns: bool,
) -> io::Result<()> {
    let with_password = !proxy.username().is_empty();
    let method = if with_password { 0x02 } else { 0x00 };
    stream.write_all(&[0x05, 0x01, method]).await?;
    let mut choice = [0u8; 2];
    stream.read_exact(&mut choice).await?;
    if choice != [0x05, method] {
        return Err(invalid(
            "the SOCKS5 proxy refused the authentication method",
        ));
    }
    if with_password {
        let user = percent_encoding::percent_decode_str(proxy.username()).collect::<Vec<u8>>();
        let pass = percent_encoding::percent_decode_str(proxy.password().unwrap_or(""))
            .collect::<Vec<u8>>();
        let (Ok(user_len), Ok(pass_len)) = (u8::try_from(user.len()), u8::try_from(pass.len()))
        else {
            return Err(invalid(
                "SOCKS5 username and password must be under 256 bytes",
            ));
        };
        let mut auth = vec![0x01, user_len];
        auth.extend_from_slice(&user);
        auth.push(pass_len);
        auth.extend_from_slice(&pass);
        stream.write_all(&auth).await?;
        let mut status = [0u8; 2];
        stream.read_exact(&mut status).await?;
        if status[1] != 0x00 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the SOCKS5 proxy rejected the username or password",
            ));
        }
    }

    let bare_host = host.trim_matches(['[', ']']);
    let mut request = vec![0x05, 0x01, 0x00];
    let address = match bare_host.parse::<IpAddr>() {
        Ok(ip) => Some(ip),
        Err(_) if remote_dns => None,
        Err(_) => Some(
            tokio::net::lookup_host((bare_host, port))
                .await?
                .next()
                .ok_or_else(|| invalid(format!("{bare_host} did not resolve")))?
                .ip(),
        ),
    };
    match address {
        Some(IpAddr::V4(ip)) => {
            request.push(0x01);
            request.extend_from_slice(&ip.octets());
        }
        Some(IpAddr::V6(ip)) => {
            request.push(0x04);
            request.extend_from_slice(&ip.octets());
        }
        None => {
            let name = bare_host.as_bytes();
            let len = u8::try_from(name.len()).map_err(|_| invalid("host name too long"))?;
            request.push(0x03);
            request.push(len);
            request.extend_from_slice(name);
        }
    }
    request.extend_from_slice(&port.to_be_bytes());
    stream.write_all(&request).await?;

    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await?;
    if reply[1] != 0x00 {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "the SOCKS5 proxy could not connect (reply code {})",
                reply[1]
            ),
        ));
    }
    // Skip the bound address the proxy reports.
    let skip = match reply[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => usize::from(stream.read_u8().await?),
        _ => return Err(invalid("the SOCKS5 proxy sent an unknown address type")),
    };
    let mut rest = vec![0u8; skip + 2];
    stream.read_exact(&mut rest).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matches_hosts_and_domain_suffixes() {
        assert!(bypasses("*", "api.openai.com"));
        assert!(bypasses("openai.com", "api.openai.com"));
        assert!(bypasses(" .openai.com ,x", "api.openai.com"));
        assert!(bypasses("127.0.0.1", "127.0.0.1"));
        assert!(bypasses("::1", "[::1]"));
        assert!(!bypasses("notopenai.com", "api.openai.com"));
        assert!(!bypasses("", "api.openai.com"));
    }
}
