//! Identity between the gateway and the services: a compact JWS (RFC 7515) signed with
//! Ed25519 (`alg: EdDSA`), carried in the `x-paysuite-identity` header.
//!
//! The gateway holds the private key and mints short-lived tokens; services hold only
//! public keys — several at once, chosen by the token's `kid`, so keys rotate without
//! downtime. Claims: `sub` (the principal), `scopes`, `aud` (the service the token is
//! for), `iat`, `exp`.
//!
//! Written here rather than with a JWT crate: we accept exactly one algorithm and one
//! claim set, and the general crates bring RSA and ECDSA stacks we would never use. What
//! is verified, in order: the header names `EdDSA` and a known `kid`; the signature; the
//! audience; `iat`/`exp` against the clock with a leeway; and a lifetime no longer than
//! the verifier's maximum.
//!
//! A verified token is remembered (a bounded cache keyed by the whole token): the same
//! bytes verify the same way until they expire, and the gateway reuses a token for many
//! calls, so the signature check — the expensive step — runs once per token instead of
//! once per call. Only the clock checks run again on a hit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signer as _, Verifier as _};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

/// The request header carrying the identity token.
pub const IDENTITY_HEADER: &str = "x-paysuite-identity";
/// Clock skew tolerated between minting and verifying hosts.
pub const LEEWAY: Duration = Duration::from_secs(5);
/// The longest lifetime the gateway gives a token.
pub const GATEWAY_TOKEN_TTL: Duration = Duration::from_secs(60);

/// A verified caller: who it is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The principal (tenant) acting.
    pub principal: String,
    /// The scopes it holds, e.g. `payments:read`.
    pub scopes: BTreeSet<String>,
}

impl Identity {
    /// Whether the identity holds `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }
}

/// Why a token was refused. Messages are safe to return to callers: they never contain
/// the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// No `x-paysuite-identity` header.
    #[error("missing identity token")]
    Missing,
    /// Not a compact JWS with an EdDSA header and JSON claims.
    #[error("malformed identity token")]
    Malformed,
    /// Signed by a key this service does not know.
    #[error("identity token signed by an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("identity token signature is invalid")]
    BadSignature,
    /// Issued for another service.
    #[error("identity token is for another audience")]
    WrongAudience,
    /// Past its `exp`.
    #[error("identity token expired")]
    Expired,
    /// Issued in the future, or lives longer than allowed.
    #[error("identity token lifetime is not acceptable")]
    BadLifetime,
}

/// A key-configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    kid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scopes: Vec<String>,
    aud: String,
    iat: i64,
    exp: i64,
}

/// An Ed25519 private key with its key id. Debug never shows the key.
pub struct SigningKey {
    kid: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(kid: &str) -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|err| KeyError(format!("no randomness: {err}")))?;
        Ok(Self {
            kid: validate_kid(kid)?,
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Parses `kid:base64url(32-byte seed)`, the form [`SigningKey::to_secret_string`] writes.
    pub fn parse(text: &SecretString) -> Result<Self, KeyError> {
        let (kid, seed) = split_key(text.expose_secret())?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| KeyError("a signing key is 32 bytes".to_owned()))?;
        Ok(Self {
            kid,
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// `kid:base64url(seed)`: the form to store in a secret.
    pub fn to_secret_string(&self) -> SecretString {
        SecretString::from(format!(
            "{}:{}",
            self.kid,
            URL_SAFE_NO_PAD.encode(self.key.to_bytes())
        ))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            kid: self.kid.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Mints a token for `principal` with `scopes`, for `audience`, living `ttl`.
    pub fn mint(
        &self,
        principal: &str,
        scopes: &[String],
        audience: &str,
        ttl: Duration,
    ) -> String {
        self.mint_at(principal, scopes, audience, unix_now(), ttl)
    }

    /// Mints a token issued at `issued_at` (seconds since the epoch); for tests of expiry.
    pub fn mint_at(
        &self,
        principal: &str,
        scopes: &[String],
        audience: &str,
        issued_at: i64,
        ttl: Duration,
    ) -> String {
        let header = Header {
            alg: "EdDSA".to_owned(),
            kid: self.kid.clone(),
            typ: Some("JWT".to_owned()),
        };
        let claims = Claims {
            sub: principal.to_owned(),
            scopes: scopes.to_vec(),
            aud: audience.to_owned(),
            iat: issued_at,
            exp: issued_at.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        };
        let signing_input = format!("{}.{}", encode_json(&header), encode_json(&claims));
        let signature = self.key.sign(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.to_bytes())
        )
    }
}

/// Mints the gateway's tokens and reuses each while more than half its lifetime remains:
/// a caller making many calls carries one token per half lifetime — one signature here and
/// one verification upstream ([`Verifier`] remembers verified tokens) — instead of one per
/// call. Debug never shows a token.
pub struct Minter {
    key: std::sync::Arc<SigningKey>,
    ttl: Duration,
    minted: quick_cache::sync::Cache<MintedFor, std::sync::Arc<Minted>>,
}

/// Who a token was minted for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MintedFor {
    principal: String,
    scopes: Vec<String>,
    audience: String,
}

/// [`MintedFor`] borrowed, to look a token up without allocating on every call. Its
/// fields hash as the owned ones do (`str` as `String`, a slice as a `Vec`), in the same
/// order.
#[derive(Hash)]
struct MintedForRef<'a> {
    principal: &'a str,
    scopes: &'a [String],
    audience: &'a str,
}

impl quick_cache::Equivalent<MintedFor> for MintedForRef<'_> {
    fn equivalent(&self, key: &MintedFor) -> bool {
        self.principal == key.principal
            && self.scopes == key.scopes.as_slice()
            && self.audience == key.audience
    }
}

