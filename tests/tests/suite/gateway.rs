//! gateway-svc end to end: the real grpcurl and tonic clients through the gateway to a
//! real payment-svc on PostgreSQL — API keys and scopes, the minted identity (a forged
//! one is ignored), keys reloaded from their file, streams, upstream errors byte for
//! byte (trailers-only included), unknown paths, oversize messages, TLS.

use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures::StreamExt as _;
use prost::Message as _;
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use service_kit::identity::IDENTITY_HEADER;
use tests::gateway::{GatewayOptions, TestGateway, WRITE_SCOPES, with_key};
use tests::grpcurl::{GrpcurlOutput, grpcurl, grpcurl_tls};
use tests::payments::{cards, payment_request};
use tests::postgres::TestDatabase;
use tests::services::{self, RunningService};
use tonic::Code;
use tonic_types::StatusExt as _;

const PAYMENT_SERVICE: &str = "paysuite.payments.v1.PaymentService";

async fn gateway_for(payment: &RunningService) -> anyhow::Result<TestGateway> {
    TestGateway::start(GatewayOptions {
        payment: payment.endpoint(),
        ..Default::default()
    })
    .await
}

fn bearer(key: &str) -> String {
    format!("authorization: Bearer {key}")
}

fn json(output: &GrpcurlOutput) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(output.success, "grpcurl failed: {output:?}");
    Ok(serde_json::from_str(&output.stdout)?)
}

fn failed_with(output: &GrpcurlOutput, code: &str) -> bool {
    !output.success && output.stderr.contains(&format!("Code: {code}"))
}

#[tokio::test]
async fn grpcurl_through_the_gateway_lists_the_api_and_creates_and_reads_payments()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let gateway = gateway_for(&payment).await?;
    let addr = gateway.addr().to_string();
    let writer = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    let reader = gateway
        .add_key("acme", &["payments:read"], "standard")
        .await?;

    // Reflection shows every paysuite service, without a key.
    let listed = grpcurl(&[&addr, "list"]).await?;
    assert!(listed.success, "{listed:?}");
    for service in proto::policy::paysuite_service_names() {
        assert!(
            listed.stdout.lines().any(|line| line.trim() == service),
            "{service} missing from:\n{}",
            listed.stdout
        );
    }

    // A write key creates an account and a payment, and reads the payment back.
    let account = json(
        &grpcurl(&[
            "-H",
            &bearer(&writer),
            "-d",
            r#"{"idempotency_key":"acct-1","currency":"BRL","kind":"ACCOUNT_KIND_MERCHANT"}"#,
            &addr,
            &format!("{PAYMENT_SERVICE}/CreateAccount"),
        ])
        .await?,
    )?;
    let account_id = account["account"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!account_id.is_empty(), "{account}");
    assert_eq!(account["account"]["owner"], "acme", "{account}");
    let create = serde_json::json!({
        "idempotency_key": "pay-1",
        "merchant_account_id": account_id,
        "amount": {"amount_minor": "2500", "currency": "BRL"},
        "card": {"number": cards::CARD_APPROVED, "exp_month": 12, "exp_year": 2034, "cvc": "123"},
    })
    .to_string();
    let created = json(
        &grpcurl(&[
            "-H",
            &bearer(&writer),
            "-d",
            &create,
            &addr,
            &format!("{PAYMENT_SERVICE}/CreatePayment"),
        ])
        .await?,
    )?;
    let payment_id = created["payment"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(!payment_id.is_empty(), "{created}");
    let read = json(
        &grpcurl(&[
            "-H",
            &bearer(&reader),
            "-d",
            &serde_json::json!({ "payment_id": payment_id }).to_string(),
            &addr,
            &format!("{PAYMENT_SERVICE}/GetPayment"),
        ])
        .await?,
    )?;
    assert_eq!(read["payment"]["id"], payment_id.as_str(), "{read}");
    assert_eq!(read["payment"]["amount"]["amountMinor"], "2500", "{read}");

    // Response metadata passes through: the replay of a completed key says so.
    let replayed = grpcurl(&[
        "-v",
        "-H",
        &bearer(&writer),
        "-d",
        &create,
        &addr,
        &format!("{PAYMENT_SERVICE}/CreatePayment"),
    ])
    .await?;
    assert!(replayed.success, "{replayed:?}");
    assert!(
        replayed.stdout.contains("idempotent-replayed: true"),
        "{}",
        replayed.stdout
    );

    // No key, a key nobody issued, a malformed header: UNAUTHENTICATED.
    let get = format!("{PAYMENT_SERVICE}/GetPayment");
    let body = serde_json::json!({ "payment_id": payment_id }).to_string();
    let no_key = grpcurl(&["-d", &body, &addr, &get]).await?;
    assert!(failed_with(&no_key, "Unauthenticated"), "{no_key:?}");
    let unknown_key = format!("{writer}x");
    let unknown = grpcurl(&["-H", &bearer(&unknown_key), "-d", &body, &addr, &get]).await?;
    assert!(failed_with(&unknown, "Unauthenticated"), "{unknown:?}");
    let basic = grpcurl(&[
        "-H",
        "authorization: Basic Zm9vOmJhcg==",
        "-d",
        &body,
        &addr,
        &get,
    ])
    .await?;
    assert!(failed_with(&basic, "Unauthenticated"), "{basic:?}");

    // A read-only key cannot write.
    let denied = grpcurl(&[
        "-H",
        &bearer(&reader),
        "-d",
        r#"{"idempotency_key":"acct-2","currency":"BRL","kind":"ACCOUNT_KIND_MERCHANT"}"#,
        &addr,
        &format!("{PAYMENT_SERVICE}/CreateAccount"),
    ])
    .await?;
    assert!(failed_with(&denied, "PermissionDenied"), "{denied:?}");

    // Health needs no key either.
    let health = grpcurl(&[
        "-d",
        &serde_json::json!({ "service": PAYMENT_SERVICE }).to_string(),
        &addr,
        "grpc.health.v1.Health/Check",
    ])
    .await?;
    assert!(health.stdout.contains("SERVING"), "{health:?}");

    gateway.stop().await?;
    payment.stop().await
}

