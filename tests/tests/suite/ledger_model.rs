//! Model-based test of the ledger through payment-svc: proptest generates sequences of
//! transfers, payments, refunds and retries (reusing idempotency keys, sometimes with a
//! different request), runs them against the real service and PostgreSQL, and checks
//! every answer and every balance against a small in-memory model of the rules.
//!
//! Each case runs as a fresh principal with fresh accounts, so cases share one database
//! and one service. Proptest drives a synchronous closure; each case blocks on the async
//! workload inside `block_in_place` (multi-threaded runtime).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use payment_svc::acquirer::sandbox::{Sandbox, SandboxSettings};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use proto::payments::v1 as pb;
use tests::payments::{Tenant, brl, cards, payment_request, reason, replayed};
use tests::postgres::TestDatabase;
use tests::services;
use tonic::Code;

/// Customer accounts (non-negative), merchants (non-negative), and one funding account
/// allowed to go negative.
const CUSTOMERS: usize = 3;
const MERCHANTS: usize = 2;
const FUNDING: usize = CUSTOMERS + MERCHANTS;

#[derive(Debug, Clone)]
enum Op {
    /// Move `amount` between two accounts (indexes into the case's accounts).
    Transfer { from: usize, to: usize, amount: i64 },
    /// A card payment into a merchant; `approved` picks the approved or the declined card.
    Pay {
        merchant: usize,
        amount: i64,
        approved: bool,
    },
    /// Refund `amount` of the `payment`-th payment made so far (modulo).
    Refund { payment: usize, amount: i64 },
    /// Send the `op`-th earlier request again, with its key: the first answer replays.
    Retry { op: usize },
    /// Reuse the `op`-th earlier key for a different request: refused, nothing changes.
    Reuse { op: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=FUNDING, 0..=FUNDING, 1..3_000i64)
            .prop_filter("distinct accounts", |(from, to, _)| from != to)
            .prop_map(|(from, to, amount)| Op::Transfer { from, to, amount }),
        3 => (0..MERCHANTS, 1..5_000i64, prop::bool::weighted(0.8))
            .prop_map(|(merchant, amount, approved)| Op::Pay { merchant, amount, approved }),
        2 => (0..16usize, 1..3_000i64).prop_map(|(payment, amount)| Op::Refund { payment, amount }),
        2 => (0..64usize).prop_map(|op| Op::Retry { op }),
        1 => (0..64usize).prop_map(|op| Op::Reuse { op }),
    ]
}

/// What the service answered, reduced to what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok,
    Refused(String),
}

/// A request as sent, so that it can be sent again.
#[derive(Debug, Clone)]
enum Sent {
    Transfer {
        key: String,
        from: String,
        to: String,
        amount: i64,
    },
    Pay {
        key: String,
        merchant: String,
        amount: i64,
        card: &'static str,
    },
    Refund {
        key: String,
        payment: String,
        amount: i64,
    },
}

#[derive(Debug, Default)]
struct Model {
    balances: BTreeMap<String, i64>,
    /// Per payment: merchant, captured, refunded.
    payments: Vec<(String, String, i64, i64)>,
    sent: Vec<(Sent, Answer)>,
}

impl Model {
    fn transfer(&mut self, from: &str, to: &str, amount: i64, funding: &str) -> Answer {
        let balance = self.balances.get(from).copied().unwrap_or_default();
        if from != funding && balance < amount {
            return Answer::Refused("INSUFFICIENT_FUNDS".to_owned());
        }
        *self.balances.entry(from.to_owned()).or_default() -= amount;
        *self.balances.entry(to.to_owned()).or_default() += amount;
        Answer::Ok
    }

    fn refund(&mut self, index: usize, amount: i64) -> Answer {
        let Some((_, merchant, captured, refunded)) = self.payments.get(index).cloned() else {
            return Answer::Refused("missing".to_owned());
        };
        if amount > captured - refunded {
            return Answer::Refused("AMOUNT_EXCEEDS_REFUNDABLE".to_owned());
        }
        if self.balances.get(&merchant).copied().unwrap_or_default() < amount {
            return Answer::Refused("INSUFFICIENT_FUNDS".to_owned());
        }
        *self.balances.entry(merchant).or_default() -= amount;
        if let Some(payment) = self.payments.get_mut(index) {
            payment.3 += amount;
        }
        Answer::Ok
    }
}

fn answer_of<T>(result: Result<tonic::Response<T>, tonic::Status>) -> (Answer, bool) {
    match result {
        Ok(response) => (Answer::Ok, replayed(&response)),
        Err(status) if status.code() == Code::FailedPrecondition => (
            Answer::Refused(reason(&status).unwrap_or_default()),
            // A replayed refusal carries the header in its trailers-only metadata.
            status
                .metadata()
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true"),
        ),
        Err(status) => (
            Answer::Refused(format!(
                "{:?}/{}",
                status.code(),
                reason(&status).unwrap_or_default()
            )),
            false,
        ),
    }
}

async fn send(tenant: &Tenant, sent: &Sent) -> (Answer, bool, Option<String>) {
    match sent {
        Sent::Transfer {
            key,
            from,
            to,
            amount,
        } => {
            let (answer, replayed) =
                answer_of(tenant.transfer(key, from, to, *amount, "BRL").await);
            (answer, replayed, None)
        }
        Sent::Pay {
            key,
            merchant,
            amount,
            card,
        } => {
            let result = tenant
                .pay(payment_request(key, merchant, *amount, card))
                .await;
            let payment = result
                .as_ref()
                .ok()
                .and_then(|r| r.get_ref().payment.clone());
            let (answer, replayed) = answer_of(result);
            let succeeded = payment
                .filter(|p| p.status == pb::PaymentStatus::Succeeded as i32)
                .map(|p| p.id);
            (answer, replayed, succeeded)
        }
        Sent::Refund {
            key,
            payment,
            amount,
        } => {
            let (answer, replayed) = answer_of(tenant.refund(key, payment, brl(*amount)).await);
            (answer, replayed, None)
        }
    }
}

