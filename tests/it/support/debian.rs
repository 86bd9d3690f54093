//! Debian packages a test needs beyond cargo (`redis-server`, `prometheus`): installed here
//! when missing, so `cargo test` alone suffices on a new machine (`.ci/run` installs them
//! first, which is quicker).

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// `command`, from Debian's `package`, installed with apt-get if it does not run.
pub fn debian_command(command: &'static str, package: &str) -> &'static str {
    static CHECKED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut checked = CHECKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if checked.get_or_insert_with(HashSet::new).insert(command) {
        let present = Command::new(command).arg("--version").output();
        if present.is_err() {
            let status = Command::new("apt-get")
                .args(["install", "-y", "-qq", package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .unwrap_or_else(|_| panic!("{command} is missing and apt-get cannot run"));
            assert!(status.success(), "apt-get install {package} failed");
        }
    }
    command
}
