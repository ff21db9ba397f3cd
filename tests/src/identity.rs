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
