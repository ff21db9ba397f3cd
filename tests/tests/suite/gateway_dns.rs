//! gateway-svc's upstream endpoints from DNS, end to end: a spawned gateway resolves its
//! payments cluster from a name whose addresses the test changes (the process sees its
//! own `/etc/hosts`, bind-mounted from a file the test rewrites, as a headless Service's
//! records change when pods come and go). An address that appears becomes an endpoint
//! that takes calls; one that vanishes stops being one; calls keep succeeding throughout.

use std::net::{Ipv6Addr, SocketAddr};

use proto::gateway::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use proto::gateway::v1::{ListUpstreamsRequest, Upstream};
use secrecy::ExposeSecret as _;
use tests::gateway::{ADMIN_SCOPES, eventually, open_merchant, spawn_payment_svc, with_key};
use tests::postgres::TestDatabase;
use tests::process::SpawnedService;
use tonic::transport::Channel;

const NAME: &str = "payments.paysuite.test";

fn hosts(addresses: &[&str]) -> String {
    let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for address in addresses {
        text.push_str(&format!("{address} {NAME}\n"));
    }
    text
}

/// The payments cluster as the admin API lists it.
async fn payments(channel: &Channel, key: &str) -> anyhow::Result<Upstream> {
    let upstreams = GatewayAdminServiceClient::new(channel.clone())
        .list_upstreams(with_key(ListUpstreamsRequest {}, key)?)
        .await?
        .into_inner()
        .upstreams;
    upstreams
        .into_iter()
        .find(|upstream| upstream.name == gateway_svc::routes::PAYMENTS)
        .ok_or_else(|| anyhow::anyhow!("no payments upstream"))
}

fn addresses(upstream: &Upstream) -> Vec<String> {
    let mut addresses: Vec<String> = upstream
        .endpoints
        .iter()
        .map(|endpoint| endpoint.address.clone())
        .collect();
    addresses.sort();
    addresses
}

#[tokio::test]
async fn spawned_endpoints_follow_the_addresses_of_a_dns_name() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    // Two replicas on one port, at the two loopback addresses the name will point to.
    let v4 = spawn_payment_svc(&database, None).await?;
    let port = v4.addr().port();
    let v6 = spawn_payment_svc(
        &database,
        Some(SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
    )
    .await?;
    let (v4_address, v6_address) = (format!("127.0.0.1:{port}"), format!("[::1]:{port}"));

    let dir = tempfile::tempdir()?;
    let hosts_file = dir.path().join("hosts");
    std::fs::write(&hosts_file, hosts(&["127.0.0.1"]))?;
    let pepper = gateway_svc::keys::Pepper::new(
        "test pepper: long enough to key an HMAC-SHA256"
            .to_owned()
            .into(),
    )?;
    let scopes: Vec<String> = ADMIN_SCOPES.iter().map(|s| (*s).to_owned()).collect();
    let generated = gateway_svc::keys::generate(&pepper, "ops", &scopes, "internal")?;
    let key = generated.key.expose_secret().to_owned();
    let mut envs = tests::gateway::spawned_env(dir.path())?;
    std::fs::write(
        dir.path().join("api-keys.yaml"),
        format!("{}\n", generated.line),
    )?;
    envs.push(("PAYMENT_SVC_ADDR", format!("http://{NAME}:{port}")));
    envs.push(("UPSTREAM_RESOLVE_INTERVAL", "100ms".to_owned()));
    let gateway = SpawnedService::start_with_hosts("gateway-svc", &envs, &hosts_file).await?;
    let channel = Channel::from_shared(gateway.endpoint())?.connect().await?;
    let call = || {
        let channel = channel.clone();
        let key = key.clone();
        async move { open_merchant(channel, &key).await.map(drop) }
    };

    // One address: one endpoint, which answers.
    assert_eq!(
        addresses(&payments(&channel, &key).await?),
        std::slice::from_ref(&v4_address)
    );
    call().await?;

    // The name gains an address: a second endpoint, and it takes calls.
    std::fs::write(&hosts_file, hosts(&["127.0.0.1", "::1"]))?;
    let mut both = vec![v4_address.clone(), v6_address.clone()];
    both.sort();
    eventually("the new address becomes an endpoint", || async {
        Ok(addresses(&payments(&channel, &key).await?) == both)
    })
    .await?;
    eventually("the new endpoint takes calls", || async {
        call().await?;
        let upstream = payments(&channel, &key).await?;
        Ok(upstream
            .endpoints
            .iter()
            .any(|endpoint| endpoint.address == v6_address && endpoint.window_calls > 0))
    })
    .await?;

    // The first address vanishes: its endpoint goes, calls keep succeeding.
    std::fs::write(&hosts_file, hosts(&["::1"]))?;
    eventually("the vanished address is no endpoint any more", || async {
        Ok(addresses(&payments(&channel, &key).await?) == [v6_address.clone()])
    })
    .await?;
    for _ in 0..5 {
        call().await?;
    }
    let left = payments(&channel, &key).await?;
    assert!(left.endpoints[0].window_calls >= 5, "{left:?}");

    drop((v4, v6));
    Ok(())
}
