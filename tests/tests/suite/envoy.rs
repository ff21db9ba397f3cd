//! Envoy's rate limit API (`envoy.service.ratelimit.v3.RateLimitService`) configured by
//! envoyproxy/ratelimit's YAML: per-descriptor statuses in request order, nested and
//! key-only descriptors, unlimited, shadow_mode, replaces, hits_addend peeks, refused
//! requests spending nothing more; configurations shaped like envoyproxy/ratelimit's
//! documented examples load unchanged; Redis shares one limit between replicas; a bad
//! file stops the binary with one line.
//!
//! No call carries an identity token: Envoy sends none, and the service is built with
//! identity required (as in production), so every answer here proves it is not asked.

use std::path::Path;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use service_kit::validation::violated_fields;
use tests::services::RunningService;
use tonic::transport::Channel;

/// A domain shaped like envoyproxy/ratelimit's example configuration (nested lists,
/// key-only defaults, values beating them, a zero limit, shadow mode, unlimited, names
/// and replaces), plus our `algorithm` extension. `{domain}` is replaced per test.
/// Fixed windows that a test spends several times are days, so that a window turning
/// during a test is as unlikely as it can be (the algorithms' own tests drive a clock).
const RL_DOMAIN: &str = r#"
# The comments, the leading document marker and the key order are as people write them.
---
domain: "{domain}"
descriptors:
  - key: category
    value: account
    rate_limit:
      replaces:
        - name: per_user
      unit: minute
      requests_per_unit: 4
  - key: source_cluster
    value: proxy
    descriptors:
      - key: destination_cluster
        value: mock
        rate_limit:
          unit: day
          requests_per_unit: 1
  - key: user
    rate_limit:
      unit: day
      requests_per_unit: 2
    descriptors:
      - key: action
        rate_limit:
          unit: day
          requests_per_unit: 3
      - key: action
        value: login
        rate_limit:
          name: per_user
          unit: day
          requests_per_unit: 1
      - key: action
        value: banned
        rate_limit:
          unit: minute
          requests_per_unit: 0
      - key: action
        value: shady
        shadow_mode: true
        rate_limit:
          unit: day
          requests_per_unit: 2
      - key: action
        value: free
        rate_limit:
          unlimited: true
      - key: action
        value: smooth
        rate_limit:
          unit: hour
          requests_per_unit: 2
          algorithm: gcra
      - key: action
        value: exact
        rate_limit:
          unit: hour
          requests_per_unit: 2
          algorithm: sliding
"#;

fn entry(key: &str, value: &str) -> Entry {
    Entry {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| entry(k, v)).collect(),
        ..RateLimitDescriptor::default()
    }
}

/// A descriptor with its own `hits_addend`.
fn with_hits(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor {
        hits_addend: Some(UInt64Value { value: hits }),
        ..descriptor(entries)
    }
}

struct Envoy {
    service: RunningService,
    client: RateLimitServiceClient<Channel>,
}

impl Envoy {
    /// ratelimit-svc reading `config` (a file or a directory), on `redis_url` when given.
    async fn start(config: &Path, redis_url: Option<String>) -> anyhow::Result<Self> {
        let config = config.to_path_buf();
        let service = tests::services::ratelimit_with(move |settings| {
            settings.ratelimit_config = Some(config);
            settings.redis_url = redis_url;
        })
        .await?;
        let channel = Channel::from_shared(service.endpoint())?.connect().await?;
        Ok(Self {
            service,
            client: RateLimitServiceClient::new(channel),
        })
    }

    async fn ask(
        &mut self,
        domain: &str,
        descriptors: Vec<RateLimitDescriptor>,
        hits_addend: u32,
    ) -> anyhow::Result<RateLimitResponse> {
        Ok(self
            .client
            .should_rate_limit(RateLimitRequest {
                domain: domain.to_owned(),
                descriptors,
                hits_addend,
            })
            .await?
            .into_inner())
    }

