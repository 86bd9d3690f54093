//! The manifests in examples/: each loads through the real loader, and a request through
//! each mount reaches a local upstream at the URL and with the headers the provider expects
//! (its base URL pointed at the local upstream by the environment, as a Docker user would).

use std::path::Path;

use crate::support::{client, json_response, Binary, Upstream, KEY};
use serde_json::json;

/// One request through a mount, and what the upstream must see.
struct Case {
    example: &'static str,
    mount: &'static str,
    /// The client's request path on the gateway.
    path: &'static str,
    /// Where the key goes, as the provider's SDK sends it.
    credential: (&'static str, &'static str),
    /// A header the provider needs passed through, if any.
    extra: Option<(&'static str, &'static str)>,
}

const CASES: [Case; 7] = [
    Case {
        example: "groq.toml",
        mount: "groq",
        path: "/groq/v1/chat/completions",
        credential: ("authorization", "Bearer "),
        extra: None,
    },
    Case {
        example: "openrouter.toml",
        mount: "openrouter",
        path: "/openrouter/v1/chat/completions",
        credential: ("authorization", "Bearer "),
        extra: Some(("x-title", "my app")),
    },
    Case {
        example: "azure-openai.toml",
        mount: "azure",
        path: "/azure/v1/chat/completions",
        credential: ("api-key", ""),
        extra: None,
    },
    Case {
        example: "gemini.toml",
        mount: "gemini",
        path: "/gemini/chat/completions",
        credential: ("authorization", "Bearer "),
        extra: None,
    },
    Case {
        example: "local-models.toml",
        mount: "ollama",
        path: "/ollama/v1/chat/completions",
        credential: ("authorization", "Bearer "),
        extra: None,
    },
    Case {
        example: "local-models.toml",
        mount: "vllm",
        path: "/vllm/v1/embeddings",
        credential: ("authorization", "Bearer "),
        extra: None,
    },
    Case {
        example: "anthropic.toml",
        mount: "anthropic",
        path: "/anthropic/v1/messages",
        credential: ("x-api-key", ""),
        extra: Some(("anthropic-version", "2023-06-01")),
    },
];

fn examples() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
}

#[test]
fn every_example_loads_through_the_real_loader() {
    let mut loaded = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Routes files are read by the manifests that name them.
        if !text.contains("[mounts.") {
            continue;
        }
        let config = oa_bypass::Config::load(Some(&path))
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert!(!config.mounts.is_empty(), "{}", path.display());
        for mount in &config.mounts {
            assert!(
                mount.routes(&config.routes).len() >= 3,
                "{}",
                path.display()
            );
        }
        loaded += 1;
    }
    assert_eq!(loaded, 6);
}

#[tokio::test]
async fn a_request_through_each_example_arrives_as_its_provider_expects() {
    let upstream = Upstream::start(|_| json_response(200, &json!({"ok": true}))).await;
    for case in CASES {
        let manifest = std::fs::read_to_string(examples().join(case.example)).unwrap();
        let config = oa_bypass::Config::load(Some(&examples().join(case.example))).unwrap();
        let mount = (config.mounts.iter())
            .find(|mount| &*mount.upstream.mount == case.mount)
            .unwrap();
        // The example's base path, on the local upstream.
        let base_path = mount.upstream.base_url.path().trim_end_matches('/');
        let base_url = format!("{}{base_path}", upstream.base_url());
        let var = format!("OA_BYPASS_MOUNTS__{}__BASE_URL", case.mount.to_uppercase());
        let files: Vec<(String, String)> = std::fs::read_dir(examples())
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.to_string_lossy().ends_with("-routes.toml"))
            .map(|path| {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, t)| (n.as_str(), t.as_str()))
            .collect();
        let gateway =
            Binary::spawn_with_files(&manifest, &files, &[(var.as_str(), base_url.as_str())]);

        let (header, scheme) = case.credential;
        let mut request = client()
            .post(gateway.url(case.path))
            .header(header, format!("{scheme}{KEY}"))
            .header("content-type", "application/json")
            .body(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#);
        if let Some((name, value)) = case.extra {
            request = request.header(name, value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "{}: {}",
            case.example,
            gateway.logs()
        );
        let seen = upstream.last();
        let expected_path = format!(
            "{base_path}{}",
            case.path.strip_prefix(&mount.prefix).unwrap()
        );
        assert_eq!(seen.path_and_query, expected_path, "{}", case.example);
        assert_eq!(
            seen.header(header),
            Some(format!("{scheme}{KEY}").as_str()),
            "{}",
            case.example
        );
        if let Some((name, value)) = case.extra {
            assert_eq!(seen.header(name), Some(value), "{}", case.example);
        }
        assert_eq!(
            seen.body_text(),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#
        );
    }
}
