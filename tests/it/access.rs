//! Access control: allowed key hashes, allowed client addresses behind trusted proxies, and
//! the path secret. Each refusal happens without an upstream call.

use crate::support;
use crate::support::{bearer, client, Gateway, Upstream, KEY};
use serde_json::Value;

fn manifest(upstream: &Upstream, access: &str) -> String {
    format!(
        "[access]\n{access}\n{}",
        support::test_manifest(&upstream.base_url(), "")
    )
}

async fn get_models(gateway: &Gateway, headers: &[(&str, String)]) -> reqwest::Response {
    let mut request = client().get(gateway.url("/v1/models"));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn only_listed_key_hashes_are_forwarded() {
    let upstream = Upstream::echo().await;
    let allowed = oa_bypass::config::hash_line(KEY);
    let gateway = Gateway::start(&manifest(
        &upstream,
        &format!("allowed_key_hashes = [\"{allowed}\"]"),
    ))
    .await;
    assert_eq!(
        get_models(&gateway, &[("authorization", bearer())])
            .await
            .status(),
        200
    );
    assert_eq!(
        get_models(&gateway, &[("api-key", KEY.into())])
            .await
            .status(),
        200
    );
    assert_eq!(upstream.requests().len(), 2);

    let refused = get_models(
        &gateway,
        &[("authorization", "Bearer sk-someone-else".into())],
    )
    .await;
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert!(
        !body.to_string().contains("sk-someone-else"),
        "the key was echoed"
    );
    assert_eq!(
        upstream.requests().len(),
        2,
        "a refused key reached the upstream"
    );
}

#[tokio::test]
async fn hash_key_prints_the_line_for_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(support::binary_path())
        .arg("hash-key")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{KEY}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let line = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        line,
        format!("sha256:{}\n", support::sha256(KEY.as_bytes()))
    );
    assert!(!line.contains(KEY));
}

#[tokio::test]
async fn clients_outside_allowed_ips_get_403() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "allowed_ips = [\"10.0.0.0/8\"]")).await;
    let refused = get_models(&gateway, &[("authorization", bearer())]).await;
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "address_not_allowed");
    // The docs are part of the API; liveness is not.
    let docs = client()
        .get(gateway.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(docs.status(), 403);
    let health = client().get(gateway.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(upstream.requests().is_empty());

    let gateway = Gateway::start(&manifest(
        &upstream,
        "allowed_ips = [\"127.0.0.0/8\", \"::1\"]",
    ))
    .await;
    assert_eq!(
        get_models(&gateway, &[("authorization", bearer())])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let upstream = Upstream::echo().await;
    // The gateway sees 127.0.0.1 as its peer: trusted here, so X-Forwarded-For decides.
    let behind_proxy = Gateway::start(&manifest(
        &upstream,
        "allowed_ips = [\"203.0.113.0/24\"]\ntrusted_proxies = [\"127.0.0.1/32\"]",
    ))
    .await;
    let from = |ip: &str| {
        vec![
            ("authorization", bearer()),
            ("x-forwarded-for", ip.to_owned()),
        ]
    };
    assert_eq!(
        get_models(&behind_proxy, &from("203.0.113.7"))
            .await
            .status(),
        200
    );
    assert_eq!(
        get_models(&behind_proxy, &from("198.51.100.1"))
            .await
            .status(),
        403
    );
    // A client cannot smuggle an allowed address in front of its real one.
    assert_eq!(
        get_models(&behind_proxy, &from("203.0.113.7, 198.51.100.1"))
            .await
            .status(),
        403
    );
    // The header itself never reaches the upstream (privacy), whatever the access rules.
    assert!(upstream.last().header("x-forwarded-for").is_none());

    // Without trusted proxies the header is ignored: the peer 127.0.0.1 is not allowed.
    let direct = Gateway::start(&manifest(&upstream, "allowed_ips = [\"203.0.113.0/24\"]")).await;
    assert_eq!(
        get_models(&direct, &from("203.0.113.7")).await.status(),
        403
    );
}

#[tokio::test]
async fn path_secret_gates_the_api_by_url() {
    let upstream = Upstream::echo().await;
    let gateway = Gateway::start(&manifest(&upstream, "path_secret = \"s3cret-Path_42\"")).await;
    let bare = get_models(&gateway, &[("authorization", bearer())]).await;
    assert_eq!(bare.status(), 404);
    assert!(upstream.requests().is_empty());

    let response = support::get_with_key(gateway.url("/s3cret-Path_42/v1/models?limit=1")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().path_and_query, "/v1/models?limit=1");

    for path in [
        "/s3cret-Path_42/docs",
        "/s3cret-Path_42/openapi.json",
        "/health",
    ] {
        let response = client().get(gateway.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    for path in ["/docs", "/openapi.json", "/wrong-secret/v1/models"] {
        let response = client().get(gateway.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let doc: Value = client()
        .get(gateway.url("/s3cret-Path_42/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["servers"][0]["url"], "/s3cret-Path_42");
}

#[test]
fn bad_access_settings_are_refused_without_echoing_keys() {
    let text = "[access]\nallowed_key_hashes = [\"sk-pasted-a-real-key-here\"]\n\
                allowed_ips = [\"10.0.0.0/33\"]\npath_secret = \"short\"\n\
                [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";
    let err = oa_bypass::Config::from_manifest_str(text)
        .unwrap_err()
        .to_string();
    assert!(!err.contains("sk-pasted"), "{err}");
    assert!(
        err.contains("access.allowed_key_hashes[0]: not a \"sha256:<64 hex digits>\" line"),
        "{err}"
    );
    assert!(
        err.contains("access.allowed_ips[0]: \"10.0.0.0/33\" is not an address or CIDR network"),
        "{err}"
    );
    assert!(
        err.contains("access.path_secret: must be 8 to 128 characters"),
        "{err}"
    );
}