#[derive(Debug)]
struct Minted {
    token: http::HeaderValue,
    /// When to mint a fresh one (seconds since the epoch): half the lifetime in.
    refresh_at: i64,
}

/// Token sets a minter remembers at most (one per caller and audience).
const MINTED_CAPACITY: usize = 10_000;

impl fmt::Debug for Minter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minter")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// Mints with `key`, tokens living `ttl`.
    pub fn new(key: std::sync::Arc<SigningKey>, ttl: Duration) -> Self {
        Self {
            key,
            ttl,
            minted: quick_cache::sync::Cache::new(MINTED_CAPACITY),
        }
    }

    /// A token for `principal` with `scopes`, for `audience`, as a header value: the one
    /// minted before while it has more than half its lifetime left, else a fresh one.
    pub fn token(&self, principal: &str, scopes: &[String], audience: &str) -> http::HeaderValue {
        self.token_at(principal, scopes, audience, unix_now())
    }

    fn token_at(
        &self,
        principal: &str,
        scopes: &[String],
        audience: &str,
        now: i64,
    ) -> http::HeaderValue {
        let borrowed = MintedForRef {
            principal,
            scopes,
            audience,
        };
        if let Some(minted) = self.minted.get(&borrowed)
            && now < minted.refresh_at
        {
            return minted.token.clone();
        }
        let key = MintedFor {
            principal: principal.to_owned(),
            scopes: scopes.to_vec(),
            audience: audience.to_owned(),
        };
        let token = self.key.mint_at(principal, scopes, audience, now, self.ttl);
        // A compact JWS is base64url and dots: always a valid header value.
        let token = http::HeaderValue::try_from(token)
            .unwrap_or_else(|_| http::HeaderValue::from_static(""));
        let half = i64::try_from(self.ttl.as_secs() / 2).unwrap_or(i64::MAX);
        self.minted.insert(
            key,
            std::sync::Arc::new(Minted {
                token: token.clone(),
                refresh_at: now.saturating_add(half),
            }),
        );
        token
    }
}

/// An Ed25519 public key with its key id.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    kid: String,
    key: ed25519_dalek::VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    /// `kid:base64url(32-byte key)`, the form `IDENTITY_PUBLIC_KEYS` lists.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.kid,
            URL_SAFE_NO_PAD.encode(self.key.as_bytes())
        )
    }
}

impl std::str::FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (kid, bytes) = split_key(text)?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError("a public key is 32 bytes".to_owned()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError(format!("public key {kid} is not a valid Ed25519 point")))?;
        Ok(Self { kid, key })
    }
}

/// Tokens a verifier remembers at most.
const VERIFIED_CAPACITY: usize = 10_000;

/// What a verified token said, for the clock checks that run again on every use.
#[derive(Debug)]
struct Verified {
    identity: Identity,
    iat: i64,
    exp: i64,
}

