//! The sandbox acquirer: deterministic outcomes by test card (like Stripe's), at-most-once
//! per operation id, per-operation call counters, and switches for latency and failures.
//!
//! Test cards:
//! | number | outcome |
//! |---|---|
//! | 4242 4242 4242 4242 | approved |
//! | 4000 0000 0000 0002 | declined `card_declined` |
//! | 4000 0000 0000 9995 | declined `insufficient_funds` |
//! | 4000 0000 0000 0119 | failed `processing_error` (transient: nothing happened) |
//! | 4000 0000 0000 5126 | approved, but answers only after `slow_answer` (an unknown outcome for a caller with a shorter timeout) |
//! Any other valid card is approved.
//!
//! Switches ([`SandboxSettings`]): added latency, and a share of calls failing as
//! UNAVAILABLE (nothing done), TIMEOUT (done, never answered) or ERROR (a processing
//! error: nothing done).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Acquirer, AcquirerError, AuthorizeRequest, Operation, OperationKind, OperationStatus};
use crate::domain::Money;

/// Approved.
pub const CARD_APPROVED: &str = "4242424242424242";
/// Declined with `card_declined`.
pub const CARD_DECLINED: &str = "4000000000000002";
/// Declined with `insufficient_funds`.
pub const CARD_INSUFFICIENT_FUNDS: &str = "4000000000009995";
/// Fails with a transient `processing_error`.
pub const CARD_PROCESSING_ERROR: &str = "4000000000000119";
/// Approved, but answers after [`SandboxSettings::slow_answer`].
pub const CARD_SLOW_APPROVED: &str = "4000000000005126";

/// Injected failure behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailureMode {
    /// No injected failures.
    #[default]
    None,
    /// Answer UNAVAILABLE without doing anything.
    Unavailable,
    /// Do the operation, then never answer.
    Timeout,
    /// Answer a processing error without doing anything.
    Error,
}

/// The sandbox's switches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxSettings {
    /// Latency added to every call.
    pub added_latency: Duration,
    /// How injected failures behave.
    pub failure_mode: FailureMode,
    /// Share of calls that fail, in parts per million.
    pub failure_rate_ppm: u32,
    /// How long the slow test card takes to answer.
    pub slow_answer: Duration,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            added_latency: Duration::ZERO,
            failure_mode: FailureMode::None,
            failure_rate_ppm: 0,
            slow_answer: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    operations: BTreeMap<String, Operation>,
    order: Vec<String>,
    counters: BTreeMap<String, BTreeMap<&'static str, u64>>,
    settings: SandboxSettings,
    /// xorshift state for the failure rate.
    random: u64,
}

/// The in-process sandbox acquirer; clones share state.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    state: Arc<Mutex<State>>,
}

impl Sandbox {
    /// A sandbox with `settings`.
    pub fn new(settings: SandboxSettings) -> Self {
        let sandbox = Self::default();
        {
            let mut state = sandbox.lock();
            state.settings = settings;
            state.random = 0x9e37_79b9_7f4a_7c15;
        }
        sandbox
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The switches now.
    pub fn settings(&self) -> SandboxSettings {
        self.lock().settings.clone()
    }

    /// Replaces the switches.
    pub fn set_settings(&self, settings: SandboxSettings) {
        self.lock().settings = settings;
    }

    /// Calls received per operation id, by kind.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
        self.lock().counters.clone()
    }

    /// How many authorizations were approved (charges made), over all operation ids.
    pub fn approved_count(&self, kind: OperationKind) -> usize {
        self.lock()
            .operations
            .values()
            .filter(|op| op.kind == kind && op.status == OperationStatus::Approved)
            .count()
    }

