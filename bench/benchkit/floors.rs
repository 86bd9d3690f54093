//! Floors for bench/run: hyper alone, and a bare byte relay.

use std::convert::Infallible;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A bare reverse proxy on hyper alone: hyper's HTTP/1 server and hyper-util's pooled client,
/// one current-thread runtime per core on a shared `SO_REUSEPORT` port, as the gateway runs.
/// No routing, checks, metrics or logs: the floor any hyper-based gateway starts from,
/// measured in the same run as the gateway and nginx.
pub fn hyper_proxy(addr: String, upstream: String) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let upstream: &'static str = Box::leak(upstream.trim_end_matches('/').into());
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(hyper_proxy_worker(addr, upstream))
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
}

type HyperClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::combinators::BoxBody<Bytes, hyper::Error>,
>;

async fn hyper_proxy_worker(addr: std::net::SocketAddr, upstream: &'static str) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseport(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(1024).unwrap();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: HyperClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);
    loop {
        let (stream, _) = listener.accept().await.unwrap();
        stream.set_nodelay(true).unwrap();
        let client = client.clone();
        let service =
            hyper::service::service_fn(move |req| hyper_forward(client.clone(), upstream, req));
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service),
        );
    }
}

async fn hyper_forward(
    client: HyperClient,
    upstream: &'static str,
    req: http::Request<hyper::body::Incoming>,
) -> Result<http::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>, Infallible> {
    use http_body_util::BodyExt;
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("{upstream}{path}").parse().unwrap();
    parts.headers.remove(http::header::HOST);
    match client
        .request(http::Request::from_parts(parts, body.boxed()))
        .await
    {
        Ok(response) => Ok(response.map(BodyExt::boxed)),
        Err(_) => {
            let empty = http_body_util::Empty::new().map_err(|never| match never {});
            let mut response = http::Response::new(empty.boxed());
            *response.status_mut() = http::StatusCode::BAD_GATEWAY;
            Ok(response)
        }
    }
}

/// The floor of one more hop: a byte relay with a blocked thread each way, no parsing, no
/// event loop. What it adds to an SSE event's lag is what the machine charges for waking one
/// more sleeping thread and one more loopback write: about the least a proxy in user space
/// that sleeps when idle can add.
pub fn tcp_relay(addr: String, upstream: String) {
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    for client in listener.incoming() {
        let client = client.unwrap();
        let server = std::net::TcpStream::connect(&upstream).unwrap();
        client.set_nodelay(true).unwrap();
        server.set_nodelay(true).unwrap();
        let (client_back, server_back) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || pump(client, server));
        std::thread::spawn(move || pump(server_back, client_back));
    }
}

fn pump(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