/// Verifies tokens for one audience against a set of public keys. Clones share the cache
/// of verified tokens.
#[derive(Clone)]
pub struct Verifier {
    keys: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    audience: String,
    max_ttl: Duration,
    verified: std::sync::Arc<quick_cache::sync::Cache<String, std::sync::Arc<Verified>>>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the cache: its keys are bearer tokens.
        f.debug_struct("Verifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("audience", &self.audience)
            .field("max_ttl", &self.max_ttl)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `audience` accepting lifetimes up to `max_ttl`.
    pub fn new(
        keys: impl IntoIterator<Item = PublicKey>,
        audience: &str,
        max_ttl: Duration,
    ) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.kid, k.key)).collect(),
            audience: audience.to_owned(),
            max_ttl,
            verified: std::sync::Arc::new(quick_cache::sync::Cache::new(VERIFIED_CAPACITY)),
        }
    }

    /// Parses a comma-separated list of `kid:base64url` public keys.
    pub fn parse_keys(list: &str) -> Result<Vec<PublicKey>, KeyError> {
        list.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::parse)
            .collect()
    }

    /// Verifies `token` now.
    pub fn verify(&self, token: &str) -> Result<Identity, IdentityError> {
        self.verify_at(token, unix_now())
    }

    /// Verifies `token` at `now` (seconds since the epoch).
    pub fn verify_at(&self, token: &str, now: i64) -> Result<Identity, IdentityError> {
        if let Some(verified) = self.verified.get(token) {
            check_clock(verified.iat, verified.exp, now)?;
            return Ok(verified.identity.clone());
        }
        let verified = self.verify_signed(token)?;
        check_clock(verified.iat, verified.exp, now)?;
        let identity = verified.identity.clone();
        self.verified
            .insert(token.to_owned(), std::sync::Arc::new(verified));
        Ok(identity)
    }

    /// Everything that does not depend on the clock: the header, the signature, the
    /// audience, the lifetime and the subject.
    fn verify_signed(&self, token: &str) -> Result<Verified, IdentityError> {
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::Malformed);
        };
        let header: Header = decode_json(header)?;
        if header.alg != "EdDSA" {
            return Err(IdentityError::Malformed);
        }
        let key = self
            .keys
            .get(&header.kid)
            .ok_or(IdentityError::UnknownKey)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| IdentityError::Malformed)?;
        let signature = ed25519_dalek::Signature::from_slice(&signature)
            .map_err(|_| IdentityError::Malformed)?;
        let (signing_input, _) = token.rsplit_once('.').ok_or(IdentityError::Malformed)?;
        key.verify(signing_input.as_bytes(), &signature)
            .map_err(|_| IdentityError::BadSignature)?;

        let claims: Claims = decode_json(claims)?;
        if claims.aud != self.audience {
            return Err(IdentityError::WrongAudience);
        }
        let max_ttl = i64::try_from(self.max_ttl.as_secs()).unwrap_or(i64::MAX);
        if claims.exp <= claims.iat || claims.exp - claims.iat > max_ttl {
            return Err(IdentityError::BadLifetime);
        }
        if claims.sub.is_empty() {
            return Err(IdentityError::Malformed);
        }
        Ok(Verified {
            identity: Identity {
                principal: claims.sub,
                scopes: claims.scopes.into_iter().collect(),
            },
            iat: claims.iat,
            exp: claims.exp,
        })
    }
}

/// A token's `iat`/`exp` against the clock, with the leeway.
fn check_clock(iat: i64, exp: i64, now: i64) -> Result<(), IdentityError> {
    let leeway = i64::try_from(LEEWAY.as_secs()).unwrap_or(i64::MAX);
    if exp.saturating_add(leeway) <= now {
        return Err(IdentityError::Expired);
    }
    if iat > now.saturating_add(leeway) {
        return Err(IdentityError::BadLifetime);
    }
    Ok(())
}

/// `IDENTITY_PUBLIC_KEYS`: comma-separated `kid:base64url` Ed25519 public keys.
pub const ENV_PUBLIC_KEYS: &str = "IDENTITY_PUBLIC_KEYS";
/// `IDENTITY_AUDIENCE`: the `aud` a token must carry; defaults to the service's name.
pub const ENV_AUDIENCE: &str = "IDENTITY_AUDIENCE";
/// `IDENTITY_MAX_TTL`: the longest token lifetime accepted.
pub const ENV_MAX_TTL: &str = "IDENTITY_MAX_TTL";
/// Default of `IDENTITY_MAX_TTL` (long enough for developer tokens from `cargo xtask token`).
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

/// How a service verifies identity tokens.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The keys tokens may be signed with (several during a rotation).
    pub public_keys: Vec<PublicKey>,
    /// The audience tokens must name.
    pub audience: String,
    /// The longest lifetime accepted.
    pub max_ttl: Duration,
}

