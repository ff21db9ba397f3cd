//! The card vault (PCI DSS): PANs are stored only encrypted with AES-256-GCM — a fresh
//! 96-bit nonce per row, the row id as associated data (a ciphertext moved to another
//! row does not decrypt), and the key id stored per row so keys rotate
//! (`payment-svc rotate-card-keys` re-encrypts under the active key). A keyed HMAC-SHA256
//! fingerprint finds equal cards without decrypting.

use std::collections::BTreeMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox};
use sha2::Sha256;

use crate::domain::card::Pan;

/// `CARD_ENCRYPTION_KEYS`: comma-separated `kid:base64url(32 bytes)` AES-256 keys.
pub const ENV_ENCRYPTION_KEYS: &str = "CARD_ENCRYPTION_KEYS";
/// `CARD_ENCRYPTION_ACTIVE_KEY`: the key id new rows are encrypted with (default: the first).
pub const ENV_ACTIVE_KEY: &str = "CARD_ENCRYPTION_ACTIVE_KEY";
/// `CARD_FINGERPRINT_KEY`: base64url(32 bytes) HMAC key for card fingerprints.
pub const ENV_FINGERPRINT_KEY: &str = "CARD_FINGERPRINT_KEY";

/// Why vault material was refused or a ciphertext did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// A key could not be parsed (the key itself is never shown).
    #[error("{0}")]
    Key(String),
    /// No key with this id.
    #[error("no card encryption key {0:?}")]
    UnknownKey(String),
    /// Authentication failed: wrong key, wrong row, or tampering.
    #[error("card ciphertext does not authenticate")]
    Decrypt,
    /// No randomness for a nonce.
    #[error("no randomness available")]
    Random,
}

/// An encrypted PAN as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The key id.
    pub key_id: String,
    /// The 96-bit nonce.
    pub nonce: Vec<u8>,
    /// Ciphertext and tag.
    pub ciphertext: Vec<u8>,
}

/// The vault's keys. Debug shows key ids only.
pub struct Vault {
    keys: BTreeMap<String, SecretBox<[u8; 32]>>,
    active: String,
    fingerprint_key: SecretBox<[u8; 32]>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl Clone for Vault {
    fn clone(&self) -> Self {
        Self {
            keys: self
                .keys
                .iter()
                .map(|(kid, key)| (kid.clone(), SecretBox::new(Box::new(*key.expose_secret()))))
                .collect(),
            active: self.active.clone(),
            fingerprint_key: SecretBox::new(Box::new(*self.fingerprint_key.expose_secret())),
        }
    }
}

fn decode_key(text: &str, what: &str) -> Result<[u8; 32], VaultError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| VaultError::Key(format!("{what} is not base64url")))?;
    bytes
        .try_into()
        .map_err(|_| VaultError::Key(format!("{what} must be 32 bytes")))
}

