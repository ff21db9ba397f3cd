//! API keys: who a caller is, from `authorization: Bearer <key>`.
//!
//! A key is `psk_` followed by 32 random bytes in base64url. The gateway never stores a
//! key: the keys file holds HMAC-SHA256(pepper, key) in hex, with the key's principal,
//! scopes and rate-limit tier, one YAML flow mapping per line:
//!
//! ```yaml
//! - {hash: "5f0c…e1", principal: demo, scopes: [payments:read, payments:write], tier: standard}
//! ```
//!
//! The pepper is a server-side secret, so a leaked keys file does not let anyone test
//! guesses offline. A presented key is hashed with the pepper and looked up by its hash;
//! the lookup's timing can only reveal facts about HMAC outputs, which say nothing about
//! keys without the pepper. [`KeyStore::watch`] re-reads the file on an interval and
//! swaps the table in when it changed and parses; a bad file keeps the previous table
//! (and is logged), so a half-written file never locks every caller out.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::Sha256;

/// Every key starts with this, so leaked keys are easy to recognize (and scan for).
pub const KEY_PREFIX: &str = "psk_";

/// Random bytes in a key.
const KEY_BYTES: usize = 32;

/// The shortest pepper accepted: 32 bytes, like the HMAC's output.
pub const MIN_PEPPER_BYTES: usize = 32;

/// What a valid key says about its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who is calling: the `sub` of the identity tokens the gateway mints.
    pub principal: String,
    /// What the caller may do.
    pub scopes: BTreeSet<String>,
    /// The rate-limit tier (read by the rate limiting layer).
    pub tier: String,
}

/// Why a keys file or a pepper cannot be used. Messages never show a key, a hash or the
/// pepper.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file cannot be read.
    #[error("cannot read the API keys file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a list of keys.
    #[error("the API keys file {path} is not valid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the entry.
        reason: String,
    },
    /// The pepper is too short.
    #[error("the API key pepper must be at least {MIN_PEPPER_BYTES} bytes")]
    ShortPepper,
    /// No randomness for a new key.
    #[error("no randomness for a new key: {0}")]
    Random(String),
}

/// One entry of the keys file, as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    hash: String,
    principal: String,
    #[serde(default)]
    scopes: Vec<String>,
    tier: String,
}

/// The keyed hash keys are stored and looked up by. Holds HMAC's state after the key
/// (the pepper) was absorbed, so hashing a presented key costs only its own blocks.
#[derive(Clone)]
pub struct Pepper(Hmac<Sha256>);

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper(..)")
    }
}

impl Pepper {
    /// A pepper from its secret text; at least [`MIN_PEPPER_BYTES`] bytes.
    pub fn new(secret: SecretString) -> Result<Self, KeysError> {
        if secret.expose_secret().len() < MIN_PEPPER_BYTES {
            return Err(KeysError::ShortPepper);
        }
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            .map(Self)
            .map_err(|_| KeysError::ShortPepper)
    }

    /// HMAC-SHA256(pepper, key), lowercase hex: what the keys file stores.
    pub fn hash(&self, key: &str) -> String {
        let hex = self.hash_hex(key);
        // Hex digits are ASCII.
        String::from_utf8_lossy(&hex).into_owned()
    }

    /// [`Pepper::hash`] without allocating, for the per-call lookup.
    fn hash_hex(&self, key: &str) -> [u8; 64] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.0.clone();
        mac.update(key.as_bytes());
        let mut hex = [0; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(mac.finalize().into_bytes()) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        hex
    }
}

/// A new key for `principal` and its line for the keys file.
#[derive(Debug)]
pub struct GeneratedKey {
    /// The key itself: shown once, never stored.
    pub key: SecretString,
    /// The keys-file line (holds only the hash).
    pub line: String,
}

/// Generates a key and the line that grants it `scopes` and `tier` as `principal`.
pub fn generate(
    pepper: &Pepper,
    principal: &str,
    scopes: &[String],
    tier: &str,
) -> Result<GeneratedKey, KeysError> {
    let mut bytes = [0u8; KEY_BYTES];
    getrandom::fill(&mut bytes).map_err(|err| KeysError::Random(err.to_string()))?;
    let key = format!("{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let entry = KeyEntry {
        hash: pepper.hash(&key),
        principal: principal.to_owned(),
        scopes: scopes.to_vec(),
        tier: tier.to_owned(),
    };
    validate(&entry).map_err(|reason| KeysError::Invalid {
        path: PathBuf::from("(generate-key)"),
        reason,
    })?;
    let line = format!(
        "- {{hash: \"{}\", principal: {}, scopes: [{}], tier: {}}}",
        entry.hash,
        yaml_scalar(&entry.principal),
        entry
            .scopes
            .iter()
            .map(|scope| yaml_scalar(scope))
            .collect::<Vec<_>>()
            .join(", "),
        yaml_scalar(&entry.tier)
    );
    Ok(GeneratedKey {
        key: key.into(),
        line,
    })
}