#[tokio::test]
async fn a_forged_identity_header_is_ignored_and_the_key_decides_who_calls() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let gateway = gateway_for(&payment).await?;
    let alice_key = gateway.add_key("alice", &WRITE_SCOPES, "standard").await?;
    let mallory_key = gateway
        .add_key("mallory", &WRITE_SCOPES, "standard")
        .await?;
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let account_request = |key: &str| pb::CreateAccountRequest {
        idempotency_key: key.to_owned(),
        currency: "BRL".to_owned(),
        kind: pb::AccountKind::Merchant as i32,
        ..Default::default()
    };

    let alice_account = client
        .create_account(with_key(account_request("alice-1"), &alice_key)?)
        .await?
        .into_inner()
        .account
        .unwrap_or_default();
    assert_eq!(alice_account.owner, "alice");

    // A token for alice that payment-svc itself would accept (signed by the key it trusts).
    let forged = tests::identity::token("alice", &WRITE_SCOPES, "payment-svc");
    let mut direct = PaymentServiceClient::connect(payment.endpoint()).await?;
    let mut request = tonic::Request::new(pb::GetAccountRequest {
        account_id: alice_account.id.clone(),
    });
    request
        .metadata_mut()
        .insert(IDENTITY_HEADER, forged.parse()?);
    assert!(
        direct.get_account(request).await.is_ok(),
        "the forged token is a good one"
    );

    // Through the gateway mallory sends it along with her own key: she stays mallory.
    let stolen = client
        .get_account(with_header(
            with_key(
                pb::GetAccountRequest {
                    account_id: alice_account.id.clone(),
                },
                &mallory_key,
            )?,
            IDENTITY_HEADER,
            &forged,
        )?)
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(stolen, Some(Code::NotFound));
    let created = client
        .create_account(with_header(
            with_key(account_request("mallory-1"), &mallory_key)?,
            IDENTITY_HEADER,
            &forged,
        )?)
        .await?
        .into_inner()
        .account
        .unwrap_or_default();
    assert_eq!(created.owner, "mallory");
    let listed = client
        .list_accounts(with_header(
            with_key(pb::ListAccountsRequest::default(), &mallory_key)?,
            IDENTITY_HEADER,
            &forged,
        )?)
        .await?
        .into_inner();
    assert!(
        listed
            .accounts
            .iter()
            .all(|account| account.owner == "mallory"),
        "{listed:?}"
    );

    // The forged token alone is no credential at the gateway.
    let alone = client
        .get_account(with_header(
            tonic::Request::new(pb::GetAccountRequest {
                account_id: alice_account.id.clone(),
            }),
            IDENTITY_HEADER,
            &forged,
        )?)
        .await
        .err()
        .map(|status| status.code());
    assert_eq!(alone, Some(Code::Unauthenticated));

    gateway.stop().await?;
    payment.stop().await
}

