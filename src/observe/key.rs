//! Who made a request, as far as logs and metrics may say.

use sha2::{Digest, Sha256};

/// Who made a request, as far as logs and metrics may say: the SHA-256 of its key, shown as
/// the first 8 hex digits. The key itself is never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyId {
    pub(crate) hash: [u8; 32],
}

impl KeyId {
    pub(crate) fn of(key: &str) -> KeyId {
        KeyId {
            hash: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// The first 8 hex digits of the hash: enough to tell a team's keys apart, far too few
    /// to test guesses of a key against.
    pub(crate) fn prefix(&self) -> KeyPrefix {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0; 8];
        for (pair, byte) in out.chunks_exact_mut(2).zip(&self.hash) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        KeyPrefix(out)
    }
}

/// A key's hash prefix as text, kept on the stack: every request's log line has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyPrefix([u8; 8]);

impl KeyPrefix {
    /// The hex digits, unchecked: what a log line copies.
    pub(crate) fn hex(&self) -> &[u8; 8] {
        &self.0
    }
}

impl std::ops::Deref for KeyPrefix {
    type Target = str;

    fn deref(&self) -> &str {
        // Hex digits only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::hash_line;

    #[test]
    fn key_id_prefix_is_the_first_eight_hex_digits_of_the_hash() {
        let line = hash_line("sk-test");
        assert_eq!(
            &*KeyId::of("sk-test").prefix(),
            &line["sha256:".len()..][..8]
        );
    }
}