/// A YAML scalar for `value`: plain when it cannot be read as anything but that string,
/// double-quoted otherwise (JSON strings are valid YAML).
fn yaml_scalar(value: &str) -> String {
    const RESERVED: [&str; 11] = [
        "true", "false", "null", "yes", "no", "on", "off", "y", "n", "~", "nan",
    ];
    let plain = !RESERVED.contains(&value.to_ascii_lowercase().as_str())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'/'))
        && value
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphabetic)
        && !value.ends_with(':');
    if plain {
        value.to_owned()
    } else {
        serde_json::to_string(value).unwrap_or_default()
    }
}

fn validate(entry: &KeyEntry) -> Result<(), String> {
    if entry.hash.len() != 64 || !entry.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("hash must be 64 hex digits (HMAC-SHA256)".to_owned());
    }
    let printable =
        |text: &str| !text.is_empty() && text.len() <= 255 && !text.chars().any(char::is_control);
    if !printable(&entry.principal) {
        return Err("principal must be 1–255 printable characters".to_owned());
    }
    if !printable(&entry.tier) {
        return Err("tier must be 1–255 printable characters".to_owned());
    }
    if let Some(scope) = entry.scopes.iter().find(|scope| !printable(scope)) {
        return Err(format!(
            "scope {scope:?} must be 1–255 printable characters"
        ));
    }
    Ok(())
}

/// The keys of one version of the file, by hash.
#[derive(Debug, Default)]
struct KeyTable {
    by_hash: HashMap<String, Caller>,
}

impl KeyTable {
    fn parse(path: &Path, text: &str) -> Result<Self, KeysError> {
        let invalid = |reason: String| KeysError::Invalid {
            path: path.to_owned(),
            reason,
        };
        // An empty file (or only comments) grants nothing.
        let entries: Vec<KeyEntry> = if text
            .lines()
            .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'))
        {
            Vec::new()
        } else {
            yaml_serde::from_str(text).map_err(|err| invalid(err.to_string()))?
        };
        let mut by_hash = HashMap::with_capacity(entries.len());
        for (index, entry) in entries.into_iter().enumerate() {
            validate(&entry).map_err(|reason| invalid(format!("entry {}: {reason}", index + 1)))?;
            let caller = Caller {
                principal: entry.principal,
                scopes: entry.scopes.into_iter().collect(),
                tier: entry.tier,
            };
            if by_hash
                .insert(entry.hash.to_ascii_lowercase(), caller)
                .is_some()
            {
                return Err(invalid(format!(
                    "entry {}: the same key is listed twice",
                    index + 1
                )));
            }
        }
        Ok(Self { by_hash })
    }
}

/// The API keys in force, reloaded from their file.
#[derive(Debug, Clone)]
pub struct KeyStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug)]
struct StoreInner {
    path: PathBuf,
    pepper: Pepper,
    table: RwLock<Arc<KeyTable>>,
    /// The file's bytes the table was parsed from.
    loaded: RwLock<Vec<u8>>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl KeyStore {
    /// Loads `path`; fails when the file cannot be read or is not valid.
    pub async fn load(path: &Path, pepper: Pepper) -> Result<Self, KeysError> {
        let bytes = read(path).await?;
        let table = KeyTable::parse(path, &String::from_utf8_lossy(&bytes))?;
        tracing::info!(path = %path.display(), keys = table.by_hash.len(), "API keys loaded");
        Ok(Self {
            inner: Arc::new(StoreInner {
                path: path.to_owned(),
                pepper,
                table: RwLock::new(Arc::new(table)),
                loaded: RwLock::new(bytes),
                reloads: AtomicU64::new(0),
                reload_failures: AtomicU64::new(0),
            }),
        })
    }

    /// The caller a presented key belongs to, if any.
    pub fn caller(&self, key: &str) -> Option<Caller> {
        if !key.starts_with(KEY_PREFIX) {
            return None;
        }
        let hash = self.inner.pepper.hash_hex(key);
        let hash = std::str::from_utf8(&hash).ok()?;
        let table = match self.inner.table.read() {
            Ok(table) => Arc::clone(&table),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        table.by_hash.get(hash).cloned()
    }

    /// How many times a changed file was loaded (for tests and metrics).
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// How many times a changed file could not be loaded (the previous keys stayed).
    pub fn reload_failures(&self) -> u64 {
        self.inner.reload_failures.load(Ordering::Relaxed)
    }

    /// Re-reads the file every `interval` until `stop` completes, swapping in each changed
    /// version that parses. Reading the bytes (rather than trusting mtimes) also catches
    /// Kubernetes' symlink swaps of mounted Secrets and same-second edits.
    pub async fn watch(&self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => self.reload_if_changed().await,
            }
        }
    }

