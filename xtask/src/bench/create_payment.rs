//! The `create-payment` workload of the `payments` scenario: `PaymentService/CreatePayment`
//! through gateway-svc, SYNC with automatic capture, the sandbox's approved test card
//! [`CARD_NUMBER`], [`AMOUNT_MINOR`] [`CURRENCY`], a unique idempotency key per call
//! (`bench-<run>-<sequence>`, the run a random tag), to a merchant account drawn from a
//! file of account ids (one for the hot merchant, many for uniform traffic).
//!
//! Every answer is checked: a payment that SUCCEEDED, fully captured, for the merchant
//! and the amount asked; anything else counts as an error.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::payments::v1 as pb;
use proto::payments::v1::payment_service_client::PaymentServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use super::check::{ENV_API_KEY, spread_key};
use super::load::{CallFuture, Workload};

/// The workload's name (see [`super::workload`]).
pub const CREATE_PAYMENT_WORKLOAD: &str = "create-payment";

/// The sandbox acquirer's always-approved test card.
pub const CARD_NUMBER: &str = "4242424242424242";
/// What every payment is for.
pub const AMOUNT_MINOR: i64 = 1999;
pub const CURRENCY: &str = "BRL";

/// The request of call `key` to `merchant`: what the generator sends and what the
/// capture sends (so the captured statements are those of a measured call).
pub fn request(key: String, merchant: String) -> pb::CreatePaymentRequest {
    pb::CreatePaymentRequest {
        idempotency_key: key,
        merchant_account_id: merchant,
        amount: Some(pb::Money {
            amount_minor: AMOUNT_MINOR,
            currency: CURRENCY.to_owned(),
        }),
        card: Some(pb::CardInput {
            number: CARD_NUMBER.to_owned(),
            exp_month: 12,
            exp_year: 2034,
            cvc: "123".to_owned(),
        }),
        capture_method: pb::CaptureMethod::Automatic.into(),
        mode: pb::PaymentMode::Sync.into(),
        description: String::new(),
        metadata: Default::default(),
    }
}

/// Checks an answer: SUCCEEDED, fully captured, for `merchant` and the amount asked.
pub fn check_answer(payment: Option<&pb::Payment>, merchant: &str) -> Result<(), String> {
    let payment = payment.ok_or_else(|| "an answer without a payment".to_owned())?;
    if payment.status != i32::from(pb::PaymentStatus::Succeeded) {
        return Err(format!(
            "a payment in status {:?}, not SUCCEEDED",
            pb::PaymentStatus::try_from(payment.status)
        ));
    }
    if payment.merchant_account_id != merchant {
        return Err("a payment for another merchant".to_owned());
    }
    let captured = payment.amount_captured.as_ref().map(|m| m.amount_minor);
    if captured != Some(AMOUNT_MINOR) {
        return Err(format!("{captured:?} captured, not {AMOUNT_MINOR}"));
    }
    Ok(())
}

/// The generator's side: CreatePayment calls over several connections.
#[derive(Debug)]
pub struct CreatePaymentWorkload {
    channels: Vec<Channel>,
    authorization: MetadataValue<Ascii>,
    merchants: Vec<String>,
    run: String,
}

impl CreatePaymentWorkload {
    /// Parameters: `merchants=<file>` (account ids, one a line), `run=<tag>` (makes the
    /// idempotency keys unique across runs); the API key comes from `BENCH_API_KEY`.
    pub fn from_params(params: &BTreeMap<String, String>) -> anyhow::Result<Self> {
        let file = params
            .get("merchants")
            .context("the create-payment workload needs merchants=<file>")?;
        let merchants = read_merchants(
            &std::fs::read_to_string(file)
                .with_context(|| format!("reading the merchant accounts from {file}"))?,
        )?;
        let run = params
            .get("run")
            .context("the create-payment workload needs run=<tag>")?
            .clone();
        let key = std::env::var(ENV_API_KEY)
            .ok()
            .filter(|key| !key.is_empty())
            .with_context(|| format!("{ENV_API_KEY} is not set"))?;
        let authorization = format!("Bearer {key}")
            .parse()
            .map_err(|_| anyhow::anyhow!("{ENV_API_KEY} is not a valid header value"))?;
        Ok(Self {
            channels: Vec::new(),
            authorization,
            merchants,
            run,
        })
    }
}

/// Account ids, one a line (blank lines skipped); at least one.
pub fn read_merchants(text: &str) -> anyhow::Result<Vec<String>> {
    let merchants: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    if merchants.is_empty() {
        bail!("no merchant account ids");
    }
    Ok(merchants)
}

impl Workload for CreatePaymentWorkload {
    fn connect(&mut self, address: &str, connections: usize) -> CallFuture {
        let endpoint = Endpoint::from_shared(address.to_owned()).map(|endpoint| {
            endpoint
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(5))
        });
        match endpoint {
            Ok(endpoint) => {
                self.channels = (0..connections).map(|_| endpoint.connect_lazy()).collect();
                Box::pin(async { Ok(()) })
            }
            Err(err) => {
                let err = err.to_string();
                Box::pin(async move { Err(err) })
            }
        }
    }

    fn call(&self, sequence: u64) -> CallFuture {
        let Some(channel) = self
            .channels
            .get(usize::try_from(sequence).unwrap_or(0) % self.channels.len().max(1))
            .cloned()
        else {
            return Box::pin(async { Err("not connected".to_owned()) });
        };
        let index =
            usize::try_from(spread_key(sequence) % self.merchants.len() as u64).unwrap_or_default();
        let merchant = self.merchants[index].clone();
        // Call 0 is the readiness probe, repeated until it succeeds: a key per attempt.
        let key = if sequence == 0 {
            format!("bench-{}-ready-{}", self.run, uniq())
        } else {
            format!("bench-{}-{sequence}", self.run)
        };
        let mut request = tonic::Request::new(request(key, merchant.clone()));
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        Box::pin(async move {
            let response = PaymentServiceClient::new(channel)
                .create_payment(request)
                .await
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
            check_answer(response.into_inner().payment.as_ref(), &merchant)
        })
    }
}

/// A value unique within this process (nanoseconds since the epoch).
fn uniq() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchants_are_read_one_a_line() -> anyhow::Result<()> {
        assert_eq!(read_merchants("a\n\n b \n")?, ["a", "b"]);
        assert!(read_merchants("\n").is_err());
        Ok(())
    }

    #[test]
    fn only_a_captured_payment_for_the_merchant_passes() {
        let mut payment = pb::Payment {
            merchant_account_id: "m".to_owned(),
            status: pb::PaymentStatus::Succeeded.into(),
            amount_captured: Some(pb::Money {
                amount_minor: AMOUNT_MINOR,
                currency: CURRENCY.to_owned(),
            }),
            ..Default::default()
        };
        assert_eq!(check_answer(Some(&payment), "m"), Ok(()));
        assert!(check_answer(Some(&payment), "other").is_err());
        payment.status = pb::PaymentStatus::RequiresCapture.into();
        assert!(check_answer(Some(&payment), "m").is_err());
        assert!(check_answer(None, "m").is_err());
    }
}
