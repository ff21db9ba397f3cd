//! Hostile input against every service (payment-svc, ratelimit-svc, gateway-svc), as
//! spawned processes: each case attacks each service while a [`Probe`] keeps calling its
//! health check and a normal RPC over a connection opened before the attack. Every case
//! asserts three things: the hostile traffic gets a clear refusal, the probe saw no failure
//! at all (allowance: zero), and the process's resident memory (`VmRSS`, and `VmHWM` when
//! it rose) stayed within a stated bound of its baseline.
//!
//! The bounds were set from measurements on the shared 2-core test machine (the figures
//! are printed with `--no-capture`); each states what the growth would be if the limit
//! under test were missing, so the bound is well below that and well above the noise.

use std::time::Duration;

use bytes::Bytes;
use tests::hostile::{
    Answer, H2Client, Probe, RawConnection, Target, Targets, error_code, flags, frame, frame_type,
    grpc_message, hpack_literal,
};
use tonic::Code;

/// The default `GRPC_MAX_MESSAGE_BYTES` (4 MiB).
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_oversize_messages_get_resource_exhausted_without_buffering()
-> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let (path, _) = target.unary_method();
        // Sixteen calls at once, each sending a whole message one byte over the limit, and
        // one announcing 4 GiB: buffered, they would be 64 MiB.
        let mut calls = Vec::new();
        for announced in std::iter::repeat_n(MAX_MESSAGE_BYTES + 1, 16).chain([u32::MAX as usize]) {
            let mut client = H2Client::connect(target.addr()).await?;
            let request = client.request(path, &[credentials(target)])?;
            let body = oversize_body(announced);
            calls.push(tokio::spawn(
                async move { client.call(request, body).await },
            ));
        }
        for call in calls {
            let answer = call.await?;
            assert!(
                matches!(&answer, Answer::Grpc { code: Code::ResourceExhausted, message, .. }
                    if message.contains("exceeds the limit")),
                "{}: {answer:?}",
                target.name()
            );
        }
        // Bound: 16 MiB. Buffering the messages would add 64 MiB; what remains is HTTP/2
        // receive windows and allocator slack.
        probe
            .finish()
            .await?
            .assert_healthy(target, "oversize", 16.0);
    }
    Ok(())
}

/// A message announcing `announced` bytes, of which at most 4 MiB + 1 are sent.
fn oversize_body(announced: usize) -> Bytes {
    let sent = announced.min(MAX_MESSAGE_BYTES + 1);
    let mut body = Vec::with_capacity(sent + 5);
    body.push(0);
    body.extend_from_slice(&u32::try_from(announced).unwrap_or(u32::MAX).to_be_bytes());
    body.resize(sent + 5, b'x');
    body.into()
}

