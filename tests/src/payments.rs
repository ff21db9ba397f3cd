//! A payment-svc client acting as one principal, with helpers for the common calls.

use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use service_kit::identity::IDENTITY_HEADER;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::identity;

/// Every scope a tenant has.
pub const TENANT_SCOPES: [&str; 2] = ["payments:read", "payments:write"];

/// payment-svc as seen by `principal`.
#[derive(Debug, Clone)]
pub struct Tenant {
    principal: String,
    channel: Channel,
    client: PaymentServiceClient<Channel>,
}

impl Tenant {
    /// A client for `principal` over `channel`.
    pub fn new(principal: &str, channel: Channel) -> Self {
        Self {
            principal: principal.to_owned(),
            client: PaymentServiceClient::new(channel.clone()),
            channel,
        }
    }

    /// The same service as another principal.
    pub fn as_principal(&self, principal: &str) -> Self {
        Self::new(principal, self.channel.clone())
    }

    /// The principal.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The raw client.
    pub fn client(&self) -> PaymentServiceClient<Channel> {
        self.client.clone()
    }

    /// `message` with a fresh identity token of this principal.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let token = identity::token(&self.principal, &TENANT_SCOPES, "payment-svc");
        if let Ok(value) = token.parse() {
            request.metadata_mut().insert(IDENTITY_HEADER, value);
        }
        request
    }

    /// Opens an account; `allow_negative` accounts serve as funding sources in tests.
    pub async fn open_account(
        &self,
        kind: pb::AccountKind,
        currency: &str,
        allow_negative: bool,
    ) -> anyhow::Result<pb::Account> {
        let response = self
            .client()
            .create_account(self.request(pb::CreateAccountRequest {
                idempotency_key: uuid::Uuid::new_v4().to_string(),
                currency: currency.to_owned(),
                kind: kind as i32,
                allow_negative,
                ..Default::default()
            }))
            .await?;
        response
            .into_inner()
            .account
            .ok_or_else(|| anyhow::anyhow!("CreateAccount answered no account"))
    }

    /// A transfer with an explicit idempotency key.
    pub async fn transfer(
        &self,
        key: &str,
        from: &str,
        to: &str,
        amount_minor: i64,
        currency: &str,
    ) -> Result<Response<pb::CreateTransferResponse>, Status> {
        self.client()
            .create_transfer(self.request(pb::CreateTransferRequest {
                idempotency_key: key.to_owned(),
                from_account_id: from.to_owned(),
                to_account_id: to.to_owned(),
                amount: Some(pb::Money {
                    amount_minor,
                    currency: currency.to_owned(),
                }),
                description: String::new(),
            }))
            .await
    }

    /// An account's balance in minor units and its version.
    pub async fn balance(&self, account_id: &str) -> anyhow::Result<(i64, i64)> {
        let balance = self
            .client()
            .get_balance(self.request(pb::GetBalanceRequest {
                account_id: account_id.to_owned(),
            }))
            .await?
            .into_inner()
            .balance
            .ok_or_else(|| anyhow::anyhow!("GetBalance answered no balance"))?;
        let amount = balance.balance.map(|m| m.amount_minor).unwrap_or_default();
        Ok((amount, balance.version))
    }
}

/// Whether a response was replayed from an idempotency key.
pub fn replayed<T>(response: &Response<T>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

/// The `ErrorInfo.reason` of a status, if any.
pub fn reason(status: &Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status.get_details_error_info().map(|info| info.reason)
}

/// The test cards of the sandbox acquirer.
pub mod cards {
    pub use payment_svc::acquirer::sandbox::{
        CARD_APPROVED, CARD_DECLINED, CARD_INSUFFICIENT_FUNDS, CARD_PROCESSING_ERROR,
        CARD_SLOW_APPROVED,
    };

    /// Every test card number.
    pub const ALL: [&str; 5] = [
        CARD_APPROVED,
        CARD_DECLINED,
        CARD_INSUFFICIENT_FUNDS,
        CARD_PROCESSING_ERROR,
        CARD_SLOW_APPROVED,
    ];
}

/// A CreatePayment request for `amount_minor` BRL on `card` into `merchant`.
pub fn payment_request(
    key: &str,
    merchant: &str,
    amount_minor: i64,
    card: &str,
) -> pb::CreatePaymentRequest {
    pb::CreatePaymentRequest {
        idempotency_key: key.to_owned(),
        merchant_account_id: merchant.to_owned(),
        amount: Some(pb::Money {
            amount_minor,
            currency: "BRL".to_owned(),
        }),
        card: Some(pb::CardInput {
            number: card.to_owned(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".to_owned(),
        }),
        ..Default::default()
    }
}

impl Tenant {
    /// CreatePayment.
    pub async fn pay(
        &self,
        request: pb::CreatePaymentRequest,
    ) -> Result<Response<pb::CreatePaymentResponse>, Status> {
        self.client().create_payment(self.request(request)).await
    }
}

/// `Some(money)` of `amount_minor` BRL.
pub fn brl(amount_minor: i64) -> Option<pb::Money> {
    Some(pb::Money {
        amount_minor,
        currency: "BRL".to_owned(),
    })
}

impl Tenant {
    /// CapturePayment; the whole authorized amount when `amount` is `None`.
    pub async fn capture(
        &self,
        key: &str,
        payment_id: &str,
        amount: Option<pb::Money>,
    ) -> Result<Response<pb::CapturePaymentResponse>, Status> {
        self.client()
            .capture_payment(self.request(pb::CapturePaymentRequest {
                idempotency_key: key.to_owned(),
                payment_id: payment_id.to_owned(),
                amount,
            }))
            .await
    }

    /// CancelPayment.
    pub async fn cancel(
        &self,
        key: &str,
        payment_id: &str,
    ) -> Result<Response<pb::CancelPaymentResponse>, Status> {
        self.client()
            .cancel_payment(self.request(pb::CancelPaymentRequest {
                idempotency_key: key.to_owned(),
                payment_id: payment_id.to_owned(),
            }))
            .await
    }

    /// RefundPayment; what remains refundable when `amount` is `None`.
    pub async fn refund(
        &self,
        key: &str,
        payment_id: &str,
        amount: Option<pb::Money>,
    ) -> Result<Response<pb::RefundPaymentResponse>, Status> {
        self.client()
            .refund_payment(self.request(pb::RefundPaymentRequest {
                idempotency_key: key.to_owned(),
                payment_id: payment_id.to_owned(),
                amount,
                reason: "requested_by_customer".to_owned(),
            }))
            .await
    }

    /// GetPayment.
    pub async fn payment(&self, payment_id: &str) -> anyhow::Result<pb::Payment> {
        self.client()
            .get_payment(self.request(pb::GetPaymentRequest {
                payment_id: payment_id.to_owned(),
            }))
            .await?
            .into_inner()
            .payment
            .ok_or_else(|| anyhow::anyhow!("GetPayment answered no payment"))
    }
}