    async fn reload_if_changed(&self) {
        let path = &self.inner.path;
        let bytes = match read(path).await {
            Ok(bytes) => bytes,
            Err(err) => {
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "API keys not reloaded: keeping the previous keys");
                return;
            }
        };
        let unchanged = match self.inner.loaded.read() {
            Ok(loaded) => *loaded == bytes,
            Err(poisoned) => *poisoned.into_inner() == bytes,
        };
        if unchanged {
            return;
        }
        match KeyTable::parse(path, &String::from_utf8_lossy(&bytes)) {
            Ok(table) => {
                let keys = table.by_hash.len();
                if let Ok(mut current) = self.inner.table.write() {
                    *current = Arc::new(table);
                }
                if let Ok(mut loaded) = self.inner.loaded.write() {
                    *loaded = bytes;
                }
                self.inner.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(path = %path.display(), keys, "API keys reloaded");
            }
            Err(err) => {
                // Remember the bad bytes so the same bad file is reported once.
                if let Ok(mut loaded) = self.inner.loaded.write() {
                    *loaded = bytes;
                }
                self.inner.reload_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, "API keys not reloaded: keeping the previous keys");
            }
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, KeysError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| KeysError::Read {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper() -> Pepper {
        match Pepper::new("a pepper of at least thirty-two bytes".to_owned().into()) {
            Ok(pepper) => pepper,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn the_hash_is_hmac_sha256_of_the_key_under_the_pepper_in_lowercase_hex()
    -> Result<(), KeysError> {
        // Expected value from Python's hmac module: an implementation independent of ours.
        let pepper = Pepper::new("p".repeat(40).into())?;
        assert_eq!(
            pepper.hash("psk_known"),
            "e84edc89568d06fe8f18657f09af07f2197b8a9af9ba10a5861ed538a31e888a"
        );
        Ok(())
    }

    #[test]
    fn a_generated_line_parses_back_to_its_caller() -> Result<(), KeysError> {
        let pepper = pepper();
        let scopes = vec!["payments:read".to_owned(), "payments:write".to_owned()];
        let generated = generate(&pepper, "acme corp", &scopes, "gold")?;
        let table = KeyTable::parse(Path::new("keys.yaml"), &generated.line)?;
        let caller = table
            .by_hash
            .get(&pepper.hash(generated.key.expose_secret()));
        assert_eq!(
            caller,
            Some(&Caller {
                principal: "acme corp".to_owned(),
                scopes: scopes.into_iter().collect(),
                tier: "gold".to_owned(),
            })
        );
        // The line holds the hash, never the key.
        assert!(!generated.line.contains(generated.key.expose_secret()));
        Ok(())
    }

    #[test]
    fn another_pepper_or_key_finds_nothing() -> Result<(), KeysError> {
        let generated = generate(&pepper(), "demo", &[], "standard")?;
        let table = KeyTable::parse(Path::new("keys.yaml"), &generated.line)?;
        let other = Pepper::new("another pepper, also thirty-two bytes".to_owned().into())?;
        assert!(
            !table
                .by_hash
                .contains_key(&other.hash(generated.key.expose_secret()))
        );
        assert!(!table.by_hash.contains_key(&pepper().hash("psk_guess")));
        Ok(())
    }

    #[test]
    fn bad_files_are_refused_naming_the_entry() {
        let good = "0".repeat(64);
        for (text, expected) in [
            (
                "- {hash: abc, principal: p, tier: t}".to_owned(),
                "entry 1: hash",
            ),
            (
                format!("- {{hash: {good}, principal: '', tier: t}}"),
                "entry 1: principal",
            ),
            (
                format!(
                    "- {{hash: {good}, principal: p, tier: t}}\n- {{hash: {good}, principal: q, tier: t}}"
                ),
                "entry 2: the same key",
            ),
            (
                format!("- {{hash: {good}, principal: p, tier: t, extra: 1}}"),
                "unknown field",
            ),
            ("keys: nope".to_owned(), "invalid type"),
        ] {
            let err = KeyTable::parse(Path::new("keys.yaml"), &text)
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains(expected)),
                "{text}: {err:?}"
            );
        }
        assert!(Pepper::new("short".to_owned().into()).is_err());
    }

    #[test]
    fn an_empty_or_commented_file_grants_nothing() -> Result<(), KeysError> {
        for text in ["", "\n", "# no keys yet\n"] {
            assert!(
                KeyTable::parse(Path::new("keys.yaml"), text)?
                    .by_hash
                    .is_empty()
            );
        }
        Ok(())
    }
}
