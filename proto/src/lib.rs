//! The paysuite contracts: Rust types and tonic clients/servers generated from
//! `proto/paysuite/**/*.proto`, the encoded descriptor set, and the per-method policy
//! (required scope, idempotency level) declared in those descriptors.
//!
//! - [`api::v1`]: the shared `required_scope` method option (its name, field number and
//!   the scopes in use; the option itself has no generated Rust type).
//! - [`payments::v1`], [`ratelimit::v1`], [`gateway::v1`], [`acquirer::v1`]: one module per
//!   protobuf package, each with its messages, enums, and a `<service>_server` and
//!   `<service>_client` module per service.
//! - [`FILE_DESCRIPTOR_SET`]: every paysuite file plus its imports, with comments, for
//!   reflection and for the gateway.
//! - [`policy`]: each RPC's `required_scope`, `idempotency_level` and streaming shape,
//!   read from [`FILE_DESCRIPTOR_SET`].

pub mod policy;

/// The encoded `FileDescriptorSet` of every paysuite file and its imports, with source
/// info (comments), as registered with reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/paysuite_descriptor_set.bin"));

// Includes the code tonic-prost-build generated for one package. The modules that use it
// allow `missing_debug_implementations` and clippy's lints: generated code (service
// wrappers without Debug, long functions, needless borrows) is not ours to fix.
macro_rules! generated {
    ($package:literal) => {
        include!(concat!(env!("OUT_DIR"), "/", $package, ".rs"));
    };
}

/// `paysuite.api.v1`.
pub mod api {
    /// Options shared by every paysuite API.
    #[allow(missing_debug_implementations, clippy::all, clippy::pedantic)]
    pub mod v1 {
        generated!("paysuite.api.v1");

        /// Full name of the method option naming the scope an RPC requires.
        pub const REQUIRED_SCOPE_EXTENSION: &str = "paysuite.api.v1.required_scope";
        /// Field number of that option in `google.protobuf.MethodOptions`.
        pub const REQUIRED_SCOPE_FIELD_NUMBER: u32 = 50001;

        /// Payments reads and streams.
        pub const SCOPE_PAYMENTS_READ: &str = "payments:read";
        /// Payments writes.
        pub const SCOPE_PAYMENTS_WRITE: &str = "payments:write";
        /// Operator services: payments admin and gateway admin.
        pub const SCOPE_ADMIN: &str = "admin";
        /// The rate limiter's own API.
        pub const SCOPE_RATELIMIT_CHECK: &str = "ratelimit:check";
        /// The acquirer and its sandbox controls.
        pub const SCOPE_ACQUIRER_CALL: &str = "acquirer:call";
        /// Every scope a paysuite RPC may require.
        pub const SCOPES: [&str; 5] = [
            SCOPE_PAYMENTS_READ,
            SCOPE_PAYMENTS_WRITE,
            SCOPE_ADMIN,
            SCOPE_RATELIMIT_CHECK,
            SCOPE_ACQUIRER_CALL,
        ];
    }
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
