//! The Realtime WebSocket through the gateway, against an in-process WebSocket upstream.
// tungstenite's handshake callback type returns its (large) refusal response by value.
#![allow(clippy::result_large_err)]

mod keys_and_metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support;
use crate::support::{bearer, connect, read_head, Binary, Gateway, RawUpstream, Session, KEY};
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const WAIT: Duration = Duration::from_secs(10);

/// A WebSocket upstream: records each handshake, answers it (or refuses it) with `answer`,
/// then runs `behave` on the session.
struct WsUpstream {
    addr: SocketAddr,
    handshakes: Arc<Mutex<Vec<HeaderMap>>>,
    connections: Arc<AtomicUsize>,
}

impl WsUpstream {
    async fn start<B, F>(
        answer: impl Fn(&Request, Response) -> Result<Response, ErrorResponse> + Send + Sync + 'static,
        behave: B,
    ) -> WsUpstream
    where
        B: Fn(Session) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let behave = Arc::new(behave);
        let (seen, count) = (Arc::clone(&handshakes), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (seen, answer, behave) =
                    (Arc::clone(&seen), Arc::clone(&answer), Arc::clone(&behave));
                tokio::spawn(async move {
                    let callback = |req: &Request, resp: Response| {
                        seen.lock().unwrap().push(req.headers().clone());
                        answer(req, resp)
                    };
                    let config = WebSocketConfig::default()
                        .max_message_size(Some(64 << 20))
                        .max_frame_size(Some(64 << 20));
                    if let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(
                        stream,
                        callback,
                        Some(config),
                    )
                    .await
                    {
                        behave(ws).await;
                    }
                });
            }
        });
        WsUpstream {
            addr,
            handshakes,
            connections,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn last_handshake(&self) -> HeaderMap {
        self.handshakes
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no handshake")
    }
}

fn accept_all(_: &Request, resp: Response) -> Result<Response, ErrorResponse> {
    Ok(resp)
}

/// Picks the first subprotocol the client offered that is not a key carrier.
fn choose_realtime(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if let Some(list) = req.headers().get("sec-websocket-protocol") {
        let chosen = list
            .to_str()
            .unwrap()
            .split(',')
            .map(str::trim)
            .find(|p| !p.starts_with("openai-insecure-api-key."))
            .unwrap()
            .to_owned();
        resp.headers_mut()
            .insert("sec-websocket-protocol", chosen.parse().unwrap());
    }
    resp.headers_mut()
        .insert("x-request-id", "req_realtime".parse().unwrap());
    Ok(resp)
}

