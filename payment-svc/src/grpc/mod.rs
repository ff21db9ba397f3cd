//! The gRPC edge of payment-svc: the only module that sees protobuf types.
//!
//! Each RPC: take the caller's identity (verified by the server before routing), parse
//! and validate the request into domain values (every bad field reported), run the work
//! (mutations in a task that outlives the caller, under an idempotency key), and convert
//! the result back. Streams run in their own tasks, wake on NOTIFY and read the tables.

mod convert;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use prost::Message;
use proto::payments::v1 as pb;
use proto::payments::v1::payment_admin_service_server::{
    PaymentAdminService, PaymentAdminServiceServer,
};
use proto::payments::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use service_kit::validation::Violations;
use service_kit::{Identity, ServiceSet};
use sqlx::PgPool;
use tokio_stream::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use crate::audit::{self, AuditEvent};
use crate::domain::card::{CardDetails, Cvc, Pan, check_expiry};
use crate::domain::money::DEFAULT_CURRENCY;
use crate::domain::{Currency, IdempotencyKey, Money};
use crate::error::Error;
use crate::idempotency::{self, Claim, REPLAYED_HEADER, Stored};
use crate::jobs;
use crate::ledger::{self, AccountKind, Movement, MovementKind, NewAccount};
use crate::payments::events;
use crate::payments::{
    self, Action, CaptureMethod, FollowUp, NewPayment, PaymentMode, PaymentStatus,
};

/// Settings of the gRPC edge.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The largest amount a request may move, in minor units.
    pub max_amount_minor: i64,
    /// The payment flow.
    pub payments: payments::Payments,
}

/// What streams wait on.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Wake-ups from NOTIFY.
    pub notifier: crate::notify::Notifier,
    /// The safety-net poll of every stream.
    pub poll_interval: std::time::Duration,
}

/// Every service payment-svc serves.
pub(crate) fn services(pool: PgPool, settings: ApiSettings, streams: StreamSettings) -> ServiceSet {
    let api = PaymentApi {
        pool,
        settings,
        streams,
    };
    ServiceSet::new("payment-svc")
        .add_service(PaymentServiceServer::new(api.clone()))
        .add_service(PaymentAdminServiceServer::new(api))
}

/// `paysuite.payments.v1.PaymentService` and `PaymentAdminService`.
#[derive(Debug, Clone)]
struct PaymentApi {
    pool: PgPool,
    settings: ApiSettings,
    streams: StreamSettings,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type RpcResult<T> = Result<Response<T>, Status>;

const MAX_LABELS: usize = 32;
const MAX_TEXT: usize = 500;

/// The verified caller (the server refuses paysuite RPCs without one before routing).
fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
    request
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("missing identity token"))
}

/// The request id from `x-request-id`, or a new one (then recorded on the call's span,
/// so errors logged for the call carry it; a caller's id is recorded by the RPC layer).
fn request_id<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            let generated = uuid::Uuid::new_v4().to_string();
            tracing::Span::current().record("request_id", generated.as_str());
            generated
        })
}

fn parse_key(violations: &mut Violations, key: &str) -> Option<IdempotencyKey> {
    violations.check("idempotency_key", IdempotencyKey::parse(key))
}

fn parse_currency(violations: &mut Violations, field: &str, code: &str) -> Option<Currency> {
    let code = if code.is_empty() {
        DEFAULT_CURRENCY
    } else {
        code
    };
    violations.check(field, Currency::parse(code))
}

fn parse_amount(
    violations: &mut Violations,
    field: &str,
    amount: Option<&pb::Money>,
    maximum: i64,
) -> Option<Money> {
    let Some(amount) = amount else {
        violations.add(field, "is required");
        return None;
    };
    let currency = parse_currency(violations, &format!("{field}.currency"), &amount.currency);
    let checked = currency.map(|c| Money::positive(amount.amount_minor, c, maximum));
    violations
        .check(&format!("{field}.amount_minor"), checked.transpose())
        .flatten()
}

fn check_id(violations: &mut Violations, field: &str, id: &str) {
    if id.is_empty() {
        violations.add(field, "is required");
    } else if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        violations.add(field, "is not a valid identifier");
    }
}

fn check_text(violations: &mut Violations, field: &str, text: &str) {
    if text.chars().count() > MAX_TEXT {
        violations.add(field, format!("must be at most {MAX_TEXT} characters"));
    }
    check_no_nul(violations, field, text);
}

/// PostgreSQL's text and jsonb cannot hold U+0000: refused here, as a field violation,
/// rather than failing the insert (found by the request fuzzer).
fn check_no_nul(violations: &mut Violations, field: &str, text: &str) {
    if text.contains('\0') {
        violations.add(field, "must not contain NUL (U+0000) characters");
    }
}

