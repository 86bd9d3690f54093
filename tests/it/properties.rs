//! Property tests over the inputs users and attackers control: the manifest and config loader,
//! path templates, and request matching with parameter checks. PROPTEST_CASES sets the
//! number of cases: `cargo test` runs proptest's 256, and `.ci/run` adds 20,000 of each.

use oa_bypass::config::Config;
use oa_bypass::routes::{check_path_param, ParamProblem, PathTemplate};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use proptest::prelude::*;

/// Strings matching `pattern`. A pattern given as `&str` is parsed again for every value it
/// makes, which took most of these tests' time; this parses it once.
fn regex(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
    proptest::string::string_regex(pattern).expect("a valid pattern")
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        regex("[a-z_]{1,12}"),
        regex("[a-z_]{1,8}").prop_map(|s| format!("{{{s}}}")),
    ]
}

fn template() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..6).prop_map(|segments| format!("/{}", segments.join("/")))
}

thread_local! {
    /// One runtime per test thread, shared by its cases.
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().build().unwrap();
}

/// `route`'s answer to a GET of `uri`.
fn answer(route: &poem::Route, uri: http::Uri) -> poem::Response {
    let request = poem::Request::builder().uri(uri).finish();
    RUNTIME.with(|runtime| runtime.block_on(poem::Endpoint::get_response(route, request)))
}

