//! Each test's own Redis key space: a unique prefix on the shared throwaway Redis.

use crate::{ENV_REDIS_URL, provided};

/// One test's Redis.
#[derive(Debug)]
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    /// A key space no other test uses.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            url: provided(ENV_REDIS_URL)?,
            prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        })
    }

    /// The Redis URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The prefix every key of this test must start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A connection, for assertions on what the service wrote.
    pub async fn connection(&self) -> anyhow::Result<::redis::aio::MultiplexedConnection> {
        let client = ::redis::Client::open(self.url.as_str())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }
}