    /// The status of one descriptor asked alone (one hit).
    async fn one(
        &mut self,
        domain: &str,
        entries: &[(&str, &str)],
    ) -> anyhow::Result<DescriptorStatus> {
        let response = self.ask(domain, vec![descriptor(entries)], 0).await?;
        assert_eq!(response.statuses.len(), 1);
        Ok(response.statuses.into_iter().next().unwrap_or_default())
    }
}

fn code(status: &DescriptorStatus) -> Option<Code> {
    Code::try_from(status.code).ok()
}

/// (code, (requests_per_unit, unit) of the limit, remaining) — what a caller reads.
type Summary = (Option<Code>, Option<(u32, Option<Unit>)>, u32);

fn summary(status: &DescriptorStatus) -> Summary {
    (
        code(status),
        status
            .current_limit
            .as_ref()
            .map(|limit| (limit.requests_per_unit, Unit::try_from(limit.unit).ok())),
        status.limit_remaining,
    )
}

fn overall(response: &RateLimitResponse) -> Option<Code> {
    Code::try_from(response.overall_code).ok()
}

fn write_config(dir: &Path, file: &str, yaml: &str, domain: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(file), yaml.replace("{domain}", domain))?;
    Ok(())
}

#[tokio::test]
async fn each_descriptor_gets_its_rules_status_in_request_order() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, "rl")?;
    let mut envoy = Envoy::start(&dir.path().join("rl.yaml"), None).await?;
    let day = Some(Unit::Day);

    // Nested: the request walks both levels; one per minute.
    let mock = [("source_cluster", "proxy"), ("destination_cluster", "mock")];
    let first = envoy.one("rl", &mock).await?;
    assert_eq!(
        summary(&first),
        (Some(Code::Ok), Some((1, Some(Unit::Day))), 0)
    );
    let reset = first.duration_until_reset.unwrap_or_default();
    assert!(
        reset.seconds <= 86_400 && (reset.seconds > 0 || reset.nanos > 0),
        "{reset:?}"
    );
    let refused = envoy.ask("rl", vec![descriptor(&mock)], 0).await?;
    assert_eq!(overall(&refused), Some(Code::OverLimit));
    assert_eq!(
        summary(&refused.statuses[0]),
        (Some(Code::OverLimit), Some((1, Some(Unit::Day))), 0)
    );

    // Key-only entries match any value, and each value is its own counter; a value
    // entry beats the key-only one beside it.
    let statuses = envoy
        .ask(
            "rl",
            vec![
                descriptor(&[("user", "alice")]),
                descriptor(&[("user", "alice"), ("action", "read")]),
                descriptor(&[("user", "bob"), ("action", "read")]),
                descriptor(&[("user", "alice"), ("action", "login")]),
                descriptor(&[("user", "alice"), ("action", "free")]),
                descriptor(&[("nothing", "matches")]),
                descriptor(&[("user", "alice"), ("action", "read"), ("deeper", "x")]),
            ],
            0,
        )
        .await?
        .statuses;
    let got: Vec<_> = statuses.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (Some(Code::Ok), Some((2, day)), 1),
            (Some(Code::Ok), Some((3, day)), 2),
            (Some(Code::Ok), Some((3, day)), 2),
            (Some(Code::Ok), Some((1, day)), 0),
            (Some(Code::Ok), None, u32::MAX),
            (Some(Code::Ok), None, 0),
            (Some(Code::Ok), None, 0),
        ]
    );
    // A zero limit refuses without counting.
    let banned = envoy
        .one("rl", &[("user", "x"), ("action", "banned")])
        .await?;
    assert_eq!(
        summary(&banned),
        (Some(Code::OverLimit), Some((0, Some(Unit::Minute))), 0)
    );
    assert!(banned.duration_until_reset.is_some_and(|d| d.seconds <= 60));

    // An unknown domain limits nothing.
    let unknown = envoy
        .ask("nobody", vec![descriptor(&[("user", "a")])], 0)
        .await?;
    assert_eq!(overall(&unknown), Some(Code::Ok));
    assert_eq!(summary(&unknown.statuses[0]), (Some(Code::Ok), None, 0));
    envoy.service.stop().await
}

