//! The built binary as a user meets it: start-up messages, `--check`, the built-in manifest,
//! environment overrides, SIGTERM, and what reaches the logs.

use std::time::Duration;

use crate::support;
use crate::support::{bearer, client, run_binary, Binary, Upstream, KEY, LOG_DEADLINE};
use bytes::Bytes;
use futures_util::StreamExt;
use poem::Response;

const ROUTE: &str = "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";

/// The value `--check` shows for a setting.
fn shown<'a>(stdout: &'a str, setting: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&format!("{setting} ")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{setting} missing from:\n{stdout}"))
}

/// Runs `--check` on a manifest and returns (exit code, stdout, stderr).
fn check(manifest: &str, envs: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), manifest).unwrap();
    run_binary(&["--check", "--config", "bad.toml"], envs, dir.path())
}

fn assert_refused(manifest: &str, envs: &[(&str, &str)], message: &str) {
    let (code, stdout, stderr) = check(manifest, envs);
    assert_eq!(code, 1, "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        stderr,
        format!("oa-bypass: invalid configuration:\n{message}\n")
    );
}

#[test]
fn bad_manifests_are_refused_with_one_clear_message() {
    assert_refused(
        &format!("[server]\nprot = 80\n{ROUTE}"),
        &[],
        "server.prot: unknown key; allowed here: host, port, shutdown_grace, header_read_timeout, body_read_timeout, max_header_bytes, max_connections, workers, fast_lane, tls, acme (in bad.toml)",
    );
    assert_refused(
        &format!("{ROUTE}[[routes]]\nmethod = \"POST\"\npath = \"/v1/x\"\nbody = \"xml\"\n"),
        &[],
        "routes[1].body: \"xml\" is not one of none, json, multipart, binary, sdp, websocket",
    );
    assert_refused(
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/files/{unclosed\"\n",
        &[],
        "routes[0].path: \"/v1/files/{unclosed\" has an unclosed '{' in segment \"{unclosed\"",
    );
    assert_refused(
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/files/{}\"\n",
        &[],
        "routes[0].path: \"/v1/files/{}\" has an empty parameter name '{}'",
    );
    assert_refused(
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/a/{id}/b/{id}\"\n",
        &[],
        "routes[0].path: \"/v1/a/{id}/b/{id}\" repeats the parameter name \"id\"",
    );
    assert_refused(
        "[[routes]]\nmethod = \"FETCH\"\npath = \"/v1/models\"\n",
        &[],
        "routes[0].method: \"FETCH\" is not one of GET, POST, PUT, PATCH, DELETE",
    );
    assert_refused(
        "[[routes]]\nmethod = \"GET\"\n",
        &[],
        "routes[0]: missing field `path` (in bad.toml)",
    );
    assert_refused(
        &format!("{ROUTE}{ROUTE}"),
        &[],
        "routes[1]: GET /v1/models is already declared by routes[0]",
    );
    assert_refused(
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/files/{file_id}\"\n\
         [[routes]]\nmethod = \"DELETE\"\npath = \"/v1/files/{id}\"\n",
        &[],
        "routes[1]: /v1/files/{id} cannot be told apart from /v1/files/{file_id} (routes[0]): \
         they differ only in parameter names; use the same names",
    );
    assert_refused(
        &format!("[upstream]\nbase_url = \"api.openai.com\"\n{ROUTE}"),
        &[],
        "upstream.base_url: \"api.openai.com\" is not a URL (relative URL without a base)",
    );
    assert_refused(
        ROUTE,
        &[("OA_BYPASS_UPSTREAM__HTTP2_MAX_CONCURRENT_STREAMS", "0")],
        "upstream.http2_max_concurrent_streams: must be at least 1",
    );
    assert_refused(
        ROUTE,
        &[("OA_BYPASS_SERVER__PORT", "eighty")],
        "server.port: invalid type: found string \"eighty\", expected u16 \
         (from environment variable OA_BYPASS_SERVER__PORT)",
    );
    assert_refused(
        ROUTE,
        &[("OA_BYPASS_UPSTREAM__READ_TIMEOUT", "soon")],
        "upstream.read_timeout: \"soon\" is not a duration like \"30s\", \"10m\" or \"1h\" \
         (from environment variable OA_BYPASS_UPSTREAM__READ_TIMEOUT)",
    );
    assert_refused(
        "[limits]\nmax_json_body = \"big\"\n",
        &[],
        "limits.max_json_body: \"big\" is not a size like \"64MiB\", \"500KB\" or \"1GiB\" (in bad.toml)",
    );
    assert_refused(
        "",
        &[],
        "routes: the manifest declares no [[routes]]; there would be nothing to serve",
    );
}

#[test]
fn toml_syntax_errors_name_the_line_but_do_not_quote_it() {
    assert_refused(
        "[upstream]\nproxy = \"http://u:hunter2@p:1\"\nproxy = \"x\"\n",
        &[],
        "TOML parse error at line 3, column 1: duplicate key `proxy` in table `upstream` (in bad.toml)",
    );
}

#[test]
fn serving_a_bad_manifest_exits_nonzero_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), "[server]\nport = \"x\"\n").unwrap();
    // ./routes.toml is picked up without --config.
    let (code, stdout, stderr) = run_binary(&[], &[], dir.path());
    assert_eq!(code, 1);
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains(
            "server.port: invalid type: found string \"x\", expected u16 (in routes.toml)"
        ),
        "{stderr}"
    );
}

