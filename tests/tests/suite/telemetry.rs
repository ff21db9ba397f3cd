//! Telemetry end to end: the services as real processes exporting over OTLP to the
//! test's own collector ([`tests::otlp::Collector`]).

use std::collections::BTreeMap;

use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use tests::gateway::with_key;
use tests::otlp::{CollectedSpan, Collector, KIND_CLIENT, KIND_SERVER, TracedStack};
use tests::payments::{cards, payment_request};
use tests::postgres::TestDatabase;
use tonic::transport::Channel;

const CREATE_PAYMENT: &str = "/paysuite.payments.v1.PaymentService/CreatePayment";
const AUTHORIZE: &str = "/paysuite.acquirer.v1.AcquirerService/Authorize";

/// A merchant account of the stack's tenant.
async fn merchant(
    client: &mut PaymentServiceClient<Channel>,
    api_key: &str,
) -> anyhow::Result<String> {
    Ok(client
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: "merchant-1".to_owned(),
                currency: "BRL".to_owned(),
                kind: pb::AccountKind::Merchant as i32,
                ..Default::default()
            },
            api_key,
        )?)
        .await?
        .into_inner()
        .account
        .unwrap_or_default()
        .id)
}

/// The spans of one trace, by span id.
struct Trace<'a> {
    spans: BTreeMap<&'a str, &'a CollectedSpan>,
}

impl<'a> Trace<'a> {
    fn of(spans: &'a [CollectedSpan], trace_id: &str) -> Self {
        Self {
            spans: spans
                .iter()
                .filter(|span| span.trace_id == trace_id)
                .map(|span| (span.span_id.as_str(), span))
                .collect(),
        }
    }

    fn find(&self, service: &str, name: &str, kind: i32) -> Option<&'a CollectedSpan> {
        self.spans
            .values()
            .find(|span| span.service == service && span.name == name && span.kind == kind)
            .copied()
    }

    /// Whether `span` is `ancestor` or below it, following parent links in this trace.
    fn descends(&self, span: &CollectedSpan, ancestor: &CollectedSpan) -> bool {
        let mut current = Some(span);
        while let Some(span) = current {
            if span.span_id == ancestor.span_id {
                return true;
            }
            current = self.spans.get(span.parent_span_id.as_str()).copied();
        }
        false
    }
}

