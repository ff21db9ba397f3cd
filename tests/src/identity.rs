//! Identity tokens for tests: one signing key per test process, trusted by every
//! service the harness starts.

use std::sync::LazyLock;
use std::time::Duration;

use service_kit::IdentityConfig;
use service_kit::identity::{DEFAULT_MAX_TTL, SigningKey};

static KEY: LazyLock<SigningKey> = LazyLock::new(|| match SigningKey::generate("test") {
    Ok(key) => key,
    Err(err) => panic!("cannot generate the test identity key: {err}"),
});

/// The signing key the harness mints tokens with.
pub fn signing_key() -> &'static SigningKey {
    &KEY
}

/// `IDENTITY_PUBLIC_KEYS` for spawned services.
pub fn public_keys_env() -> String {
    KEY.public_key().to_string()
}

/// Identity settings trusting the harness key, for `audience`.
pub fn config(audience: &str) -> IdentityConfig {
    IdentityConfig {
        public_keys: vec![KEY.public_key()],
        audience: audience.to_owned(),
        max_ttl: DEFAULT_MAX_TTL,
    }
}

/// A token for `principal` with `scopes`, for `audience`, valid for a minute.
pub fn token(principal: &str, scopes: &[&str], audience: &str) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| (*s).to_owned()).collect();
    KEY.mint(principal, &scopes, audience, Duration::from_secs(60))
}

/// Card vault keys for every payment-svc the harness starts: `(CARD_ENCRYPTION_KEYS,
/// CARD_FINGERPRINT_KEY)`.
pub fn vault_env() -> (String, String) {
    static KEYS: LazyLock<(String, String)> = LazyLock::new(|| {
        let encryption = payment_svc::vault::Vault::generate_key_text("test")
            .unwrap_or_else(|err| panic!("cannot generate a card key: {err}"));
        let fingerprint = payment_svc::vault::Vault::generate_key_text("fp")
            .unwrap_or_else(|err| panic!("cannot generate a fingerprint key: {err}"));
        let fingerprint = fingerprint
            .split_once(':')
            .map(|(_, key)| key.to_owned())
            .unwrap_or_default();
        (encryption, fingerprint)
    });
    KEYS.clone()
}

/// Every variable a spawned service needs to trust the harness's keys.
pub fn service_env() -> Vec<(&'static str, String)> {
    let (encryption, fingerprint) = vault_env();
    vec![
        ("IDENTITY_PUBLIC_KEYS", public_keys_env()),
        ("CARD_ENCRYPTION_KEYS", encryption),
        ("CARD_FINGERPRINT_KEY", fingerprint),
    ]
}
