//! Fuzzing of request decoding and validation, with proptest generators (cargo-fuzz needs
//! a nightly toolchain).
//!
//! Every request goes over HTTP/2 to the real service in this process, so it is decoded
//! by tonic and validated by the service's gRPC edge exactly as in production. The
//! committed corpus (`tests/fuzz-corpus/<package.Service.Method>/*.hex`, plus `any/`
//! replayed against every method) runs first; then generated inputs: arbitrary bytes, and
//! wire-level mutations of the corpus's valid requests (fields dropped, duplicated,
//! retyped, values replaced by extreme numbers, long or invalid strings, nested garbage,
//! truncation). Every answer must be a gRPC status the caller can act on: OK, or
//! INVALID_ARGUMENT carrying field violations (or an ErrorInfo reason), or a domain refusal (NOT_FOUND,
//! FAILED_PRECONDITION, ALREADY_EXISTS, …) — never INTERNAL, UNKNOWN, a reset stream or a
//! dropped connection (a panic in a handler shows as one of those).
//!
//! Cases per method: [`SHORT_CASES`] in `cargo xtask test`, [`SOAK_CASES`] when
//! `PAYSUITE_SOAK=1` (`cargo xtask soak`). A failing input is printed as hex, ready to be
//! added to the corpus.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tests::hostile::{Answer, H2Client, grpc_message};
use tests::postgres::TestDatabase;
use tonic::Code;

/// Generated inputs per method in the ordinary test run.
const SHORT_CASES: usize = 48;
/// Generated inputs per method under `PAYSUITE_SOAK=1`.
const SOAK_CASES: usize = 5_000;
/// `PAYSUITE_SOAK`: set to 1 for the long run.
const ENV_SOAK: &str = "PAYSUITE_SOAK";

fn cases() -> usize {
    match std::env::var(ENV_SOAK).as_deref() {
        Ok("1") => SOAK_CASES,
        _ => SHORT_CASES,
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-corpus")
}

/// The corpus entries of `dir`, by file name.
fn read_corpus(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("hex") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let bytes = decode_hex(text.trim())
            .ok_or_else(|| anyhow::anyhow!("{} is not hex", path.display()))?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        entries.push((name, bytes));
    }
    entries.sort();
    Ok(entries)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One field of a protobuf message, as it is on the wire.
#[derive(Debug, Clone)]
struct WireField {
    number: u64,
    value: WireValue,
}

#[derive(Debug, Clone)]
enum WireValue {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Parses a well-formed message into its fields (`None` for anything else).
fn parse_fields(bytes: &[u8]) -> Option<Vec<WireField>> {
    let mut fields = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let key = read_varint(bytes, &mut at)?;
        let number = key >> 3;
        let value = match key & 7 {
            0 => WireValue::Varint(read_varint(bytes, &mut at)?),
            1 => WireValue::Fixed64(bytes.get(at..at + 8)?.try_into().ok()?),
            2 => {
                let len = usize::try_from(read_varint(bytes, &mut at)?).ok()?;
                let value = bytes.get(at..at.checked_add(len)?)?.to_vec();
                at += len;
                WireValue::Bytes(value)
            }
            5 => WireValue::Fixed32(bytes.get(at..at + 4)?.try_into().ok()?),
            _ => return None,
        };
        if matches!(value, WireValue::Fixed64(_)) {
            at += 8;
        } else if matches!(value, WireValue::Fixed32(_)) {
            at += 4;
        }
        fields.push(WireField { number, value });
    }
    Some(fields)
}

fn encode_fields(fields: &[WireField]) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        let wire_type = match field.value {
            WireValue::Varint(_) => 0,
            WireValue::Fixed64(_) => 1,
            WireValue::Bytes(_) => 2,
            WireValue::Fixed32(_) => 5,
        };
        write_varint(&mut out, field.number << 3 | wire_type);
        match &field.value {
            WireValue::Varint(v) => write_varint(&mut out, *v),
            WireValue::Fixed64(v) => out.extend_from_slice(v),
            WireValue::Bytes(v) => {
                write_varint(&mut out, v.len() as u64);
                out.extend_from_slice(v);
            }
            WireValue::Fixed32(v) => out.extend_from_slice(v),
        }
    }
    out
}

/// A structure-aware mutation of a message (indices are taken modulo its field count).
#[derive(Debug, Clone)]
enum Mutation {
    Drop(usize),
    Duplicate(usize),
    SetVarint(usize, u64),
    SetBytes(usize, Vec<u8>),
    SetText(usize, String),
    /// Recurse into a nested message (a length-delimited field that parses as one).
    Nested(usize, Box<Mutation>),
    Retype(usize),
    AddUnknown(u64, Vec<u8>),
    Truncate(usize),
    FlipByte(usize, u8),
}

