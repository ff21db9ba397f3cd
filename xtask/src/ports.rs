//! Local TCP ports: free ones for throwaway servers, and a check that fixed ones are free.

use std::net::{SocketAddr, TcpListener};

use anyhow::{Context as _, bail};

/// A port on 127.0.0.1 that nothing listens on right now (the kernel picks it when binding
/// port 0). Another process could take it before the server binds it; the servers here
/// start within a second, and a clash fails their start loudly rather than silently.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Fails naming every address in `addresses` that cannot be bound now.
pub fn ensure_free(addresses: &[SocketAddr]) -> anyhow::Result<()> {
    let busy: Vec<String> = addresses
        .iter()
        .filter_map(|address| {
            TcpListener::bind(address)
                .err()
                .map(|err| format!("{address} ({err})"))
        })
        .collect();
    if !busy.is_empty() {
        bail!(
            "cannot bind {}: stop whatever listens there (another `cargo xtask up`? \
             `ss -ltnp` shows the owner)",
            busy.join(", ")
        );
    }
    Ok(())
}