fn with_header<T>(
    mut request: tonic::Request<T>,
    name: &'static str,
    value: &str,
) -> anyhow::Result<tonic::Request<T>> {
    request.metadata_mut().insert(name, value.parse()?);
    Ok(request)
}

#[tokio::test]
async fn keys_removed_from_or_added_to_the_file_apply_without_a_restart() -> anyhow::Result<()> {
    // No upstream: an accepted key gets UNAVAILABLE from the unreachable cluster, a
    // refused one UNAUTHENTICATED from the gateway, so the answer tells which happened.
    let gateway = TestGateway::start_with(GatewayOptions::default(), |config| {
        config.api_keys_reload_interval = Duration::from_millis(100);
    })
    .await?;
    let kept = gateway.keys().add("kept", &WRITE_SCOPES, "standard")?;
    // Both keys were added after start: the first reload picks them up.
    let removed = gateway.keys().add("removed", &WRITE_SCOPES, "standard")?;
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let mut code_for = async |key: &str| -> anyhow::Result<Code> {
        let request = with_key(pb::ListAccountsRequest::default(), key)?;
        Ok(match client.list_accounts(request).await {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        })
    };
    let started = tokio::time::Instant::now();
    while code_for(&removed).await? != Code::Unavailable {
        anyhow::ensure!(
            started.elapsed() < tests::LIVENESS,
            "the new keys never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code_for(&kept).await?, Code::Unavailable);
    let reloads = gateway.stats().keys.reloads();
    assert!(reloads >= 1);

    gateway.keys().remove(&removed)?;
    let started = tokio::time::Instant::now();
    while code_for(&removed).await? != Code::Unauthenticated {
        anyhow::ensure!(
            started.elapsed() < tests::LIVENESS,
            "the removed key still works"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        gateway.stats().keys.reloads() > reloads,
        "a reload proved the path"
    );
    assert_eq!(
        code_for(&kept).await?,
        Code::Unavailable,
        "other keys keep working"
    );

    // A broken file keeps the keys in force.
    let failures = gateway.stats().keys.reload_failures();
    std::fs::write(gateway.keys().path(), "- {hash: [not, a, hash]")?;
    let started = tokio::time::Instant::now();
    while gateway.stats().keys.reload_failures() == failures {
        anyhow::ensure!(
            started.elapsed() < tests::LIVENESS,
            "the broken file was not read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(code_for(&kept).await?, Code::Unavailable);
    gateway.stop().await
}

#[tokio::test]
async fn watch_balance_through_the_gateway_delivers_live_updates_and_streams_take_no_unary_slot()
-> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    // One unary call per connection: the streams below share the connection with the
    // unary calls, and must not take that slot.
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: payment.endpoint(),
            ..Default::default()
        },
        |config| config.limits.max_unary_per_connection = 1,
    )
    .await?;
    let key = gateway
        .add_key("streamer", &WRITE_SCOPES, "standard")
        .await?;
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let merchant = client
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: "m-1".to_owned(),
                currency: "BRL".to_owned(),
                kind: pb::AccountKind::Merchant as i32,
                ..Default::default()
            },
            &key,
        )?)
        .await?
        .into_inner()
        .account
        .unwrap_or_default()
        .id;
    let mut stream = client
        .watch_balance(with_key(
            pb::WatchBalanceRequest {
                account_id: merchant.clone(),
            },
            &key,
        )?)
        .await?
        .into_inner();
    let amount = |message: Option<pb::WatchBalanceResponse>| {
        message
            .and_then(|m| m.balance)
            .and_then(|b| b.balance)
            .map(|m| m.amount_minor)
    };
    let first = tokio::time::timeout(tests::LIVENESS, stream.next())
        .await?
        .transpose()?;
    assert_eq!(amount(first), Some(0));
    let mut others = Vec::new();
    for _ in 0..2 {
        let mut other = client
            .watch_balance(with_key(
                pb::WatchBalanceRequest {
                    account_id: merchant.clone(),
                },
                &key,
            )?)
            .await?
            .into_inner();
        let first = tokio::time::timeout(tests::LIVENESS, other.next())
            .await?
            .transpose()?;
        assert_eq!(amount(first), Some(0));
        others.push(other);
    }
    for (index, total) in [(1, 1_000), (2, 2_000)] {
        client
            .create_payment(with_key(
                payment_request(
                    &format!("p-{index}"),
                    &merchant,
                    1_000,
                    cards::CARD_APPROVED,
                ),
                &key,
            )?)
            .await?;
        let next = tokio::time::timeout(tests::LIVENESS, stream.next())
            .await?
            .transpose()?;
        assert_eq!(amount(next), Some(total));
    }
    // Three streams open on the connection, and no unary call was ever shed.
    assert_eq!(
        gateway
            .stats()
            .server
            .unary_calls_shed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(others);
    drop(stream);
    gateway.stop().await?;
    payment.stop().await
}

