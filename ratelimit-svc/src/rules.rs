//! The rules of Envoy's rate limit API, in envoyproxy/ratelimit's YAML format: one domain
//! per YAML document (`domain`, nested `descriptors` with `key`, optional `value`,
//! `rate_limit` {`unit`, `requests_per_unit`, `unlimited`, `name`, `replaces`},
//! `shadow_mode`, `quota_mode`, wildcards and `share_threshold`), plus our extensions
//! `rate_limit.algorithm` (`fixed` by default, `sliding`, `gcra`) and the domain's
//! `failure_mode` (`open`, `closed`; the service's `FAILURE_MODE` when absent).
//!
//! Matching is envoyproxy/ratelimit's: a request descriptor's entries walk the tree one
//! level per entry; at each level a `key`+`value` entry beats a wildcard value, which
//! beats a key-only entry (any value); a rule applies only when the walk ends exactly at
//! it. Each distinct value gets its own counter (the counter key names every entry's
//! value), except values sharing a wildcard's threshold.
//!
//! Pure: parsing and lookups do no IO; only [`Rules::load`] reads files.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::guard::FailureMode;
use crate::limiter::{Algorithm, Limit};

/// Every key envoyproxy/ratelimit accepts (anywhere in a file, as it checks them), and ours.
const KNOWN_KEYS: &[&str] = &[
    "domain",
    "key",
    "value",
    "descriptors",
    "rate_limit",
    "unit",
    "requests_per_unit",
    "unlimited",
    "shadow_mode",
    "quota_mode",
    "name",
    "replaces",
    "detailed_metric",
    "value_to_metric",
    "share_threshold",
    "metadata",
    // Ours.
    "algorithm",
    "failure_mode",
];

/// A rule's time unit; months are 30 days and years 365, as in envoyproxy/ratelimit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// One second.
    Second,
    /// One minute.
    Minute,
    /// One hour.
    Hour,
    /// One day.
    Day,
    /// Seven days.
    Week,
    /// Thirty days.
    Month,
    /// 365 days.
    Year,
}

impl Unit {
    fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "second" => Self::Second,
            "minute" => Self::Minute,
            "hour" => Self::Hour,
            "day" => Self::Day,
            "week" => Self::Week,
            "month" => Self::Month,
            "year" => Self::Year,
            _ => return None,
        })
    }

    /// Its length; fixed windows are aligned on multiples of it since the Unix epoch.
    pub fn window(self) -> Duration {
        const DAY: u64 = 24 * 3600;
        Duration::from_secs(match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => DAY,
            Self::Week => 7 * DAY,
            Self::Month => 30 * DAY,
            Self::Year => 365 * DAY,
        })
    }
}

/// What a rule allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// Anything, without counting.
    Unlimited,
    /// `requests_per_unit` per `unit` (0 refuses everything).
    PerUnit {
        /// Requests admitted per unit.
        requests_per_unit: u32,
        /// The unit.
        unit: Unit,
        /// How the limit is enforced.
        algorithm: Algorithm,
    },
}

/// One `rate_limit` block and the flags of its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Where it is, as envoyproxy/ratelimit names it (`domain.key_value.key`), for logs.
    pub path: String,
    /// Its `name` (empty when it has none); other rules may replace it by name.
    pub name: String,
    /// The names of the rules it replaces when both match one request.
    pub replaces: Vec<String>,
    /// Counted and reported, but never makes the request over the limit.
    pub shadow_mode: bool,
    /// Over the limit makes the request over the limit only when every quota-mode
    /// descriptor of the request is over.
    pub quota_mode: bool,
    /// What it allows.
    pub quota: Quota,
}

impl Rule {
    /// The limit the store enforces: none for unlimited rules and for rules that admit
    /// nothing (0 requests per unit needs no counting).
    pub fn limit(&self) -> Option<Limit> {
        match self.quota {
            Quota::PerUnit {
                requests_per_unit,
                unit,
                algorithm,
            } if requests_per_unit > 0 => Some(Limit {
                limit: u64::from(requests_per_unit),
                window: unit.window(),
                algorithm,
            }),
            _ => None,
        }
    }
}

