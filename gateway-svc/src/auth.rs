//! Who is calling, and what the upstream is told about it.
//!
//! - [`Authenticate`]: `authorization: Bearer <API key>` → the key's [`Caller`], checked
//!   against the RPC's `required_scope` from the contract. Missing or unknown key →
//!   UNAUTHENTICATED; scope not held → PERMISSION_DENIED. The key itself never goes
//!   upstream.
//! - [`MintIdentity`]: the identity token the upstream trusts (`x-paysuite-identity`,
//!   for the cluster's audience, living `GATEWAY_TOKEN_TTL`; one per caller and audience
//!   is reused for half its lifetime, see [`Minter`]).
//! - [`strip_internal_headers`]: clients cannot send `x-paysuite-*` headers: whatever
//!   they sent is removed before anything reads the request, so a forged identity never
//!   reaches an upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Response};
use service_kit::identity::{IDENTITY_HEADER, Minter};
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::keys::{Caller, KeyStore};
use crate::proxy::{GrpcFuture, status_response};

/// The prefix of the suite's internal headers.
const INTERNAL_HEADER_PREFIX: &str = "x-paysuite-";

/// Removes every `x-paysuite-*` header a client sent.
pub fn strip_internal_headers(headers: &mut HeaderMap) {
    let internal: Vec<_> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(INTERNAL_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in internal {
        headers.remove(name);
    }
}

/// The caller of `headers` if it holds `required_scope`.
pub fn authenticate(
    keys: &KeyStore,
    required_scope: &str,
    headers: &HeaderMap,
) -> Result<Caller, Status> {
    let mut presented = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (presented.next(), presented.next()) else {
        return Err(Status::unauthenticated(
            "missing API key: send the header authorization: Bearer <key>",
        ));
    };
    let key = value
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .ok_or_else(|| Status::unauthenticated("the authorization header must be Bearer <key>"))?;
    let caller = keys
        .caller(key)
        .ok_or_else(|| Status::unauthenticated("invalid API key"))?;
    if !caller.scopes.contains(required_scope) {
        return Err(Status::permission_denied(format!(
            "this call requires the scope {required_scope}"
        )));
    }
    Ok(caller)
}

/// Adds [`Authenticate`] to a stack.
#[derive(Debug, Clone)]
pub struct AuthenticateLayer {
    keys: KeyStore,
}

impl AuthenticateLayer {
    /// Authenticates against `keys`.
    pub fn new(keys: KeyStore) -> Self {
        Self { keys }
    }
}

impl<S> Layer<S> for AuthenticateLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// Lets through only callers whose API key holds the RPC's scope; they continue with
/// their [`Caller`] in the request extensions and without the key.
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    keys: KeyStore,
}

impl<S> Service<Request<tonic::body::Body>> for Authenticate<S>
where
    S: Service<
            Request<tonic::body::Body>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
            Future = GrpcFuture,
        >,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        // Only routed paysuite RPCs reach this layer; an RPC without a policy would be a
        // contract defect, refused rather than let through.
        let Some(policy) = proto::policy::method_policy(request.uri().path()) else {
            return refuse(&Status::unimplemented("unknown method"));
        };
        match authenticate(&self.keys, &policy.required_scope, request.headers()) {
            Ok(caller) => {
                service_kit::telemetry::record_principal(&caller.principal);
                request.headers_mut().remove(AUTHORIZATION);
                request.extensions_mut().insert(caller);
                self.inner.call(request)
            }
            Err(status) => refuse(&status),
        }
    }
}

fn refuse(status: &Status) -> GrpcFuture {
    Box::pin(std::future::ready(Ok(status_response(status))))
}

/// Adds [`MintIdentity`] to a stack.
#[derive(Debug, Clone)]
pub struct MintIdentityLayer {
    minter: Arc<Minter>,
    audience: Arc<str>,
}

impl MintIdentityLayer {
    /// Mints (or reuses, see [`Minter`]) tokens for `audience`.
    pub fn new(minter: Arc<Minter>, audience: &str) -> Self {
        Self {
            minter,
            audience: audience.into(),
        }
    }
}

impl<S> Layer<S> for MintIdentityLayer {
    type Service = MintIdentity<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MintIdentity {
            inner,
            minter: Arc::clone(&self.minter),
            audience: Arc::clone(&self.audience),
        }
    }
}

/// Sends the authenticated [`Caller`] upstream as a short-lived identity token.
#[derive(Debug, Clone)]
pub struct MintIdentity<S> {
    inner: S,
    minter: Arc<Minter>,
    audience: Arc<str>,
}

impl<S> Service<Request<tonic::body::Body>> for MintIdentity<S>
where
    S: Service<
            Request<tonic::body::Body>,
            Response = Response<tonic::body::Body>,
            Error = Infallible,
            Future = GrpcFuture,
        >,
{
    type Response = Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = GrpcFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<tonic::body::Body>) -> Self::Future {
        let Some(caller) = request.extensions().get::<Caller>() else {
            // Authenticate always runs first; without a caller nothing may go upstream.
            return refuse(&Status::unauthenticated("missing API key"));
        };
        let scopes: Vec<String> = caller.scopes.iter().cloned().collect();
        let token = self
            .minter
            .token(&caller.principal, &scopes, &self.audience);
        request.headers_mut().insert(IDENTITY_HEADER, token);
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_headers_are_stripped_and_others_kept() -> anyhow::Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(IDENTITY_HEADER, "forged".parse()?);
        headers.append("x-paysuite-anything", "a".parse()?);
        headers.append("x-paysuite-anything", "b".parse()?);
        headers.insert("x-request-id", "r1".parse()?);
        strip_internal_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-request-id"));
        Ok(())
    }
}