fn check_labels(violations: &mut Violations, field: &str, labels: &BTreeMap<String, String>) {
    if labels.len() > MAX_LABELS {
        violations.add(field, format!("at most {MAX_LABELS} entries"));
    }
    for (key, value) in labels {
        if key.is_empty() || key.len() > 64 {
            violations.add(format!("{field}[{key}]"), "keys are 1–64 characters");
        }
        if value.len() > 256 {
            violations.add(
                format!("{field}[{key}]"),
                "values are at most 256 characters",
            );
        }
        check_no_nul(violations, &format!("{field}[{key}]"), key);
        check_no_nul(violations, &format!("{field}[{key}]"), value);
    }
}

fn page_size(violations: &mut Violations, requested: i32, default: i64, maximum: i64) -> i64 {
    match i64::from(requested) {
        0 => default,
        size if (1..=maximum).contains(&size) => size,
        _ => {
            violations.add("page_size", format!("must be between 0 and {maximum}"));
            default
        }
    }
}

/// Where a page starts: `None` for the first page (no token); otherwise what `accept`
/// makes of the decoded token, which must name this request's principal and filter
/// (anything else is a `page_token` violation).
fn page_token<Token: DeserializeOwned, After>(
    violations: &mut Violations,
    token: &str,
    accept: impl FnOnce(Token) -> Option<After>,
) -> Option<After> {
    if token.is_empty() {
        return None;
    }
    let after = convert::decode_token::<Token>(token).and_then(accept);
    if after.is_none() {
        violations.add("page_token", "is not a page token of this request");
    }
    after
}

/// One page out of the `limit + 1` rows a list query fetched: the first `limit`, and the
/// token of the next page (empty on the last page), built from the page's last row.
fn page<T, Token: Serialize>(
    mut rows: Vec<T>,
    limit: i64,
    token: impl FnOnce(&T) -> Token,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(0);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = match rows.last() {
        Some(last) if more => convert::encode_token(&token(last)),
        _ => String::new(),
    };
    (rows, next)
}

/// A stored answer as the RPC's response (or status), marked when replayed.
fn answer<T: Message + Default>(outcome: idempotency::Outcome) -> RpcResult<T> {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if outcome.replayed {
        metadata.insert(REPLAYED_HEADER, MetadataValue::from_static("true"));
    }
    match outcome.stored {
        Stored::Response(bytes) => {
            let message = T::decode(bytes.as_slice()).map_err(|err| {
                Status::from(Error::Internal(format!(
                    "stored response does not decode: {err}"
                )))
            })?;
            let mut response = Response::new(message);
            *response.metadata_mut() = metadata;
            Ok(response)
        }
        Stored::Refusal {
            code,
            message,
            details,
        } => Err(Status::with_details_and_metadata(
            tonic::Code::from_i32(code),
            message,
            details.into(),
            metadata,
        )),
    }
}

impl PaymentApi {
    /// Runs `work` under the caller's idempotency key, in a task that outlives the caller.
    async fn idempotent<Req, Resp, F>(
        &self,
        method: &'static str,
        principal: &str,
        key: IdempotencyKey,
        normalized: &Req,
        work: F,
    ) -> RpcResult<Resp>
    where
        Req: Message,
        Resp: Message + Default,
        F: for<'c> FnMut(&'c mut sqlx::PgConnection) -> idempotency::Work<'c> + Send + 'static,
    {
        let fingerprint = idempotency::fingerprint(&normalized.encode_to_vec());
        let pool = self.pool.clone();
        let owner = principal.to_owned();
        // Spawned: a caller that disconnects or times out does not leave the work half done.
        let task = tokio::spawn(
            async move {
                let claim = Claim {
                    owner_id: &owner,
                    method,
                    key: &key,
                    fingerprint,
                };
                idempotency::run_atomic(&pool, &claim, work).await
            }
            .in_current_span(),
        );
        let outcome = task
            .await
            .map_err(|err| Status::from(Error::Internal(format!("request task failed: {err}"))))?
            .map_err(Status::from)?;
        answer(outcome)
    }

    /// Runs a capture, cancel or refund under the caller's idempotency key, in a task
    /// that outlives the caller.
    async fn follow_up<Req, Resp>(
        &self,
        method: &'static str,
        key: IdempotencyKey,
        normalized: &Req,
        follow_up: FollowUp,
        encode: payments::EncodeFollowUp,
    ) -> RpcResult<Resp>
    where
        Req: Message,
        Resp: Message + Default,
    {
        let fingerprint = idempotency::fingerprint(&normalized.encode_to_vec());
        let flow = self.settings.payments.clone();
        // Spawned: a caller that disconnects or times out does not leave the work half done.
        let task = tokio::spawn(
            async move {
                let owner = follow_up.owner_id.clone();
                let claim = Claim {
                    owner_id: &owner,
                    method,
                    key: &key,
                    fingerprint,
                };
                flow.follow_up(&claim, follow_up, encode).await
            }
            .in_current_span(),
        );
        let outcome = task
            .await
            .map_err(|err| Status::from(Error::Internal(format!("request task failed: {err}"))))?
            .map_err(Status::from)?;
        answer(outcome)
    }

    /// An optional amount: `Some(None)` when absent, `None` when invalid.
    fn optional_amount(
        &self,
        violations: &mut Violations,
        amount: Option<&pb::Money>,
    ) -> Option<Option<Money>> {
        match amount {
            None => Some(None),
            Some(amount) => parse_amount(
                violations,
                "amount",
                Some(amount),
                self.settings.max_amount_minor,
            )
            .map(Some),
        }
    }
}