async fn echo(mut ws: Session) {
    while let Some(Ok(message)) = ws.next().await {
        match message {
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
            other => {
                if ws.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
}

fn manifest(upstream: &str, extra: &str) -> String {
    format!(
        "[upstream]\nbase_url = \"{upstream}\"\nconnect_timeout = \"2s\"\n{extra}\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/realtime\"\nbody = \"websocket\"\n\
         [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n"
    )
}

async fn next_message(ws: &mut Session) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("no message in time")
        .expect("the stream ended")
        .expect("the stream failed")
}

#[tokio::test]
async fn auth_beta_and_subprotocols_are_forwarded_and_the_chosen_one_returned() {
    let upstream = WsUpstream::start(choose_realtime, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, response) = connect(
        gateway.addr,
        &[
            ("authorization", bearer()),
            ("openai-beta", "realtime=v1".into()),
            ("openai-organization", "org-1".into()),
            ("openai-project", "proj-1".into()),
            (
                "sec-websocket-protocol",
                format!("realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1"),
            ),
            ("x-forwarded-for", "203.0.113.5".into()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    assert_eq!(response.headers()["x-request-id"], "req_realtime");
    let seen = upstream.last_handshake();
    assert_eq!(seen["authorization"], bearer().as_str());
    assert_eq!(seen["openai-beta"], "realtime=v1");
    assert_eq!(seen["openai-organization"], "org-1");
    assert_eq!(seen["openai-project"], "proj-1");
    assert_eq!(
        seen["sec-websocket-protocol"],
        format!("realtime, openai-insecure-api-key.{KEY}, openai-beta.realtime-v1").as_str()
    );
    assert_eq!(seen["host"], upstream.addr.to_string().as_str());
    assert!(seen.get("x-forwarded-for").is_none());

    // Text, binary and ping pass; what comes back is what the upstream sent.
    ws.send(Message::text(r#"{"type":"session.update"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await,
        Message::text(r#"{"type":"session.update"}"#)
    );
    let audio: Vec<u8> = (0..=255u8).cycle().take(32_000).collect();
    ws.send(Message::binary(audio.clone())).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::binary(audio));
}

#[tokio::test]
async fn a_key_subprotocol_alone_is_a_credential_like_a_browser_sends() {
    let upstream = WsUpstream::start(choose_realtime, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, response) = connect(
        gateway.addr,
        &[(
            "sec-websocket-protocol",
            format!("realtime, openai-insecure-api-key.{KEY}"),
        )],
    )
    .await
    .unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
}

#[tokio::test]
async fn no_credential_is_401_and_the_upstream_is_never_dialled() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let err = connect(
        gateway.addr,
        &[("sec-websocket-protocol", "realtime".into())],
    )
    .await
    .unwrap_err();
    let WsError::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}")
    };
    assert_eq!(response.status(), 401);
    let body: serde_json::Value =
        serde_json::from_slice(response.body().as_ref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "missing_api_key");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_plain_get_on_the_websocket_route_is_426() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let response = support::get_with_key(gateway.url("/v1/realtime?model=x")).await;
    assert_eq!(response.status(), 426);
    assert_eq!(response.headers()["upgrade"], "websocket");
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn upstream_refusals_reach_the_client_as_that_status_and_body() {
    for status in [401u16, 403, 404, 429] {
        let upstream = WsUpstream::start(
            move |_: &Request, _| {
                let body = format!(
                    r#"{{"error":{{"message":"refused with {status}","type":"invalid_request_error","param":null,"code":null}}}}"#
                );
                Err(http::Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .header("retry-after", "3")
                    .body(Some(body))
                    .unwrap())
            },
            echo,
        )
        .await;
        let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
        let err = connect(gateway.addr, &[("authorization", bearer())])
            .await
            .unwrap_err();
        let WsError::Http(response) = err else {
            panic!("expected an HTTP refusal, got {err:?}")
        };
        assert_eq!(response.status(), status);
        assert_eq!(response.headers()["retry-after"], "3");
        let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
        assert!(body.contains(&format!("refused with {status}")), "{body}");
    }
}

#[tokio::test]
async fn close_codes_pass_both_ways() {
    // Client closes: the upstream sees the client's code and reason.
    let (code_tx, code_rx) = tokio::sync::oneshot::channel::<Option<CloseFrame>>();
    let code_tx = Arc::new(Mutex::new(Some(code_tx)));
    let upstream = WsUpstream::start(accept_all, move |mut ws: Session| {
        let code_tx = Arc::clone(&code_tx);
        async move {
            while let Some(Ok(message)) = ws.next().await {
                if let Message::Close(frame) = message {
                    if let Some(tx) = code_tx.lock().unwrap().take() {
                        let _ = tx.send(frame);
                    }
                    break;
                }
            }
        }
    })
    .await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4000),
        reason: "client done".into(),
    }))
    .await
    .unwrap();
    let frame = tokio::time::timeout(WAIT, code_rx)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.code, CloseCode::Library(4000));
    assert_eq!(frame.reason.as_str(), "client done");

    // Upstream closes: the client sees the upstream's code and reason.
    let upstream = WsUpstream::start(accept_all, |mut ws: Session| async move {
        ws.send(Message::text("bye soon")).await.unwrap();
        let _ = ws
            .close(Some(CloseFrame {
                code: CloseCode::Policy,
                reason: "session expired".into(),
            }))
            .await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("bye soon"));
    let Message::Close(Some(frame)) = next_message(&mut ws).await else {
        panic!("expected a close frame")
    };
    assert_eq!(frame.code, CloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "session expired");
}

#[tokio::test]
async fn an_upstream_that_vanishes_closes_the_client_with_1011() {
    let upstream = WsUpstream::start(accept_all, |ws: Session| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Drop the TCP connection with no close frame.
        drop(ws);
    })
    .await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    let Message::Close(Some(frame)) = next_message(&mut ws).await else {
        panic!("expected a close frame")
    };
    assert_eq!(frame.code, CloseCode::Error);
    assert_eq!(frame.reason.as_str(), "the upstream connection failed");
}

#[tokio::test]
async fn idle_sessions_are_closed_with_1001() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(
        &upstream.base_url(),
        "[realtime]\nidle_timeout = \"300ms\"",
    ))
    .await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    let Message::Close(Some(frame)) = next_message(&mut ws).await else {
        panic!("expected a close frame")
    };
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "idle past realtime.idle_timeout");
}

#[tokio::test]
async fn a_five_mib_binary_message_passes_both_ways() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    let audio: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
    ws.send(Message::binary(audio.clone())).await.unwrap();
    let Message::Binary(back) = next_message(&mut ws).await else {
        panic!("expected binary")
    };
    assert_eq!(back.len(), audio.len());
    assert!(
        back.as_ref() == audio.as_slice(),
        "the message changed on the way"
    );
}

#[tokio::test]
async fn a_message_over_realtime_max_message_ends_the_session() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(
        &upstream.base_url(),
        "[realtime]\nmax_message = \"1MiB\"",
    ))
    .await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    ws.send(Message::binary(vec![0u8; 2 << 20])).await.unwrap();
    // tungstenite answers an oversized message with close 1009 (message too big).
    let ended = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    match ended {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Size),
        other => assert!(
            matches!(other, None | Some(Err(_))),
            "expected the session to end, got {other:?}"
        ),
    }
}