/// A rule matched by a request descriptor, and the counter it is counted in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched<'a> {
    /// The rule.
    pub rule: &'a Rule,
    /// The counter: the domain and every entry's key and value (a shared wildcard's
    /// pattern instead of the value), unambiguously joined.
    pub counter_key: String,
}

/// All domains.
#[derive(Debug, Default)]
pub struct Rules {
    domains: HashMap<String, Domain>,
}

/// One domain's rules.
#[derive(Debug)]
pub struct Domain {
    /// Its name.
    pub name: String,
    /// What its requests get when the store cannot decide; `None`: the service's default.
    pub failure_mode: Option<FailureMode>,
    descriptors: Level,
}

/// The descriptors of one level, by key.
#[derive(Debug, Default)]
struct Level(HashMap<String, Keyed>);

/// The descriptors of one level sharing a key.
#[derive(Debug, Default)]
struct Keyed {
    by_value: HashMap<String, Node>,
    /// In file order: the first match wins.
    wildcards: Vec<(Wildcard, Node)>,
    any_value: Option<Node>,
}

#[derive(Debug)]
struct Node {
    rule: Option<Rule>,
    /// Set for a wildcard whose matches share one counter: its pattern.
    shared_pattern: Option<String>,
    children: Level,
}

/// A value with `*`s, each matching any run of characters (also none).
#[derive(Debug)]
struct Wildcard {
    pattern: String,
    parts: Vec<String>,
}

