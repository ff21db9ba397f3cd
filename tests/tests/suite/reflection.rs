//! Operators drive the suite with grpcurl: reflection lists the API, `describe` shows its
//! documentation, and health answers on every service without credentials.

use tests::grpcurl::grpcurl;
use tests::postgres::TestDatabase;
use tests::services;

#[tokio::test]
async fn grpcurl_lists_describes_and_health_checks_every_service() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let ratelimit = services::ratelimit().await?;
    let gateway = services::gateway().await?;

    // The gateway's reflection shows the whole API.
    let gateway_addr = gateway.addr().to_string();
    let listed = grpcurl(&[&gateway_addr, "list"]).await?;
    assert!(listed.success, "{listed:?}");
    for service in proto::policy::paysuite_service_names() {
        assert!(
            listed.stdout.lines().any(|line| line.trim() == service),
            "{service} missing from:\n{}",
            listed.stdout
        );
    }
    assert!(
        listed.stdout.contains("grpc.health.v1.Health"),
        "{}",
        listed.stdout
    );

    // Each service lists what it serves.
    let payment_addr = payment.addr().to_string();
    let listed = grpcurl(&[&payment_addr, "list"]).await?;
    assert!(
        listed
            .stdout
            .contains("paysuite.payments.v1.PaymentService"),
        "{listed:?}"
    );
    let ratelimit_addr = ratelimit.addr().to_string();
    let listed = grpcurl(&[&ratelimit_addr, "list"]).await?;
    assert!(
        listed
            .stdout
            .contains("paysuite.ratelimit.v1.RateLimitService"),
        "{listed:?}"
    );

    // `describe` shows documented RPCs.
    for addr in [&gateway_addr, &payment_addr] {
        let described = grpcurl(&[addr, "describe", "paysuite.payments.v1.PaymentService"]).await?;
        assert!(described.success, "{described:?}");
        assert!(
            described.stdout.contains("rpc CreatePayment"),
            "{}",
            described.stdout
        );
        let comment_lines = described
            .stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("//"))
            .count();
        assert!(
            comment_lines >= 10,
            "RPCs should be documented:\n{}",
            described.stdout
        );
    }
    let described = grpcurl(&[
        &gateway_addr,
        "describe",
        "paysuite.payments.v1.CreatePaymentRequest",
    ])
    .await?;
    assert!(
        described.stdout.contains("idempotency_key"),
        "{}",
        described.stdout
    );

    // Readiness answers SERVING everywhere, without credentials.
    for addr in [&gateway_addr, &payment_addr, &ratelimit_addr] {
        let health = grpcurl(&[
            "-d",
            r#"{"service":"readiness"}"#,
            addr,
            "grpc.health.v1.Health/Check",
        ])
        .await?;
        assert!(health.success, "{health:?}");
        assert!(
            health.stdout.contains(r#""status": "SERVING""#),
            "{addr}: {}",
            health.stdout
        );
    }

    gateway.stop().await?;
    ratelimit.stop().await?;
    payment.stop().await?;
    Ok(())
}

#[tokio::test]
async fn unknown_method_answers_unimplemented() -> anyhow::Result<()> {
    let gateway = services::gateway().await?;
    let channel = tonic::transport::Channel::from_shared(gateway.endpoint())?
        .connect()
        .await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    // Sanity: the channel works.
    client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let path = http::uri::PathAndQuery::from_static("/paysuite.nope.v1.Nope/Nothing");
    let status = grpc
        .unary::<_, (), _>(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(status, Some(tonic::Code::Unimplemented));
    gateway.stop().await?;
    Ok(())
}