proptest! {
    /// Any text at all: the loader answers Ok or a message, never a panic.
    #[test]
    fn config_loader_never_panics_on_arbitrary_text(text in regex(".{0,400}")) {
        let _ = Config::from_manifest_str(&text);
    }

    /// Structurally plausible manifests with random values: Ok, or an error that names a key.
    #[test]
    fn config_errors_name_where_the_problem_is(
        method in prop_oneof![Just("GET"), Just("POST"), Just("FETCH"), Just("delete")],
        path in prop_oneof![template(), regex(".{0,30}")],
        body in prop_oneof![Just("none"), Just("json"), Just("xml"), Just("websocket"), Just("multipart")],
        port in prop_oneof![Just("8080".to_owned()), regex("[a-z]{1,5}").prop_map(|s| format!("{s:?}")), Just("70000".to_owned())],
        timeout in prop_oneof![Just("\"10s\""), Just("\"soon\""), Just("5"), Just("-1")],
    ) {
        let text = format!(
            "[server]\nport = {port}\n[upstream]\nread_timeout = {timeout}\n\
             [[routes]]\nmethod = \"{method}\"\npath = {path:?}\nbody = \"{body}\"\n"
        );
        match Config::from_manifest_str(&text) {
            Ok(config) => prop_assert_eq!(config.routes.len(), 1),
            Err(err) => {
                let message = err.to_string();
                prop_assert!(!message.is_empty());
                for line in message.lines() {
                    prop_assert!(
                        line.starts_with("server.") || line.starts_with("upstream.")
                            || line.starts_with("routes") || line.starts_with("TOML parse error"),
                        "a message that names no key: {line}"
                    );
                }
            }
        }
    }

    /// The template parser never panics, and what it accepts the router accepts too.
    #[test]
    fn templates_parse_or_are_refused_and_the_router_takes_what_parses(text in regex("[/{}a-z_:*<>.-]{0,40}")) {
        if let Ok(template) = PathTemplate::parse(&text) {
            let route = poem::Route::new().try_at(template.to_poem_path(), poem::endpoint::make_sync(|_| ""));
            prop_assert!(route.is_ok(), "poem refused {:?}", template.to_poem_path());
        }
    }

    /// Matching a generated template: every parameter is found under its own name, decoded.
    #[test]
    fn matching_returns_each_raw_parameter(template in template(), values in prop::collection::vec(regex("[A-Za-z0-9._~%:-]{1,12}"), 6)) {
        let Ok(parsed) = PathTemplate::parse(&template) else { return Ok(()) };
        let mut path = String::new();
        let mut expected = Vec::new();
        let mut values = values.into_iter();
        for segment in parsed.segments() {
            path.push('/');
            match segment {
                oa_bypass::routes::Segment::Static(s) => path.push_str(s),
                oa_bypass::routes::Segment::Param(name) => {
                    let value = values.next().unwrap();
                    path.push_str(&value);
                    expected.push((name.clone(), value));
                }
            }
        }
        // The router decodes parameters once; a value that is not UTF-8 once decoded is left
        // out (and the gateway then refuses the request).
        let expected: Vec<(String, Option<String>)> = expected
            .into_iter()
            .map(|(name, raw)| {
                let decoded = percent_encoding::percent_decode_str(&raw)
                    .decode_utf8()
                    .ok()
                    .map(|value| value.into_owned());
                (name, decoded)
            })
            .collect();
        let endpoint = poem::endpoint::make_sync(move |req| {
            for (name, value) in &expected {
                assert_eq!(req.raw_path_param(name), value.as_deref());
            }
            "matched"
        });
        let route = poem::Route::new().at(parsed.to_poem_path(), endpoint);
        let uri: http::Uri = match path.parse() { Ok(uri) => uri, Err(_) => return Ok(()) };
        let response = answer(&route, uri);
        prop_assert_eq!(response.status(), http::StatusCode::OK, "{} did not match {}", path, template);
    }

    /// Through the real router: a parameter that decodes to a separator or a control character
    /// is refused, whatever surrounds it, and no value panics the check.
    #[test]
    fn parameters_that_decode_to_separators_are_refused(value in regex("\\PC{0,20}"), sep in prop_oneof![Just("/"), Just("\\\\"), Just("\n"), Just("\u{0}")]) {
        let raw = utf8_percent_encode(&format!("{value}{sep}"), NON_ALPHANUMERIC).to_string();
        let route = poem::Route::new().at("/v1/files/:file_id", poem::endpoint::make_sync(|req| {
            match check_path_param(req.raw_path_param("file_id")) {
                Err(ParamProblem::Slash | ParamProblem::ControlChar) => "refused",
                other => panic!("{other:?}"),
            }
        }));
        let uri: http::Uri = format!("/v1/files/{raw}").parse().unwrap();
        let response = answer(&route, uri);
        prop_assert_eq!(response.status(), http::StatusCode::OK);
        let _ = check_path_param(Some(&value));
    }

    /// The pipeline reads a route's parameters from the raw path itself, so that no engine's
    /// router has to hand them over: it must read each one as poem's router decodes it.
    #[test]
    fn the_pipeline_reads_each_parameter_as_the_router_does(
        template in template(),
        values in prop::collection::vec(regex("([A-Za-z0-9._~:-]|%[0-9A-Fa-f]{2}|%[0-9A-Fa-f]){1,8}"), 6),
    ) {
        let Ok(parsed) = PathTemplate::parse(&template) else { return Ok(()) };
        let mut path = String::new();
        let mut values = values.into_iter();
        for segment in parsed.segments() {
            path.push('/');
            match segment {
                oa_bypass::routes::Segment::Static(s) => path.push_str(s),
                oa_bypass::routes::Segment::Param(_) => path.push_str(&values.next().unwrap()),
            }
        }
        let ours: Vec<(String, Option<String>)> = parsed
            .params_in(&path)
            .map(|(name, value)| (name.to_owned(), value.map(|v| v.into_owned())))
            .collect();
        let endpoint = poem::endpoint::make_sync(move |req| {
            for (name, value) in &ours {
                assert_eq!(req.raw_path_param(name), value.as_deref(), "{name}");
            }
            "matched"
        });
        let route = poem::Route::new().at(parsed.to_poem_path(), endpoint);
        let uri: http::Uri = match path.parse() { Ok(uri) => uri, Err(_) => return Ok(()) };
        let response = answer(&route, uri);
        prop_assert_eq!(response.status(), http::StatusCode::OK, "{} did not match {}", path, template);
    }
}