impl Wildcard {
    fn new(pattern: &str) -> Self {
        Self {
            pattern: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    fn matches(&self, value: &str) -> bool {
        let (Some(first), Some(last)) = (self.parts.first(), self.parts.last()) else {
            return false;
        };
        let Some(rest) = value.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some(mut middle) = rest.strip_suffix(last.as_str()) else {
            return false;
        };
        // The prefix and suffix must not overlap.
        if first.len() + last.len() > value.len() {
            return false;
        }
        for part in &self.parts[1..self.parts.len() - 1] {
            match middle.find(part.as_str()) {
                Some(at) => middle = &middle[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// A configuration file that cannot be used: the file and the problem, on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {problem}")]
pub struct RulesError {
    /// The file.
    pub file: String,
    /// What is wrong with it.
    pub problem: String,
}

impl Rules {
    /// Reads `path`: a YAML file, or a directory whose `*.yaml`/`*.yml` files are read
    /// in name order. Every file holds one or more domains (one per YAML document); a
    /// domain may be defined once.
    pub fn load(path: &Path, sliding_window_max_limit: u64) -> Result<Self, RulesError> {
        let unreadable = |file: &Path, err: std::io::Error| RulesError {
            file: file.display().to_string(),
            problem: format!("cannot read: {err}"),
        };
        let files = if path.is_dir() {
            let mut files = Vec::new();
            for entry in std::fs::read_dir(path).map_err(|err| unreadable(path, err))? {
                let file = entry.map_err(|err| unreadable(path, err))?.path();
                let hidden = file
                    .file_name()
                    .and_then(|name| name.to_str())
                    .is_none_or(|name| name.starts_with('.'));
                let yaml = file
                    .extension()
                    .is_some_and(|extension| extension == "yaml" || extension == "yml");
                // Kubernetes mounts ConfigMaps with hidden `..data` links beside the files.
                if yaml && !hidden && file.is_file() {
                    files.push(file);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(RulesError {
                    file: path.display().to_string(),
                    problem: "the directory holds no *.yaml file".to_owned(),
                });
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut rules = Self::default();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|err| unreadable(&file, err))?;
            rules.add_file(&file.display().to_string(), &text, sliding_window_max_limit)?;
        }
        Ok(rules)
    }

    /// Parses `text`, the content of the file named `file`, and adds its domains.
    pub fn add_file(
        &mut self,
        file: &str,
        text: &str,
        sliding_window_max_limit: u64,
    ) -> Result<(), RulesError> {
        let fail = |problem: String| RulesError {
            file: file.to_owned(),
            problem,
        };
        let mut found = 0;
        for document in yaml_serde::Deserializer::from_str(text) {
            let value = yaml_serde::Value::deserialize(document)
                .map_err(|err| fail(format!("error loading config file: {err}")))?;
            if value.is_null() {
                continue;
            }
            check_keys(&value).map_err(fail)?;
            let root: YamlRoot = yaml_serde::from_value(value)
                .map_err(|err| fail(format!("error loading config file: {err}")))?;
            let domain = build_domain(root, sliding_window_max_limit).map_err(fail)?;
            if self.domains.contains_key(&domain.name) {
                return Err(fail(format!("duplicate domain '{}'", domain.name)));
            }
            self.domains.insert(domain.name.clone(), domain);
            found += 1;
        }
        if found == 0 {
            return Err(fail("config file cannot have empty domain".to_owned()));
        }
        Ok(())
    }

    /// The domain named `name`, if configured.
    pub fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.get(name)
    }

    /// How many domains there are.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether there is no domain.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }
}

impl Domain {
    /// The rule a descriptor's `(key, value)` entries match, if any.
    pub fn find<'a>(&'a self, entries: &[(&str, &str)]) -> Option<Matched<'a>> {
        let mut level = &self.descriptors;
        let mut counter_key = String::from("envoy");
        push_part(&mut counter_key, '|', &self.name);
        for (index, (key, value)) in entries.iter().enumerate() {
            let keyed = level.0.get(*key)?;
            let node = keyed
                .by_value
                .get(*value)
                .or_else(|| {
                    keyed
                        .wildcards
                        .iter()
                        .find(|(wildcard, _)| wildcard.matches(value))
                        .map(|(_, node)| node)
                })
                .or(keyed.any_value.as_ref())?;
            push_part(&mut counter_key, '|', key);
            push_part(
                &mut counter_key,
                '=',
                node.shared_pattern.as_deref().unwrap_or(value),
            );
            if index + 1 == entries.len() {
                return node.rule.as_ref().map(|rule| Matched { rule, counter_key });
            }
            if node.children.0.is_empty() {
                return None;
            }
            level = &node.children;
        }
        None
    }

    /// The counter of a descriptor that carries its own limit (Envoy's limit override).
    pub fn override_counter_key(&self, entries: &[(&str, &str)]) -> String {
        let mut counter_key = String::from("envoy-override");
        push_part(&mut counter_key, '|', &self.name);
        for (key, value) in entries {
            push_part(&mut counter_key, '|', key);
            push_part(&mut counter_key, '=', value);
        }
        counter_key
    }
}

/// Appends `separator` and `part`, escaping the separators so keys never collide.
fn push_part(key: &mut String, separator: char, part: &str) {
    key.push(separator);
    for c in part.chars() {
        if matches!(c, '\\' | '|' | '=') {
            key.push('\\');
        }
        key.push(c);
    }
}

// The file's shape. Fields envoyproxy/ratelimit uses only for metrics (detailed_metric,
// value_to_metric, metadata) are accepted by `check_keys` and ignored here.

#[derive(Debug, Deserialize)]
struct YamlRoot {
    domain: Option<Text>,
    #[serde(default)]
    descriptors: Option<Vec<YamlDescriptor>>,
    failure_mode: Option<String>,
}

#[derive(Debug, Deserialize)]
struct YamlDescriptor {
    key: Option<Text>,
    value: Option<Text>,
    rate_limit: Option<YamlRateLimit>,
    descriptors: Option<Vec<YamlDescriptor>>,
    #[serde(default)]
    shadow_mode: Option<bool>,
    #[serde(default)]
    quota_mode: Option<bool>,
    #[serde(default)]
    share_threshold: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct YamlRateLimit {
    requests_per_unit: Option<u32>,
    unit: Option<Text>,
    #[serde(default)]
    unlimited: Option<bool>,
    name: Option<Text>,
    replaces: Option<Vec<YamlReplaces>>,
    algorithm: Option<String>,
}

#[derive(Debug, Deserialize)]
struct YamlReplaces {
    name: Option<Text>,
}

/// A scalar read as text, as envoyproxy/ratelimit reads keys and values (`value: 500`).
#[derive(Debug, Default)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text(v.to_string()))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Text, E> {
                Ok(Text(String::new()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn text(value: Option<Text>) -> String {
    value.map(|Text(text)| text).unwrap_or_default()
}

/// Refuses keys envoyproxy/ratelimit would refuse (a misspelt key silently changes a
/// limit otherwise), and lists of anything but maps.
fn check_keys(value: &yaml_serde::Value) -> Result<(), String> {
    use yaml_serde::Value;
    match value {
        Value::Mapping(mapping) => {
            for (key, value) in mapping {
                let Some(key) = key.as_str() else {
                    return Err(format!(
                        "config error, key is not of type string: {}",
                        yaml_serde::to_string(key).unwrap_or_default().trim_end()
                    ));
                };
                if !KNOWN_KEYS.contains(&key) {
                    return Err(format!("config error, unknown key '{key}'"));
                }
                // Metadata is free-form.
                if key != "metadata" {
                    check_keys(value)?;
                }
            }
            Ok(())
        }
        Value::Sequence(items) => {
            for item in items {
                if !item.is_mapping() {
                    return Err(
                        "config error, yaml file contains list of type other than map".to_owned(),
                    );
                }
                check_keys(item)?;
            }
            Ok(())
        }
        Value::Tagged(tagged) => check_keys(&tagged.value),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => Ok(()),
    }
}

fn build_domain(root: YamlRoot, sliding_window_max_limit: u64) -> Result<Domain, String> {
    let name = text(root.domain);
    if name.is_empty() {
        return Err("config file cannot have empty domain".to_owned());
    }
    let failure_mode = root
        .failure_mode
        .map(|mode| {
            mode.parse::<FailureMode>()
                .map_err(|err| format!("domain '{name}': failure_mode {err}"))
        })
        .transpose()?;
    let descriptors = build_level(
        &name,
        root.descriptors.unwrap_or_default(),
        sliding_window_max_limit,
    )?;
    Ok(Domain {
        name,
        failure_mode,
        descriptors,
    })
}

fn build_level(
    parent: &str,
    descriptors: Vec<YamlDescriptor>,
    sliding_window_max_limit: u64,
) -> Result<Level, String> {
    let mut level = Level::default();
    for descriptor in descriptors {
        let key = text(descriptor.key);
        if key.is_empty() {
            return Err(format!("descriptor under '{parent}' has empty key"));
        }
        let value = text(descriptor.value);
        let path = if value.is_empty() {
            format!("{parent}.{key}")
        } else {
            format!("{parent}.{key}_{value}")
        };
        let wildcard = value.contains('*');
        let shared = descriptor.share_threshold.unwrap_or(false);
        if shared && !wildcard {
            return Err(format!(
                "descriptor '{path}': share_threshold can only be used with wildcard values (containing '*')"
            ));
        }
        let rule = descriptor
            .rate_limit
            .map(|rate_limit| {
                build_rule(
                    &path,
                    rate_limit,
                    descriptor.shadow_mode.unwrap_or(false),
                    descriptor.quota_mode.unwrap_or(false),
                    sliding_window_max_limit,
                )
            })
            .transpose()?;
        let node = Node {
            rule,
            shared_pattern: shared.then(|| value.clone()),
            children: build_level(
                &path,
                descriptor.descriptors.unwrap_or_default(),
                sliding_window_max_limit,
            )?,
        };
        let keyed = level.0.entry(key).or_default();
        let duplicate = if value.is_empty() {
            keyed.any_value.replace(node).is_some()
        } else if wildcard {
            let duplicate = keyed
                .wildcards
                .iter()
                .any(|(existing, _)| existing.pattern == value);
            keyed.wildcards.push((Wildcard::new(&value), node));
            duplicate
        } else {
            keyed.by_value.insert(value, node).is_some()
        };
        if duplicate {
            return Err(format!("duplicate descriptor composite key '{path}'"));
        }
    }
    Ok(level)
}

fn build_rule(
    path: &str,
    rate_limit: YamlRateLimit,
    shadow_mode: bool,
    quota_mode: bool,
    sliding_window_max_limit: u64,
) -> Result<Rule, String> {
    let fail = |problem: String| format!("descriptor '{path}': {problem}");
    let unit_text = text(rate_limit.unit);
    let unit = Unit::parse(&unit_text);
    let quota = if rate_limit.unlimited.unwrap_or(false) {
        if unit.is_some() {
            return Err(fail(
                "should not specify rate limit unit when unlimited".to_owned(),
            ));
        }
        Quota::Unlimited
    } else {
        let Some(unit) = unit else {
            return Err(fail(format!(
                "invalid rate limit unit '{unit_text}' (second, minute, hour, day, week, month or year)"
            )));
        };
        let Some(requests_per_unit) = rate_limit.requests_per_unit else {
            return Err(fail("rate_limit needs requests_per_unit".to_owned()));
        };
        let algorithm = match rate_limit.algorithm.as_deref() {
            None | Some("fixed") => Algorithm::FixedWindow,
            Some("sliding") => Algorithm::SlidingWindow,
            Some("gcra") => Algorithm::Gcra,
            Some(other) => {
                return Err(fail(format!(
                    "unknown algorithm '{other}' (fixed, sliding or gcra)"
                )));
            }
        };
        if algorithm == Algorithm::SlidingWindow
            && u64::from(requests_per_unit) > sliding_window_max_limit
        {
            return Err(fail(format!(
                "the sliding window takes at most SLIDING_WINDOW_MAX_LIMIT={sliding_window_max_limit} requests_per_unit, not {requests_per_unit} (use gcra or fixed)"
            )));
        }
        Quota::PerUnit {
            requests_per_unit,
            unit,
            algorithm,
        }
    };
    let name = text(rate_limit.name);
    let mut replaces = Vec::new();
    for replaced in rate_limit.replaces.unwrap_or_default() {
        let replaced = text(replaced.name);
        if replaced.is_empty() {
            return Err(fail("should not have an empty replaces entry".to_owned()));
        }
        if replaced == name {
            return Err(fail(
                "replaces should not contain name of same descriptor".to_owned(),
            ));
        }
        replaces.push(replaced);
    }
    Ok(Rule {
        path: path.to_owned(),
        name,
        replaces,
        shadow_mode,
        quota_mode,
        quota,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Rules, RulesError> {
        let mut rules = Rules::default();
        rules.add_file("test.yaml", text, 1_000)?;
        Ok(rules)
    }

    fn problem(text: &str) -> String {
        match parse(text) {
            Ok(_) => "loaded".to_owned(),
            Err(err) => err.to_string(),
        }
    }

    /// The rule's path and counter key the entries match in `domain`.
    fn found(rules: &Rules, domain: &str, entries: &[(&str, &str)]) -> Option<(String, String)> {
        let matched = rules.domain(domain)?.find(entries)?;
        Some((matched.rule.path.clone(), matched.counter_key))
    }

    fn path(rules: &Rules, domain: &str, entries: &[(&str, &str)]) -> Option<String> {
        found(rules, domain, entries).map(|(path, _)| path)
    }

    // The shape of envoyproxy/ratelimit's README examples 2 and 3 (nested lists,
    // key-only defaults, a value beating its key's default, a zero limit).
    const MESSAGING: &str = "
domain: messaging
descriptors:
  # five marketing messages a day per number
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
";

    #[test]
    fn a_value_beats_its_keys_default_and_nesting_needs_every_level() -> Result<(), RulesError> {
        let rules = parse(MESSAGING)?;
        assert_eq!(
            path(
                &rules,
                "messaging",
                &[("message_type", "marketing"), ("to_number", "2061111111")]
            ),
            Some("messaging.message_type_marketing.to_number".to_owned())
        );
        assert_eq!(
            path(&rules, "messaging", &[("to_number", "2061111111")]),
            Some("messaging.to_number".to_owned())
        );
        // Only the nested level has a rule; a request that stops above it or goes
        // below it matches nothing.
        assert_eq!(
            path(&rules, "messaging", &[("message_type", "marketing")]),
            None
        );
        assert_eq!(
            path(&rules, "messaging", &[("to_number", "1"), ("extra", "x")]),
            None
        );
        assert_eq!(
            path(
                &rules,
                "messaging",
                &[("message_type", "other"), ("to_number", "1")]
            ),
            None
        );
        let blocked = rules
            .domain("messaging")
            .and_then(|domain| domain.find(&[("remote_address", "50.0.0.5")]));
        assert_eq!(
            blocked.map(|m| (m.rule.path.as_str(), m.rule.limit())),
            Some(("messaging.remote_address_50.0.0.5", None)),
            "a zero limit refuses without counting"
        );
        let default = rules
            .domain("messaging")
            .and_then(|domain| domain.find(&[("remote_address", "50.0.0.1")]));
        assert_eq!(
            default.and_then(|m| m.rule.limit()),
            Some(Limit {
                limit: 10,
                window: Duration::from_secs(1),
                algorithm: Algorithm::FixedWindow
            })
        );
        assert!(rules.domain("unknown").is_none());
        Ok(())
    }

    #[test]
    fn every_value_gets_its_own_counter_and_keys_cannot_collide() -> Result<(), RulesError> {
        let rules = parse(MESSAGING)?;
        let key = |entries: &[(&str, &str)]| found(&rules, "messaging", entries).map(|(_, k)| k);
        assert_eq!(
            key(&[("to_number", "1")]),
            Some("envoy|messaging|to_number=1".to_owned())
        );
        assert_ne!(key(&[("to_number", "1")]), key(&[("to_number", "2")]));
        assert_ne!(
            key(&[("to_number", "a|to_number=b")]),
            key(&[("to_number", "a"), ("to_number", "b")])
        );
        assert_eq!(
            key(&[("to_number", "a|b")]),
            Some(r"envoy|messaging|to_number=a\|b".to_owned())
        );
        Ok(())
    }

    #[test]
    fn wildcards_match_in_file_order_after_exact_values_and_may_share_a_counter()
    -> Result<(), RulesError> {
        let rules = parse(
            "
domain: files
descriptors:
  - key: path
    value: /api/*/action
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: path
    value: /api/*
    rate_limit: {unit: minute, requests_per_unit: 30}
  - key: path
    value: /api/v1/action
    rate_limit: {unit: minute, requests_per_unit: 40}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
  - key: route
    value: /r/*/x/*/y
    rate_limit: {unit: minute, requests_per_unit: 1}
",
        )?;
        let at = |entries: &[(&str, &str)]| path(&rules, "files", entries);
        assert_eq!(
            at(&[("path", "/api/v1/action")]),
            Some("files.path_/api/v1/action".to_owned())
        );
        assert_eq!(
            at(&[("path", "/api/v2/action")]),
            Some("files.path_/api/*/action".to_owned())
        );
        assert_eq!(
            at(&[("path", "/api/v2/other")]),
            Some("files.path_/api/*".to_owned())
        );
        assert_eq!(at(&[("path", "/other")]), None);
        assert_eq!(
            at(&[("route", "/r/1/x/2/y")]),
            Some("files.route_/r/*/x/*/y".to_owned())
        );
        assert_eq!(at(&[("route", "/r/1/x/y")]), None);
        let shared = |value| found(&rules, "files", &[("files", value)]).map(|(_, k)| k);
        assert_eq!(
            shared("files/a.pdf"),
            Some("envoy|files|files=files/*".to_owned())
        );
        assert_eq!(shared("files/a.pdf"), shared("files/b.csv"));
        // Without share_threshold each value is its own counter.
        let own = |value| found(&rules, "files", &[("path", value)]).map(|(_, k)| k);
        assert_ne!(own("/api/1/action"), own("/api/2/action"));
        Ok(())
    }

    #[test]
    fn wildcard_parts_must_fit_in_order_without_overlapping() {
        let cases = [
            ("a*", "a", true),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "ac", true),
            ("a*c", "abbc", true),
            ("ab*bc", "abc", false),
            ("a*b*c", "acb", false),
            ("a*b*c", "axbyc", true),
            ("*", "", true),
            ("a*c", "ab", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                Wildcard::new(pattern).matches(value),
                expected,
                "{pattern} {value}"
            );
        }
    }

    #[test]
    fn flags_names_replaces_algorithms_and_failure_mode_are_read() -> Result<(), RulesError> {
        let rules = parse(
            "
domain: flags
failure_mode: closed
descriptors:
  - key: user
    value: a
    shadow_mode: true
    quota_mode: true
    detailed_metric: true
    value_to_metric: true
    metadata: {anything: [1, {goes: here}], unknown_key: ok}
    rate_limit:
      name: specific
      replaces: [{name: general}]
      unit: HOUR
      requests_per_unit: 7
      algorithm: gcra
  - key: ldap
    rate_limit:
      unlimited: true
  - key: number
    value: 500
    rate_limit: {unit: second, requests_per_unit: 3, algorithm: sliding}
",
        )?;
        let domain = rules.domain("flags");
        assert_eq!(
            domain.and_then(|d| d.failure_mode),
            Some(FailureMode::Closed)
        );
        let rule = domain
            .and_then(|d| d.find(&[("user", "a")]))
            .map(|m| m.rule.clone());
        assert_eq!(
            rule,
            Some(Rule {
                path: "flags.user_a".to_owned(),
                name: "specific".to_owned(),
                replaces: vec!["general".to_owned()],
                shadow_mode: true,
                quota_mode: true,
                quota: Quota::PerUnit {
                    requests_per_unit: 7,
                    unit: Unit::Hour,
                    algorithm: Algorithm::Gcra
                },
            })
        );
        let unlimited = domain.and_then(|d| d.find(&[("ldap", "x")]));
        assert_eq!(
            unlimited.as_ref().map(|m| m.rule.quota),
            Some(Quota::Unlimited)
        );
        assert_eq!(unlimited.and_then(|m| m.rule.limit()), None);
        let numeric = domain.and_then(|d| d.find(&[("number", "500")]));
        assert_eq!(
            numeric.and_then(|m| m.rule.limit()).map(|l| l.algorithm),
            Some(Algorithm::SlidingWindow)
        );
        Ok(())
    }

    #[test]
    fn documents_are_domains_and_a_domain_is_defined_once() {
        let mut rules = Rules::default();
        let two = "---\ndomain: one\n---\ndomain: two\ndescriptors: []\n";
        assert_eq!(rules.add_file("a.yaml", two, 1_000), Ok(()));
        assert_eq!(rules.len(), 2);
        assert_eq!(
            rules
                .add_file("b.yaml", "domain: two\n", 1_000)
                .map_err(|e| e.to_string()),
            Err("b.yaml: duplicate domain 'two'".to_owned())
        );
    }

    #[test]
    fn configuration_errors_name_the_file_and_the_problem_on_one_line() {
        let cases = [
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
                "test.yaml: descriptor 'd.k': invalid rate limit unit 'fortnight' (second, minute, hour, day, week, month or year)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {requests_per_unit: 1}\n",
                "test.yaml: descriptor 'd.k': invalid rate limit unit '' (second, minute, hour, day, week, month or year)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second}\n",
                "test.yaml: descriptor 'd.k': rate_limit needs requests_per_unit",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    value: v\n  - key: k\n    value: v\n",
                "test.yaml: duplicate descriptor composite key 'd.k_v'",
            ),
            (
                "domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: k\n      - key: k\n",
                "test.yaml: duplicate descriptor composite key 'd.a.k'",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1, algorithm: leaky}\n",
                "test.yaml: descriptor 'd.k': unknown algorithm 'leaky' (fixed, sliding or gcra)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1001, algorithm: sliding}\n",
                "test.yaml: descriptor 'd.k': the sliding window takes at most SLIDING_WINDOW_MAX_LIMIT=1000 requests_per_unit, not 1001 (use gcra or fixed)",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: second}\n",
                "test.yaml: descriptor 'd.k': should not specify rate limit unit when unlimited",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {name: x, replaces: [{name: x}], unit: second, requests_per_unit: 1}\n",
                "test.yaml: descriptor 'd.k': replaces should not contain name of same descriptor",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limit: {replaces: [{}], unit: second, requests_per_unit: 1}\n",
                "test.yaml: descriptor 'd.k': should not have an empty replaces entry",
            ),
            (
                "domain: d\ndescriptors:\n  - key: k\n    value: v\n    share_threshold: true\n",
                "test.yaml: descriptor 'd.k_v': share_threshold can only be used with wildcard values (containing '*')",
            ),
            (
                "domain: d\ndescriptors:\n  - value: v\n",
                "test.yaml: descriptor under 'd' has empty key",
            ),
            (
                "descriptors: []\n",
                "test.yaml: config file cannot have empty domain",
            ),
            ("", "test.yaml: config file cannot have empty domain"),
            (
                "domain: d\ndescriptors:\n  - key: k\n    rate_limt: {unit: second}\n",
                "test.yaml: config error, unknown key 'rate_limt'",
            ),
            (
                "domain: d\ndescriptors:\n  - k\n",
                "test.yaml: config error, yaml file contains list of type other than map",
            ),
            (
                "domain: d\nfailure_mode: maybe\n",
                "test.yaml: domain 'd': failure_mode must be `open` or `closed`",
            ),
        ];
        for (text, expected) in cases {
            let problem = problem(text);
            assert_eq!(problem, expected, "{text}");
            assert!(!problem.contains('\n'));
        }
        let syntax = problem("domain: [d\n");
        assert!(
            syntax.starts_with("test.yaml: error loading config file: ") && !syntax.contains('\n'),
            "{syntax}"
        );
    }

    #[test]
    fn a_directory_loads_its_yaml_files_and_nothing_else() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.yaml"), "domain: a\n")?;
        std::fs::write(dir.path().join("b.yml"), "domain: b\n")?;
        std::fs::write(dir.path().join("notes.txt"), "not: yaml: at all")?;
        std::fs::write(dir.path().join(".hidden.yaml"), "domain: [broken")?;
        let rules = Rules::load(dir.path(), 1_000)?;
        assert!(rules.domain("a").is_some() && rules.domain("b").is_some());
        assert_eq!(rules.len(), 2);
        let file = dir.path().join("a.yaml");
        assert!(Rules::load(&file, 1_000)?.domain("a").is_some());
        let missing = dir.path().join("missing.yaml");
        let err = Rules::load(&missing, 1_000).err().map(|e| e.file);
        assert_eq!(err, Some(missing.display().to_string()));
        let empty = tempfile::tempdir()?;
        assert!(Rules::load(empty.path(), 1_000).is_err());
        Ok(())
    }
}