#[tokio::test]
async fn spawned_create_payment_is_one_trace_from_the_caller_through_the_gateway_to_the_acquirer()
-> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let database = TestDatabase::create().await?;
    let stack = TracedStack::start(&collector, &database, &[]).await?;
    let mut client = PaymentServiceClient::new(stack.channel().await?);
    let merchant = merchant(&mut client, &stack.api_key).await?;

    // The caller's own trace: the gateway continues it.
    let caller_trace = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let mut request = with_key(
        payment_request("traced-1", &merchant, 1_000, cards::CARD_APPROVED),
        &stack.api_key,
    )?;
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01").parse()?,
    );
    let payment = client
        .create_payment(request)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(payment.status, pb::PaymentStatus::Succeeded as i32);

    // Every hop has exported its spans (each process batches on its own; a server span
    // ends after everything under it).
    let expected = [
        ("gateway-svc", CREATE_PAYMENT),
        ("payment-svc", CREATE_PAYMENT),
        ("payment-svc", "attempt.record"),
        ("payment-svc", "acquirer.authorize"),
        ("sandbox-acquirer", AUTHORIZE),
    ];
    collector
        .wait_for("every hop's span in the caller's trace", |spans, _| {
            expected.iter().all(|(service, name)| {
                spans.iter().any(|span| {
                    span.trace_id == caller_trace && span.service == *service && span.name == *name
                })
            })
        })
        .await?;
    let spans = collector.spans();
    let trace = Trace::of(&spans, &caller_trace);
    let names = || {
        trace
            .spans
            .values()
            .map(|s| format!("{}:{}", s.service, s.name))
            .collect::<Vec<_>>()
    };

    let gateway = trace
        .find("gateway-svc", CREATE_PAYMENT, KIND_SERVER)
        .ok_or_else(|| anyhow::anyhow!("no gateway span in {:?}", names()))?;
    assert_eq!(gateway.parent_span_id, caller_span, "continues the caller");
    assert_eq!(
        gateway.attributes.get("rpc.principal").map(String::as_str),
        Some("acme")
    );
    assert_eq!(
        gateway
            .attributes
            .get("rpc.grpc.status_code")
            .map(String::as_str),
        Some("0")
    );

    let service = trace
        .find("payment-svc", CREATE_PAYMENT, KIND_SERVER)
        .ok_or_else(|| anyhow::anyhow!("no payment-svc span in {:?}", names()))?;
    assert_eq!(service.parent_span_id, gateway.span_id);
    assert_eq!(
        service.attributes.get("rpc.principal").map(String::as_str),
        Some("acme")
    );

    // The SQL of the payment: its transactions and statement groups, under the call.
    let sql: Vec<&CollectedSpan> = trace
        .spans
        .values()
        .copied()
        .filter(|span| {
            span.attributes.get("db.system.name").map(String::as_str) == Some("postgresql")
        })
        .collect();
    for group in [
        "idempotency.claim",
        "payment.create",
        "attempt.load",
        "attempt.record",
    ] {
        let span = sql
            .iter()
            .find(|span| span.name == group)
            .ok_or_else(|| anyhow::anyhow!("no SQL span {group} in {:?}", names()))?;
        assert_eq!(span.service, "payment-svc");
        assert_eq!(span.kind, KIND_CLIENT);
        assert!(trace.descends(span, service), "{group} is under the call");
    }

    // The acquirer call, with its attempt id, and the acquirer's own span under it.
    let call = trace
        .find("payment-svc", "acquirer.authorize", KIND_CLIENT)
        .ok_or_else(|| anyhow::anyhow!("no acquirer call span in {:?}", names()))?;
    assert!(trace.descends(call, service));
    let attempt_id = call
        .attributes
        .get("acquirer.attempt_id")
        .cloned()
        .unwrap_or_default();
    let operations = tests::acquirer::counters(&stack.acquirer.endpoint()).await?;
    assert!(
        operations.contains_key(&attempt_id),
        "the span names the attempt the acquirer received: {attempt_id:?} not in {:?}",
        operations.keys().collect::<Vec<_>>()
    );
    let acquirer = trace
        .find("sandbox-acquirer", AUTHORIZE, KIND_SERVER)
        .ok_or_else(|| anyhow::anyhow!("no acquirer span in {:?}", names()))?;
    assert_eq!(acquirer.parent_span_id, call.span_id);
    Ok(())
}

#[tokio::test]
async fn spawned_sigterm_flushes_the_last_request_s_spans_and_metrics_before_exit()
-> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let database = TestDatabase::create().await?;
    // Nothing is exported on its own for an hour: whatever arrives was flushed by the
    // graceful shutdown.
    let hour = "3600000".to_owned();
    let stack = TracedStack::start(
        &collector,
        &database,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", hour.clone()),
            ("OTEL_METRIC_EXPORT_INTERVAL", hour),
        ],
    )
    .await?;
    let TracedStack {
        mut gateway,
        mut payment,
        acquirer,
        api_key,
        ..
    } = stack;
    let channel = Channel::from_shared(gateway.endpoint())?.connect().await?;
    let mut client = PaymentServiceClient::new(channel);
    let merchant = merchant(&mut client, &api_key).await?;
    client
        .create_payment(with_key(
            payment_request("last-1", &merchant, 500, cards::CARD_APPROVED),
            &api_key,
        )?)
        .await?;
    drop(client);
    assert!(
        collector.spans().is_empty() && collector.points().is_empty(),
        "nothing exported before the shutdown"
    );

    for service in [&gateway, &payment] {
        service.signal(nix::sys::signal::Signal::SIGTERM)?;
    }
    for service in [&mut gateway, &mut payment] {
        let status = service.wait(tests::LIVENESS).await?;
        assert!(status.success(), "{status:?}");
    }
    // Exited: what they flushed is here already, no waiting.
    let spans = collector.spans();
    for service in ["gateway-svc", "payment-svc"] {
        assert!(
            spans
                .iter()
                .any(|span| span.service == service && span.name == CREATE_PAYMENT),
            "{service}'s CreatePayment span was flushed"
        );
        assert!(
            collector
                .points()
                .iter()
                .any(|point| point.service == service
                    && point.metric == "rpc.server.call.duration"
                    && point.attributes.get("rpc.method").map(String::as_str)
                        == Some(CREATE_PAYMENT)),
            "{service}'s RPC metrics were flushed"
        );
    }
    assert!(
        !spans.iter().any(|span| span.service == "sandbox-acquirer"),
        "the acquirer, still running, exported nothing: the flush is the shutdown's"
    );
    drop(acquirer);
    Ok(())
}