    /// Counts the call, applies latency and injected failures; `Some(err)` means the call
    /// ends with that error before doing anything.
    async fn enter(
        &self,
        operation_id: &str,
        kind: OperationKind,
    ) -> Result<FailureMode, AcquirerError> {
        let (latency, mode) = {
            let mut state = self.lock();
            *state
                .counters
                .entry(operation_id.to_owned())
                .or_default()
                .entry(kind.as_str())
                .or_default() += 1;
            state.random ^= state.random << 13;
            state.random ^= state.random >> 7;
            state.random ^= state.random << 17;
            let fails = state.settings.failure_mode != FailureMode::None
                && (state.random % 1_000_000) < u64::from(state.settings.failure_rate_ppm);
            let mode = if fails {
                state.settings.failure_mode
            } else {
                FailureMode::None
            };
            (state.settings.added_latency, mode)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if mode == FailureMode::Unavailable {
            return Err(AcquirerError::Unavailable(
                "sandbox: injected failure".to_owned(),
            ));
        }
        Ok(mode)
    }

    /// Records `operation` unless the id exists; returns the stored one.
    fn record(&self, operation: Operation) -> Operation {
        let mut state = self.lock();
        if let Some(existing) = state.operations.get(&operation.operation_id) {
            return existing.clone();
        }
        state.order.push(operation.operation_id.clone());
        state
            .operations
            .insert(operation.operation_id.clone(), operation.clone());
        operation
    }

    fn existing(&self, operation_id: &str) -> Option<Operation> {
        self.lock().operations.get(operation_id).cloned()
    }

    /// Sum of approved child operations of `parent` of `kind`.
    fn consumed(&self, parent: &str, kind: OperationKind) -> i64 {
        self.lock()
            .operations
            .values()
            .filter(|op| {
                op.kind == kind
                    && op.status == OperationStatus::Approved
                    && op.parent_operation_id.as_deref() == Some(parent)
            })
            .map(|op| op.amount.amount_minor())
            .sum()
    }

    async fn answer(
        &self,
        mode: FailureMode,
        operation: Operation,
    ) -> Result<Operation, AcquirerError> {
        if mode == FailureMode::Timeout {
            // The operation happened; the answer never comes.
            std::future::pending::<()>().await;
        }
        Ok(operation)
    }

    fn child(
        &self,
        operation_id: &str,
        kind: OperationKind,
        parent_id: &str,
        amount: Option<Money>,
    ) -> Result<Operation, AcquirerError> {
        if let Some(existing) = self.existing(operation_id) {
            return Ok(existing);
        }
        let parent = self
            .existing(parent_id)
            .filter(|p| p.status == OperationStatus::Approved)
            .ok_or_else(|| AcquirerError::Rejected(format!("no approved operation {parent_id}")))?;
        let expected_parent = match kind {
            OperationKind::Capture | OperationKind::Void => OperationKind::Authorize,
            OperationKind::Refund => OperationKind::Capture,
            OperationKind::Authorize => {
                return Err(AcquirerError::Rejected(
                    "authorize has no parent".to_owned(),
                ));
            }
        };
        if parent.kind != expected_parent {
            return Err(AcquirerError::Rejected(format!(
                "{parent_id} is not a {}",
                expected_parent.as_str()
            )));
        }
        let amount = amount.unwrap_or(parent.amount);
        if amount.currency() != parent.amount.currency() || amount.amount_minor() <= 0 {
            return Err(AcquirerError::Rejected(
                "amount does not match the parent operation".to_owned(),
            ));
        }
        let status = match kind {
            OperationKind::Capture => {
                let voided = self.consumed(parent_id, OperationKind::Void) > 0;
                let left =
                    parent.amount.amount_minor() - self.consumed(parent_id, OperationKind::Capture);
                if voided || amount.amount_minor() > left {
                    OperationStatus::Declined {
                        code: "amount_too_large".to_owned(),
                    }
                } else {
                    OperationStatus::Approved
                }
            }
            OperationKind::Void => {
                if self.consumed(parent_id, OperationKind::Capture) > 0 {
                    OperationStatus::Declined {
                        code: "already_captured".to_owned(),
                    }
                } else {
                    OperationStatus::Approved
                }
            }
            OperationKind::Refund => {
                let left =
                    parent.amount.amount_minor() - self.consumed(parent_id, OperationKind::Refund);
                if amount.amount_minor() > left {
                    OperationStatus::Declined {
                        code: "amount_too_large".to_owned(),
                    }
                } else {
                    OperationStatus::Approved
                }
            }
            OperationKind::Authorize => OperationStatus::Approved,
        };
        Ok(self.record(Operation {
            operation_id: operation_id.to_owned(),
            kind,
            status,
            amount,
            parent_operation_id: Some(parent_id.to_owned()),
            reference: parent.reference,
        }))
    }
}

/// A processing error: nothing was done or recorded, so a repeat of the id is processed
/// afresh.
fn processing_error(
    operation_id: &str,
    kind: OperationKind,
    amount: Money,
    parent: Option<&str>,
    reference: &str,
) -> Operation {
    Operation {
        operation_id: operation_id.to_owned(),
        kind,
        status: OperationStatus::Failed {
            code: "processing_error".to_owned(),
        },
        amount,
        parent_operation_id: parent.map(str::to_owned),
        reference: reference.to_owned(),
    }
}

#[tonic::async_trait]
impl Acquirer for Sandbox {
    async fn authorize(&self, request: AuthorizeRequest<'_>) -> Result<Operation, AcquirerError> {
        let mode = self
            .enter(request.operation_id, OperationKind::Authorize)
            .await?;
        if mode == FailureMode::Error {
            return Ok(processing_error(
                request.operation_id,
                OperationKind::Authorize,
                request.amount,
                None,
                request.reference,
            ));
        }
        if let Some(existing) = self.existing(request.operation_id) {
            return self.answer(mode, existing).await;
        }
        let number = request.card.pan.expose_secret();
        let (status, slow) = match number {
            CARD_DECLINED => (
                OperationStatus::Declined {
                    code: "card_declined".to_owned(),
                },
                false,
            ),
            CARD_INSUFFICIENT_FUNDS => (
                OperationStatus::Declined {
                    code: "insufficient_funds".to_owned(),
                },
                false,
            ),
            CARD_PROCESSING_ERROR => (
                OperationStatus::Failed {
                    code: "processing_error".to_owned(),
                },
                false,
            ),
            CARD_SLOW_APPROVED => (OperationStatus::Approved, true),
            _ => (OperationStatus::Approved, false),
        };
        let operation = Operation {
            operation_id: request.operation_id.to_owned(),
            kind: OperationKind::Authorize,
            status,
            amount: request.amount,
            parent_operation_id: None,
            reference: request.reference.to_owned(),
        };
        // A processing error leaves no trace: a repeat of the id is processed again.
        let operation = if matches!(operation.status, OperationStatus::Failed { .. }) {
            operation
        } else {
            self.record(operation)
        };
        if slow {
            let delay = self.lock().settings.slow_answer;
            tokio::time::sleep(delay).await;
        }
        self.answer(mode, operation).await
    }

