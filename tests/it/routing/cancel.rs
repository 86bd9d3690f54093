//! A client that leaves cancels the attempt in progress, and nothing is retried.

use super::*;

#[tokio::test]
async fn a_client_that_leaves_cancels_the_attempt_in_progress() {
    let (closed, seen) = tokio::sync::mpsc::channel::<()>(1);
    let silent = support::RawUpstream::start(move |mut socket| {
        let closed = closed.clone();
        async move {
            let mut pending = Vec::new();
            if support::read_message(&mut socket, &mut pending)
                .await
                .is_some()
            {
                // No answer: wait for the gateway to let the connection go.
                let mut byte = [0u8; 1];
                let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut byte).await;
                let _ = closed.send(()).await;
            }
        }
    })
    .await;
    let second = Upstream::start(chat_from("second")).await;
    let text = manifest(
        &second.base_url(),
        &[("silent", silent.base_url())],
        "[models.fast]\ntargets = [\"silent\", \"default\"]\n",
        true,
    );
    let gateway = Gateway::start(&text).await;
    let base = gateway.url("");
    let request = post_chat(&base, "/v1/chat/completions", r#"{"model":"fast"}"#);
    assert!(tokio::time::timeout(Duration::from_millis(300), request)
        .await
        .is_err());
    let mut seen = seen;
    // Within 3 s: the read timeout (5 s) would let it go later even if leaving did not.
    tokio::time::timeout(Duration::from_secs(3), seen.recv())
        .await
        .expect("the upstream connection was not let go when the client left");
    assert!(
        second.requests().is_empty(),
        "nothing was retried for a client that left"
    );
}
