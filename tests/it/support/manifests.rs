//! The manifests tests start the gateway with, and the key they send.

use sha2::{Digest, Sha256};

use super::Upstream;

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A manifest with a handful of routes of every body kind, pointed at `upstream`.
pub fn test_manifest(upstream: &str, extra_settings: &str) -> String {
    format!(
        r#"
[upstream]
base_url = "{upstream}"
connect_timeout = "2s"
read_timeout = "2s"
{extra_settings}

[[routes]]
method = "GET"
path = "/v1/models"

[[routes]]
method = "POST"
path = "/v1/chat/completions"
body = "json"
streaming = true

[[routes]]
method = "POST"
path = "/v1/embeddings"
body = "json"

[[routes]]
method = "POST"
path = "/v1/files"
body = "multipart"

[[routes]]
method = "GET"
path = "/v1/files/{{file_id}}/content"

[[routes]]
method = "DELETE"
path = "/v1/files/{{file_id}}"

[[routes]]
method = "GET"
path = "/v1/files/{{file_id}}"

[[routes]]
method = "PUT"
path = "/v1/blobs/{{blob_id}}"
body = "binary"

[[routes]]
method = "POST"
path = "/v1/realtime/calls"
body = ["multipart", "sdp"]

[[routes]]
method = "POST"
path = "/v1/slow"
body = "json"
read_timeout = "300ms"

[[routes]]
method = "POST"
path = "/v1/tiny"
body = "json"
max_body = "10"

[[routes]]
method = "GET"
path = "/v1/realtime"
body = "websocket"
"#
    )
}

/// The shipped manifest (every route, the built-in settings) pointed at `upstream`.
pub fn shipped_manifest(upstream: &Upstream) -> String {
    oa_bypass::config::BUILT_IN_MANIFEST.replace(
        "base_url = \"https://api.openai.com\"",
        &format!("base_url = \"{}\"", upstream.base_url()),
    )
}

pub const KEY: &str = "sk-test-0123456789abcdefSECRET";

pub fn bearer() -> String {
    format!("Bearer {KEY}")
}
