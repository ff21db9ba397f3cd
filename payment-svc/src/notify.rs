//! Wake-ups for streams from PostgreSQL LISTEN/NOTIFY, so a change committed by any
//! replica reaches the streams of every replica.
//!
//! One listener connection per process (from the listener pool) feeds two generation
//! counters — payment events and ledger changes — that streams wait on. A notification is
//! only a wake-up: streams then read the table. When the listener reconnects
//! (`try_recv` answers `None`, notifications may have been lost) both counters move, so
//! every stream resyncs from the table; a slow poll in each stream is the last safety net.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::sync::watch;

use crate::ledger;
use crate::payments::events;

/// Generation counters that move on every notification.
#[derive(Debug, Clone)]
pub struct Notifier {
    events: watch::Receiver<u64>,
    ledger: watch::Receiver<u64>,
    received: Arc<AtomicU64>,
}

impl Notifier {
    /// Starts listening on `listener_pool` until `shutdown` turns true.
    pub fn start(listener_pool: PgPool, mut shutdown: watch::Receiver<bool>) -> Self {
        let (events_tx, events) = watch::channel(0u64);
        let (ledger_tx, ledger) = watch::channel(0u64);
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        tokio::spawn(async move {
            let bump = |sender: &watch::Sender<u64>| sender.send_modify(|n| *n += 1);
            let mut listener: Option<PgListener> = None;
            loop {
                if *shutdown.borrow() {
                    return;
                }
                let Some(active) = listener.as_mut() else {
                    listener = connect(&listener_pool).await;
                    // Whatever happened while we were not listening: resync.
                    bump(&events_tx);
                    bump(&ledger_tx);
                    if listener.is_none() {
                        tokio::select! {
                            _ = shutdown.changed() => {}
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    continue;
                };
                tokio::select! {
                    _ = shutdown.changed() => {}
                    received = active.try_recv() => match received {
                        Ok(Some(notification)) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                            if notification.channel() == events::CHANNEL {
                                bump(&events_tx);
                            } else {
                                bump(&ledger_tx);
                            }
                        }
                        // Reconnected: notifications may have been lost.
                        Ok(None) => {
                            bump(&events_tx);
                            bump(&ledger_tx);
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "stream notifications lost; reconnecting");
                            listener = None;
                        }
                    },
                }
            }
        });
        Self {
            events,
            ledger,
            received,
        }
    }

    /// Moves when a payment event may have committed.
    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }

    /// Moves when a balance may have changed.
    pub fn ledger(&self) -> watch::Receiver<u64> {
        self.ledger.clone()
    }

    /// Notifications received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

async fn connect(listener_pool: &PgPool) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(listener_pool).await {
        Ok(listener) => listener,
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for stream notifications");
            return None;
        }
    };
    match listener
        .listen_all([events::CHANNEL, ledger::CHANNEL])
        .await
    {
        Ok(()) => Some(listener),
        Err(err) => {
            tracing::warn!(error = %err, "cannot listen for stream notifications");
            None
        }
    }
}

/// Queues a notification on `channel`, sent when the caller's transaction commits.
///
/// PostgreSQL serializes the commits of notifying transactions on one global lock taken
/// at COMMIT, so under the service's short `lock_timeout` a busy moment would fail the
/// commit itself ("canceling statement due to lock timeout") after all its work was done.
/// That lock is only ever held for the length of another commit: the rest of this
/// transaction waits for locks without `lock_timeout` (`statement_timeout` still bounds
/// every statement, COMMIT included), so callers notify last.
pub async fn queue(
    connection: &mut PgConnection,
    channel: &str,
    payload: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT set_config('lock_timeout', '0', true), pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(connection)
        .await?;
    Ok(())
}