/// A gRPC message frame: uncompressed flag, big-endian length, the bytes.
fn frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(5 + message.len());
    buf.put_u8(0);
    buf.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    buf.extend_from_slice(message);
    buf.freeze()
}

/// What a raw HTTP/2 client saw of one call.
#[derive(Debug)]
struct RawResponse {
    http_status: u16,
    headers: http::HeaderMap,
    /// The response ended with its headers: a trailers-only response.
    trailers_only: bool,
    trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    /// grpc-status from the headers (trailers-only) or the trailers.
    fn grpc_status(&self) -> Option<String> {
        self.headers
            .get("grpc-status")
            .or_else(|| self.trailers.as_ref()?.get("grpc-status"))
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    }
}

/// One call over a fresh HTTP/2 connection, with `body` sent and the request stream left
/// open unless `end` (so a test can show the gateway answers without the rest).
async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    metadata: &[(&str, String)],
    body: Bytes,
    end: bool,
) -> anyhow::Result<RawResponse> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in metadata {
        request = request.header(*name, value.as_str());
    }
    let (response, mut stream) = sender.send_request(request.body(())?, false)?;
    stream.send_data(body, end)?;
    let response = tokio::time::timeout(tests::LIVENESS, response).await??;
    let (parts, mut body) = response.into_parts();
    let trailers_only = body.is_end_stream();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await?;
    drop(stream);
    Ok(RawResponse {
        http_status: parts.status.as_u16(),
        headers: parts.headers,
        trailers_only,
        trailers,
    })
}

#[tokio::test]
async fn upstream_errors_arrive_intact_including_trailers_only_responses() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let gateway = gateway_for(&payment).await?;
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;

    // Bad input: INVALID_ARGUMENT with a BadRequest naming the fields, through tonic.
    let bad = pb::CreateAccountRequest {
        idempotency_key: "bad-1".to_owned(),
        currency: "XXQ".to_owned(),
        kind: pb::AccountKind::Unspecified as i32,
        ..Default::default()
    };
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let status = client
        .create_account(with_key(bad.clone(), &key)?)
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("bad input accepted"))?;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields: Vec<String> = status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default();
    assert!(fields.iter().any(|f| f == "currency"), "{fields:?}");

    // The same call straight to payment-svc and through the gateway: the same
    // trailers-only response, status, message and details byte for byte.
    let path = format!("/{PAYMENT_SERVICE}/CreateAccount");
    let token = tests::identity::token("acme", &WRITE_SCOPES, "payment-svc");
    let direct = raw_call(
        payment.addr(),
        &path,
        &[(IDENTITY_HEADER, token)],
        frame(&bad.encode_to_vec()),
        true,
    )
    .await?;
    let proxied = raw_call(
        gateway.addr(),
        &path,
        &[("authorization", format!("Bearer {key}"))],
        frame(&bad.encode_to_vec()),
        true,
    )
    .await?;
    assert!(direct.trailers_only, "{direct:?}");
    assert!(proxied.trailers_only, "{proxied:?}");
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "content-type",
    ] {
        assert!(direct.headers.contains_key(name), "{name}: {direct:?}");
        assert_eq!(
            direct.headers.get(name),
            proxied.headers.get(name),
            "{name} differs"
        );
    }

    // A successful unary call ends with real trailers after its message.
    let good = pb::GetBalanceRequest {
        account_id: "acc_missing".to_owned(),
    };
    let missing = raw_call(
        gateway.addr(),
        &format!("/{PAYMENT_SERVICE}/GetBalance"),
        &[("authorization", format!("Bearer {key}"))],
        frame(&good.encode_to_vec()),
        true,
    )
    .await?;
    assert_eq!(missing.grpc_status().as_deref(), Some("5"), "{missing:?}");

    gateway.stop().await?;
    payment.stop().await
}