impl IdentityConfig {
    /// Reads `IDENTITY_*`; the keys are required (a service without keys would refuse
    /// every call, so it refuses to start instead).
    pub fn from_env(env: &crate::Env, default_audience: &str) -> Result<Self, crate::ConfigError> {
        let keys = env
            .raw(ENV_PUBLIC_KEYS)
            .ok_or_else(|| crate::ConfigError::new(ENV_PUBLIC_KEYS, "is required but not set"))?;
        let public_keys = Verifier::parse_keys(keys)
            .map_err(|err| crate::ConfigError::new(ENV_PUBLIC_KEYS, err))?;
        if public_keys.is_empty() {
            return Err(crate::ConfigError::new(ENV_PUBLIC_KEYS, "lists no key"));
        }
        Ok(Self {
            public_keys,
            audience: env.raw(ENV_AUDIENCE).unwrap_or(default_audience).to_owned(),
            max_ttl: env.duration_or(ENV_MAX_TTL, DEFAULT_MAX_TTL)?,
        })
    }

    /// The verifier these settings describe.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(
            self.public_keys.iter().cloned(),
            &self.audience,
            self.max_ttl,
        )
    }
}

/// Checks a call's identity header against the RPC's required scope: UNAUTHENTICATED
/// without a valid token, PERMISSION_DENIED without the scope.
pub fn authorize(
    verifier: &Verifier,
    required_scope: &str,
    headers: &http::HeaderMap,
) -> Result<Identity, tonic::Status> {
    let token = headers
        .get(IDENTITY_HEADER)
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| tonic::Status::unauthenticated(IdentityError::Missing.to_string()))?;
    let identity = verifier
        .verify(token)
        .map_err(|err| tonic::Status::unauthenticated(err.to_string()))?;
    if !identity.has_scope(required_scope) {
        return Err(tonic::Status::permission_denied(format!(
            "this call requires the scope {required_scope}"
        )));
    }
    Ok(identity)
}

fn split_key(text: &str) -> Result<(String, Vec<u8>), KeyError> {
    let (kid, encoded) = text
        .trim()
        .split_once(':')
        .ok_or_else(|| KeyError("a key is written kid:base64url".to_owned()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| KeyError(format!("key {kid} is not base64url")))?;
    Ok((validate_kid(kid)?, bytes))
}

fn validate_kid(kid: &str) -> Result<String, KeyError> {
    if kid.is_empty()
        || kid.len() > 64
        || !kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(KeyError(
            "a key id is 1–64 characters of [A-Za-z0-9_-]".to_owned(),
        ));
    }
    Ok(kid.to_owned())
}

