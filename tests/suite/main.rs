//! kontain's integration suite: one binary, run by libtest-mimic so that it
//! can start the processes it needs (the real server, dockerd) once, share
//! them between trials, and stop them at the end.
//!
//! `cargo test --release --test suite -- <filter>` runs a subset.

mod buildpack;
mod deploy;
mod expiry;
mod fair;
mod flatten;
mod flatten_real;
mod gcs;
mod hostile;
mod http;
mod ko;
mod long;
mod mirror;
mod ops;
mod plugins;
mod pull;
mod reload;
mod storage;
mod support;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let trials = [
        deploy::trials(),
        http::trials(),
        plugins::trials(),
        pull::trials(),
        mirror::trials(),
        flatten::trials(),
        flatten_real::trials(),
        ko::trials(),
        buildpack::trials(),
        expiry::trials(),
        gcs::trials(),
        storage::trials(),
        reload::trials(),
        hostile::trials(),
        ops::trials(),
        fair::trials(),
        long::trials(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    support::teardown();
    conclusion.exit_code()
}