#[tokio::test]
async fn unknown_and_unrouted_paths_answer_unimplemented_over_http_200() -> anyhow::Result<()> {
    let gateway = TestGateway::start(GatewayOptions::default()).await?;
    let key = gateway
        .add_key(
            "acme",
            &["payments:read", "payments:write", "admin"],
            "standard",
        )
        .await?;
    for path in [
        "/paysuite.nope.v1.Nope/Nothing",
        "/paysuite.payments.v1.PaymentService/NoSuchMethod",
        // The acquirer is never routed, whatever the key.
        "/paysuite.acquirer.v1.AcquirerService/Authorize",
        "/paysuite.acquirer.v1.SandboxControlService/SetFaults",
    ] {
        let response = raw_call(
            gateway.addr(),
            path,
            &[("authorization", format!("Bearer {key}"))],
            frame(&[]),
            true,
        )
        .await?;
        assert_eq!(response.http_status, 200, "{path}: {response:?}");
        assert_eq!(
            response.grpc_status().as_deref(),
            Some("12"),
            "{path}: {response:?}"
        );
    }
    gateway.stop().await
}

#[tokio::test]
async fn an_oversize_message_is_refused_from_its_prefix_without_the_rest() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: payment.endpoint(),
            ..Default::default()
        },
        |config| config.limits.max_message_bytes = 1024,
    )
    .await?;
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;

    // Only the prefix of a 1 MiB message, and the stream left open: the gateway cannot
    // be waiting for the message to answer.
    let mut prefix = BytesMut::new();
    prefix.put_u8(0);
    prefix.put_u32(1 << 20);
    prefix.extend_from_slice(b"partial");
    let response = raw_call(
        gateway.addr(),
        &format!("/{PAYMENT_SERVICE}/CreateAccount"),
        &[("authorization", format!("Bearer {key}"))],
        prefix.freeze(),
        false,
    )
    .await?;
    assert_eq!(response.http_status, 200);
    assert_eq!(response.grpc_status().as_deref(), Some("8"), "{response:?}");
    assert_eq!(
        gateway
            .stats()
            .server
            .messages_refused_oversize
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A message at the limit goes through (and is answered by payment-svc).
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let within = client
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: "k".repeat(200),
                currency: "BRL".to_owned(),
                kind: pb::AccountKind::Merchant as i32,
                display_name: "x".repeat(480),
                labels: [("note".to_owned(), "y".repeat(250))].into(),
                ..Default::default()
            },
            &key,
        )?)
        .await;
    assert!(within.is_ok(), "{within:?}");
    gateway.stop().await?;
    payment.stop().await
}

