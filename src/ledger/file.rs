//! `limits.state_file`: the ledger's counts between runs, as one small JSON document.
//!
//! Written whole, at most once a second while counts change and once more on exit: to a
//! temporary file beside it, synced, then renamed over it, so a crash leaves the old file or
//! the new one, never half of one. After a SIGKILL at most the last second of spend is lost.
//! A file that cannot be read or parsed stops start-up with its path: budgets are never
//! silently reset.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Ledger, Spent};

/// How often changed counts are written.
const EVERY: Duration = Duration::from_secs(1);
/// The document's shape; a file of another version is refused, not guessed at.
const VERSION: u32 = 1;

/// Why the state file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("limits.state_file: {0}")]
pub(crate) struct StateError(String);

/// The file, by its path.
pub(super) struct StateFile {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    version: u32,
    /// By key name.
    spent: HashMap<String, Spent>,
}

impl StateFile {
    /// Opens `path` and reads its counts; a file not there yet is made now (with its folder),
    /// so a path the process cannot write fails at start-up rather than an hour later.
    pub(super) fn open(path: &Path) -> Result<(StateFile, HashMap<Arc<str>, Spent>), StateError> {
        let file = StateFile {
            path: path.to_owned(),
        };
        // Absolute, so the message names the file whatever the working directory.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let shown = absolute.display();
        match std::fs::read(path) {
            Ok(bytes) => {
                let document: Document = serde_json::from_slice(&bytes).map_err(|err| {
                    StateError(format!(
                        "{shown} is not a state file this gateway can read ({err}); it is never \
                         reset on its own: restore it, or move it away to start the counts from \
                         zero"
                    ))
                })?;
                if document.version != VERSION {
                    return Err(StateError(format!(
                        "{shown} is of version {}, and this gateway reads version {VERSION}",
                        document.version
                    )));
                }
                let spent = (document.spent.into_iter())
                    .map(|(name, spent)| (Arc::from(name.as_str()), spent))
                    .collect();
                Ok((file, spent))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if let Some(folder) = path
                    .parent()
                    .filter(|folder| !folder.as_os_str().is_empty())
                {
                    std::fs::create_dir_all(folder).map_err(|err| {
                        StateError(format!("cannot create {shown}'s folder: {err}"))
                    })?;
                }
                file.write(&HashMap::new())
                    .map_err(|err| StateError(format!("cannot create {shown}: {err}")))?;
                Ok((file, HashMap::new()))
            }
            Err(err) => Err(StateError(format!("cannot read {shown}: {err}"))),
        }
    }

    /// Replaces the file with `spent`, whole: a temporary file, synced, then renamed.
    pub(super) fn write(&self, spent: &HashMap<Arc<str>, Spent>) -> std::io::Result<()> {
        let document = Document {
            version: VERSION,
            spent: (spent.iter())
                .map(|(name, spent)| (name.to_string(), *spent))
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&document).map_err(std::io::Error::other)?;
        let mut temporary = self.path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let mut out = std::fs::File::create(&temporary)?;
        out.write_all(&json)?;
        out.sync_all()?;
        std::fs::rename(&temporary, &self.path)
    }
}

/// Writes `ledger`'s changed counts once a second, on a thread of its own, until the ledger
/// is dropped (which writes them a last time).
pub(super) fn write_while_alive(ledger: Weak<Ledger>) {
    let spawned = std::thread::Builder::new()
        .name("oa-bypass-ledger".to_owned())
        .spawn(move || loop {
            std::thread::sleep(EVERY);
            match ledger.upgrade() {
                Some(ledger) => ledger.flush(),
                None => break,
            }
        });
    if let Err(err) = spawned {
        tracing::error!(
            "cannot start the state file's writer: {err}; counts are written on exit only"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip_and_a_corrupt_file_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        // A folder not there yet is made.
        let path = dir.path().join("spend").join("state.json");
        let (file, spent) = StateFile::open(&path).unwrap();
        assert!(spent.is_empty() && path.exists());
        let mut counts = HashMap::new();
        counts.insert(
            Arc::from("alice"),
            Spent {
                month: 7,
                month_pico_usd: 42,
                ..Spent::default()
            },
        );
        file.write(&counts).unwrap();
        let (_, read) = StateFile::open(&path).unwrap();
        assert_eq!(read, counts);

        std::fs::write(
            &path,
            b"{\"version\":1,\"spent\":{\"alice\":{\"month\":\"x\"}}}",
        )
        .unwrap();
        let err = StateFile::open(&path).err().unwrap().to_string();
        assert!(err.starts_with("limits.state_file: "), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("never reset"), "{err}");
    }
}
