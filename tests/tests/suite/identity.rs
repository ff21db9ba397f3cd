//! Identity between the gateway and the services: every paysuite RPC needs a valid token
//! holding its `required_scope`; health and reflection never do.

use std::time::Duration;

use proto::payments::v1::payment_service_client::PaymentServiceClient;
use proto::payments::v1::{GetPaymentRequest, ListAccountsRequest};
use service_kit::identity::{IDENTITY_HEADER, SigningKey};
use tests::identity;
use tests::postgres::TestDatabase;
use tests::services;
use tonic::transport::Channel;
use tonic::{Code, Request};

fn with_token<T>(message: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(IDENTITY_HEADER, token.parse()?);
    Ok(request)
}

async fn code_of(
    client: &mut PaymentServiceClient<Channel>,
    request: Request<GetPaymentRequest>,
) -> Code {
    match client.get_payment(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn payment_rpcs_require_a_valid_token_with_the_scope() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = services::payment(&database).await?;
    let mut client = PaymentServiceClient::connect(payment.endpoint()).await?;
    let get = || GetPaymentRequest {
        payment_id: "pay_x".to_owned(),
    };

    // No token.
    assert_eq!(
        code_of(&mut client, Request::new(get())).await,
        Code::Unauthenticated
    );
    // Garbage, a stranger's signature, an expired token, another audience.
    assert_eq!(
        code_of(&mut client, with_token(get(), "not.a.token")?).await,
        Code::Unauthenticated
    );
    let stranger = SigningKey::generate("test")?;
    let forged = stranger.mint(
        "demo",
        &["payments:read".to_owned()],
        "payment-svc",
        Duration::from_secs(60),
    );
    assert_eq!(
        code_of(&mut client, with_token(get(), &forged)?).await,
        Code::Unauthenticated
    );
    let expired = identity::signing_key().mint_at(
        "demo",
        &["payments:read".to_owned()],
        "payment-svc",
        1_000_000_000,
        Duration::from_secs(60),
    );
    assert_eq!(
        code_of(&mut client, with_token(get(), &expired)?).await,
        Code::Unauthenticated
    );
    let elsewhere = identity::token("demo", &["payments:read"], "ratelimit-svc");
    assert_eq!(
        code_of(&mut client, with_token(get(), &elsewhere)?).await,
        Code::Unauthenticated
    );

    // A valid token without the RPC's scope.
    let writer = identity::token("demo", &["payments:write"], "payment-svc");
    assert_eq!(
        code_of(&mut client, with_token(get(), &writer)?).await,
        Code::PermissionDenied
    );

    // With the scope, the call reaches its handler.
    let reader = identity::token("demo", &["payments:read"], "payment-svc");
    let listed = client
        .list_accounts(with_token(ListAccountsRequest::default(), &reader)?)
        .await?;
    assert!(listed.into_inner().accounts.is_empty());

    payment.stop().await
}