#[tokio::test]
async fn shadow_mode_replaces_and_unlimited_change_only_what_they_say() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, "rl")?;
    let mut envoy = Envoy::start(&dir.path().join("rl.yaml"), None).await?;
    let day = Some(Unit::Day);

    // Shadow mode: counted and reported, never refused.
    let shady = [("user", "carol"), ("action", "shady")];
    for remaining in [1, 0] {
        let response = envoy.ask("rl", vec![descriptor(&shady)], 0).await?;
        assert_eq!(
            summary(&response.statuses[0]),
            (Some(Code::Ok), Some((2, day)), remaining)
        );
    }
    let over = envoy.ask("rl", vec![descriptor(&shady)], 0).await?;
    assert_eq!(overall(&over), Some(Code::Ok));
    assert_eq!(
        summary(&over.statuses[0]),
        (Some(Code::Ok), Some((2, day)), 0)
    );

    // `category=account` replaces the rule named per_user: while both match, the
    // replaced one answers OK without a limit and its counter is untouched.
    let login = [("user", "dave"), ("action", "login")];
    for _ in 0..3 {
        let both = envoy
            .ask(
                "rl",
                vec![descriptor(&login), descriptor(&[("category", "account")])],
                0,
            )
            .await?;
        assert_eq!(overall(&both), Some(Code::Ok));
        assert_eq!(summary(&both.statuses[0]), (Some(Code::Ok), None, 0));
        assert_eq!(
            both.statuses[1]
                .current_limit
                .as_ref()
                .map(|l| l.requests_per_unit),
            Some(4)
        );
    }
    let alone = envoy.one("rl", &login).await?;
    assert_eq!(
        summary(&alone),
        (Some(Code::Ok), Some((1, day)), 0),
        "the replaced rule's counter was never spent"
    );
    assert_eq!(
        alone.current_limit.map(|l| l.name),
        Some("per_user".to_owned())
    );

    // Unlimited counts nothing, however often.
    for _ in 0..5 {
        let free = envoy
            .one("rl", &[("user", "erin"), ("action", "free")])
            .await?;
        assert_eq!(summary(&free), (Some(Code::Ok), None, u32::MAX));
    }
    envoy.service.stop().await
}