/// Every `eyJ…` run of base64url characters with two dots: the shape of an identity
/// token (a JWS whose header is a JSON object).
fn token_shaped(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("eyJ") {
        let candidate = &rest[start..];
        let end = candidate
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
            .unwrap_or(candidate.len());
        let run = &candidate[..end];
        if run.split('.').filter(|part| !part.is_empty()).count() == 3 {
            found.push(run);
        }
        rest = &candidate[end.max(3)..];
    }
    found
}

#[test]
fn the_token_scanner_finds_tokens() {
    let token = tests::identity::token("acme", &["payments:read"], "payment-svc");
    let line = format!("{{\"authorization\":\"Bearer {token}\"}}");
    assert_eq!(token_shaped(&line), [token.as_str()]);
    assert!(token_shaped("eyJhbGciOi is not a token, nor is eyJ.a").is_empty());
}

#[tokio::test]
async fn spawned_telemetry_canary_no_card_number_key_or_token_in_logs_or_exports()
-> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let database = TestDatabase::create().await?;
    let stack =
        TracedStack::start(&collector, &database, &[("RUST_LOG", "trace".to_owned())]).await?;
    let TracedStack {
        mut gateway,
        mut payment,
        mut acquirer,
        api_key,
        ..
    } = stack;
    let mut client =
        PaymentServiceClient::new(Channel::from_shared(gateway.endpoint())?.connect().await?);
    let merchant = merchant(&mut client, &api_key).await?;
    let mut answers = Vec::new();
    for (n, card) in cards::ALL.iter().enumerate() {
        // Through the gateway: the API key, and the identity tokens it mints.
        let paid = client
            .create_payment(with_key(
                payment_request(&format!("canary-{n}"), &merchant, 1_000, card),
                &api_key,
            )?)
            .await;
        answers.push(format!("{paid:?}"));
        // A refused card field that carries the number.
        let mut expired = payment_request(&format!("expired-{n}"), &merchant, 100, card);
        if let Some(card) = expired.card.as_mut() {
            card.exp_month = 13;
        }
        answers.push(format!(
            "{:?}",
            client.create_payment(with_key(expired, &api_key)?).await
        ));
    }
    // Straight to payment-svc with a token we know, so the scan can look for it.
    let token = tests::identity::token("acme", &tests::gateway::WRITE_SCOPES, "payment-svc");
    let mut direct =
        PaymentServiceClient::new(Channel::from_shared(payment.endpoint())?.connect().await?);
    let mut request = tonic::Request::new(payment_request(
        "direct-1",
        &merchant,
        700,
        cards::CARD_APPROVED,
    ));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    answers.push(format!("{:?}", direct.create_payment(request).await));
    drop((client, direct));

    // Export and logs are complete once the processes flushed on their way out.
    for service in [&gateway, &payment, &acquirer] {
        service.signal(nix::sys::signal::Signal::SIGTERM)?;
    }
    let mut logs = String::new();
    for service in [&mut gateway, &mut payment, &mut acquirer] {
        let status = service.wait(tests::LIVENESS).await?;
        assert!(status.success(), "{status:?}");
        logs.push_str(&service.stdout().joined());
        logs.push('\n');
        logs.push_str(&service.stderr().joined());
        logs.push('\n');
    }
    let exported = collector.requests().join("\n");
    // The scans cover something: a TRACE log, with trace ids, and exported spans.
    assert!(
        logs.contains("\"level\":\"TRACE\"") && logs.contains("\"trace_id\":"),
        "expected TRACE lines with trace ids"
    );
    assert!(
        collector
            .spans()
            .iter()
            .any(|span| span.name == "acquirer.authorize"),
        "expected exported acquirer spans"
    );

    for (what, text) in [("the logs", &logs), ("the exported telemetry", &exported)] {
        for card in cards::ALL {
            for form in super::canary::leaked_forms(card) {
                assert!(!text.contains(&form), "{what} hold card {}…", &card[..4]);
            }
        }
        assert!(
            super::canary::luhn_valid_numbers(text)
                .iter()
                .all(|number| !cards::ALL.contains(&number.as_str())),
            "{what} hold a test card number"
        );
        assert!(!text.contains(&api_key), "{what} hold the API key");
        assert!(
            !text.contains(gateway_svc::keys::KEY_PREFIX),
            "{what} hold something shaped like an API key"
        );
        assert!(!text.contains(&token), "{what} hold an identity token");
        let tokens = token_shaped(text);
        assert!(
            tokens.is_empty(),
            "{what} hold {} identity token(s)",
            tokens.len()
        );
    }
    let answers = answers.join("\n");
    assert!(
        !answers.contains(cards::CARD_APPROVED),
        "an answer holds a card number"
    );
    Ok(())
}

