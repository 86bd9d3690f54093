//! `deploy/grafana/oa-bypass.json`, the dashboard of a team's keys: every panel's query is run
//! against a real Prometheus (Debian's) that scraped a gateway serving named keys, and each
//! must return data. A query that names a metric the gateway does not export, or a label it
//! does not set, returns nothing and fails here.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::budgets::eight_tokens;
use crate::support::{self, Gateway, KillOnDrop, Upstream, KEY};

const BOB: &str = "sk-bob-dashboard-0123456789SECRET";

/// Every panel's queries, with Grafana's variables as a dashboard would fill them.
fn panel_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("deploy/grafana/oa-bypass.json").unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$__range", "10m")
                .replace("$key", ".*");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    queries
}

/// The answer to `expr`, or `null` while Prometheus does not answer yet.
async fn query(prometheus: &str, expr: &str) -> Value {
    let response = support::client()
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await;
    match response {
        Ok(response) => response.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

#[tokio::test]
async fn every_panel_of_the_dashboard_returns_data_from_a_real_prometheus() {
    let queries = panel_queries();
    let titles: Vec<&str> = queries.iter().map(|(title, _)| title.as_str()).collect();
    for needed in [
        "Requests",
        "Errors",
        "Latency",
        "Tokens by key",
        "Tokens by model",
        "Spend by key",
        "Spend by model",
        "Budget left",
    ] {
        assert!(
            titles.iter().any(|t| t.starts_with(needed)),
            "no {needed} panel: {titles:?}"
        );
    }

    let upstream = Upstream::start(eight_tokens).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "[limits]\nstate_file = \"{}\"\n[upstream]\nbase_url = \"{}\"\n\
         [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
         tag = \"Chat\"\nusage = true\n\
         [keys.alice]\nhash = \"{}\"\nmodels = [\"gpt-4o-mini\"]\nmax_usd_per_month = 5\n\
         max_tokens_per_day = 100000\n\
         [keys.bob]\nhash = \"{}\"\nmax_tokens_per_month = 100000\n",
        dir.path().join("spend.json").display(),
        upstream.base_url(),
        oa_bypass::config::hash_line(KEY),
        oa_bypass::config::hash_line(BOB),
    );
    let gateway = Gateway::start(&manifest).await;
    let chat = |key: &'static str, model: &'static str| {
        support::client()
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": []}))
            .send()
    };

    let port = support::closed_port().port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: oa-bypass\n    \
             static_configs:\n      - targets: [\"{}\"]\n",
            gateway.addr
        ),
    )
    .unwrap();
    let _server = KillOnDrop(
        Command::new(support::debian_command("prometheus", "prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}");

    // Traffic across several scrapes, so rates and increases have samples on both sides:
    // answers for both keys, and a refusal (an unlisted model) for the errors panel.
    let deadline = support::LOG_DEADLINE * 6;
    support::eventually("every panel to return data", deadline, || {
        let (chat, url, queries) = (&chat, &url, &queries);
        async move {
            for (key, model) in [(KEY, "gpt-4o-mini"), (BOB, "gpt-4o-mini"), (KEY, "o3")] {
                if let Ok(response) = chat(key, model).await {
                    let _ = response.bytes().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut empty = Vec::new();
            for (title, expr) in queries {
                let answer = query(url, expr).await;
                let data = answer["data"]["result"].as_array().map_or(0, Vec::len);
                if answer["status"] != "success" || data == 0 {
                    empty.push(format!("{title}: {expr} → {answer}"));
                }
            }
            if empty.is_empty() {
                Ok(())
            } else {
                Err(empty.join("\n"))
            }
        }
    })
    .await;
}