#[tokio::test]
async fn grpcurl_over_tls_with_a_dev_certificate() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let gateway = TestGateway::start(GatewayOptions {
        payment: payment.endpoint(),
        tls: true,
        ..Default::default()
    })
    .await?;
    let ca = gateway
        .tls_ca()
        .ok_or_else(|| anyhow::anyhow!("no CA"))?
        .to_owned();
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    for host in ["127.0.0.1", "localhost"] {
        let addr = format!("{host}:{}", gateway.addr().port());
        let listed = grpcurl_tls(&ca, &[&addr, "list"]).await?;
        assert!(listed.success, "{listed:?}");
        assert!(listed.stdout.contains(PAYMENT_SERVICE), "{}", listed.stdout);
    }
    let addr = gateway.addr().to_string();
    let account = json(
        &grpcurl_tls(
            &ca,
            &[
                "-H",
                &bearer(&key),
                "-d",
                r#"{"idempotency_key":"tls-1","currency":"BRL","kind":"ACCOUNT_KIND_MERCHANT"}"#,
                &addr,
                &format!("{PAYMENT_SERVICE}/CreateAccount"),
            ],
        )
        .await?,
    )?;
    assert_eq!(account["account"]["owner"], "acme", "{account}");

    // Plaintext is not served on a TLS listener.
    let plaintext = grpcurl(&[&addr, "list"]).await?;
    assert!(!plaintext.success, "{plaintext:?}");
    gateway.stop().await?;
    payment.stop().await
}

#[tokio::test]
async fn spawned_frozen_upstream_unary_calls_end_at_the_default_or_capped_deadline_streams_live_on()
-> anyhow::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;

    use tests::process::SpawnedService;

    const DEFAULT: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(4);
    let database = TestDatabase::create().await?;
    let payment = SpawnedService::start(
        "payment-svc",
        &[
            ("DATABASE_URL", database.service_url()),
            ("DATABASE_MIGRATION_URL", database.owner_url()),
        ],
    )
    .await?;
    let gateway = TestGateway::start_with(
        GatewayOptions {
            payment: payment.endpoint(),
            ..Default::default()
        },
        |config| {
            config.deadlines = gateway_svc::config::Deadlines {
                default: DEFAULT,
                max: MAX,
            }
        },
    )
    .await?;
    let key = gateway.add_key("acme", &WRITE_SCOPES, "standard").await?;
    let stats = gateway.stats().deadlines.clone();
    let mut client = PaymentServiceClient::new(gateway.channel().await?);
    let merchant = client
        .create_account(with_key(
            pb::CreateAccountRequest {
                idempotency_key: "m-1".to_owned(),
                currency: "BRL".to_owned(),
                kind: pb::AccountKind::Merchant as i32,
                ..Default::default()
            },
            &key,
        )?)
        .await?
        .into_inner()
        .account
        .unwrap_or_default()
        .id;
    assert_eq!(
        stats.defaulted.load(Relaxed),
        1,
        "CreateAccount got the default"
    );

    // A stream outlives the unary deadlines: still open and delivering after them.
    let mut stream = client
        .watch_balance(with_key(
            pb::WatchBalanceRequest {
                account_id: merchant.clone(),
            },
            &key,
        )?)
        .await?
        .into_inner();
    tokio::time::timeout(tests::LIVENESS, stream.next())
        .await?
        .transpose()?;
    tokio::time::sleep(MAX + DEFAULT / 2).await;
    let mut pay = with_key(
        payment_request("p-1", &merchant, 700, cards::CARD_APPROVED),
        &key,
    )?;
    pay.set_timeout(Duration::from_secs(3600));
    client.create_payment(pay).await?;
    assert_eq!(
        stats.capped.load(Relaxed),
        1,
        "the hour was cut to the maximum"
    );
    let update = tokio::time::timeout(tests::LIVENESS, stream.next())
        .await?
        .transpose()?;
    assert_eq!(
        update
            .and_then(|m| m.balance)
            .and_then(|b| b.balance)
            .map(|m| m.amount_minor),
        Some(700)
    );
    assert_eq!(stats.exceeded.load(Relaxed), 0);

    // payment-svc frozen: a unary call without a deadline ends at the default, one asking
    // for an hour at the maximum — each well within the liveness bound, and counted.
    payment.freeze().await?;
    let balance = || pb::GetBalanceRequest {
        account_id: merchant.clone(),
    };
    let started = tokio::time::Instant::now();
    let defaulted = client
        .get_balance(with_key(balance(), &key)?)
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(defaulted, Some(Code::DeadlineExceeded));
    assert!(started.elapsed() >= DEFAULT && started.elapsed() < tests::LIVENESS);
    assert_eq!(stats.exceeded.load(Relaxed), 1);
    let mut long = with_key(balance(), &key)?;
    long.set_timeout(Duration::from_secs(3600));
    let started = tokio::time::Instant::now();
    let capped = client.get_balance(long).await.err().map(|s| s.code());
    assert_eq!(capped, Some(Code::DeadlineExceeded));
    assert!(started.elapsed() >= MAX && started.elapsed() < tests::LIVENESS);
    assert_eq!(stats.capped.load(Relaxed), 2);
    assert_eq!(stats.exceeded.load(Relaxed), 2);

    payment.resume()?;
    drop(stream);
    gateway.stop().await
}

