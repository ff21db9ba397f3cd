//! Typed configuration from environment variables.
//!
//! Every service reads its settings once, at start, into one typed struct. The variable
//! names are constants next to that struct and match the README table and the `k8s/`
//! ConfigMaps. Tests never mutate the process environment: they build an [`Env`] from
//! pairs, or build the config struct directly.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

/// A configuration variable was malformed or missing.
///
/// The message names the variable but never echoes its value: values may be secrets
/// (a database URL carries a password).
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub variable: String,
    /// What is wrong with it, without its value.
    pub reason: String,
}

impl ConfigError {
    /// A config error for `variable` with an explanation.
    pub fn new(variable: &str, reason: impl fmt::Display) -> Self {
        Self {
            variable: variable.to_owned(),
            reason: reason.to_string(),
        }
    }
}

/// A snapshot of environment variables to read typed settings from.
#[derive(Clone, Default)]
pub struct Env {
    vars: BTreeMap<String, String>,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets; show only which variables are present.
        f.debug_struct("Env")
            .field("variables", &self.vars.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Env {
    /// The variables of this process (non-UTF-8 ones are skipped).
    pub fn from_process() -> Self {
        Self {
            vars: std::env::vars_os()
                .filter_map(|(name, value)| {
                    Some((name.into_string().ok()?, value.into_string().ok()?))
                })
                .collect(),
        }
    }

    /// An environment made of the given pairs, for tests.
    pub fn from_pairs<I, K, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The raw value of `name`; empty values count as unset.
    pub fn raw(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(|value| value.trim())
            .filter(|value| !value.is_empty())
    }

    /// `name` parsed as `T`, or `None` when unset.
    pub fn optional<T>(&self, name: &str) -> Result<Option<T>, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.raw(name)
            .map(|value| {
                value
                    .parse::<T>()
                    .map_err(|err| ConfigError::new(name, format_args!("cannot parse: {err}")))
            })
            .transpose()
    }

    /// `name` parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        Ok(self.optional(name)?.unwrap_or(default))
    }

    /// `name` parsed as `T`; an error when unset.
    pub fn required<T>(&self, name: &str) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.optional(name)?
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }

    /// A duration such as `250ms`, `5s`, `1m 30s`, `24h`, or `default` when unset.
    pub fn duration_or(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(name) {
            None => Ok(default),
            Some(value) => humantime::parse_duration(value).map_err(|err| {
                ConfigError::new(
                    name,
                    format_args!("not a duration like 250ms, 5s or 1h: {err}"),
                )
            }),
        }
    }

    /// `true`/`false` (also `1`/`0`, `yes`/`no`), or `default` when unset.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(ConfigError::new(name, "expected true or false")),
        }
    }

    /// A secret value; it is only ever exposed explicitly.
    pub fn secret(&self, name: &str) -> Option<SecretString> {
        self.raw(name)
            .map(|value| SecretString::from(value.to_owned()))
    }

    /// A required secret value.
    pub fn required_secret(&self, name: &str) -> Result<SecretString, ConfigError> {
        self.secret(name)
            .ok_or_else(|| ConfigError::new(name, "is required but not set"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_typed_values_and_defaults() {
        let env = Env::from_pairs([
            ("PORT", "50052"),
            ("FLAG", "yes"),
            ("WAIT", "250ms"),
            ("EMPTY", " "),
        ]);
        assert_eq!(env.parse_or("PORT", 1u16).ok(), Some(50052));
        assert_eq!(env.parse_or("MISSING", 7u16).ok(), Some(7));
        assert_eq!(env.bool_or("FLAG", false).ok(), Some(true));
        assert_eq!(
            env.duration_or("WAIT", Duration::ZERO).ok(),
            Some(Duration::from_millis(250))
        );
        assert!(env.optional::<u16>("EMPTY").ok().flatten().is_none());
    }

    #[test]
    fn errors_name_the_variable_but_not_the_value() {
        let env = Env::from_pairs([("DATABASE_URL_PORT", "hunter2")]);
        let err = env
            .required::<u16>("DATABASE_URL_PORT")
            .err()
            .map(|e| e.to_string());
        let message = err.unwrap_or_default();
        assert!(message.starts_with("DATABASE_URL_PORT: "), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let missing = env.required::<u16>("NOPE").err().map(|e| e.to_string());
        assert_eq!(missing.as_deref(), Some("NOPE: is required but not set"));
    }
}
