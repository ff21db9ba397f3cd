//! Failpoints (DESIGN §7): with the `failpoints` feature, `PAYSUITE_FAILPOINT=<name>`
//! aborts the process when execution reaches `hit("<name>")`, so crash tests are
//! deterministic. Without the feature, `hit` compiles to nothing.

/// The environment variable naming the failpoint to abort at.
pub const ENV_FAILPOINT: &str = "PAYSUITE_FAILPOINT";

/// Aborts the process if `name` is the configured failpoint (only with `failpoints`).
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if std::env::var(ENV_FAILPOINT).is_ok_and(|configured| configured == name) {
        eprintln!("payment-svc: failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// Does nothing: failpoints are compiled out of release builds.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
