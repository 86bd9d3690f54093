//! What reaches the upstream of a request: a content type the route does not take is refused, and no header is added.

use super::*;

#[tokio::test]
async fn a_content_type_that_contradicts_the_route_is_415_naming_the_accepted_kinds() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let send = |path: &'static str, content_type: &'static str| {
        client()
            .post(gateway.url(path))
            .header("authorization", bearer())
            .header("content-type", content_type)
            .body("payload")
            .send()
    };
    let response = send("/v1/embeddings", "text/plain").await.unwrap();
    let (status, body) = error_of(response).await;
    assert_eq!(status, 415);
    assert_eq!(
        body["error"]["message"],
        "This route takes json bodies; the request declares Content-Type \"text/plain\""
    );
    let response = send("/v1/files", "application/json").await.unwrap();
    assert_eq!(response.status(), 415);
    let response = send("/v1/realtime/calls", "application/xml").await.unwrap();
    let (_, body) = error_of(response).await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("This route takes multipart, sdp bodies"));
    assert!(upstream.requests().is_empty());

    // Parameters do not change the kind, and declared kinds the route takes pass.
    for (path, content_type) in [
        ("/v1/embeddings", "application/json; charset=utf-8"),
        ("/v1/realtime/calls", "application/sdp"),
        ("/v1/blobs/b1", "audio/mpeg"),
    ] {
        let method = if path.starts_with("/v1/blobs") {
            reqwest::Method::PUT
        } else {
            reqwest::Method::POST
        };
        let response = client()
            .request(method, gateway.url(path))
            .header("authorization", bearer())
            .header("content-type", content_type)
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path} {content_type}");
    }
}

#[tokio::test]
async fn nothing_is_added_to_the_request_headers() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::in_front_of(&upstream).await;
    let answer = support::raw_get(gateway.addr, "/v1/models").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = upstream.last();
    // The client sent Host, Authorization and Connection; the upstream gets its own Host and
    // the key, and no Accept, User-Agent or encoding the client did not ask for.
    let mut names: Vec<&str> = seen.headers.keys().map(|name| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["authorization", "host"], "{:?}", seen.headers);
}
