//! The development identity key: generated once into `.paysuite/dev-identity.key`, trusted
//! by the services `up` starts, and used by `cargo xtask token` to mint tokens so grpcurl
//! can call a service directly.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::ExposeSecret as _;
use service_kit::identity::SigningKey;

use crate::workspace_root;

fn key_path() -> PathBuf {
    workspace_root().join(".paysuite/dev-identity.key")
}

/// The development signing key, created on first use.
pub fn dev_key() -> anyhow::Result<SigningKey> {
    let path = key_path();
    if let Ok(text) = std::fs::read_to_string(&path) {
        return SigningKey::parse(&text.trim().to_owned().into()).with_context(|| {
            format!(
                "{} is not a signing key; delete it to start over",
                path.display()
            )
        });
    }
    let key = SigningKey::generate("dev")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(&path, key.to_secret_string().expose_secret())?;
    Ok(key)
}

pub(crate) fn write_private(path: &PathBuf, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// `cargo xtask token`: prints a token for grpcurl's `-H "x-paysuite-identity: …"`.
pub fn print_token(principal: &str, scopes: &str, audience: &str, ttl: &str) -> anyhow::Result<()> {
    let ttl: Duration =
        humantime::parse_duration(ttl).context("--ttl takes a duration like 10m or 1h")?;
    let scopes: Vec<String> = scopes
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let token = dev_key()?.mint(principal, &scopes, audience, ttl);
    println!("{token}");
    Ok(())
}

/// The development card-vault keys `(CARD_ENCRYPTION_KEYS, CARD_FINGERPRINT_KEY)`,
/// generated once into `.paysuite/dev-card-keys` (a database kept across runs stays
/// readable).
pub fn dev_card_keys() -> anyhow::Result<(String, String)> {
    use base64::Engine as _;
    let path = workspace_root().join(".paysuite/dev-card-keys");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some((encryption, fingerprint)) = text.trim().split_once('\n')
    {
        return Ok((encryption.trim().to_owned(), fingerprint.trim().to_owned()));
    }
    let key = || -> anyhow::Result<String> {
        let mut bytes = [0u8; 32];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    };
    let encryption = format!("dev:{}", key()?);
    let fingerprint = key()?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_private(&path, &format!("{encryption}\n{fingerprint}\n"))?;
    Ok((encryption, fingerprint))
}