async fn run_case(
    channel: tonic::transport::Channel,
    case: usize,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let tenant = Tenant::new(&format!("model-{case}"), channel);
    let mut accounts = Vec::new();
    for index in 0..=FUNDING {
        let (kind, negative) = match index {
            i if i < CUSTOMERS => (pb::AccountKind::Customer, false),
            i if i < FUNDING => (pb::AccountKind::Merchant, false),
            _ => (pb::AccountKind::Customer, true),
        };
        let account = tenant
            .open_account(kind, "BRL", negative)
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        accounts.push(account.id);
    }
    let funding = accounts[FUNDING].clone();
    let mut model = Model::default();
    for (step, op) in ops.into_iter().enumerate() {
        let key = format!("step-{step}");
        let (sent, expected) = match op {
            Op::Transfer { from, to, amount } => {
                let (from, to) = (accounts[from].clone(), accounts[to].clone());
                let expected = model.transfer(&from, &to, amount, &funding);
                (
                    Sent::Transfer {
                        key,
                        from,
                        to,
                        amount,
                    },
                    expected,
                )
            }
            Op::Pay {
                merchant,
                amount,
                approved,
            } => {
                let merchant = accounts[CUSTOMERS + merchant].clone();
                let card = if approved {
                    cards::CARD_APPROVED
                } else {
                    cards::CARD_DECLINED
                };
                (
                    Sent::Pay {
                        key,
                        merchant,
                        amount,
                        card,
                    },
                    Answer::Ok,
                )
            }
            Op::Refund { payment, amount } => {
                if model.payments.is_empty() {
                    continue;
                }
                let index = payment % model.payments.len();
                let expected = model.refund(index, amount);
                let payment = model.payments[index].0.clone();
                (
                    Sent::Refund {
                        key,
                        payment,
                        amount,
                    },
                    expected,
                )
            }
            Op::Retry { op } => {
                if model.sent.is_empty() {
                    continue;
                }
                let (sent, first) = model.sent[op % model.sent.len()].clone();
                let (answer, replayed, _) = send(&tenant, &sent).await;
                prop_assert_eq!(&answer, &first, "retry of {:?}", sent);
                prop_assert!(replayed, "a retry is marked replayed: {:?}", sent);
                continue;
            }
            Op::Reuse { op } => {
                if model.sent.is_empty() {
                    continue;
                }
                let (sent, _) = model.sent[op % model.sent.len()].clone();
                let altered = match sent {
                    Sent::Transfer {
                        key,
                        from,
                        to,
                        amount,
                    } => Sent::Transfer {
                        key,
                        from,
                        to,
                        amount: amount + 1,
                    },
                    Sent::Pay {
                        key,
                        merchant,
                        amount,
                        card,
                    } => Sent::Pay {
                        key,
                        merchant,
                        amount: amount + 1,
                        card,
                    },
                    Sent::Refund {
                        key,
                        payment,
                        amount,
                    } => Sent::Refund {
                        key,
                        payment,
                        amount: amount + 1,
                    },
                };
                let (answer, _, _) = send(&tenant, &altered).await;
                prop_assert_eq!(
                    answer,
                    Answer::Refused("InvalidArgument/IDEMPOTENCY_KEY_REUSED".to_owned())
                );
                continue;
            }
        };
        let (answer, replayed, succeeded) = send(&tenant, &sent).await;
        prop_assert!(!replayed, "a new key is not a replay: {:?}", sent);
        prop_assert_eq!(&answer, &expected, "step {} {:?}", step, sent);
        if let (
            Sent::Pay {
                merchant, amount, ..
            },
            Some(id),
        ) = (&sent, succeeded)
        {
            *model.balances.entry(merchant.clone()).or_default() += amount;
            model.payments.push((id, merchant.clone(), *amount, 0));
        }
        model.sent.push((sent, answer));
    }
    for account in &accounts {
        let (balance, _) = tenant
            .balance(account)
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        let expected = model.balances.get(account).copied().unwrap_or_default();
        prop_assert_eq!(balance, expected, "balance of {}", account);
    }
    for (id, _, captured, refunded) in &model.payments {
        let payment = tenant
            .payment(id)
            .await
            .map_err(|err| TestCaseError::fail(err.to_string()))?;
        prop_assert_eq!(
            payment.amount_captured.map(|m| m.amount_minor),
            Some(*captured)
        );
        prop_assert_eq!(
            payment.amount_refunded.map(|m| m.amount_minor),
            Some(*refunded)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_agrees_with_a_model_over_random_operations() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let sandbox = Sandbox::new(SandboxSettings::default());
    let service = services::payment_with_acquirer(&database, |_| {}, Arc::new(sandbox)).await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let runtime = tokio::runtime::Handle::current();
    let cases = AtomicUsize::new(0);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = tokio::task::block_in_place(|| {
        runner.run(&prop::collection::vec(op(), 1..40), |ops| {
            let case = cases.fetch_add(1, Ordering::Relaxed);
            runtime.block_on(run_case(channel.clone(), case, ops))
        })
    });
    if let Err(failure) = result {
        anyhow::bail!("{failure}");
    }
    // Whatever the cases did, the books balance.
    assert_eq!(database.books_sum().await?, 0);
    service.stop().await
}