const CREATE_ACCOUNT: &str = "/paysuite.payments.v1.PaymentService/CreateAccount";
const CREATE_TRANSFER: &str = "/paysuite.payments.v1.PaymentService/CreateTransfer";
const CREATE_PAYMENT: &str = "/paysuite.payments.v1.PaymentService/CreatePayment";
const RETRY_JOB: &str = "/paysuite.payments.v1.PaymentAdminService/RetryJob";
const CAPTURE_PAYMENT: &str = "/paysuite.payments.v1.PaymentService/CapturePayment";
const CANCEL_PAYMENT: &str = "/paysuite.payments.v1.PaymentService/CancelPayment";
const REFUND_PAYMENT: &str = "/paysuite.payments.v1.PaymentService/RefundPayment";

#[derive(Serialize, Deserialize)]
struct AuditPageToken {
    owner: String,
    entity_type: String,
    entity_id: String,
    after: i64,
}

/// Messages a stream buffers for a slow consumer (its task then waits; writers never do).
const STREAM_BUFFER: usize = 16;
/// The response header of WatchPaymentEvents naming the cursor the stream starts from.
pub const START_CURSOR_HEADER: &str = "x-paysuite-cursor";
/// How soon a stream looks again at events held back by a running transaction.
const HELD_BACK_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// Events read per query.
const EVENT_BATCH: i64 = 100;

/// A WatchPaymentEvents cursor: opaque to clients, bound to the principal.
#[derive(Serialize, Deserialize)]
struct EventCursor {
    owner: String,
    xid: i64,
    id: i64,
}

#[derive(Serialize, Deserialize)]
struct JobsPageToken {
    owner: String,
    state: i32,
    after: i64,
}

#[derive(Serialize, Deserialize)]
struct PaymentsPageToken {
    owner: String,
    status: i32,
    created_at_micros: i64,
    id: String,
}

fn parse_card(violations: &mut Violations, card: Option<&pb::CardInput>) -> Option<CardDetails> {
    let Some(card) = card else {
        violations.add("card", "is required");
        return None;
    };
    let pan = violations.check("card.number", Pan::parse(&card.number));
    let today = Utc::now();
    let expiry = violations.check(
        "card.exp_month",
        check_expiry(
            card.exp_month,
            card.exp_year,
            (
                chrono::Datelike::year(&today),
                chrono::Datelike::month(&today),
            ),
        ),
    );
    let cvc = if card.cvc.is_empty() {
        None
    } else {
        violations.check("card.cvc", Cvc::parse(&card.cvc))
    };
    let (pan, (exp_month, exp_year)) = (pan?, expiry?);
    Some(CardDetails {
        pan,
        exp_month,
        exp_year,
        cvc,
    })
}

fn payment_status_filter(status: i32) -> Result<Option<PaymentStatus>, ()> {
    Ok(match pb::PaymentStatus::try_from(status).map_err(|_| ())? {
        pb::PaymentStatus::Unspecified => None,
        pb::PaymentStatus::Pending => Some(PaymentStatus::Pending),
        pb::PaymentStatus::Processing => Some(PaymentStatus::Processing),
        pb::PaymentStatus::RequiresCapture => Some(PaymentStatus::RequiresCapture),
        pb::PaymentStatus::Succeeded => Some(PaymentStatus::Succeeded),
        pb::PaymentStatus::Failed => Some(PaymentStatus::Failed),
        pb::PaymentStatus::Canceled => Some(PaymentStatus::Canceled),
    })
}

#[derive(Serialize, Deserialize)]
struct AccountsPageToken {
    owner: String,
    /// Microseconds since the epoch: PostgreSQL's precision, so the key round-trips exactly.
    created_at_micros: i64,
    id: String,
}