const SHOULD_RATE_LIMIT: &str = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// Polls GetPayment (at most [`tests::LIVENESS`]) until the payment is `status`.
async fn until_status(
    client: &mut PaymentServiceClient<Channel>,
    api_key: &str,
    payment_id: &str,
    status: pb::PaymentStatus,
) -> anyhow::Result<()> {
    tokio::time::timeout(tests::LIVENESS, async {
        loop {
            let payment = client
                .get_payment(with_key(
                    pb::GetPaymentRequest {
                        payment_id: payment_id.to_owned(),
                    },
                    api_key,
                )?)
                .await?
                .into_inner()
                .payment
                .unwrap_or_default();
            if payment.status == status as i32 {
                return anyhow::Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "payment {payment_id} not {status:?} within {:?}",
            tests::LIVENESS
        )
    })?
}

#[tokio::test]
async fn spawned_a_short_workload_reaches_the_collector_as_every_metric_family_and_one_trace_through_the_rate_limiter()
-> anyhow::Result<()> {
    use tests::otlp::latest;

    let collector = Collector::start().await?;
    let database = TestDatabase::create().await?;
    let redis = tests::redis::TestRedis::new()?;
    let stack = TracedStack::start_rate_limited(&collector, &database, redis.url(), &[]).await?;
    let key = stack.api_key.clone();
    let mut client = PaymentServiceClient::new(stack.channel().await?);
    let merchant = merchant(&mut client, &key).await?;

    // Two approved SYNC payments (one carrying the caller's trace), a declined one, an
    // ASYNC one finished by a job, a replay and a conflict.
    let caller_trace = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let mut traced = with_key(
        payment_request("m-1", &merchant, 1_000, cards::CARD_APPROVED),
        &key,
    )?;
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{caller_trace}-{caller_span}-01").parse()?,
    );
    client.create_payment(traced).await?;
    client
        .create_payment(with_key(
            payment_request("m-2", &merchant, 2_500, cards::CARD_APPROVED),
            &key,
        )?)
        .await?;
    let declined = client
        .create_payment(with_key(
            payment_request("m-3", &merchant, 700, cards::CARD_DECLINED),
            &key,
        )?)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    assert_eq!(declined.status, pb::PaymentStatus::Failed as i32);
    // The ASYNC payment carries a trace of its own: its job's span links to it.
    let enqueuing_trace = uuid::Uuid::new_v4().simple().to_string();
    let mut asynchronous = with_key(
        pb::CreatePaymentRequest {
            mode: pb::PaymentMode::Async as i32,
            ..payment_request("m-4", &merchant, 300, cards::CARD_APPROVED)
        },
        &key,
    )?;
    asynchronous.metadata_mut().insert(
        "traceparent",
        format!("00-{enqueuing_trace}-{caller_span}-01").parse()?,
    );
    let queued = client
        .create_payment(asynchronous)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();
    let replay = client
        .create_payment(with_key(
            payment_request("m-1", &merchant, 1_000, cards::CARD_APPROVED),
            &key,
        )?)
        .await?;
    assert!(replay.metadata().contains_key("idempotent-replayed"));
    let conflict = client
        .create_payment(with_key(
            payment_request("m-1", &merchant, 1_001, cards::CARD_APPROVED),
            &key,
        )?)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a reused key with another request is refused"))?;
    assert_eq!(
        conflict.code(),
        tonic::Code::InvalidArgument,
        "{conflict:?}"
    );
    until_status(&mut client, &key, &queued.id, pb::PaymentStatus::Succeeded).await?;

    // The trial tier allows 3 writes a day: the 4th is refused by the limiter.
    let mut refused = 0;
    for n in 0..4 {
        let created = client
            .create_account(with_key(
                pb::CreateAccountRequest {
                    idempotency_key: format!("trial-{n}"),
                    currency: "BRL".to_owned(),
                    kind: pb::AccountKind::Merchant as i32,
                    ..Default::default()
                },
                &stack.trial_key,
            )?)
            .await;
        if let Err(status) = created {
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
            refused += 1;
        }
    }
    assert_eq!(refused, 1);

    // ratelimit-svc goes away (flushing its telemetry): calls are admitted without a
    // decision (fail-open, the default), and the 5th failure in a row trips the
    // gateway's breaker in front of it (its default). No call follows, so no probe.
    let mut ratelimit = stack
        .ratelimit
        .ok_or_else(|| anyhow::anyhow!("the stack has ratelimit-svc"))?;
    ratelimit.signal(nix::sys::signal::Signal::SIGTERM)?;
    assert!(ratelimit.wait(tests::LIVENESS).await?.success());
    const UNDECIDED: u32 = 5;
    for _ in 0..UNDECIDED {
        client
            .get_payment(with_key(
                pb::GetPaymentRequest {
                    payment_id: queued.id.clone(),
                },
                &key,
            )?)
            .await?;
    }

    let payment_families = [
        (
            "paysuite.payments.transitions",
            vec![("status", "processing"), ("currency", "BRL")],
            4.0,
        ),
        (
            "paysuite.payments.transitions",
            vec![("status", "pending"), ("currency", "BRL")],
            1.0,
        ),
        (
            "paysuite.payments.transitions",
            vec![("status", "succeeded"), ("currency", "BRL")],
            3.0,
        ),
        (
            "paysuite.payments.transitions",
            vec![("status", "failed"), ("currency", "BRL")],
            1.0,
        ),
        (
            "paysuite.ledger.volume",
            vec![("currency", "BRL"), ("kind", "capture")],
            3_800.0,
        ),
        (
            "paysuite.idempotency.replays",
            vec![("rpc.method", CREATE_PAYMENT)],
            1.0,
        ),
        (
            "paysuite.idempotency.conflicts",
            vec![("rpc.method", CREATE_PAYMENT), ("reason", "reused")],
            1.0,
        ),
        (
            "paysuite.jobs.attempts",
            vec![("kind", "process_payment"), ("outcome", "completed")],
            1.0,
        ),
        (
            "paysuite.ratelimit.decisions",
            vec![("domain", "paysuite-gateway"), ("result", "over_limit")],
            1.0,
        ),
        (
            "paysuite.gateway.ratelimit.decisions",
            vec![("result", "over_limit")],
            1.0,
        ),
        (
            "paysuite.breaker.transitions",
            vec![
                ("upstream", "ratelimit-svc"),
                ("from", "closed"),
                ("to", "open"),
            ],
            1.0,
        ),
    ];
    let service_of = |metric: &str| {
        if metric.starts_with("paysuite.ratelimit.") {
            "ratelimit-svc"
        } else if metric.starts_with("paysuite.gateway.") || metric.starts_with("paysuite.breaker.")
        {
            "gateway-svc"
        } else {
            "payment-svc"
        }
    };
    // At least the undecided calls: on a loaded machine an earlier decision can also
    // outlast the gateway's rate-limit timeout, and that call fails open too.
    let fail_open = |points: &[tests::otlp::CollectedPoint]| {
        latest(
            points,
            "gateway-svc",
            "paysuite.gateway.ratelimit.decisions",
            &[("result", "fail_open")],
        )
    };
    let arrived = collector
        .wait_for(
            "every metric family with the workload's values",
            |_, points| {
                payment_families.iter().all(|(metric, labels, value)| {
                    latest(points, service_of(metric), metric, labels) == Some(*value)
                }) && fail_open(points).is_some_and(|count| count >= f64::from(UNDECIDED))
                    && latest(
                        points,
                        "payment-svc",
                        "paysuite.jobs.depth",
                        &[("state", "ready")],
                    )
                    .is_some()
                    && latest(points, "payment-svc", "paysuite.jobs.oldest_age", &[]).is_some()
                    && latest(
                        points,
                        "gateway-svc",
                        "paysuite.breaker.state",
                        &[("upstream", "payments"), ("state", "closed")],
                    ) == Some(1.0)
            },
        )
        .await;
    if let Err(err) = arrived {
        let points = collector.points();
        let seen: Vec<String> = payment_families
            .iter()
            .map(|(metric, labels, value)| {
                format!(
                    "{metric} {labels:?}: want {value}, got {:?}",
                    latest(&points, service_of(metric), metric, labels)
                )
            })
            .collect();
        anyhow::bail!(
            "{err}: {seen:#?}; fail-open decisions {:?}, want at least {UNDECIDED}",
            fail_open(&points)
        );
    }
    let points = collector.points();

    // Plausible values where exact ones depend on timing: every admitted call was
    // decided (the workload's calls and the polls), and the queue is empty again.
    let decided_ok = latest(
        &points,
        "gateway-svc",
        "paysuite.gateway.ratelimit.decisions",
        &[("result", "ok")],
    );
    assert!(decided_ok.is_some_and(|ok| ok >= 10.0), "{decided_ok:?}");
    let limiter_ok = latest(
        &points,
        "ratelimit-svc",
        "paysuite.ratelimit.decisions",
        &[("domain", "paysuite-gateway"), ("result", "ok")],
    );
    assert!(limiter_ok.is_some_and(|ok| ok >= 10.0), "{limiter_ok:?}");
    for state in ["ready", "executing", "waiting", "dead"] {
        assert!(
            latest(
                &points,
                "payment-svc",
                "paysuite.jobs.depth",
                &[("state", state)]
            )
            .is_some(),
            "jobs.depth state={state}"
        );
    }
    for state in ["open", "half_open"] {
        assert_eq!(
            latest(
                &points,
                "gateway-svc",
                "paysuite.breaker.state",
                &[("upstream", "payments"), ("state", state)],
            ),
            Some(0.0),
            "breaker state {state}"
        );
    }
    // Bounded labels: no metric point names a payment, an account, a key or a principal.
    for point in &points {
        for value in point.attributes.values() {
            assert!(
                !value.starts_with("pay_")
                    && !value.contains("tryout")
                    && *value != "acme"
                    && *value != merchant,
                "{} carries {value:?}",
                point.metric
            );
        }
    }
    // Nothing else went wrong: only that breaker changed state, and the limiter's store
    // answered.
    let transitions: Vec<_> = points
        .iter()
        .filter(|point| point.metric == "paysuite.breaker.transitions")
        .collect();
    assert!(
        transitions
            .iter()
            .all(|point| point.service == "gateway-svc"
                && point.attributes.get("upstream").map(String::as_str) == Some("ratelimit-svc")
                && point.attributes.get("to").map(String::as_str) == Some("open")),
        "breaker transitions: {transitions:?}"
    );
    assert!(
        points
            .iter()
            .all(|point| point.metric != "paysuite.ratelimit.store.errors")
    );

    // The rate limit decision joined the caller's trace: ratelimit-svc's server span
    // is a child of the gateway's.
    collector
        .wait_for("ratelimit-svc's span in the caller's trace", |spans, _| {
            spans.iter().any(|span| {
                span.trace_id == caller_trace
                    && span.service == "ratelimit-svc"
                    && span.name == SHOULD_RATE_LIMIT
            })
        })
        .await?;
    let spans = collector.spans();
    let trace = Trace::of(&spans, &caller_trace);
    let gateway = trace
        .find("gateway-svc", CREATE_PAYMENT, KIND_SERVER)
        .ok_or_else(|| anyhow::anyhow!("no gateway span"))?;
    let limiter = trace
        .find("ratelimit-svc", SHOULD_RATE_LIMIT, KIND_SERVER)
        .ok_or_else(|| anyhow::anyhow!("no ratelimit-svc span"))?;
    assert_eq!(limiter.parent_span_id, gateway.span_id);

    // The job that finished the ASYNC payment runs in a trace of its own, linked to a
    // span of the request that enqueued it.
    collector
        .wait_for("the job's span", |spans, _| {
            spans
                .iter()
                .any(|span| span.service == "payment-svc" && span.name == "job")
        })
        .await?;
    let spans = collector.spans();
    let job = spans
        .iter()
        .find(|span| span.service == "payment-svc" && span.name == "job")
        .ok_or_else(|| anyhow::anyhow!("no job span"))?;
    assert_ne!(job.trace_id, enqueuing_trace);
    let (linked_trace, linked_span) = job
        .links
        .first()
        .ok_or_else(|| anyhow::anyhow!("the job span has no link: {job:?}"))?;
    assert_eq!(linked_trace, &enqueuing_trace);
    assert!(
        spans.iter().any(|span| span.trace_id == enqueuing_trace
            && &span.span_id == linked_span
            && span.service == "payment-svc"),
        "the link names a payment-svc span of the enqueuing trace"
    );
    Ok(())
}

