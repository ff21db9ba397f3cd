//! The services in-process, each behind its own `127.0.0.1:0` listener.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::postgres::TestDatabase;

/// A service running in this process; stopped (gracefully) by [`RunningService::stop`],
/// aborted when dropped.
#[derive(Debug)]
pub struct RunningService {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl RunningService {
    /// Runs `run` on a fresh `127.0.0.1:0` listener; it must return once the receiver
    /// fires.
    pub async fn start<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpListener, oneshot::Receiver<()>) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(listener, stopped));
        Ok(Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where it serves.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for tonic clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Asks the service to shut down and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.context("service task panicked")?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningService {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn on_signal(stopped: oneshot::Receiver<()>) {
    let _ = stopped.await;
}

/// payment-svc on `database` (migrated on start, serving as the service role).
pub async fn payment(database: &TestDatabase) -> anyhow::Result<RunningService> {
    payment_with(database, |_| {}).await
}

/// payment-svc on `database`, with its configuration adjusted by `adjust`.
pub async fn payment_with(
    database: &TestDatabase,
    adjust: impl FnOnce(&mut payment_svc::Config),
) -> anyhow::Result<RunningService> {
    let sandbox = payment_svc::acquirer::sandbox::Sandbox::new(Default::default());
    payment_with_acquirer(database, adjust, std::sync::Arc::new(sandbox)).await
}

/// payment-svc on `database` using `acquirer` (tests keep a handle on a sandbox to count
/// its charges).
pub async fn payment_with_acquirer(
    database: &TestDatabase,
    adjust: impl FnOnce(&mut payment_svc::Config),
    acquirer: std::sync::Arc<dyn payment_svc::acquirer::Acquirer>,
) -> anyhow::Result<RunningService> {
    let mut pairs = crate::identity::service_env();
    pairs.push((
        payment_svc::config::ENV_DATABASE_URL,
        database.service_url(),
    ));
    let mut config = payment_svc::Config::from_env(&service_kit::Env::from_pairs(pairs))?;
    config.database = database.payment_config();
    adjust(&mut config);
    RunningService::start(move |listener, stopped| async move {
        payment_svc::run_with_acquirer(listener, config, acquirer, on_signal(stopped)).await?;
        Ok(())
    })
    .await
}

/// ratelimit-svc with default settings (the embedded memory store).
pub async fn ratelimit() -> anyhow::Result<RunningService> {
    ratelimit_with(|_| {}).await
}

/// ratelimit-svc with its configuration adjusted by `adjust`.
pub async fn ratelimit_with(
    adjust: impl FnOnce(&mut ratelimit_svc::Config) + Send + 'static,
) -> anyhow::Result<RunningService> {
    RunningService::start(|listener, stopped| async move {
        let mut config = ratelimit_svc::Config::new(
            listener.local_addr()?,
            crate::identity::config(ratelimit_svc::config::AUDIENCE),
        );
        adjust(&mut config);
        ratelimit_svc::run(listener, config, on_signal(stopped)).await?;
        Ok(())
    })
    .await
}

/// ratelimit-svc with its configuration adjusted by `adjust`, and the counters it keeps
/// (tests read them to prove which path a decision took).
pub async fn ratelimit_counted(
    adjust: impl FnOnce(&mut ratelimit_svc::Config) + Send + 'static,
) -> anyhow::Result<(
    RunningService,
    std::sync::Arc<ratelimit_svc::guard::Counters>,
)> {
    let counters = std::sync::Arc::new(ratelimit_svc::guard::Counters::default());
    let counted = std::sync::Arc::clone(&counters);
    let service = RunningService::start(|listener, stopped| async move {
        let mut config = ratelimit_svc::Config::new(
            listener.local_addr()?,
            crate::identity::config(ratelimit_svc::config::AUDIENCE),
        );
        adjust(&mut config);
        ratelimit_svc::run_with_counters(listener, config, counted, on_signal(stopped)).await?;
        Ok(())
    })
    .await?;
    Ok((service, counters))
}

/// gateway-svc with default settings (plaintext, no keys, upstreams unreachable).
pub async fn gateway() -> anyhow::Result<crate::gateway::TestGateway> {
    crate::gateway::TestGateway::start(Default::default()).await
}