#[derive(Serialize, Deserialize)]
struct EntriesPageToken {
    owner: String,
    account: String,
    after: i64,
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    type WatchBalanceStream = ResponseStream<pb::WatchBalanceResponse>;
    type WatchPaymentEventsStream = ResponseStream<pb::WatchPaymentEventsResponse>;

    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> RpcResult<pb::CreateAccountResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        let currency = parse_currency(&mut violations, "currency", &normalized.currency);
        let kind = match pb::AccountKind::try_from(normalized.kind) {
            Ok(pb::AccountKind::Customer) => Some(AccountKind::Customer),
            Ok(pb::AccountKind::Merchant) => Some(AccountKind::Merchant),
            _ => {
                violations.add(
                    "kind",
                    "must be ACCOUNT_KIND_CUSTOMER or ACCOUNT_KIND_MERCHANT",
                );
                None
            }
        };
        check_text(&mut violations, "display_name", &normalized.display_name);
        check_labels(&mut violations, "labels", &normalized.labels);
        violations.into_result()?;
        let (Some(key), Some(currency), Some(kind)) = (key, currency, kind) else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        normalized.currency = currency.code().to_owned();
        let new_account = NewAccount {
            owner_id: identity.principal.clone(),
            currency,
            kind,
            allow_negative: normalized.allow_negative,
            display_name: normalized.display_name.clone(),
            labels: normalized.labels.clone(),
        };
        let principal = identity.principal.clone();
        self.idempotent(
            CREATE_ACCOUNT,
            &identity.principal,
            key,
            &normalized,
            move |connection| {
                let new_account = new_account.clone();
                let principal = principal.clone();
                let request_id = request_id.clone();
                Box::pin(async move {
                    let account = ledger::create_account(connection, &new_account).await?;
                    let message = convert::account(&account);
                    audit::record(
                        connection,
                        AuditEvent {
                            owner_id: &account.owner_id,
                            principal: &principal,
                            action: "account.create",
                            entity_type: "account",
                            entity_id: &account.id,
                            before: None,
                            after: Some(serde_json::json!({
                                "currency": account.currency.code(),
                                "kind": format!("{:?}", account.kind).to_lowercase(),
                                "allow_negative": account.allow_negative,
                                "display_name": account.display_name,
                            })),
                            request_id: &request_id,
                        },
                    )
                    .await?;
                    Ok(pb::CreateAccountResponse {
                        account: Some(message),
                    }
                    .encode_to_vec())
                })
            },
        )
        .await
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> RpcResult<pb::GetAccountResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        check_id(&mut violations, "account_id", &request.account_id);
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let account =
            ledger::get_account(&mut connection, &identity.principal, &request.account_id).await?;
        Ok(Response::new(pb::GetAccountResponse {
            account: Some(convert::account(&account)),
        }))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> RpcResult<pb::ListAccountsResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = page_size(&mut violations, request.page_size, 20, 100);
        let after = page_token(
            &mut violations,
            &request.page_token,
            |token: AccountsPageToken| {
                (token.owner == identity.principal)
                    .then(|| DateTime::<Utc>::from_timestamp_micros(token.created_at_micros))
                    .flatten()
                    .map(|at| (at, token.id))
            },
        );
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let accounts = ledger::list_accounts(
            &mut connection,
            &identity.principal,
            after.as_ref(),
            limit + 1,
        )
        .await?;
        let (page, next_page_token) = page(accounts, limit, |last| AccountsPageToken {
            owner: identity.principal.clone(),
            created_at_micros: last.created_at.timestamp_micros(),
            id: last.id.clone(),
        });
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: page.iter().map(convert::account).collect(),
            next_page_token,
        }))
    }

    async fn create_payment(
        &self,
        request: Request<pb::CreatePaymentRequest>,
    ) -> RpcResult<pb::CreatePaymentResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        check_id(
            &mut violations,
            "merchant_account_id",
            &normalized.merchant_account_id,
        );
        let amount = parse_amount(
            &mut violations,
            "amount",
            normalized.amount.as_ref(),
            self.settings.max_amount_minor,
        );
        let card = parse_card(&mut violations, normalized.card.as_ref());
        let capture_method = match pb::CaptureMethod::try_from(normalized.capture_method) {
            Ok(pb::CaptureMethod::Unspecified | pb::CaptureMethod::Automatic) => {
                Some(CaptureMethod::Automatic)
            }
            Ok(pb::CaptureMethod::Manual) => Some(CaptureMethod::Manual),
            Err(_) => {
                violations.add("capture_method", "is not a capture method");
                None
            }
        };
        let mode = match pb::PaymentMode::try_from(normalized.mode) {
            Ok(pb::PaymentMode::Unspecified | pb::PaymentMode::Sync) => Some(PaymentMode::Sync),
            Ok(pb::PaymentMode::Async) => Some(PaymentMode::Async),
            Err(_) => {
                violations.add("mode", "is not a payment mode");
                None
            }
        };
        check_text(&mut violations, "description", &normalized.description);
        check_labels(&mut violations, "metadata", &normalized.metadata);
        violations.into_result()?;
        let (Some(key), Some(amount), Some(card), Some(capture_method), Some(mode)) =
            (key, amount, card, capture_method, mode)
        else {
            return Err(Status::internal("validation passed without values"));
        };
        // The fingerprint covers the request with defaults applied, without its key, and
        // without the CVC (which is never stored anywhere).
        normalized.idempotency_key.clear();
        normalized.amount = Some(convert::money(amount));
        normalized.capture_method = match capture_method {
            CaptureMethod::Automatic => pb::CaptureMethod::Automatic,
            CaptureMethod::Manual => pb::CaptureMethod::Manual,
        } as i32;
        normalized.mode = convert::payment_mode(mode) as i32;
        if let Some(card) = normalized.card.as_mut() {
            card.cvc.clear();
        }
        let fingerprint = idempotency::fingerprint(&normalized.encode_to_vec());
        let new_payment = NewPayment {
            owner_id: identity.principal.clone(),
            merchant_account_id: normalized.merchant_account_id.clone(),
            amount,
            card,
            capture_method,
            mode,
            description: normalized.description.clone(),
            metadata: normalized.metadata.clone(),
            request_id,
        };
        let flow = self.settings.payments.clone();
        let owner = identity.principal.clone();
        let encode: payments::Encode = Arc::new(|payment| {
            pb::CreatePaymentResponse {
                payment: Some(convert::payment(payment)),
            }
            .encode_to_vec()
        });
        // Spawned: a caller that disconnects or times out does not leave the payment half done.
        let task = tokio::spawn(
            async move {
                let claim = Claim {
                    owner_id: &owner,
                    method: CREATE_PAYMENT,
                    key: &key,
                    fingerprint,
                };
                flow.create(&claim, new_payment, encode).await
            }
            .in_current_span(),
        );
        let outcome = task
            .await
            .map_err(|err| Status::from(Error::Internal(format!("request task failed: {err}"))))?
            .map_err(Status::from)?;
        answer(outcome)
    }

    async fn get_payment(
        &self,
        request: Request<pb::GetPaymentRequest>,
    ) -> RpcResult<pb::GetPaymentResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        check_id(&mut violations, "payment_id", &request.payment_id);
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let payment =
            payments::get(&mut connection, &identity.principal, &request.payment_id).await?;
        Ok(Response::new(pb::GetPaymentResponse {
            payment: Some(convert::payment(&payment)),
        }))
    }

    async fn list_payments(
        &self,
        request: Request<pb::ListPaymentsRequest>,
    ) -> RpcResult<pb::ListPaymentsResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = page_size(&mut violations, request.page_size, 20, 100);
        let status = match payment_status_filter(request.status) {
            Ok(status) => status,
            Err(()) => {
                violations.add("status", "is not a payment status");
                None
            }
        };
        let after = page_token(
            &mut violations,
            &request.page_token,
            |token: PaymentsPageToken| {
                (token.owner == identity.principal && token.status == request.status)
                    .then(|| DateTime::<Utc>::from_timestamp_micros(token.created_at_micros))
                    .flatten()
                    .map(|at| (at, token.id))
            },
        );
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let found = payments::list(
            &mut connection,
            &identity.principal,
            status,
            after.as_ref(),
            limit + 1,
        )
        .await?;
        let (page, next_page_token) = page(found, limit, |last| PaymentsPageToken {
            owner: identity.principal.clone(),
            status: request.status,
            created_at_micros: last.created_at.timestamp_micros(),
            id: last.id.clone(),
        });
        Ok(Response::new(pb::ListPaymentsResponse {
            payments: page.iter().map(convert::payment).collect(),
            next_page_token,
        }))
    }

    async fn capture_payment(
        &self,
        request: Request<pb::CapturePaymentRequest>,
    ) -> RpcResult<pb::CapturePaymentResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        check_id(&mut violations, "payment_id", &normalized.payment_id);
        let amount = self.optional_amount(&mut violations, normalized.amount.as_ref());
        violations.into_result()?;
        let (Some(key), Some(amount)) = (key, amount) else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        normalized.amount = amount.map(convert::money);
        let follow_up = FollowUp {
            owner_id: identity.principal.clone(),
            payment_id: normalized.payment_id.clone(),
            action: Action::Capture { amount },
            request_id,
        };
        let encode: payments::EncodeFollowUp = Arc::new(|payment, _| {
            pb::CapturePaymentResponse {
                payment: Some(convert::payment(payment)),
            }
            .encode_to_vec()
        });
        self.follow_up(CAPTURE_PAYMENT, key, &normalized, follow_up, encode)
            .await
    }

    async fn cancel_payment(
        &self,
        request: Request<pb::CancelPaymentRequest>,
    ) -> RpcResult<pb::CancelPaymentResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        check_id(&mut violations, "payment_id", &normalized.payment_id);
        violations.into_result()?;
        let Some(key) = key else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        let follow_up = FollowUp {
            owner_id: identity.principal.clone(),
            payment_id: normalized.payment_id.clone(),
            action: Action::Cancel,
            request_id,
        };
        let encode: payments::EncodeFollowUp = Arc::new(|payment, _| {
            pb::CancelPaymentResponse {
                payment: Some(convert::payment(payment)),
            }
            .encode_to_vec()
        });
        self.follow_up(CANCEL_PAYMENT, key, &normalized, follow_up, encode)
            .await
    }

    async fn refund_payment(
        &self,
        request: Request<pb::RefundPaymentRequest>,
    ) -> RpcResult<pb::RefundPaymentResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        check_id(&mut violations, "payment_id", &normalized.payment_id);
        let amount = self.optional_amount(&mut violations, normalized.amount.as_ref());
        check_text(&mut violations, "reason", &normalized.reason);
        violations.into_result()?;
        let (Some(key), Some(amount)) = (key, amount) else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        normalized.amount = amount.map(convert::money);
        let follow_up = FollowUp {
            owner_id: identity.principal.clone(),
            payment_id: normalized.payment_id.clone(),
            action: Action::Refund {
                amount,
                reason: normalized.reason.clone(),
            },
            request_id,
        };
        let encode: payments::EncodeFollowUp = Arc::new(|payment, refund| {
            pb::RefundPaymentResponse {
                refund: refund.map(convert::refund),
                payment: Some(convert::payment(payment)),
            }
            .encode_to_vec()
        });
        self.follow_up(REFUND_PAYMENT, key, &normalized, follow_up, encode)
            .await
    }

    async fn create_transfer(
        &self,
        request: Request<pb::CreateTransferRequest>,
    ) -> RpcResult<pb::CreateTransferResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        check_id(
            &mut violations,
            "from_account_id",
            &normalized.from_account_id,
        );
        check_id(&mut violations, "to_account_id", &normalized.to_account_id);
        if !normalized.to_account_id.is_empty()
            && normalized.to_account_id == normalized.from_account_id
        {
            violations.add("to_account_id", "must differ from from_account_id");
        }
        let amount = parse_amount(
            &mut violations,
            "amount",
            normalized.amount.as_ref(),
            self.settings.max_amount_minor,
        );
        check_text(&mut violations, "description", &normalized.description);
        violations.into_result()?;
        let (Some(key), Some(amount)) = (key, amount) else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        normalized.amount = Some(convert::money(amount));
        let principal = identity.principal.clone();
        let transfer = normalized.clone();
        self.idempotent(
            CREATE_TRANSFER,
            &identity.principal,
            key,
            &normalized,
            move |connection| {
                let principal = principal.clone();
                let transfer = transfer.clone();
                let request_id = request_id.clone();
                Box::pin(async move {
                    // The debited account must be the caller's; the credited one may be anyone's.
                    ledger::get_account(connection, &principal, &transfer.from_account_id).await?;
                    let transfer_id = ledger::new_id("tr");
                    let posted = ledger::post(
                        connection,
                        &Movement {
                            owner_id: principal.clone(),
                            kind: MovementKind::Transfer,
                            reference_id: transfer_id.clone(),
                            from_account_id: transfer.from_account_id.clone(),
                            to_account_id: transfer.to_account_id.clone(),
                            amount,
                            description: transfer.description.clone(),
                        },
                    )
                    .await?;
                    audit::record(
                        connection,
                        AuditEvent {
                            owner_id: &principal,
                            principal: &principal,
                            action: "transfer.create",
                            entity_type: "transfer",
                            entity_id: &transfer_id,
                            before: None,
                            after: Some(serde_json::json!({
                                "from_account_id": transfer.from_account_id,
                                "to_account_id": transfer.to_account_id,
                                "amount_minor": amount.amount_minor(),
                                "currency": amount.currency().code(),
                                "movement_id": posted.movement_id,
                            })),
                            request_id: &request_id,
                        },
                    )
                    .await?;
                    Ok(pb::CreateTransferResponse {
                        transfer: Some(pb::Transfer {
                            id: transfer_id,
                            from_account_id: transfer.from_account_id,
                            to_account_id: transfer.to_account_id,
                            amount: Some(convert::money(amount)),
                            description: transfer.description,
                            create_time: Some(convert::timestamp(posted.created_at)),
                        }),
                    }
                    .encode_to_vec())
                })
            },
        )
        .await
    }

    async fn get_balance(
        &self,
        request: Request<pb::GetBalanceRequest>,
    ) -> RpcResult<pb::GetBalanceResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        check_id(&mut violations, "account_id", &request.account_id);
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let balance =
            ledger::balance(&mut connection, &identity.principal, &request.account_id).await?;
        Ok(Response::new(pb::GetBalanceResponse {
            balance: Some(convert::balance(&request.account_id, balance)),
        }))
    }

    async fn list_ledger_entries(
        &self,
        request: Request<pb::ListLedgerEntriesRequest>,
    ) -> RpcResult<pb::ListLedgerEntriesResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        check_id(&mut violations, "account_id", &request.account_id);
        let limit = page_size(&mut violations, request.page_size, 100, 500);
        let after = page_token(
            &mut violations,
            &request.page_token,
            |token: EntriesPageToken| {
                (token.owner == identity.principal && token.account == request.account_id)
                    .then_some(token.after)
            },
        )
        .unwrap_or(0);
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let entries = ledger::list_entries(
            &mut connection,
            &identity.principal,
            &request.account_id,
            after,
            limit + 1,
        )
        .await?;
        let (page, next_page_token) = page(entries, limit, |last| EntriesPageToken {
            owner: identity.principal.clone(),
            account: request.account_id.clone(),
            after: last.position,
        });
        Ok(Response::new(pb::ListLedgerEntriesResponse {
            entries: page.iter().map(convert::entry).collect(),
            next_page_token,
        }))
    }

    async fn watch_balance(
        &self,
        request: Request<pb::WatchBalanceRequest>,
    ) -> RpcResult<Self::WatchBalanceStream> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        check_id(&mut violations, "account_id", &request.account_id);
        violations.into_result()?;
        let owner = identity.principal;
        let account_id = request.account_id;
        // The current balance first; another tenant's account is NOT_FOUND before any stream.
        let first = {
            let mut connection = self.pool.acquire().await.map_err(Error::from)?;
            ledger::balance(&mut connection, &owner, &account_id).await?
        };
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let pool = self.pool.clone();
        let mut wake = self.streams.notifier.ledger();
        let poll = self.streams.poll_interval;
        tokio::spawn(
            async move {
                let mut version = first.version;
                let message = |balance| pb::WatchBalanceResponse {
                    balance: Some(convert::balance(&account_id, balance)),
                };
                if sender.send(Ok(message(first))).await.is_err() {
                    return;
                }
                loop {
                    // A slow consumer is not sent every change: when it takes the next
                    // message, it gets the balance as it is then (the version shows the jump).
                    tokio::select! {
                        _ = wake.changed() => {}
                        () = tokio::time::sleep(poll) => {}
                        () = sender.closed() => return,
                    }
                    wake.borrow_and_update();
                    let balance = match pool.acquire().await {
                        Ok(mut connection) => {
                            ledger::balance(&mut connection, &owner, &account_id).await
                        }
                        Err(err) => Err(Error::from(err)),
                    };
                    match balance {
                        Ok(balance) if balance.version > version => {
                            version = balance.version;
                            if sender.send(Ok(message(balance))).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(err) => {
                            let _ = sender.send(Err(Status::from(err))).await;
                            return;
                        }
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn watch_payment_events(
        &self,
        request: Request<pb::WatchPaymentEventsRequest>,
    ) -> RpcResult<Self::WatchPaymentEventsStream> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let owner = identity.principal;
        let mut violations = Violations::new();
        let resume = page_token(&mut violations, &request.cursor, |token: EventCursor| {
            (token.owner == owner).then_some(events::Cursor {
                xid: token.xid,
                id: token.id,
            })
        });
        violations.into_result()?;
        let (mut cursor, already_committed) = match resume {
            Some(cursor) => (cursor, Vec::new()),
            None => {
                let mut connection = self.pool.acquire().await.map_err(Error::from)?;
                events::current_cursor(&mut connection, &owner).await?
            }
        };
        let already_committed: std::collections::BTreeSet<i64> =
            already_committed.into_iter().collect();
        // Where this stream starts, for a consumer whose stream breaks before its first
        // event: resuming from it delivers what this stream would have, plus the events
        // committed just before it began (`already_committed`, skipped here).
        let start = convert::encode_token(&EventCursor {
            owner: owner.clone(),
            xid: cursor.xid,
            id: cursor.id,
        });
        let (sender, receiver) = tokio::sync::mpsc::channel(STREAM_BUFFER);
        let pool = self.pool.clone();
        let mut wake = self.streams.notifier.events();
        let poll = self.streams.poll_interval;
        tokio::spawn(
            async move {
                loop {
                    wake.borrow_and_update();
                    // After a batch that is not full, are events still held back behind
                    // a transaction (any in the cluster: xmin is cluster-wide)? Those need
                    // a look again soon, whether or not this batch delivered anything:
                    // their notification may have come and gone already.
                    let batch = match pool.acquire().await {
                        Ok(mut connection) => {
                            match events::after(&mut connection, &owner, cursor, EVENT_BATCH).await
                            {
                                Ok(batch) if (batch.len() as i64) < EVENT_BATCH => {
                                    let last = batch.last().map_or(cursor, |event| event.cursor);
                                    events::held_back(&mut connection, &owner, last)
                                        .await
                                        .map(|held| (batch, held))
                                }
                                other => other.map(|batch| (batch, false)),
                            }
                        }
                        Err(err) => Err(Error::from(err)),
                    };
                    let (batch, held) = match batch {
                        Ok(found) => found,
                        Err(err) => {
                            let _ = sender.send(Err(Status::from(err))).await;
                            return;
                        }
                    };
                    let full = batch.len() as i64 == EVENT_BATCH;
                    for event in batch {
                        cursor = event.cursor;
                        if already_committed.contains(&event.id) {
                            continue;
                        }
                        let token = convert::encode_token(&EventCursor {
                            owner: owner.clone(),
                            xid: cursor.xid,
                            id: cursor.id,
                        });
                        let message = pb::WatchPaymentEventsResponse {
                            event: Some(convert::event(&event, token)),
                        };
                        if sender.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    if full {
                        continue;
                    }
                    // Events wait behind a transaction that has not ended: look again soon
                    // (it may roll back or die without notifying anyone).
                    let wait = if held { HELD_BACK_RETRY } else { poll };
                    tokio::select! {
                        _ = wake.changed() => {}
                        () = tokio::time::sleep(wait) => {}
                        () = sender.closed() => return,
                    }
                }
            }
            .in_current_span(),
        );
        let mut response = Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )) as Self::WatchPaymentEventsStream);
        // The token is URL-safe base64, always a valid header value.
        if let Ok(value) = start.parse() {
            response.metadata_mut().insert(START_CURSOR_HEADER, value);
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl PaymentAdminService for PaymentApi {
    async fn get_audit_trail(
        &self,
        request: Request<pb::GetAuditTrailRequest>,
    ) -> RpcResult<pb::GetAuditTrailResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = page_size(&mut violations, request.page_size, 100, 500);
        let after = page_token(
            &mut violations,
            &request.page_token,
            |token: AuditPageToken| {
                (token.owner == identity.principal
                    && token.entity_type == request.entity_type
                    && token.entity_id == request.entity_id)
                    .then_some(token.after)
            },
        )
        .unwrap_or(0);
        violations.into_result()?;
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let records = audit::list(
            &mut connection,
            non_empty(&request.entity_type).as_deref(),
            non_empty(&request.entity_id).as_deref(),
            after,
            limit + 1,
        )
        .await?;
        let (page, next_page_token) = page(records, limit, |last| AuditPageToken {
            owner: identity.principal.clone(),
            entity_type: request.entity_type.clone(),
            entity_id: request.entity_id.clone(),
            after: last.id,
        });
        Ok(Response::new(pb::GetAuditTrailResponse {
            records: page.iter().map(convert::audit_record).collect(),
            next_page_token,
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> RpcResult<pb::ListJobsResponse> {
        let identity = caller(&request)?;
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = page_size(&mut violations, request.page_size, 100, 500);
        let state = match convert::job_state_filter(request.state) {
            Ok(state) => state,
            Err(()) => {
                violations.add("state", "is not a job state");
                None
            }
        };
        let after = page_token(
            &mut violations,
            &request.page_token,
            |token: JobsPageToken| {
                (token.owner == identity.principal && token.state == request.state)
                    .then_some(token.after)
            },
        )
        .unwrap_or(0);
        violations.into_result()?;
        let mut connection = self.pool.acquire().await.map_err(Error::from)?;
        let found = jobs::list(&mut connection, state, after, limit + 1).await?;
        let (page, next_page_token) = page(found, limit, |last| JobsPageToken {
            owner: identity.principal.clone(),
            state: request.state,
            after: last.id,
        });
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.iter().map(convert::job).collect(),
            next_page_token,
        }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> RpcResult<pb::RetryJobResponse> {
        let identity = caller(&request)?;
        let request_id = request_id(&request);
        let mut normalized = request.into_inner();
        let mut violations = Violations::new();
        let key = parse_key(&mut violations, &normalized.idempotency_key);
        if normalized.job_id <= 0 {
            violations.add("job_id", "must be a job id");
        }
        violations.into_result()?;
        let Some(key) = key else {
            return Err(Status::internal("validation passed without values"));
        };
        normalized.idempotency_key.clear();
        let job_id = normalized.job_id;
        let principal = identity.principal.clone();
        self.idempotent(
            RETRY_JOB,
            &identity.principal,
            key,
            &normalized,
            move |connection| {
                let principal = principal.clone();
                let request_id = request_id.clone();
                Box::pin(async move {
                    let job = jobs::retry_dead(connection, job_id).await?;
                    audit::record(
                        connection,
                        AuditEvent {
                            owner_id: &job.owner_id,
                            principal: &principal,
                            action: "job.retry",
                            entity_type: "job",
                            entity_id: &job.id.to_string(),
                            before: Some(serde_json::json!({ "state": "dead" })),
                            after: Some(serde_json::json!({ "state": job.state.as_str() })),
                            request_id: &request_id,
                        },
                    )
                    .await?;
                    Ok(pb::RetryJobResponse {
                        job: Some(convert::job(&job)),
                    }
                    .encode_to_vec())
                })
            },
        )
        .await
    }
}