fn credentials(target: &Target) -> (String, String) {
    let (name, value) = target.credentials();
    (name.to_owned(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_64_kib_of_metadata_closes_the_connection_and_20_kib_gets_431()
-> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let (path, body) = target.unary_method();
        let metadata = |entries: usize| {
            let mut metadata = vec![credentials(target)];
            for i in 0..entries {
                metadata.push((format!("x-hostile-{i}"), "m".repeat(4 * 1024)));
            }
            metadata
        };
        for _ in 0..50 {
            // 64 KiB is past four times GRPC_MAX_HEADER_LIST_BYTES (16 KiB), where h2 stops
            // decoding and closes the connection (COMPRESSION_ERROR) rather than keep
            // a header block it will not use.
            let mut client = H2Client::connect(target.addr()).await?;
            let request = client.request(path, &metadata(16))?;
            let answer = client.call(request, grpc_message(&body)).await;
            // The server ends the connection: the client sees a connection error (GOAWAY
            // COMPRESSION_ERROR, or a broken pipe while it still sends).
            assert!(
                matches!(&answer, Answer::Connection(_)),
                "{}: {answer:?}",
                target.name()
            );
        }
        // 20 KiB: over the limit, under the abuse threshold: HTTP 431 for that call, and the
        // same connection goes on serving.
        let mut client = H2Client::connect(target.addr()).await?;
        for _ in 0..20 {
            let request = client.request(path, &metadata(5))?;
            let answer = client.call(request, grpc_message(&body)).await;
            assert!(
                matches!(
                    answer,
                    Answer::Http(431) | Answer::Reset(h2::Reason::REFUSED_STREAM)
                ),
                "{}: {answer:?}",
                target.name()
            );
        }
        let request = client.request(path, &metadata(1))?;
        let answer = client.call(request, grpc_message(&body)).await;
        assert!(
            matches!(answer, Answer::Grpc { code: Code::Ok, .. }),
            "{}: {answer:?}",
            target.name()
        );
        // Bound: 16 MiB (h2 never holds more than four times the header limit per
        // connection; 50 such blocks held at once would be 3 MiB).
        probe
            .finish()
            .await?
            .assert_healthy(target, "metadata", 16.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_malformed_protobuf_gets_invalid_argument_and_trips_no_breaker()
-> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let (path, _) = target.unary_method();
        let mut client = H2Client::connect(target.addr()).await?;
        let malformed: [&[u8]; 4] = [
            // A field with wire type 7 (there is none).
            &[0x0f, 0x01],
            // A varint that never ends.
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            // A length-delimited field claiming more bytes than follow.
            &[0x12, 0x7f, b'a'],
            // Field 2 as a string holding invalid UTF-8.
            &[0x12, 0x02, 0xff, 0xfe],
        ];
        // Fifty malformed calls in a row: were they answered INTERNAL, the gateway would
        // count each as an upstream failure and open the breaker for every tenant.
        for round in 0..50 {
            let payload = malformed[round % malformed.len()];
            let request = client.request(path, &[credentials(target)])?;
            let answer = client.call(request, grpc_message(payload)).await;
            assert!(
                matches!(&answer, Answer::Grpc { code: Code::InvalidArgument, message, details, .. }
                    if message.contains("failed to decode Protobuf message")
                        && details == &[service_kit::malformed::FIELD]),
                "{}: {answer:?}",
                target.name()
            );
        }
        probe
            .finish()
            .await?
            .assert_healthy(target, "malformed protobuf", 16.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_rapid_reset_flood_gets_goaway_enhance_your_calm() -> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let (path, _) = target.unary_method();
        let (header, value) = target.credentials();
        let mut codes = Vec::new();
        for _ in 0..10 {
            let mut connection = RawConnection::open(target.addr()).await?;
            let headers = connection.request_headers(path, &[(header, value.as_str())]);
            let mut flood = Vec::new();
            for i in 0..2_000u32 {
                let stream_id = 2 * i + 1;
                flood.extend(frame(
                    frame_type::HEADERS,
                    flags::END_HEADERS,
                    stream_id,
                    &headers,
                ));
                flood.extend(frame(
                    frame_type::RST_STREAM,
                    0,
                    stream_id,
                    &error_code::CANCEL.to_be_bytes(),
                ));
            }
            // The server may close the connection before reading it all.
            let _ = connection.send(&flood).await;
            codes.push(connection.until_goaway(&mut Vec::new()).await);
        }
        assert!(
            codes
                .iter()
                .all(|c| *c == Some(error_code::ENHANCE_YOUR_CALM)),
            "{}: {codes:?}",
            target.name()
        );
        probe
            .finish()
            .await?
            .assert_healthy(target, "rapid reset", 16.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_malformed_frames_close_the_connection_with_the_right_error()
-> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        // Indexed header field 62: the first dynamic-table entry, and the table is empty
        // (RFC 7541 §2.3.3).
        let bad_headers = vec![0x80 | 62];
        // h2 answers some of these with PROTOCOL_ERROR where RFC 9113/7541 name a more
        // specific code (FRAME_SIZE_ERROR for a bad SETTINGS length, COMPRESSION_ERROR for
        // HPACK); either way the connection ends with GOAWAY and an error code.
        const PROTOCOL: u32 = error_code::PROTOCOL_ERROR;
        let cases: Vec<(&str, Vec<u8>, &[u32])> = vec![
            (
                "DATA on stream 0",
                frame(frame_type::DATA, 0, 0, b"x"),
                &[PROTOCOL],
            ),
            (
                "undecodable HPACK",
                frame(
                    frame_type::HEADERS,
                    flags::END_HEADERS | flags::END_STREAM,
                    1,
                    &bad_headers,
                ),
                &[PROTOCOL, error_code::COMPRESSION_ERROR],
            ),
            (
                "SETTINGS of a bad length",
                frame(frame_type::SETTINGS, 0, 0, &[0; 5]),
                &[PROTOCOL, error_code::FRAME_SIZE_ERROR],
            ),
            (
                "a frame over SETTINGS_MAX_FRAME_SIZE",
                frame(frame_type::DATA, 0, 1, &[0; 16 * 1024 + 1]),
                &[PROTOCOL, error_code::FRAME_SIZE_ERROR],
            ),
            (
                "WINDOW_UPDATE of zero",
                frame(frame_type::WINDOW_UPDATE, 0, 0, &[0; 4]),
                &[PROTOCOL],
            ),
            (
                "CONTINUATION without HEADERS",
                frame(frame_type::CONTINUATION, flags::END_HEADERS, 1, b""),
                &[PROTOCOL],
            ),
        ];
        for (what, bytes, expected) in &cases {
            for _ in 0..20 {
                let mut connection = RawConnection::open(target.addr()).await?;
                let _ = connection.send(bytes).await;
                let code = connection.until_goaway(&mut Vec::new()).await;
                assert!(
                    code.is_some_and(|code| expected.contains(&code)),
                    "{}: {what}: GOAWAY {code:?}",
                    target.name()
                );
            }
        }
        // Stream errors the client causes (a request ending at once that announced a
        // body): each is reset, and past GRPC_MAX_LOCAL_ERROR_RESETS (256) the connection
        // is closed.
        let mut connection = RawConnection::open(target.addr()).await?;
        let (path, _) = target.unary_method();
        let mut headers = connection.request_headers(path, &[]);
        hpack_literal(&mut headers, b"content-length", b"5");
        let mut flood = Vec::new();
        for i in 0..400u32 {
            flood.extend(frame(
                frame_type::HEADERS,
                flags::END_HEADERS | flags::END_STREAM,
                2 * i + 1,
                &headers,
            ));
        }
        let _ = connection.send(&flood).await;
        // (h2 may send the GOAWAY before the queued RST_STREAM frames, so only the
        // GOAWAY is asserted: ENHANCE_YOUR_CALM is what the reset limit sends.)
        let code = connection.until_goaway(&mut Vec::new()).await;
        assert_eq!(
            code,
            Some(error_code::ENHANCE_YOUR_CALM),
            "{}",
            target.name()
        );
        probe
            .finish()
            .await?
            .assert_healthy(target, "malformed frames", 16.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_thousands_of_idle_connections_cost_bounded_memory() -> anyhow::Result<()> {
    let targets = Targets::start(&[("GRPC_HANDSHAKE_TIMEOUT", "1s".to_owned())]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let mut idle = Vec::new();
        for _ in 0..3_000 {
            idle.push(RawConnection::open(target.addr()).await?);
        }
        let mut silent = Vec::new();
        for _ in 0..500 {
            silent.push(RawConnection::open_tcp(target.addr()).await?);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut closed = 0;
        for mut connection in silent {
            if connection.closed_by_server().await {
                closed += 1;
            }
        }
        assert_eq!(
            closed,
            500,
            "{}: silent connections left open",
            target.name()
        );
        let report = probe.finish().await?;
        drop(idle);
        // Measured ≈ 23 KiB per idle HTTP/2 connection (hyper's connection state, buffers
        // and task); bound: 32 KiB × 3,000 ≈ 94 MiB. At the default GRPC_MAX_CONNECTIONS
        // (10,000) that is ≈ 310 MiB per process at most.
        report.assert_healthy(target, "idle connections", 94.0);
    }
    Ok(())
}

/// `grpc.reflection.v1.ServerReflectionRequest { file_containing_symbol }`: the answer
/// holds payment-svc's descriptors and their dependencies, the largest answer every
/// service gives.
fn reflection_request() -> Bytes {
    let symbol = b"paysuite.payments.v1.PaymentService";
    let mut message = vec![0x22, symbol.len() as u8];
    message.extend_from_slice(symbol);
    grpc_message(&message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_hostile_slow_readers_that_never_open_their_window_cost_bounded_memory()
-> anyhow::Result<()> {
    let targets = Targets::start(&[]).await?;
    for target in targets.iter() {
        let probe = Probe::start(target).await?;
        let mut readers = Vec::new();
        let mut responses = Vec::new();
        for _ in 0..8 {
            let mut builder = h2::client::Builder::new();
            builder.initial_window_size(0);
            let client = H2Client::connect_with(target.addr(), builder).await?;
            for _ in 0..250 {
                let request = client.request(
                    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                    &[],
                )?;
                let mut send = client.sender().ready().await?;
                let (response, mut body) = send.send_request(request, false)?;
                body.send_data(reflection_request(), true)?;
                responses.push((response, body));
            }
            readers.push(client);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let report = probe.finish().await?;
        drop(responses);
        drop(readers);
        // Measured ≈ 26 KiB per stalled stream (the encoded reflection answer waiting for a
        // window that never opens); bound: 40 KiB × 2,000 streams ≈ 80 MiB. Memory held by
        // slow readers is streams × answer size: at most GRPC_MAX_CONCURRENT_STREAMS per
        // connection, until GRPC_MAX_CONNECTION_AGE (+ grace) ends the connection.
        report.assert_healthy(target, "slow readers", 80.0);
    }
    Ok(())
}