/// A ratelimit API that records the `grpc-timeout` each call arrives with: what an
/// upstream behind the gateway is told about its caller's remaining budget.
#[derive(Debug, Clone, Default)]
struct TimeoutRecorder {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
}

#[tonic::async_trait]
impl proto::ratelimit::v1::rate_limit_service_server::RateLimitService for TimeoutRecorder {
    async fn check(
        &self,
        request: tonic::Request<proto::ratelimit::v1::CheckRequest>,
    ) -> Result<tonic::Response<proto::ratelimit::v1::CheckResponse>, tonic::Status> {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        self.seen
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .push(timeout);
        Ok(tonic::Response::new(Default::default()))
    }

    async fn peek(
        &self,
        _request: tonic::Request<proto::ratelimit::v1::PeekRequest>,
    ) -> Result<tonic::Response<proto::ratelimit::v1::PeekResponse>, tonic::Status> {
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A `grpc-timeout` value (`<digits><unit>`) as a duration.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[tokio::test]
async fn the_upstream_is_told_the_remaining_budget_the_default_or_the_capped_deadline()
-> anyhow::Result<()> {
    use proto::ratelimit::v1::rate_limit_service_client::RateLimitServiceClient;
    use proto::ratelimit::v1::rate_limit_service_server::RateLimitServiceServer;

    const DEFAULT: Duration = Duration::from_secs(7);
    const MAX: Duration = Duration::from_secs(40);
    let recorder = TimeoutRecorder::default();
    let upstream = RunningService::start({
        let recorder = recorder.clone();
        |listener, stopped| async move {
            let services = service_kit::ServiceSet::new("recorder")
                .add_service(RateLimitServiceServer::new(recorder));
            service_kit::serve(
                listener,
                services,
                &service_kit::ServerLimits::default(),
                async {
                    let _ = stopped.await;
                },
            )
            .await?;
            Ok(())
        }
    })
    .await?;
    let gateway = TestGateway::start_with(
        GatewayOptions {
            ratelimit: upstream.endpoint(),
            ..Default::default()
        },
        |config| {
            config.deadlines = gateway_svc::config::Deadlines {
                default: DEFAULT,
                max: MAX,
            }
        },
    )
    .await?;
    let key = gateway
        .add_key("acme", &["ratelimit:check"], "standard")
        .await?;
    let mut client = RateLimitServiceClient::new(gateway.channel().await?);
    let check = |timeout: Option<Duration>| -> anyhow::Result<_> {
        let mut request = with_key(
            proto::ratelimit::v1::CheckRequest {
                key: "k".to_owned(),
                ..Default::default()
            },
            &key,
        )?;
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        Ok(request)
    };
    // No deadline → the default; 20 s → what is left of 20 s; 10 min → the cap.
    for timeout in [
        None,
        Some(Duration::from_secs(20)),
        Some(Duration::from_secs(600)),
    ] {
        client.check(check(timeout)?).await?;
    }
    let seen: Vec<Option<Duration>> = recorder
        .seen
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .map(|value| value.as_deref().and_then(parse_grpc_timeout))
        .collect();
    let expected = [DEFAULT, Duration::from_secs(20), MAX];
    assert_eq!(seen.len(), expected.len(), "{seen:?}");
    for (seen, full) in seen.iter().zip(expected) {
        let seen = seen.ok_or_else(|| anyhow::anyhow!("a call arrived without grpc-timeout"))?;
        // What is left when the gateway sends: at most the full budget, and not more than
        // the liveness bound below it (the gateway spends milliseconds here).
        assert!(
            seen <= full && seen + tests::LIVENESS.min(full / 2) > full,
            "the upstream saw {seen:?} of {full:?}"
        );
    }
    gateway.stop().await?;
    upstream.stop().await
}