#[tokio::test]
async fn hits_addend_peeks_and_a_refused_request_spends_nothing_more() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, "rl")?;
    let mut envoy = Envoy::start(&dir.path().join("rl.yaml"), None).await?;
    let day = Some(Unit::Day);
    let read = [("user", "frank"), ("action", "read")];

    // An explicit per-descriptor 0 peeks, however often.
    for _ in 0..4 {
        let peek = envoy.ask("rl", vec![with_hits(&read, 0)], 0).await?;
        assert_eq!(
            summary(&peek.statuses[0]),
            (Some(Code::Ok), Some((3, day)), 3)
        );
    }
    // The request's hits_addend counts for descriptors without their own.
    let two = envoy.ask("rl", vec![descriptor(&read)], 2).await?;
    assert_eq!(
        summary(&two.statuses[0]),
        (Some(Code::Ok), Some((3, day)), 1)
    );
    // A descriptor's own hits_addend overrides the request's.
    let own = envoy.ask("rl", vec![with_hits(&read, 1)], 5).await?;
    assert_eq!(
        summary(&own.statuses[0]),
        (Some(Code::Ok), Some((3, day)), 0)
    );
    let exhausted = envoy.ask("rl", vec![with_hits(&read, 0)], 0).await?;
    assert_eq!(
        summary(&exhausted.statuses[0]),
        (Some(Code::OverLimit), Some((3, day)), 0)
    );

    // Hits beyond any limit are refused and spend nothing.
    let kate = [("user", "kate"), ("action", "read")];
    let huge = envoy.ask("rl", vec![with_hits(&kate, u64::MAX)], 0).await?;
    assert_eq!(
        summary(&huge.statuses[0]),
        (Some(Code::OverLimit), Some((3, day)), 3)
    );
    assert_eq!(
        summary(&envoy.one("rl", &kate).await?),
        (Some(Code::Ok), Some((3, day)), 2)
    );

    // Once one descriptor is over, later ones are only peeked: grace's counters are
    // untouched by a request that frank's exhausted limit refused.
    let grace = [("user", "grace"), ("action", "read")];
    let refused = envoy
        .ask(
            "rl",
            vec![
                descriptor(&read),
                descriptor(&grace),
                descriptor(&[("user", "grace")]),
            ],
            0,
        )
        .await?;
    assert_eq!(overall(&refused), Some(Code::OverLimit));
    let got: Vec<_> = refused.statuses.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (Some(Code::OverLimit), Some((3, day)), 0),
            (Some(Code::Ok), Some((3, day)), 3),
            (Some(Code::Ok), Some((2, day)), 2),
        ]
    );
    // A shadow descriptor over its limit does not stop the others.
    let shady = [("user", "grace"), ("action", "shady")];
    envoy.ask("rl", vec![with_hits(&shady, 2)], 0).await?;
    let after_shadow = envoy
        .ask("rl", vec![descriptor(&shady), descriptor(&grace)], 0)
        .await?;
    assert_eq!(overall(&after_shadow), Some(Code::Ok));
    assert_eq!(
        summary(&after_shadow.statuses[1]),
        (Some(Code::Ok), Some((3, day)), 2)
    );

    // Our algorithms, chosen per rule.
    for action in ["smooth", "exact"] {
        let entries = [("user", "heidi"), ("action", action)];
        let admitted: Vec<_> = [
            envoy.one("rl", &entries).await?,
            envoy.one("rl", &entries).await?,
            envoy.one("rl", &entries).await?,
        ]
        .iter()
        .map(code)
        .collect();
        assert_eq!(
            admitted,
            vec![Some(Code::Ok), Some(Code::Ok), Some(Code::OverLimit)],
            "{action}"
        );
    }

    // Envoy's limit override replaces the configured rule.
    let overridden = RateLimitDescriptor {
        limit: Some(RateLimitOverride {
            requests_per_unit: 1,
            unit: Unit::Day as i32,
        }),
        ..descriptor(&[("user", "ivan")])
    };
    let first = envoy.ask("rl", vec![overridden.clone()], 0).await?;
    assert_eq!(
        summary(&first.statuses[0]),
        (Some(Code::Ok), Some((1, Some(Unit::Day))), 0)
    );
    let second = envoy.ask("rl", vec![overridden], 0).await?;
    assert_eq!(overall(&second), Some(Code::OverLimit));
    envoy.service.stop().await
}

#[tokio::test]
async fn malformed_requests_name_every_bad_field() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, "rl")?;
    let mut envoy = Envoy::start(&dir.path().join("rl.yaml"), None).await?;
    let cases = [
        (
            RateLimitRequest {
                domain: String::new(),
                descriptors: vec![
                    descriptor(&[("user", "a")]),
                    descriptor(&[("user", "b")]),
                    descriptor(&[]),
                ],
                hits_addend: 0,
            },
            vec!["domain", "descriptors[2].entries"],
        ),
        (
            RateLimitRequest {
                domain: "rl".to_owned(),
                descriptors: vec![],
                hits_addend: 0,
            },
            vec!["descriptors"],
        ),
        (
            RateLimitRequest {
                domain: "rl".to_owned(),
                descriptors: vec![
                    descriptor(&[("user", "a"), ("", "b")]),
                    RateLimitDescriptor {
                        limit: Some(RateLimitOverride {
                            requests_per_unit: 1,
                            unit: Unit::Unknown as i32,
                        }),
                        ..descriptor(&[("user", "a")])
                    },
                ],
                hits_addend: 0,
            },
            vec!["descriptors[0].entries[1].key", "descriptors[1].limit.unit"],
        ),
    ];
    for (request, fields) in cases {
        let status = envoy.client.should_rate_limit(request).await.err();
        assert_eq!(
            status.as_ref().map(|s| (s.code(), violated_fields(s))),
            Some((
                tonic::Code::InvalidArgument,
                fields.iter().map(|f| (*f).to_owned()).collect()
            ))
        );
    }
    envoy.service.stop().await
}