    async fn capture(
        &self,
        operation_id: &str,
        authorization_id: &str,
        amount: Money,
    ) -> Result<Operation, AcquirerError> {
        let mode = self.enter(operation_id, OperationKind::Capture).await?;
        if mode == FailureMode::Error {
            return Ok(processing_error(
                operation_id,
                OperationKind::Capture,
                amount,
                Some(authorization_id),
                "",
            ));
        }
        let operation = self.child(
            operation_id,
            OperationKind::Capture,
            authorization_id,
            Some(amount),
        )?;
        self.answer(mode, operation).await
    }

    async fn void(
        &self,
        operation_id: &str,
        authorization_id: &str,
    ) -> Result<Operation, AcquirerError> {
        let mode = self.enter(operation_id, OperationKind::Void).await?;
        if mode == FailureMode::Error {
            let amount = self
                .existing(authorization_id)
                .map(|parent| parent.amount)
                .ok_or_else(|| {
                    AcquirerError::Rejected(format!("no operation {authorization_id}"))
                })?;
            return Ok(processing_error(
                operation_id,
                OperationKind::Void,
                amount,
                Some(authorization_id),
                "",
            ));
        }
        let operation = self.child(operation_id, OperationKind::Void, authorization_id, None)?;
        self.answer(mode, operation).await
    }

    async fn refund(
        &self,
        operation_id: &str,
        capture_id: &str,
        amount: Money,
    ) -> Result<Operation, AcquirerError> {
        let mode = self.enter(operation_id, OperationKind::Refund).await?;
        if mode == FailureMode::Error {
            return Ok(processing_error(
                operation_id,
                OperationKind::Refund,
                amount,
                Some(capture_id),
                "",
            ));
        }
        let operation = self.child(
            operation_id,
            OperationKind::Refund,
            capture_id,
            Some(amount),
        )?;
        self.answer(mode, operation).await
    }

    async fn get_operation(&self, operation_id: &str) -> Result<Option<Operation>, AcquirerError> {
        Ok(self.existing(operation_id))
    }