fn extreme_varint() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(i64::MAX as u64),
        Just(i64::MIN as u64),
        Just(u32::MAX as u64),
        Just(i32::MAX as u64),
        Just((-1i64) as u64),
        any::<u64>(),
        0u64..10_000,
    ]
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-zA-Z0-9_:-]{1,80}",
        "\\PC{0,40}",
        (1usize..6_000).prop_map(|n| "x".repeat(n)),
        Just("acct_../../etc/passwd".to_owned()),
        Just("'; DROP TABLE payments; --".to_owned()),
        Just("\u{0}\u{202e}\u{fffd}".to_owned()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let leaf = prop_oneof![
        any::<usize>().prop_map(Mutation::Drop),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), extreme_varint()).prop_map(|(i, v)| Mutation::SetVarint(i, v)),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(i, v)| Mutation::SetBytes(i, v)),
        (any::<usize>(), text()).prop_map(|(i, t)| Mutation::SetText(i, t)),
        any::<usize>().prop_map(Mutation::Retype),
        (1u64..40, proptest::collection::vec(any::<u8>(), 0..16))
            .prop_map(|(n, v)| Mutation::AddUnknown(n, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::FlipByte(i, b)),
    ];
    leaf.prop_recursive(2, 8, 1, |inner| {
        (any::<usize>(), inner).prop_map(|(i, m)| Mutation::Nested(i, Box::new(m)))
    })
}

fn apply(message: &[u8], mutation: &Mutation) -> Vec<u8> {
    let bytes_level = |message: &[u8]| -> Vec<u8> {
        let mut out = message.to_vec();
        match mutation {
            Mutation::Truncate(at) if !out.is_empty() => out.truncate(at % out.len()),
            Mutation::FlipByte(at, byte) if !out.is_empty() => {
                let len = out.len();
                out[at % len] ^= byte | 1;
            }
            _ => {}
        }
        out
    };
    let Some(mut fields) = parse_fields(message) else {
        return bytes_level(message);
    };
    if fields.is_empty() {
        if let Mutation::AddUnknown(number, value) = mutation {
            fields.push(WireField {
                number: *number,
                value: WireValue::Bytes(value.clone()),
            });
        }
        return encode_fields(&fields);
    }
    let count = fields.len();
    match mutation {
        Mutation::Drop(i) => {
            fields.remove(i % count);
        }
        Mutation::Duplicate(i) => {
            let field = fields[i % count].clone();
            fields.push(field);
        }
        Mutation::SetVarint(i, v) => fields[i % count].value = WireValue::Varint(*v),
        Mutation::SetBytes(i, v) => fields[i % count].value = WireValue::Bytes(v.clone()),
        Mutation::SetText(i, t) => {
            fields[i % count].value = WireValue::Bytes(t.clone().into_bytes());
        }
        Mutation::Nested(i, inner) => {
            if let WireValue::Bytes(nested) = &fields[i % count].value {
                let mutated = apply(nested, inner);
                fields[i % count].value = WireValue::Bytes(mutated);
            }
        }
        Mutation::Retype(i) => {
            let field = &mut fields[i % count];
            field.value = match &field.value {
                WireValue::Varint(v) => WireValue::Fixed64(v.to_le_bytes()),
                WireValue::Fixed64(_) | WireValue::Fixed32(_) => WireValue::Bytes(vec![1, 2]),
                WireValue::Bytes(b) => WireValue::Varint(b.len() as u64),
            };
        }
        Mutation::AddUnknown(number, value) => fields.push(WireField {
            number: *number,
            value: WireValue::Bytes(value.clone()),
        }),
        Mutation::Truncate(_) | Mutation::FlipByte(..) => return bytes_level(message),
    }
    encode_fields(&fields)
}

/// An input: arbitrary bytes, or mutations of one of `seeds`.
fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let count = seeds.len().max(1);
    let mutated = (0..count, proptest::collection::vec(mutation(), 1..4)).prop_map(
        move |(seed, mutations)| {
            let mut message = seeds.get(seed).cloned().unwrap_or_default();
            for mutation in &mutations {
                message = apply(&message, mutation);
            }
            message
        },
    );
    prop_oneof![
        1 => proptest::collection::vec(any::<u8>(), 0..200),
        4 => mutated,
    ]
}

/// Whether `answer` is one a caller can act on (see the module docs).
fn acceptable(answer: &Answer) -> Result<(), String> {
    match answer {
        // Field violations, or a domain refusal named by its ErrorInfo reason (a reused
        // idempotency key).
        Answer::Grpc {
            code: Code::InvalidArgument,
            details,
            ..
        } if !details.is_empty() => Ok(()),
        Answer::Grpc {
            code:
                Code::Ok
                | Code::NotFound
                | Code::FailedPrecondition
                | Code::AlreadyExists
                | Code::OutOfRange
                | Code::PermissionDenied
                | Code::Aborted,
            ..
        } => Ok(()),
        other => Err(format!("not an answer a caller can act on: {other:?}")),
    }
}

