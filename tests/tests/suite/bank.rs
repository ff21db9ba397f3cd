//! The bank workload under faults (`tests::bank`): many clients paying, capturing,
//! voiding, refunding and transferring through the gateway while replicas are killed,
//! PostgreSQL backends terminated, ratelimit-svc and Redis frozen and the acquirer made
//! slow or failing — then the checker finds no violation. The same workload runs through
//! rolling restarts of every service (two replicas each, gateways included): ≥ 99.9 % of
//! operations answered with a normal client retry policy, and the checker passes. The
//! control proves the checker can fail: a naive transfer (read, sleep 50 ms, write)
//! racing itself is reported.
//!
//! The seed is printed; `PAYSUITE_BANK_SEED=<n>` replays its workload and fault schedule.
//! The workload lasts [`SHORT_RUN`], or [`SOAK_RUN`] under `PAYSUITE_SOAK=1`
//! (`cargo xtask soak`).

use std::time::Duration;

use proto::payments::v1 as pb;
use sqlx::{Connection as _, PgConnection};
use tests::bank::{self, Bank, BankOptions, Disruption};
use tests::payments::Tenant;
use tests::postgres::TestDatabase;

/// The workload's length in `cargo xtask test`.
const SHORT_RUN: Duration = Duration::from_secs(45);
/// The workload's length under `PAYSUITE_SOAK=1`.
const SOAK_RUN: Duration = Duration::from_secs(10 * 60);
/// `PAYSUITE_SOAK`: set to 1 for the long run.
const ENV_SOAK: &str = "PAYSUITE_SOAK";

#[tokio::test]
async fn spawned_bank_under_faults_keeps_every_promise() -> anyhow::Result<()> {
    let seed = bank::seed()?;
    let duration = match std::env::var(ENV_SOAK).as_deref() {
        Ok("1") => SOAK_RUN,
        _ => SHORT_RUN,
    };
    eprintln!(
        "bank: seed {seed} (replay: {}={seed}), workload {duration:?}",
        bank::ENV_BANK_SEED
    );
    let started = tokio::time::Instant::now();
    let system = Bank::start().await?;
    let options = BankOptions {
        seed,
        duration,
        tenants: 3,
        clients_per_tenant: 4,
        customers_per_tenant: 4,
        disruption: Disruption::Faults,
    };
    let (figures, violations) = system.run(&options).await?;
    eprintln!(
        "bank: seed {seed}: {figures}; {} violation(s); {:?} in all",
        violations.len(),
        started.elapsed()
    );
    for violation in &violations {
        eprintln!("bank: violation: {violation}");
    }
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
    // Every injected fault is a dependency failing, which DESIGN §3 answers UNAVAILABLE:
    // INTERNAL (which clients do not retry) would be a defect. A terminated backend or a
    // killed replica's lost connections used to surface as INTERNAL.
    assert!(
        figures.internal_samples.is_empty(),
        "seed {seed}: INTERNAL answers under faults: {:?}",
        figures.internal_samples
    );
    // The paths ran: operations were answered, outcomes were unknown and then settled,
    // and faults were injected.
    assert!(figures.acknowledged > 0, "{figures}");
    assert!(!figures.faults.is_empty(), "{figures}");
    assert!(figures.events_received > 0, "{figures}");
    Ok(())
}

#[tokio::test]
async fn spawned_bank_through_rolling_restarts_of_every_service_answers_and_loses_nothing()
-> anyhow::Result<()> {
    let seed = bank::seed()?;
    eprintln!(
        "rolling: seed {seed} (replay: {}={seed})",
        bank::ENV_BANK_SEED
    );
    let started = tokio::time::Instant::now();
    let system = Bank::start_replicated().await?;
    let options = BankOptions {
        seed,
        duration: Duration::from_secs(15),
        tenants: 3,
        clients_per_tenant: 4,
        customers_per_tenant: 4,
        disruption: Disruption::RollingRestarts,
    };
    let (figures, violations) = system.run(&options).await?;
    eprintln!(
        "rolling: seed {seed}: {figures}; {} violation(s); {:?} in all",
        violations.len(),
        started.elapsed()
    );
    for violation in &violations {
        eprintln!("rolling: violation: {violation}");
    }
    // Nothing answered twice, lost or left unsettled; every process exited cleanly.
    assert!(
        violations.is_empty(),
        "seed {seed}: {} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
    // Each of the two replicas of every service was stopped and replaced once.
    for service in ["payment-svc", "ratelimit-svc", "gateway-svc"] {
        assert_eq!(
            figures.faults.get(&format!("restart {service}")),
            Some(&2),
            "{figures}"
        );
    }
    // With the normal retry policy (UNAVAILABLE and ABORTED again, same key), at least
    // 99.9 % of the operations were answered while the workload ran.
    assert!(figures.attempted >= 1_000, "{figures}");
    assert!(
        figures.unknown * 1_000 <= figures.attempted,
        "seed {seed}: {} of {} operations failed after retries: {figures}",
        figures.unknown,
        figures.attempted
    );
    assert!(
        figures.internal_samples.is_empty(),
        "seed {seed}: INTERNAL answers: {:?}",
        figures.internal_samples
    );
    Ok(())
}

#[tokio::test]
async fn bank_checker_reports_a_naive_transfer_racing_past_the_balance_check() -> anyhow::Result<()>
{
    let database = TestDatabase::create().await?;
    let service = tests::services::payment(&database).await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let funding = alice
        .open_account(pb::AccountKind::Customer, "BRL", true)
        .await?
        .id;
    let mut accounts = Vec::new();
    for _ in 0..3 {
        let account = alice
            .open_account(pb::AccountKind::Customer, "BRL", false)
            .await?
            .id;
        alice
            .transfer(
                &uuid::Uuid::new_v4().to_string(),
                &funding,
                &account,
                100,
                "BRL",
            )
            .await?;
        accounts.push(account);
    }
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let clean = bank::check_ledger(&mut owner).await?;
    assert!(clean.is_empty(), "{clean:?}");

    // The service's transfers, racing: the row lock lets exactly one of them through.
    let mut racing = Vec::new();
    for _ in 0..4 {
        let alice = alice.clone();
        let (from, to) = (accounts[0].clone(), accounts[1].clone());
        racing.push(tokio::spawn(async move {
            alice
                .transfer(&uuid::Uuid::new_v4().to_string(), &from, &to, 80, "BRL")
                .await
                .is_ok()
        }));
    }
    let mut through = 0;
    for call in racing {
        through += usize::from(call.await?);
    }
    assert_eq!(through, 1, "the balance allows one transfer of 80");
    let after_service = bank::check_ledger(&mut owner).await?;
    assert!(after_service.is_empty(), "{after_service:?}");

    // The naive path, racing: every one of them saw 100 before any wrote.
    let mut naive = Vec::new();
    let after_read = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    for _ in 0..4 {
        let after_read = Some(after_read.clone());
        let (from, to) = (accounts[2].clone(), accounts[1].clone());
        let url = database.owner_url();
        naive.push(tokio::spawn(async move {
            bank::naive_transfer(&url, &from, &to, 80, after_read).await
        }));
    }
    let mut written = 0;
    for transfer in naive {
        written += usize::from(transfer.await??);
    }
    assert_eq!(written, 4, "each read 100 before any wrote");
    let violations = bank::check_ledger(&mut owner).await?;
    assert!(
        violations
            .iter()
            .any(|v| v.contains(&accounts[2]) && v.contains("non-negative but holds")),
        "the checker reports the overdrawn account: {violations:?}"
    );
    service.stop().await
}
