//! The paysuite contracts: Rust types and tonic clients/servers generated from
//! `proto/paysuite/**/*.proto`, the encoded descriptor set, and the per-method policy
//! (required scope, idempotency level) declared in those descriptors.
//!
//! - [`payments::v1`], [`ratelimit::v1`], [`gateway::v1`], [`acquirer::v1`]: one module per
//!   protobuf package.
//! - [`FILE_DESCRIPTOR_SET`]: every paysuite file plus its imports, with comments, for
//!   reflection and for the gateway.
//! - [`policy`]: each RPC's `required_scope` (the `paysuite.api.v1` method option, which
//!   has no Rust types of its own), `idempotency_level` and streaming shape.

pub mod policy;

/// The encoded `FileDescriptorSet` of every paysuite file and its imports, with source
/// info (comments), as registered with reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/paysuite_descriptor_set.bin"));

// Generated code: lints that target hand-written code do not apply to it.
macro_rules! generated {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
    };
}

/// `paysuite.payments.v1`.
pub mod payments {
    /// Payments, accounts, transfers, ledger, events and admin.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        generated!("paysuite.payments.v1");
    }
}

/// `paysuite.ratelimit.v1`.
pub mod ratelimit {
    /// The rate limiter's own API.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        generated!("paysuite.ratelimit.v1");
    }
}

/// `paysuite.gateway.v1`.
pub mod gateway {
    /// The gateway's admin API.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        generated!("paysuite.gateway.v1");
    }
}

/// `paysuite.acquirer.v1`.
pub mod acquirer {
    /// The acquirer and the sandbox's controls.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        generated!("paysuite.acquirer.v1");
    }
}