fn encode_json(value: &impl Serialize) -> String {
    // Serializing these plain structs cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, IdentityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| IdentityError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| IdentityError::Malformed)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn scopes(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn key(kid: &str) -> SigningKey {
        match SigningKey::generate(kid) {
            Ok(key) => key,
            Err(err) => panic!("{err}"),
        }
    }

    #[test]
    fn a_minted_token_verifies_and_carries_its_claims() {
        let signing = key("k1");
        let verifier = Verifier::new([signing.public_key()], "payment-svc", HOUR);
        let token = signing.mint(
            "demo",
            &scopes(&["payments:read"]),
            "payment-svc",
            Duration::from_secs(60),
        );
        let identity = verifier.verify(&token);
        assert_eq!(
            identity,
            Ok(Identity {
                principal: "demo".to_owned(),
                scopes: ["payments:read".to_owned()].into_iter().collect()
            })
        );
    }

    #[test]
    fn rotation_accepts_every_listed_key_and_refuses_others() {
        let (old, new, stranger) = (key("old"), key("new"), key("stranger"));
        let verifier = Verifier::new([old.public_key(), new.public_key()], "svc", HOUR);
        for signing in [&old, &new] {
            assert!(
                verifier
                    .verify(&signing.mint("p", &[], "svc", HOUR))
                    .is_ok()
            );
        }
        let unknown = verifier.verify(&stranger.mint("p", &[], "svc", HOUR));
        assert_eq!(unknown, Err(IdentityError::UnknownKey));
        // A token claiming a known kid but signed by another key fails the signature.
        let impostor = SigningKey {
            kid: "old".to_owned(),
            key: stranger.key.clone(),
        };
        assert_eq!(
            verifier.verify(&impostor.mint("p", &[], "svc", HOUR)),
            Err(IdentityError::BadSignature)
        );
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let signing = key("k");
        let verifier = Verifier::new([signing.public_key()], "svc", HOUR);
        let token = signing.mint("alice", &scopes(&["payments:read"]), "svc", HOUR);
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = encode_json(&Claims {
            sub: "mallory".to_owned(),
            scopes: scopes(&["admin"]),
            aud: "svc".to_owned(),
            iat: unix_now(),
            exp: unix_now() + 60,
        });
        parts[1] = &forged;
        assert_eq!(
            verifier.verify(&parts.join(".")),
            Err(IdentityError::BadSignature)
        );
        assert_eq!(
            verifier.verify("not-a-token"),
            Err(IdentityError::Malformed)
        );
    }

    #[test]
    fn audience_expiry_and_lifetime_are_enforced_with_leeway() {
        let signing = key("k");
        let verifier = Verifier::new([signing.public_key()], "svc", HOUR);
        let now = 1_800_000_000;
        let token =
            |iat: i64, ttl: u64| signing.mint_at("p", &[], "svc", iat, Duration::from_secs(ttl));
        assert!(
            verifier.verify_at(&token(now - 60, 62), now).is_ok(),
            "within leeway after exp"
        );
        assert_eq!(
            verifier.verify_at(&token(now - 60, 55), now),
            Err(IdentityError::Expired)
        );
        assert!(
            verifier.verify_at(&token(now + 4, 60), now).is_ok(),
            "issued slightly ahead"
        );
        assert_eq!(
            verifier.verify_at(&token(now + 30, 60), now),
            Err(IdentityError::BadLifetime)
        );
        assert_eq!(
            verifier.verify_at(&token(now, 3601), now),
            Err(IdentityError::BadLifetime)
        );
        let other = signing.mint_at("p", &[], "ratelimit-svc", now, Duration::from_secs(60));
        assert_eq!(
            verifier.verify_at(&other, now),
            Err(IdentityError::WrongAudience)
        );
    }

    #[test]
    fn a_remembered_token_still_meets_the_clock() {
        let signing = key("k");
        let verifier = Verifier::new([signing.public_key()], "svc", HOUR);
        let now = 1_800_000_000;
        let token = signing.mint_at("p", &[], "svc", now, Duration::from_secs(60));
        assert!(verifier.verify_at(&token, now).is_ok());
        // The second use is answered from the cache, by a clone too, and still expires.
        assert!(verifier.clone().verify_at(&token, now + 30).is_ok());
        assert_eq!(
            verifier.verify_at(&token, now + 66),
            Err(IdentityError::Expired)
        );
        assert_eq!(
            verifier.verify_at(&token, now - 10),
            Err(IdentityError::BadLifetime),
            "not yet issued"
        );
        assert!(!format!("{verifier:?}").contains(&token));
    }

    #[test]
    fn a_minter_reuses_a_token_for_half_its_lifetime() -> anyhow::Result<()> {
        let signing = std::sync::Arc::new(key("k"));
        let verifier = Verifier::new([signing.public_key()], "svc", HOUR);
        let minter = Minter::new(std::sync::Arc::clone(&signing), Duration::from_secs(60));
        let now = 1_800_000_000;
        let read = scopes(&["payments:read"]);
        let first = minter.token_at("alice", &read, "svc", now);
        assert_eq!(minter.token_at("alice", &read, "svc", now + 29), first);
        let fresh = minter.token_at("alice", &read, "svc", now + 30);
        assert_ne!(fresh, first, "re-minted half-way through its lifetime");
        let verified = verifier.verify_at(fresh.to_str()?, now + 30)?;
        assert_eq!(verified.principal, "alice");
        assert_eq!(verified.scopes, read.iter().cloned().collect());
        // Another caller, other scopes or another audience never share a token.
        for (principal, scopes, audience) in [
            ("bob", read.clone(), "svc"),
            ("alice", Vec::new(), "svc"),
            ("alice", read.clone(), "other"),
        ] {
            assert_ne!(
                minter.token_at(principal, &scopes, audience, now + 30),
                fresh
            );
        }
        assert!(!format!("{minter:?}").contains(fresh.to_str()?));
        Ok(())
    }

    #[test]
    fn keys_round_trip_through_their_text_forms_and_hide_secrets() {
        let signing = key("dev-1");
        let parsed = SigningKey::parse(&signing.to_secret_string());
        assert_eq!(parsed.map(|k| k.public_key()), Ok(signing.public_key()));
        let listed = Verifier::parse_keys(&format!(
            " {} , {} ",
            signing.public_key(),
            key("dev-2").public_key()
        ));
        assert_eq!(listed.map(|keys| keys.len()), Ok(2));
        assert!(
            !format!("{signing:?}").contains(
                signing
                    .to_secret_string()
                    .expose_secret()
                    .split(':')
                    .nth(1)
                    .unwrap_or("x")
            )
        );
        assert!(Verifier::parse_keys("nokid").is_err());
        assert!(SigningKey::parse(&SecretString::from("bad kid!:AAAA".to_owned())).is_err());
    }
}