#[test]
fn check_prints_settings_and_routes_and_masks_secrets() {
    let (code, stdout, stderr) = check(
        &format!(
            "[access]\npath_secret = \"hunter2-path-secret\"\nallowed_key_hashes = [\"{}\"]\n\
             [upstream]\nproxy = \"http://user:hunter2@127.0.0.1:3128\"\n{ROUTE}\
             [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
             streaming = true\nread_timeout = \"30s\"\n",
            oa_bypass::config::hash_line(KEY)
        ),
        &[
            ("OA_BYPASS_SERVER__PORT", "9000"),
            ("OA_BYPASS_STREAMING__KEEPALIVE", "15s"),
            ("OA_BYPASS_USAGE__INJECT_STREAM_USAGE", "true"),
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(shown(&stdout, "server.port") == "9000", "{stdout}");
    assert_eq!(shown(&stdout, "streaming.keepalive"), "15s");
    assert_eq!(shown(&stdout, "usage.inject_stream_usage"), "true");
    assert!(
        stdout.contains("http://user:****@127.0.0.1:3128/"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"));
    assert_eq!(shown(&stdout, "access.path_secret"), "(set)");
    assert_eq!(shown(&stdout, "access.allowed_key_hashes"), "1 listed");
    assert!(!stdout.contains(&oa_bypass::config::hash_line(KEY)));
    assert_eq!(shown(&stdout, "realtime.max_message"), "16MiB");
    assert_eq!(shown(&stdout, "openapi.enabled"), "true");
    assert!(stdout.contains("routes (2):"));
    assert!(stdout.contains("streaming read_timeout=30s"), "{stdout}");
    assert!(stdout.ends_with("configuration OK\n"));
}

#[test]
fn help_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run_binary(&["--help"], &[], dir.path());
    assert_eq!(code, 0);
    assert!(stdout.contains("--check"));
    let (code, stdout, _) = run_binary(&["--version"], &[], dir.path());
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("oa-bypass {}\n", env!("CARGO_PKG_VERSION")));
    let (code, _, stderr) = run_binary(&["--chekc"], &[], dir.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("unexpected argument '--chekc'"), "{stderr}");
    assert!(
        stderr.contains("a similar argument exists: '--check'"),
        "{stderr}"
    );
}

#[test]
fn built_in_manifest_is_used_when_no_file_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_binary(&["--check"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("manifest: built-in manifest\n"),
        "{stdout}"
    );
    assert!(stdout.contains("routes (282):"), "{stdout}");
    assert_eq!(
        shown(&stdout, "upstream.base_url"),
        "https://api.openai.com/"
    );
}

#[test]
fn config_path_variable_selects_the_file_and_is_not_a_setting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elsewhere.toml");
    std::fs::write(&path, format!("[server]\nport = 7001\n{ROUTE}")).unwrap();
    let (code, stdout, stderr) = run_binary(
        &["--check"],
        &[("OA_BYPASS_CONFIG", path.to_str().unwrap())],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(shown(&stdout, "server.port") == "7001", "{stdout}");
    assert!(stdout.contains("routes (1):"));
}

#[tokio::test]
async fn built_in_manifest_serves_with_env_overrides() {
    let upstream = Upstream::echo().await;
    // No manifest file anywhere: the binary runs from an empty folder.
    let dir = tempfile::tempdir().unwrap();
    let mut child = support::KillOnDrop(
        std::process::Command::new(support::binary_path())
            .current_dir(dir.path())
            .env_remove("OA_BYPASS_CONFIG")
            .env("OA_BYPASS_SERVER__HOST", "127.0.0.1")
            .env("OA_BYPASS_SERVER__PORT", "0")
            .env("OA_BYPASS_UPSTREAM__BASE_URL", upstream.base_url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    // Keep draining stdout after the line is found, so the gateway's logging never hits a
    // closed pipe.
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("oa-bypass listening") {
                let _ = line_tx.send(line);
            }
        }
    });
    let line = tokio::task::spawn_blocking(move || line_rx.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("no listening line");
    assert!(line.contains("manifest=built-in manifest"), "{line}");
    assert!(line.contains("routes=282"), "{line}");
    let addr = line
        .split_whitespace()
        .find_map(|f| f.strip_prefix("addr="))
        .unwrap()
        .to_owned();
    let response = client()
        .get(format!("http://{addr}/v1/assistants?limit=2"))
        .header("authorization", bearer())
        .header("openai-beta", "assistants=v2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rec = upstream.last();
    assert_eq!(rec.path_and_query, "/v1/assistants?limit=2");
    assert_eq!(rec.header("openai-beta"), Some("assistants=v2"));
}

#[tokio::test]
async fn sigterm_drains_an_open_stream_then_exits_zero() {
    let (upstream, tx) = Upstream::streaming().await;
    let mut gateway = Binary::spawn(
        &support::test_manifest(&upstream.base_url(), "[server]\nshutdown_grace = \"20s\""),
        &[],
    );
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .body(r#"{"stream":true}"#)
        .send()
        .await
        .unwrap();
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = response.bytes_stream();
    assert_eq!(body.next().await.unwrap().unwrap().as_ref(), b"data: 1\n\n");

    gateway.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        gateway.child.try_wait().unwrap().is_none(),
        "exited with a stream open"
    );
    tx.send(Bytes::from_static(b"data: 2\n\n")).await.unwrap();
    drop(tx);
    let rest: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
    assert_eq!(rest.concat(), b"data: 2\n\n");
    let code = tokio::task::spawn_blocking(move || {
        let code = gateway.wait_exit(Duration::from_secs(10));
        (code, gateway.logs())
    })
    .await
    .unwrap();
    assert_eq!(code.0, Some(0), "logs:\n{}", code.1);
    assert!(code.1.contains("SIGTERM received"), "{}", code.1);
}

#[tokio::test]
async fn shutdown_grace_bounds_how_long_a_stream_may_hold_the_exit() {
    let (upstream, tx) = Upstream::streaming().await;
    let mut gateway = Binary::spawn(
        &support::test_manifest(&upstream.base_url(), "[server]\nshutdown_grace = \"500ms\""),
        &[],
    );
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("authorization", bearer())
        .body("{}")
        .send()
        .await
        .unwrap();
    tx.send(Bytes::from_static(b"data: 1\n\n")).await.unwrap();
    let mut body = response.bytes_stream();
    body.next().await.unwrap().unwrap();
    gateway.signal("TERM");
    let code = tokio::task::spawn_blocking(move || gateway.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
    // The stream was cut, not finished: the client sees an error.
    let next = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .unwrap();
    assert!(matches!(next, Some(Err(_))), "{next:?}");
    drop(tx);
}

#[tokio::test]
async fn the_key_never_reaches_the_logs_even_at_trace() {
    let upstream = Upstream::start(|rec| {
        if rec.path_and_query.contains("chat") {
            Response::builder()
                .header("content-type", "text/event-stream")
                .body("data: {\"x\":1}\n\ndata: [DONE]\n\n")
        } else {
            support::json_response(
                400,
                &serde_json::json!({"error": {"message": "bad", "type": "invalid_request_error", "param": null, "code": null}}),
            )
        }
    })
    .await;
    let http = client();
    let with_key = |request: reqwest::RequestBuilder| {
        request
            .header("authorization", bearer())
            .header("api-key", KEY)
    };
    // Once through the fast lane and once with it off, so hyper's client and server trace
    // too: the same requests, none may leave the key in a log line.
    for fast_lane in ["true", "false"] {
        let gateway = Binary::spawn(
            &support::test_manifest(&upstream.base_url(), ""),
            &[
                ("RUST_LOG", "trace"),
                ("OA_BYPASS_SERVER__FAST_LANE", fast_lane),
            ],
        );
        let requests = vec![
            with_key(http.post(gateway.url("/v1/chat/completions"))).body(r#"{"stream":true}"#),
            with_key(http.post(gateway.url("/v1/embeddings"))).body("{}"),
            with_key(http.post(gateway.url("/v1/files")))
                .header("content-type", "multipart/form-data; boundary=b")
                .body("--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nx\r\n--b--\r\n"),
            with_key(http.get(gateway.url("/v1/files/..%2Fx"))),
            with_key(http.get(gateway.url("/v1/unknown"))),
            with_key(http.post(gateway.url("/v1/tiny"))).body("01234567890123"),
        ];
        let sent = requests.len();
        for request in requests {
            let response = request.send().await.unwrap();
            let text = response.text().await.unwrap();
            assert!(!text.contains(KEY), "an answer echoed the key: {text}");
        }
        gateway
            .wait_for_logs(&format!("{sent} request lines"), |logs| {
                logs.matches("oa_bypass::request").count() >= sent
            })
            .await;
        let logs = gateway.settled_logs().await;
        // Trace lines themselves, not just many lines: debug alone would make those.
        let traced = logs.lines().filter(|line| line.contains(" TRACE ")).count();
        assert!(
            traced >= 6,
            "trace logging was not on (fast_lane = {fast_lane}):\n{logs}"
        );
        assert!(!logs.contains(KEY), "the key reached the logs");
        assert!(!logs.contains("SECRET"), "part of the key reached the logs");
    }

    // Access-control refusals, at trace too.
    let other = oa_bypass::config::hash_line("sk-someone-else");
    let guarded = Binary::spawn(
        &format!(
            "[access]\nallowed_key_hashes = [\"{other}\"]\n{}",
            support::test_manifest(&upstream.base_url(), "")
        ),
        &[("RUST_LOG", "trace")],
    );
    let response = with_key(http.get(guarded.url("/v1/models")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert!(!response.text().await.unwrap().contains(KEY));
    guarded.wait_for_log("status=401", LOG_DEADLINE).await;
    let logs = guarded.settled_logs().await;
    assert!(
        !logs.contains(KEY) && !logs.contains("SECRET"),
        "the key reached the logs"
    );
}

#[test]
fn docker_compose_environment_parses_through_the_real_loader() {
    let mut compose: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string("docker-compose.yml").unwrap()).unwrap();
    // The services share their settings through a YAML anchor (`<<:`), as compose reads it.
    compose.apply_merge().unwrap();
    for service in ["oa-bypass", "oa-bypass-scaled"] {
        compose_service_loads(&compose, service);
    }
    let scaled = &compose["services"]["oa-bypass-scaled"]["environment"];
    let store = scaled["OA_BYPASS_LIMITS__STORE"].as_str().unwrap();
    let redis = &compose["services"]["redis"];
    assert_eq!(redis["profiles"][0], "scale");
    assert_eq!(
        store, "redis://redis:6379/0",
        "the replicas use the redis service"
    );
}

/// `service`'s environment, given to `--check`: it loads, and each override takes effect.
fn compose_service_loads(compose: &serde_yaml_ng::Value, service: &str) {
    let environment = compose["services"][service]["environment"]
        .as_mapping()
        .unwrap_or_else(|| panic!("services.{service}.environment is a mapping"));
    let mut envs = Vec::new();
    for (key, value) in environment {
        let key = key.as_str().unwrap().to_owned();
        let value = match value {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other).unwrap().trim().to_owned(),
        };
        envs.push((key, value));
    }
    let overrides: Vec<&(String, String)> = envs
        .iter()
        .filter(|(key, _)| key.starts_with("OA_BYPASS_"))
        .collect();
    assert!(
        overrides.len() >= 3,
        "docker-compose.yml should show OA_BYPASS_* overrides"
    );
    assert!(envs.iter().any(|(key, _)| key == "RUST_LOG"));
    let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run_binary(&["--check"], &pairs, dir.path());
    assert_eq!(
        code, 0,
        "docker-compose.yml's {service} environment does not load:\n{stderr}"
    );
    // Every override shows up as an effective setting.
    for (key, value) in &overrides {
        let setting = key
            .trim_start_matches("OA_BYPASS_")
            .to_lowercase()
            .replace("__", ".");
        let line = stdout
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{setting} ")))
            .unwrap_or_else(|| panic!("{setting} missing from --check:\n{stdout}"));
        let shown = line.trim_start()[setting.len()..].trim();
        let value = value.trim_matches('"');
        assert!(
            shown.contains(value.trim_end_matches('/')) || shown == value,
            "{key}={value} shows as {shown:?}"
        );
    }
    // The compose file maps the gateway's port and has a health check and restart policy.
    let service = &compose["services"][service];
    let ports = serde_yaml_ng::to_string(&service["ports"]).unwrap();
    assert!(ports.contains(":8080"), "{ports}");
    assert!(service["healthcheck"]["test"].is_sequence());
    assert!(service["restart"].is_string());
}

#[tokio::test]
async fn each_request_logs_one_line_with_route_status_bytes_and_outcome() {
    let upstream = Upstream::start(|_| {
        Response::builder()
            .header("content-type", "application/json")
            .body("{\"ok\":true}")
    })
    .await;
    let gateway = Binary::spawn(&support::test_manifest(&upstream.base_url(), ""), &[]);
    let response = support::get_with_key(gateway.url("/v1/files/file-secret-id")).await;
    assert_eq!(response.text().await.unwrap(), "{\"ok\":true}");
    let line = gateway
        .wait_for_log("oa_bypass::request", LOG_DEADLINE)
        .await;
    for field in [
        "method=GET",
        "route=/v1/files/{file_id}",
        "status=200",
        "bytes_in=0",
        "bytes_out=11",
        "outcome=\"complete\"",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
    let logs = gateway.settled_logs().await;
    assert!(!logs.contains("file-secret-id"), "the raw path was logged");
}

#[tokio::test]
async fn healthcheck_subcommand_reports_the_local_server() {
    let upstream = Upstream::echo().await;
    let gateway = Binary::spawn(&support::test_manifest(&upstream.base_url(), ""), &[]);
    let dir = tempfile::tempdir().unwrap();
    let port = gateway.addr.port().to_string();
    let probe = |port: String| {
        let dir = dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            run_binary(
                &["healthcheck"],
                &[
                    ("OA_BYPASS_SERVER__HOST", "127.0.0.1"),
                    ("OA_BYPASS_SERVER__PORT", port.as_str()),
                ],
                &dir,
            )
        })
    };
    let (code, _, stderr) = probe(port).await.unwrap();
    assert_eq!(code, 0, "{stderr}");
    drop(gateway);
    let closed = support::closed_port().port().to_string();
    let (code, _, stderr) = probe(closed).await.unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("/health did not answer"), "{stderr}");
}