#[tokio::test]
async fn one_hundred_concurrent_sessions() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let gateway = Gateway::start(&manifest(&upstream.base_url(), "")).await;
    let addr = gateway.addr;
    let sessions: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                let (mut ws, _) = connect(addr, &[("authorization", bearer())]).await.unwrap();
                for round in 0..5 {
                    let text = format!("session {i} round {round}");
                    ws.send(Message::text(text.clone())).await.unwrap();
                    assert_eq!(next_message(&mut ws).await, Message::text(text));
                }
                ws.close(None).await.unwrap();
            })
        })
        .collect();
    for session in sessions {
        tokio::time::timeout(Duration::from_secs(60), session)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 100);
}

#[tokio::test]
async fn a_slow_client_slows_the_upstream_and_gateway_memory_stays_bounded() {
    const MESSAGES: usize = 128;
    const SIZE: usize = 1 << 20;
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let upstream = WsUpstream::start(accept_all, move |mut ws: Session| {
        let counter = Arc::clone(&counter);
        async move {
            let chunk = vec![7u8; SIZE];
            for _ in 0..MESSAGES {
                if ws.send(Message::binary(chunk.clone())).await.is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
            }
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
    let gateway = Binary::spawn(&manifest(&upstream.base_url(), ""), &[]);
    let before = support::proc_status_kib(gateway.pid(), "VmRSS");
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();

    // Read nothing for a while: the upstream must be held back, not buffered in the gateway.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent_while_stalled = sent.load(Ordering::SeqCst);
    let stalled_peak = support::proc_status_kib(gateway.pid(), "VmHWM");
    assert!(
        sent_while_stalled < MESSAGES / 2,
        "the upstream sent {sent_while_stalled} of {MESSAGES} MiB to a client that read nothing"
    );

    let mut received = 0;
    while received < MESSAGES {
        match next_message(&mut ws).await {
            Message::Binary(data) => {
                assert_eq!(data.len(), SIZE);
                received += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let peak = support::proc_status_kib(gateway.pid(), "VmHWM");
    let growth = peak.saturating_sub(before);
    println!(
        "slow client: upstream got {sent_while_stalled} MiB ahead; gateway RSS before {before} KiB, \
         peak while stalled {stalled_peak} KiB, peak {peak} KiB"
    );
    assert!(
        growth < 32 << 10,
        "the gateway grew by {growth} KiB relaying {MESSAGES} MiB to a slow client"
    );
}

#[tokio::test]
async fn shutdown_closes_open_sessions_with_1001_after_the_grace() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let mut gateway = Binary::spawn(
        &manifest(&upstream.base_url(), "[server]\nshutdown_grace = \"400ms\""),
        &[],
    );
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("still here"));
    gateway.signal("TERM");
    let Message::Close(Some(frame)) = next_message(&mut ws).await else {
        panic!("expected a close frame")
    };
    assert_eq!(frame.code, CloseCode::Away);
    assert_eq!(frame.reason.as_str(), "the gateway is shutting down");
    let code = tokio::task::spawn_blocking(move || gateway.wait_exit(WAIT))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

/// An HTTP CONNECT proxy on loopback that tunnels to wherever it is asked and counts tunnels.
async fn connect_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let targets = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&targets);
    let proxy = RawUpstream::start(move |mut client| {
        let seen = Arc::clone(&seen);
        async move {
            let mut pending = Vec::new();
            let head_len = read_head(&mut client, &mut pending).await.unwrap();
            let text = String::from_utf8_lossy(&pending[..head_len]).into_owned();
            let target = text.split_whitespace().nth(1).unwrap().to_owned();
            seen.lock().unwrap().push(target.clone());
            let mut upstream = TcpStream::connect(&target).await.unwrap();
            // Whatever the client sent behind the head is the tunnel's.
            upstream.write_all(&pending[head_len..]).await.unwrap();
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    })
    .await;
    (proxy.base_url(), targets)
}

#[tokio::test]
async fn the_outbound_proxy_carries_websocket_sessions_too() {
    let upstream = WsUpstream::start(accept_all, echo).await;
    let (proxy, targets) = connect_proxy().await;
    let gateway = Gateway::start(&manifest(
        &upstream.base_url(),
        &format!("proxy = \"{proxy}\""),
    ))
    .await;
    let (mut ws, _) = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap();
    ws.send(Message::text("via proxy")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("via proxy"));
    assert_eq!(
        targets.lock().unwrap().as_slice(),
        [upstream.addr.to_string()]
    );
}

#[tokio::test]
async fn a_silent_upstream_handshake_is_504_within_connect_timeout() {
    // Accepts TCP, never answers the WebSocket handshake.
    let silent = RawUpstream::start(|socket| async move {
        std::future::pending::<()>().await;
        drop(socket);
    })
    .await;
    let addr = silent.addr;
    let gateway = Gateway::start(&manifest(&format!("http://{addr}"), "")).await;
    let err = connect(gateway.addr, &[("authorization", bearer())])
        .await
        .unwrap_err();
    let WsError::Http(response) = err else {
        panic!("expected an HTTP answer, got {err:?}")
    };
    assert_eq!(response.status(), 504);
    let body: serde_json::Value =
        serde_json::from_slice(response.body().as_ref().unwrap()).unwrap();
    assert_eq!(
        body["error"]["message"],
        "The upstream did not accept a connection within upstream.connect_timeout (2s)"
    );
}