/// Domains shaped like the examples of envoyproxy/ratelimit's README, one file each as
/// its runtime directory holds them, written in that project's format only.
const DOCUMENTED_EXAMPLES: &[(&str, &str)] = &[
    (
        "mongo_cps.yaml",
        "
domain: mongo_cps
descriptors:
  - key: database
    value: users
    rate_limit:
      unit: second
      requests_per_unit: 500

  - key: database
    value: default
    rate_limit:
      unit: second
      requests_per_unit: 500
",
    ),
    (
        "messaging.yaml",
        "
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
",
    ),
    (
        "edge_proxy_per_ip.yaml",
        "
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
",
    ),
    (
        "internal.yaml",
        "
domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true

  - key: azure
    rate_limit:
      unit: minute
      requests_per_unit: 100
",
    ),
    (
        "example7.yaml",
        "
domain: example7
descriptors:
  - key: key_1
    value: value_1
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          name: specific_limit
          requests_per_unit: 5
          unit: second
  - key: key_2
    value: value_2
    descriptors:
      - key: user
        value: bkthomps
        rate_limit:
          replaces:
            - name: specific_limit
          requests_per_unit: 10
          unit: second
",
    ),
    (
        "example8.yaml",
        "
domain: example8
descriptors:
  - key: key1
    detailed_metric: true
    rate_limit:
      unit: minute
      requests_per_unit: 10
  - key: key1
    value: value1
    rate_limit:
      unit: minute
      requests_per_unit: 20
",
    ),
    (
        "example10.yaml",
        "
domain: example10
descriptors:
  - key: route
    value_to_metric: true
    descriptors:
      - key: http_method
        value_to_metric: true
        descriptors:
          - key: subject_id
            rate_limit:
              unit: minute
              requests_per_unit: 60
",
    ),
    (
        "example11.yaml",
        "
domain: example11
descriptors:
  - key: files
    value: files/*
    share_threshold: true
    rate_limit:
      unit: day
      requests_per_unit: 10
  - key: files_no_share
    value: files_no_share/*
    share_threshold: false
    rate_limit:
      unit: day
      requests_per_unit: 10
",
    ),
    (
        "quota.yaml",
        "
domain: quota
descriptors:
  - key: service
    value: service_1
    quota_mode: true
    rate_limit:
      unit: day
      requests_per_unit: 1
    metadata:
      service_with_quota:
        name: \"service_1\"
",
    ),
];

#[tokio::test]
async fn configurations_envoyproxy_ratelimit_documents_load_unchanged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    for (file, yaml) in DOCUMENTED_EXAMPLES {
        std::fs::write(dir.path().join(file), yaml)?;
    }
    let mut envoy = Envoy::start(dir.path(), None).await?;

    let users = envoy.one("mongo_cps", &[("database", "users")]).await?;
    assert_eq!(
        summary(&users),
        (Some(Code::Ok), Some((500, Some(Unit::Second))), 499)
    );
    let marketing = envoy
        .one(
            "messaging",
            &[("message_type", "marketing"), ("to_number", "2061111111")],
        )
        .await?;
    assert_eq!(
        summary(&marketing),
        (Some(Code::Ok), Some((5, Some(Unit::Day))), 4)
    );
    let blacklisted = envoy
        .one("edge_proxy_per_ip", &[("remote_address", "50.0.0.5")])
        .await?;
    assert_eq!(code(&blacklisted), Some(Code::OverLimit));
    let other_ip = envoy
        .one("edge_proxy_per_ip", &[("remote_address", "50.0.0.1")])
        .await?;
    assert_eq!(
        summary(&other_ip),
        (Some(Code::Ok), Some((10, Some(Unit::Second))), 9)
    );
    let ldap = envoy.one("internal", &[("ldap", "anything")]).await?;
    assert_eq!(summary(&ldap), (Some(Code::Ok), None, u32::MAX));

    // Example 7: asked together, the 10/s rule replaces the 5/s one.
    let both = envoy
        .ask(
            "example7",
            vec![
                descriptor(&[("key_1", "value_1"), ("user", "bkthomps")]),
                descriptor(&[("key_2", "value_2"), ("user", "bkthomps")]),
            ],
            0,
        )
        .await?;
    let got: Vec<_> = both.statuses.iter().map(summary).collect();
    assert_eq!(
        got,
        vec![
            (Some(Code::Ok), None, 0),
            (Some(Code::Ok), Some((10, Some(Unit::Second))), 9)
        ]
    );

    let detailed = envoy.one("example8", &[("key1", "unspecified")]).await?;
    assert_eq!(
        summary(&detailed),
        (Some(Code::Ok), Some((10, Some(Unit::Minute))), 9)
    );
    let deep = envoy
        .one(
            "example10",
            &[
                ("route", "api"),
                ("http_method", "GET"),
                ("subject_id", "123"),
            ],
        )
        .await?;
    assert_eq!(
        summary(&deep),
        (Some(Code::Ok), Some((60, Some(Unit::Minute))), 59)
    );

    // Example 11 (in days): matches of a shared wildcard spend one counter; others
    // their own.
    let day = Some(Unit::Day);
    for (value, remaining) in [("files/a.pdf", 9), ("files/b.csv", 8), ("files/c.txt", 7)] {
        let shared = envoy.one("example11", &[("files", value)]).await?;
        assert_eq!(
            summary(&shared),
            (Some(Code::Ok), Some((10, day)), remaining),
            "{value}"
        );
    }
    for value in ["files_no_share/a.pdf", "files_no_share/b.csv"] {
        let own = envoy.one("example11", &[("files_no_share", value)]).await?;
        assert_eq!(
            summary(&own),
            (Some(Code::Ok), Some((10, day)), 9),
            "{value}"
        );
    }

    // Quota mode: over its limit, the descriptor says so, but the request is refused
    // only because every quota descriptor of it is over.
    let service = [("service", "service_1")];
    envoy.one("quota", &service).await?;
    let over = envoy.ask("quota", vec![descriptor(&service)], 0).await?;
    assert_eq!(overall(&over), Some(Code::OverLimit));
    assert_eq!(code(&over.statuses[0]), Some(Code::OverLimit));
    envoy.service.stop().await
}

#[tokio::test]
async fn replicas_sharing_redis_enforce_one_envoy_limit_per_value() -> anyhow::Result<()> {
    let redis = tests::redis::TestRedis::new()?;
    // The test's key prefix is in the domain, so its counters are its own.
    let domain = format!("{}rl", redis.prefix());
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, &domain)?;
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas
            .push(Envoy::start(&dir.path().join("rl.yaml"), Some(redis.url().to_owned())).await?);
    }
    let read = [("user", "judy"), ("action", "read")];
    let mut answers = Vec::new();
    for n in 0..5 {
        let replica = &mut replicas[n % 2];
        answers.push(summary(&replica.one(&domain, &read).await?));
    }
    let day = Some(Unit::Day);
    assert_eq!(
        answers,
        vec![
            (Some(Code::Ok), Some((3, day)), 2),
            (Some(Code::Ok), Some((3, day)), 1),
            (Some(Code::Ok), Some((3, day)), 0),
            (Some(Code::OverLimit), Some((3, day)), 0),
            (Some(Code::OverLimit), Some((3, day)), 0),
        ]
    );
    // Another value of the same key-only entry is another counter, on both replicas.
    let other = replicas[1]
        .one(&domain, &[("user", "judy"), ("action", "write")])
        .await?;
    assert_eq!(summary(&other), (Some(Code::Ok), Some((3, day)), 2));
    // A peek through one replica sees what the other spent.
    let peek = replicas[0]
        .ask(
            &domain,
            vec![with_hits(&[("user", "judy"), ("action", "write")], 0)],
            0,
        )
        .await?;
    assert_eq!(
        summary(&peek.statuses[0]),
        (Some(Code::Ok), Some((3, day)), 2)
    );

    // The counters are in Redis, one key per value, and expire on their own.
    let mut connection = redis.connection().await?;
    let pattern = format!("rl:{{envoy|{domain}|user=judy|action=*");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut connection)
        .await?;
    assert_eq!(keys.len(), 2, "{keys:?}");
    for key in &keys {
        let ttl: i64 = ::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut connection)
            .await?;
        assert!(ttl > 0 && ttl <= 86_400_000, "{key}: {ttl}");
    }
    for replica in replicas {
        replica.service.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_bad_rules_file_stops_the_spawned_service_with_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "domain: d\ndescriptors:\n  - key: k\n    rate_limit:\n      unit: fortnight\n      requests_per_unit: 1\n",
    )?;
    let finished = tests::process::run_to_exit(
        "ratelimit-svc",
        &[("RATELIMIT_CONFIG", file.display().to_string())],
        &[],
    )
    .await?;
    assert!(!finished.status.success());
    let lines: Vec<&str> = finished.stderr.lines().collect();
    assert_eq!(
        lines,
        vec![format!(
            "ratelimit-svc: RATELIMIT_CONFIG: {}: descriptor 'd.k': invalid rate limit unit 'fortnight' (second, minute, hour, day, week, month or year)",
            file.display()
        )],
        "{}",
        finished.stdout
    );
    Ok(())
}

/// Where the `envoy-types` crate in Cargo.lock keeps Envoy's protos (README's grpcurl
/// example imports them from there).
fn envoy_protos() -> anyhow::Result<std::path::PathBuf> {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))?;
    let version = lock
        .split("[[package]]")
        .find(|package| package.contains("name = \"envoy-types\""))
        .and_then(|package| {
            package
                .lines()
                .find_map(|line| line.strip_prefix("version = "))
        })
        .map(|version| version.trim_matches('"').to_owned())
        .ok_or_else(|| anyhow::anyhow!("envoy-types is not in Cargo.lock"))?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .ok_or_else(|| anyhow::anyhow!("neither CARGO_HOME nor HOME is set"))?;
    for registry in std::fs::read_dir(cargo_home.join("registry/src"))? {
        let protos = registry?
            .path()
            .join(format!("envoy-types-{version}/proto"));
        if protos.is_dir() {
            return Ok(protos);
        }
    }
    anyhow::bail!(
        "no envoy-types-{version}/proto under {}",
        cargo_home.display()
    )
}

#[tokio::test]
async fn grpcurl_calls_should_rate_limit_with_envoys_protos_as_the_readme_shows()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    write_config(dir.path(), "rl.yaml", RL_DOMAIN, "rl")?;
    let envoy = Envoy::start(&dir.path().join("rl.yaml"), None).await?;
    let addr = envoy.service.addr().to_string();
    let protos = envoy_protos()?;
    let import = |dir: &str| protos.join(dir).display().to_string();
    let (api, xds, validate) = (
        import("data-plane-api"),
        import("xds"),
        import("protoc-gen-validate"),
    );
    let request = r#"{"domain":"rl","descriptors":[{"entries":[{"key":"user","value":"demo"}]}]}"#;
    let called = tests::grpcurl::grpcurl(&[
        "-import-path",
        &api,
        "-import-path",
        &xds,
        "-import-path",
        &validate,
        "-proto",
        "envoy/service/ratelimit/v3/rls.proto",
        "-d",
        request,
        &addr,
        "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
    ])
    .await?;
    assert!(called.success, "{called:?}");
    let answer: serde_json::Value = serde_json::from_str(&called.stdout)?;
    assert_eq!(answer["overallCode"], "OK", "{answer}");
    assert_eq!(
        answer["statuses"][0]["currentLimit"]["requestsPerUnit"], 2,
        "{answer}"
    );
    assert_eq!(answer["statuses"][0]["limitRemaining"], 1, "{answer}");
    // Reflection does not list it (its descriptors are Envoy's, not ours).
    let listed = tests::grpcurl::grpcurl(&[&addr, "list"]).await?;
    assert!(
        listed.success && listed.stdout.contains("paysuite.ratelimit.v1"),
        "{listed:?}"
    );
    assert!(
        !listed.stdout.contains("envoy.service"),
        "{}",
        listed.stdout
    );
    envoy.service.stop().await
}

#[tokio::test]
async fn spawned_frozen_redis_answers_by_each_domains_failure_mode() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;
    let redis = tests::redis::PrivateRedis::start().await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("modes.yaml");
    let rule = "descriptors:\n  - key: user\n    rate_limit: {unit: day, requests_per_unit: 5}\n";
    std::fs::write(
        &config,
        format!(
            "domain: open\nfailure_mode: open\n{rule}---\ndomain: closed\nfailure_mode: closed\n{rule}---\ndomain: default\n{rule}"
        ),
    )?;
    let mut service = tests::process::SpawnedService::start(
        "ratelimit-svc",
        &[
            ("RATELIMIT_CONFIG", config.display().to_string()),
            ("REDIS_URL", redis.url()),
            ("REDIS_TIMEOUT", "100ms".to_owned()),
            // Domains without their own failure_mode take the service's.
            ("FAILURE_MODE", "closed".to_owned()),
        ],
    )
    .await?;
    let channel = Channel::from_shared(service.endpoint())?.connect().await?;
    let mut client = RateLimitServiceClient::new(channel);
    let mut ask = async |domain: &str| -> anyhow::Result<DescriptorStatus> {
        let response = tokio::time::timeout(
            tests::LIVENESS,
            client.should_rate_limit(RateLimitRequest {
                domain: domain.to_owned(),
                descriptors: vec![descriptor(&[("user", "a")])],
                hits_addend: 0,
            }),
        )
        .await??
        .into_inner();
        Ok(response.statuses.into_iter().next().unwrap_or_default())
    };
    for domain in ["open", "closed", "default"] {
        assert_eq!(
            summary(&ask(domain).await?),
            (Some(Code::Ok), Some((5, Some(Unit::Day))), 4)
        );
    }
    // A frozen Redis never answers: every call ends at REDIS_TIMEOUT (or the open
    // breaker), and the domain's mode decides.
    redis.freeze().await?;
    let open = ask("open").await?;
    let closed = ask("closed").await?;
    let default = ask("default").await?;
    redis.resume()?;
    assert_eq!(code(&open), Some(Code::Ok));
    assert_eq!(code(&closed), Some(Code::OverLimit));
    assert_eq!(code(&default), Some(Code::OverLimit));

    // The counters logged at shutdown prove which path answered.
    service.signal(Signal::SIGTERM)?;
    assert!(service.wait(tests::LIVENESS).await?.success());
    // The process has exited; its last lines may still be on their way through the pipe.
    let fail_open = crate::ratelimit_distributed::shutdown_counter(&service, "fail_open").await?;
    let fail_closed =
        crate::ratelimit_distributed::shutdown_counter(&service, "fail_closed").await?;
    assert_eq!((fail_open, fail_closed), (1, 2));
    Ok(())
}