/// Replays the corpus of `method`, then fuzzes it, against the service at `addr`.
async fn fuzz_method(
    addr: std::net::SocketAddr,
    method: &str,
    credentials: impl Fn() -> (String, String),
) -> anyhow::Result<usize> {
    let dir = corpus_dir().join(method.replace('/', "."));
    let seeds = read_corpus(&dir)?;
    anyhow::ensure!(!seeds.is_empty(), "no corpus in {}", dir.display());
    let mut client = H2Client::connect(addr).await?;
    let path = format!("/{method}");
    let send = async |client: &mut H2Client, payload: &[u8]| -> anyhow::Result<Answer> {
        let request = client.request(&path, &[credentials()])?;
        Ok(client.call(request, grpc_message(payload)).await)
    };
    // The corpus first: valid seeds must pass validation (else the mutations would start
    // from nothing valid), malformed ones must be refused clearly.
    for (name, bytes) in seeds
        .iter()
        .chain(read_corpus(&corpus_dir().join("any"))?.iter())
    {
        let answer = send(&mut client, bytes).await?;
        if let Err(why) = acceptable(&answer) {
            anyhow::bail!("{method} corpus {name} ({}): {why}", hex(bytes));
        }
        if name.starts_with("valid")
            && matches!(
                answer,
                Answer::Grpc {
                    code: Code::InvalidArgument,
                    ..
                }
            )
        {
            anyhow::bail!("{method} corpus {name} is not valid: {answer:?}");
        }
    }
    let strategy = input(seeds.into_iter().map(|(_, bytes)| bytes).collect());
    let mut runner = match std::env::var(ENV_SOAK).as_deref() {
        Ok("1") => TestRunner::default(),
        _ => TestRunner::deterministic(),
    };
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..cases() {
        let bytes = strategy
            .new_tree(&mut runner)
            .map_err(|err| anyhow::anyhow!("{err}"))?
            .current();
        // A connection the server closed (it should not) is reported, not reused.
        if client.is_closed() {
            anyhow::bail!("{method}: the server closed the connection");
        }
        let answer = send(&mut client, &bytes).await?;
        if let Err(why) = acceptable(&answer) {
            anyhow::bail!("{method} input {}: {why}", hex(&bytes));
        }
        if let Answer::Grpc { code, .. } = answer {
            *counts.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    eprintln!("fuzz {method}: {counts:?}");
    // Generated inputs must exercise both sides of validation.
    anyhow::ensure!(
        counts.contains_key("InvalidArgument"),
        "{method}: no input was refused: {counts:?}"
    );
    Ok(cases())
}

fn identity(
    audience: &'static str,
    scopes: &'static [&'static str],
) -> impl Fn() -> (String, String) {
    move || {
        (
            service_kit::identity::IDENTITY_HEADER.to_owned(),
            tests::identity::token("fuzzer", scopes, audience),
        )
    }
}

#[tokio::test]
async fn fuzz_payment_requests_are_answered_ok_or_with_field_violations() -> anyhow::Result<()> {
    let database = TestDatabase::create().await?;
    let payment = tests::services::payment(&database).await?;
    for method in [
        "CreateAccount",
        "CreatePayment",
        "GetPayment",
        "ListPayments",
        "CreateTransfer",
        "RefundPayment",
    ] {
        fuzz_method(
            payment.addr(),
            &format!("paysuite.payments.v1.PaymentService/{method}"),
            identity(
                payment_svc::config::AUDIENCE,
                &tests::payments::TENANT_SCOPES,
            ),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn fuzz_ratelimit_requests_are_answered_ok_or_with_field_violations() -> anyhow::Result<()> {
    let ratelimit = tests::services::ratelimit().await?;
    for method in ["Check", "Peek"] {
        fuzz_method(
            ratelimit.addr(),
            &format!("paysuite.ratelimit.v1.RateLimitService/{method}"),
            identity(ratelimit_svc::config::AUDIENCE, &["ratelimit:check"]),
        )
        .await?;
    }
    Ok(())
}

#[test]
fn mutations_keep_well_formed_messages_parseable_and_change_them() -> anyhow::Result<()> {
    // { 1: "abc", 2: { 1: 1000, 2: "BRL" } }
    let seed = decode_hex("0a036162631208 08e807120342524c".replace(' ', "").as_str())
        .ok_or_else(|| anyhow::anyhow!("bad hex"))?;
    assert_eq!(parse_fields(&seed).map(|f| f.len()), Some(2));
    assert_eq!(
        encode_fields(&parse_fields(&seed).unwrap_or_default()),
        seed
    );
    let dropped = apply(&seed, &Mutation::Drop(0));
    assert_eq!(parse_fields(&dropped).map(|f| f.len()), Some(1));
    let nested = apply(
        &seed,
        &Mutation::Nested(1, Box::new(Mutation::SetVarint(0, u64::MAX))),
    );
    assert_ne!(nested, seed);
    assert_eq!(parse_fields(&nested).map(|f| f.len()), Some(2));
    Ok(())
}