/// The failure families the short workload above cannot produce: a job out of attempts
/// (`paysuite.jobs.dead`), and ratelimit-svc's Redis gone (`paysuite.ratelimit.store.errors`,
/// then its default failure mode admitting: `paysuite.ratelimit.fail_open`) while every
/// call through the gateway still succeeds.
#[tokio::test]
async fn spawned_a_dead_job_and_a_lost_limiter_store_reach_the_collector() -> anyhow::Result<()> {
    use tests::otlp::latest;

    let collector = Collector::start().await?;
    let database = TestDatabase::create().await?;
    let mut redis = tests::redis::PrivateRedis::start().await?;
    let stack = TracedStack::start_rate_limited(
        &collector,
        &database,
        &redis.url(),
        &[
            ("JOB_MAX_ATTEMPTS", "2".to_owned()),
            ("JOB_BACKOFF_BASE", "10ms".to_owned()),
            ("JOB_BACKOFF_MAX", "20ms".to_owned()),
            // The gateway waits for ratelimit-svc's own verdict (its Redis timeout is
            // 250 ms) instead of failing open itself after 50 ms: the decisions counted
            // are then ratelimit-svc's.
            ("RATELIMIT_TIMEOUT", "10s".to_owned()),
        ],
    )
    .await?;
    let key = stack.api_key.clone();
    let mut client = PaymentServiceClient::new(stack.channel().await?);
    let merchant = merchant(&mut client, &key).await?;

    // An ASYNC payment the acquirer fails every time: its job runs out of its 2 attempts.
    let failing = client
        .create_payment(with_key(
            pb::CreatePaymentRequest {
                mode: pb::PaymentMode::Async as i32,
                ..payment_request("dead-1", &merchant, 500, cards::CARD_PROCESSING_ERROR)
            },
            &key,
        )?)
        .await?
        .into_inner()
        .payment
        .unwrap_or_default();

    // The limiter's store goes away; each call is still admitted.
    redis.kill().await?;
    const ADMITTED: u32 = 3;
    for _ in 0..ADMITTED {
        client
            .get_payment(with_key(
                pb::GetPaymentRequest {
                    payment_id: failing.id.clone(),
                },
                &key,
            )?)
            .await?;
    }

    let dead = |points: &[tests::otlp::CollectedPoint]| {
        latest(
            points,
            "payment-svc",
            "paysuite.jobs.dead",
            &[("kind", "process_payment")],
        )
    };
    let store_errors = |points: &[tests::otlp::CollectedPoint]| {
        latest(
            points,
            "ratelimit-svc",
            "paysuite.ratelimit.store.errors",
            &[],
        )
    };
    let fail_open = |points: &[tests::otlp::CollectedPoint]| {
        latest(points, "ratelimit-svc", "paysuite.ratelimit.fail_open", &[])
    };
    let arrived = collector
        .wait_for(
            "a dead job and the limiter's store failures",
            |_, points| {
                dead(points) == Some(1.0)
                    && store_errors(points).is_some_and(|errors| errors >= 1.0)
                    && fail_open(points).is_some_and(|admitted| admitted >= f64::from(ADMITTED))
            },
        )
        .await;
    if let Err(err) = arrived {
        let points = collector.points();
        anyhow::bail!(
            "{err}: dead jobs {:?} (want 1), store errors {:?} (want at least 1), \
             fail-open decisions {:?} (want at least {ADMITTED})",
            dead(&points),
            store_errors(&points),
            fail_open(&points)
        );
    }
    // ratelimit-svc decided, so the gateway never had to fail open itself.
    let points = collector.points();
    assert_eq!(
        latest(
            &points,
            "gateway-svc",
            "paysuite.gateway.ratelimit.decisions",
            &[("result", "fail_open")],
        ),
        None
    );
    Ok(())
}