    async fn list_operations(
        &self,
        reference: Option<&str>,
        after: usize,
        limit: usize,
    ) -> Result<Vec<Operation>, AcquirerError> {
        let state = self.lock();
        Ok(state
            .order
            .iter()
            .filter_map(|id| state.operations.get(id))
            .filter(|op| reference.is_none_or(|r| op.reference == r))
            .skip(after)
            .take(limit)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Currency;
    use crate::domain::card::{CardDetails, Pan};

    fn brl(amount: i64) -> Money {
        Money::new(
            amount,
            Currency::parse("BRL").unwrap_or_else(|e| panic!("{e}")),
        )
    }

    fn card(number: &str) -> CardDetails {
        CardDetails {
            pan: Pan::parse(number).unwrap_or_else(|e| panic!("{e}")),
            exp_month: 12,
            exp_year: 2030,
            cvc: None,
        }
    }

    async fn authorize(
        sandbox: &Sandbox,
        id: &str,
        number: &str,
        amount: i64,
    ) -> Result<Operation, AcquirerError> {
        let card = card(number);
        sandbox
            .authorize(AuthorizeRequest {
                operation_id: id,
                reference: "pay_1",
                amount: brl(amount),
                card: &card,
            })
            .await
    }

    #[tokio::test]
    async fn each_test_card_has_its_documented_outcome() {
        let sandbox = Sandbox::new(SandboxSettings::default());
        let outcome = |r: Result<Operation, AcquirerError>| r.map(|op| op.status);
        assert_eq!(
            outcome(authorize(&sandbox, "a1", CARD_APPROVED, 100).await),
            Ok(OperationStatus::Approved)
        );
        assert_eq!(
            outcome(authorize(&sandbox, "a2", CARD_DECLINED, 100).await),
            Ok(OperationStatus::Declined {
                code: "card_declined".into()
            })
        );
        assert_eq!(
            outcome(authorize(&sandbox, "a3", CARD_INSUFFICIENT_FUNDS, 100).await),
            Ok(OperationStatus::Declined {
                code: "insufficient_funds".into()
            })
        );
        assert_eq!(
            outcome(authorize(&sandbox, "a4", CARD_PROCESSING_ERROR, 100).await),
            Ok(OperationStatus::Failed {
                code: "processing_error".into()
            })
        );
        assert_eq!(
            sandbox.get_operation("a4").await,
            Ok(None),
            "a processing error leaves no operation"
        );
    }

    #[tokio::test]
    async fn an_operation_id_is_performed_at_most_once() {
        let sandbox = Sandbox::new(SandboxSettings::default());
        let first = authorize(&sandbox, "same", CARD_APPROVED, 100).await;
        let second = authorize(&sandbox, "same", CARD_APPROVED, 999).await;
        assert_eq!(first, second, "a repeat answers the first outcome");
        assert_eq!(sandbox.approved_count(OperationKind::Authorize), 1);
        assert_eq!(
            sandbox
                .counters()
                .get("same")
                .and_then(|c| c.get("authorize")),
            Some(&2)
        );
    }

    #[tokio::test]
    async fn captures_voids_and_refunds_respect_their_parents() {
        let sandbox = Sandbox::new(SandboxSettings::default());
        assert!(
            authorize(&sandbox, "auth", CARD_APPROVED, 1_000)
                .await
                .is_ok()
        );
        let too_much = sandbox
            .capture("c0", "auth", brl(1_001))
            .await
            .map(|op| op.status);
        assert_eq!(
            too_much,
            Ok(OperationStatus::Declined {
                code: "amount_too_large".into()
            })
        );
        assert_eq!(
            sandbox
                .capture("c1", "auth", brl(600))
                .await
                .map(|op| op.status),
            Ok(OperationStatus::Approved)
        );
        let void = sandbox.void("v1", "auth").await.map(|op| op.status);
        assert_eq!(
            void,
            Ok(OperationStatus::Declined {
                code: "already_captured".into()
            })
        );
        assert_eq!(
            sandbox
                .refund("r1", "c1", brl(600))
                .await
                .map(|op| op.status),
            Ok(OperationStatus::Approved)
        );
        let over = sandbox.refund("r2", "c1", brl(1)).await.map(|op| op.status);
        assert_eq!(
            over,
            Ok(OperationStatus::Declined {
                code: "amount_too_large".into()
            })
        );
        assert!(matches!(
            sandbox.capture("c2", "nope", brl(1)).await,
            Err(AcquirerError::Rejected(_))
        ));
        let listed = sandbox
            .list_operations(Some("pay_1"), 0, 100)
            .await
            .map(|ops| ops.len());
        assert_eq!(listed, Ok(6), "c2 was rejected, not recorded");
    }

    #[tokio::test(start_paused = true)]
    async fn the_slow_card_is_approved_before_it_answers() {
        let sandbox = Sandbox::new(SandboxSettings {
            slow_answer: Duration::from_secs(10),
            ..SandboxSettings::default()
        });
        let call = tokio::time::timeout(
            Duration::from_secs(1),
            authorize(&sandbox, "slow", CARD_SLOW_APPROVED, 100),
        )
        .await;
        assert!(call.is_err(), "the caller times out: an unknown outcome");
        let looked_up = sandbox
            .get_operation("slow")
            .await
            .map(|op| op.map(|op| op.status));
        assert_eq!(
            looked_up,
            Ok(Some(OperationStatus::Approved)),
            "yet the charge exists"
        );
    }

    #[tokio::test]
    async fn injected_unavailability_does_nothing() {
        let sandbox = Sandbox::new(SandboxSettings {
            failure_mode: FailureMode::Unavailable,
            failure_rate_ppm: 1_000_000,
            ..SandboxSettings::default()
        });
        assert!(matches!(
            authorize(&sandbox, "x", CARD_APPROVED, 1).await,
            Err(AcquirerError::Unavailable(_))
        ));
        assert_eq!(sandbox.get_operation("x").await, Ok(None));
    }
}
