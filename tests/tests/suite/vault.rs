//! The card vault at rest: `payment-svc rotate-card-keys` moves every card to the active
//! key, every card still opens afterwards (only under its own row id), and a card that
//! does not open makes the command fail without showing any card data.

use payment_svc::vault::{Sealed, Vault};
use proto::payments::v1 as pb;
use sqlx::{Connection, PgConnection, Row};
use tests::payments::{Tenant, cards, payment_request};
use tests::postgres::TestDatabase;
use tests::process::run_to_exit;
use tests::services;

async fn sealed_cards(database: &TestDatabase) -> anyhow::Result<Vec<(String, String, Sealed)>> {
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let rows = sqlx::query("SELECT id, last4, key_id, nonce, ciphertext FROM cards ORDER BY id")
        .fetch_all(&mut owner)
        .await?;
    rows.iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                row.try_get("last4")?,
                Sealed {
                    key_id: row.try_get("key_id")?,
                    nonce: row.try_get("nonce")?,
                    ciphertext: row.try_get("ciphertext")?,
                },
            ))
        })
        .collect()
}

#[tokio::test]
async fn spawned_rotate_card_keys_moves_every_card_to_the_active_key() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let service = services::payment(&database).await?;
    let channel = tonic::transport::Channel::from_shared(service.endpoint())?
        .connect()
        .await?;
    let alice = Tenant::new("alice", channel);
    let merchant = alice
        .open_account(pb::AccountKind::Merchant, "BRL", false)
        .await?
        .id;
    for (index, card) in cards::ALL.iter().take(4).enumerate() {
        alice
            .pay(payment_request(
                &format!("pay-{index}"),
                &merchant,
                100,
                card,
            ))
            .await?;
    }
    service.stop().await?;
    let before = sealed_cards(&database).await?;
    assert_eq!(before.len(), 4);
    assert!(before.iter().all(|(_, _, sealed)| sealed.key_id == "test"));

    // The new key becomes active; the old one stays configured until rotation is done.
    let (old_keys, fingerprint) = tests::identity::vault_env();
    let new_key = Vault::generate_key_text("k2")?;
    let keys = format!("{new_key},{old_keys}");
    let env = [
        ("DATABASE_URL", database.service_url()),
        ("CARD_ENCRYPTION_KEYS", keys.clone()),
        ("CARD_ENCRYPTION_ACTIVE_KEY", "k2".to_owned()),
    ];
    let rotated = run_to_exit(
        "payment-svc",
        &env,
        &["rotate-card-keys", "--batch-size", "3"],
    )
    .await?;
    assert!(rotated.status.success(), "{}", rotated.stderr);
    assert!(
        rotated
            .stdout
            .contains("4 card(s) re-encrypted under key \"k2\"; 0 remain"),
        "{}",
        rotated.stdout
    );

    let vault = Vault::from_config(&keys, Some("k2"), &fingerprint)?;
    let after = sealed_cards(&database).await?;
    assert_eq!(after.len(), 4);
    for ((id, last4, sealed), (_, _, old)) in after.iter().zip(&before) {
        assert_eq!(sealed.key_id, "k2");
        assert_ne!(sealed.nonce, old.nonce, "a fresh nonce per encryption");
        let pan = vault.open(id, sealed)?;
        assert_eq!(pan.last4(), last4.as_str());
        // The row id is the associated data: the ciphertext does not open as another row.
        assert!(vault.open("card_elsewhere", sealed).is_err());
    }

    // Nothing left to do: a second run re-encrypts nothing and succeeds.
    let again = run_to_exit("payment-svc", &env, &["rotate-card-keys"]).await?;
    assert!(again.status.success(), "{}", again.stderr);
    assert!(
        again.stdout.contains("0 card(s) re-encrypted"),
        "{}",
        again.stdout
    );

    // A card under a key nobody has any more fails the command, naming only the row.
    let mut owner = PgConnection::connect(&database.owner_url()).await?;
    let lost: String = sqlx::query_scalar(
        "UPDATE cards SET key_id = 'lost' WHERE id = (SELECT min(id) FROM cards) RETURNING id",
    )
    .fetch_one(&mut owner)
    .await?;
    let failed = run_to_exit("payment-svc", &env, &["rotate-card-keys"]).await?;
    assert!(!failed.status.success());
    assert!(
        failed.stderr.contains("1 card(s) do not open") && failed.stderr.contains(&lost),
        "{}",
        failed.stderr
    );
    for card in cards::ALL {
        assert!(!failed.stdout.contains(card) && !failed.stderr.contains(card));
    }
    Ok(())
}
