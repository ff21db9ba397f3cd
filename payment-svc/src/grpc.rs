//! The gRPC edge of payment-svc: the only module that sees protobuf types.
//!
//! Every RPC of the v1 contract is declared here. RPCs whose behaviour has not landed yet
//! answer UNIMPLEMENTED, naming the RPC.

use std::pin::Pin;

use proto::payments::v1::payment_admin_service_server::{
    PaymentAdminService, PaymentAdminServiceServer,
};
use proto::payments::v1::payment_service_server::{PaymentService, PaymentServiceServer};
use proto::payments::v1::{
    CancelPaymentRequest, CancelPaymentResponse, CapturePaymentRequest, CapturePaymentResponse,
    CreateAccountRequest, CreateAccountResponse, CreatePaymentRequest, CreatePaymentResponse,
    CreateTransferRequest, CreateTransferResponse, GetAccountRequest, GetAccountResponse,
    GetAuditTrailRequest, GetAuditTrailResponse, GetBalanceRequest, GetBalanceResponse,
    GetPaymentRequest, GetPaymentResponse, ListAccountsRequest, ListAccountsResponse,
    ListJobsRequest, ListJobsResponse, ListLedgerEntriesRequest, ListLedgerEntriesResponse,
    ListPaymentsRequest, ListPaymentsResponse, RefundPaymentRequest, RefundPaymentResponse,
    RetryJobRequest, RetryJobResponse, WatchBalanceRequest, WatchBalanceResponse,
    WatchPaymentEventsRequest, WatchPaymentEventsResponse,
};
use service_kit::ServiceSet;
use sqlx::PgPool;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Every service payment-svc serves.
pub(crate) fn services(pool: PgPool) -> ServiceSet {
    let api = PaymentApi { _pool: pool };
    ServiceSet::new("payment-svc")
        .add_service(PaymentServiceServer::new(api.clone()))
        .add_service(PaymentAdminServiceServer::new(api))
}

/// `paysuite.payments.v1.PaymentService` and `PaymentAdminService`.
#[derive(Debug, Clone)]
struct PaymentApi {
    _pool: PgPool,
}

/// The answer for RPCs whose behaviour lands with a later issue.
fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not available yet"))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
type RpcResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    type WatchBalanceStream = ResponseStream<WatchBalanceResponse>;
    type WatchPaymentEventsStream = ResponseStream<WatchPaymentEventsResponse>;

    async fn create_account(
        &self,
        _request: Request<CreateAccountRequest>,
    ) -> RpcResult<CreateAccountResponse> {
        Err(not_yet("CreateAccount"))
    }

    async fn get_account(
        &self,
        _request: Request<GetAccountRequest>,
    ) -> RpcResult<GetAccountResponse> {
        Err(not_yet("GetAccount"))
    }

    async fn list_accounts(
        &self,
        _request: Request<ListAccountsRequest>,
    ) -> RpcResult<ListAccountsResponse> {
        Err(not_yet("ListAccounts"))
    }

    async fn create_payment(
        &self,
        _request: Request<CreatePaymentRequest>,
    ) -> RpcResult<CreatePaymentResponse> {
        Err(not_yet("CreatePayment"))
    }

    async fn get_payment(
        &self,
        _request: Request<GetPaymentRequest>,
    ) -> RpcResult<GetPaymentResponse> {
        Err(not_yet("GetPayment"))
    }

    async fn list_payments(
        &self,
        _request: Request<ListPaymentsRequest>,
    ) -> RpcResult<ListPaymentsResponse> {
        Err(not_yet("ListPayments"))
    }

    async fn capture_payment(
        &self,
        _request: Request<CapturePaymentRequest>,
    ) -> RpcResult<CapturePaymentResponse> {
        Err(not_yet("CapturePayment"))
    }

    async fn cancel_payment(
        &self,
        _request: Request<CancelPaymentRequest>,
    ) -> RpcResult<CancelPaymentResponse> {
        Err(not_yet("CancelPayment"))
    }

    async fn refund_payment(
        &self,
        _request: Request<RefundPaymentRequest>,
    ) -> RpcResult<RefundPaymentResponse> {
        Err(not_yet("RefundPayment"))
    }

    async fn create_transfer(
        &self,
        _request: Request<CreateTransferRequest>,
    ) -> RpcResult<CreateTransferResponse> {
        Err(not_yet("CreateTransfer"))
    }

    async fn get_balance(
        &self,
        _request: Request<GetBalanceRequest>,
    ) -> RpcResult<GetBalanceResponse> {
        Err(not_yet("GetBalance"))
    }

    async fn list_ledger_entries(
        &self,
        _request: Request<ListLedgerEntriesRequest>,
    ) -> RpcResult<ListLedgerEntriesResponse> {
        Err(not_yet("ListLedgerEntries"))
    }

    async fn watch_balance(
        &self,
        _request: Request<WatchBalanceRequest>,
    ) -> RpcResult<Self::WatchBalanceStream> {
        Err(not_yet("WatchBalance"))
    }

    async fn watch_payment_events(
        &self,
        _request: Request<WatchPaymentEventsRequest>,
    ) -> RpcResult<Self::WatchPaymentEventsStream> {
        Err(not_yet("WatchPaymentEvents"))
    }
}

#[tonic::async_trait]
impl PaymentAdminService for PaymentApi {
    async fn get_audit_trail(
        &self,
        _request: Request<GetAuditTrailRequest>,
    ) -> RpcResult<GetAuditTrailResponse> {
        Err(not_yet("GetAuditTrail"))
    }

    async fn list_jobs(&self, _request: Request<ListJobsRequest>) -> RpcResult<ListJobsResponse> {
        Err(not_yet("ListJobs"))
    }

    async fn retry_job(&self, _request: Request<RetryJobRequest>) -> RpcResult<RetryJobResponse> {
        Err(not_yet("RetryJob"))
    }
}