impl Vault {
    /// Parses the configured keys.
    pub fn from_config(
        keys: &str,
        active: Option<&str>,
        fingerprint_key: &str,
    ) -> Result<Self, VaultError> {
        let mut parsed = BTreeMap::new();
        let mut first = None;
        for item in keys.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (kid, key) = item
                .split_once(':')
                .ok_or_else(|| VaultError::Key("keys are written kid:base64url".to_owned()))?;
            if kid.is_empty()
                || !kid
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(VaultError::Key("a key id is [A-Za-z0-9_-]+".to_owned()));
            }
            first.get_or_insert_with(|| kid.to_owned());
            parsed.insert(
                kid.to_owned(),
                SecretBox::new(Box::new(decode_key(key, "a card key")?)),
            );
        }
        let active = active
            .map(str::to_owned)
            .or(first)
            .ok_or_else(|| VaultError::Key("no card key".to_owned()))?;
        if !parsed.contains_key(&active) {
            return Err(VaultError::UnknownKey(active));
        }
        Ok(Self {
            keys: parsed,
            active,
            fingerprint_key: SecretBox::new(Box::new(decode_key(
                fingerprint_key,
                "the fingerprint key",
            )?)),
        })
    }

    /// A fresh random key in the configuration's text form (`kid:base64url`).
    pub fn generate_key_text(kid: &str) -> Result<String, VaultError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|_| VaultError::Random)?;
        Ok(format!("{kid}:{}", URL_SAFE_NO_PAD.encode(key)))
    }

    /// The id of the key new rows use.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    fn cipher(&self, key_id: &str) -> Result<Aes256Gcm, VaultError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| VaultError::UnknownKey(key_id.to_owned()))?;
        Aes256Gcm::new_from_slice(key.expose_secret())
            .map_err(|_| VaultError::Key("bad key length".to_owned()))
    }

    /// Encrypts `pan` for the row `row_id` under the active key.
    pub fn seal(&self, row_id: &str, pan: &Pan) -> Result<Sealed, VaultError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|_| VaultError::Random)?;
        let ciphertext = self
            .cipher(&self.active)?
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: pan.expose_secret().as_bytes(),
                    aad: row_id.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        Ok(Sealed {
            key_id: self.active.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Decrypts the PAN stored in row `row_id`.
    pub fn open(&self, row_id: &str, sealed: &Sealed) -> Result<Pan, VaultError> {
        let nonce: [u8; 12] = sealed
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| VaultError::Decrypt)?;
        let plaintext = self
            .cipher(&sealed.key_id)?
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: row_id.as_bytes(),
                },
            )
            .map_err(|_| VaultError::Decrypt)?;
        let text = String::from_utf8(plaintext).map_err(|_| VaultError::Decrypt)?;
        Pan::parse(&text).map_err(|_| VaultError::Decrypt)
    }

    /// The keyed fingerprint of a PAN.
    pub fn fingerprint(&self, pan: &Pan) -> Vec<u8> {
        // HMAC accepts keys of any length, so this cannot fail for a 32-byte key.
        match <Hmac<Sha256> as Mac>::new_from_slice(self.fingerprint_key.expose_secret()) {
            Ok(mut mac) => {
                mac.update(pan.expose_secret().as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(keys: &[&str], active: Option<&str>) -> Vault {
        let keys: Vec<String> = keys
            .iter()
            .map(|kid| Vault::generate_key_text(kid).unwrap_or_default())
            .collect();
        let fingerprint = URL_SAFE_NO_PAD.encode([7u8; 32]);
        Vault::from_config(&keys.join(","), active, &fingerprint).unwrap_or_else(|e| panic!("{e}"))
    }

    fn pan() -> Pan {
        Pan::parse("4242424242424242").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn sealed_pans_open_only_for_their_row_and_key() {
        let vault = vault(&["k1"], None);
        let sealed = vault
            .seal("card_1", &pan())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !sealed.ciphertext.windows(4).any(|w| w == b"4242"),
            "no plaintext in the ciphertext"
        );
        assert_eq!(vault.open("card_1", &sealed), Ok(pan()));
        assert_eq!(
            vault.open("card_2", &sealed),
            Err(VaultError::Decrypt),
            "wrong associated data"
        );
        let other = self::vault(&["k1"], None);
        assert_eq!(
            other.open("card_1", &sealed),
            Err(VaultError::Decrypt),
            "another key under the same id"
        );
        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(vault.open("card_1", &tampered), Err(VaultError::Decrypt));
        let again = vault
            .seal("card_1", &pan())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(again.nonce, sealed.nonce, "a fresh nonce per seal");
    }

    #[test]
    fn rotation_opens_old_rows_and_seals_new_ones_under_the_active_key() {
        let old = vault(&["old"], None);
        let sealed = old.seal("card_1", &pan()).unwrap_or_else(|e| panic!("{e}"));
        let both_text = format!(
            "{},{}",
            Vault::generate_key_text("new").unwrap_or_default(),
            // Reuse the old key's material under its id.
            format_args!(
                "old:{}",
                URL_SAFE_NO_PAD.encode(old.keys["old"].expose_secret())
            )
        );
        let rotated =
            Vault::from_config(&both_text, Some("new"), &URL_SAFE_NO_PAD.encode([7u8; 32]))
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rotated.open("card_1", &sealed), Ok(pan()));
        let resealed = rotated
            .seal("card_1", &pan())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resealed.key_id, "new");
        assert_eq!(
            rotated.fingerprint(&pan()),
            old.fingerprint(&pan()),
            "fingerprints survive rotation"
        );
    }

    #[test]
    fn configuration_errors_never_show_key_material() {
        let err = Vault::from_config("k1:not-base64!", None, "x")
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("a card key is not base64url"));
        let short = Vault::from_config(
            &format!("k1:{}", URL_SAFE_NO_PAD.encode([1u8; 16])),
            None,
            "x",
        )
        .err();
        assert_eq!(
            short.map(|e| e.to_string()).as_deref(),
            Some("a card key must be 32 bytes")
        );
        assert!(matches!(
            Vault::from_config(
                &Vault::generate_key_text("k1").unwrap_or_default(),
                Some("k9"),
                &URL_SAFE_NO_PAD.encode([7u8; 32])
            ),
            Err(VaultError::UnknownKey(_))
        ));
        let shown = format!("{:?}", vault(&["k1"], None));
        assert!(shown.contains("k1") && shown.len() < 80, "{shown}");
    }
}
