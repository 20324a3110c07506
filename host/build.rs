//! Builds the plugin workspace (`../plugins`) for `wasm32-wasip2` so that the
//! built-in generators can be embedded in the binary, and tells the crate
//! where the components are:
//!   KONTAIN_PLUGINS_DIR  directory holding `<crate>.wasm` for every plugin
//!                        (built-ins and test fixtures).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root");
    let plugins = root.join("plugins");
    let wit = root.join("wit");
    // A separate target dir: the outer cargo holds the lock on its own.
    let target_dir = env::var_os("KONTAIN_PLUGINS_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target").join("plugins"));

    // The SDK includes the host's reference splitting by path.
    let shared = manifest_dir.join("src/oci/image_ref.rs");
    for dir in [&plugins, &wit, &shared] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-env-changed=KONTAIN_PLUGINS_TARGET_DIR");

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&plugins)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Settings meant for the host build must not leak into the wasm build.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PROFILE_RELEASE_DEBUG",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build plugins: {e}"));
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("wasm32-wasip2") && stderr.contains("target may not be installed") {
            panic!(
                "the wasm32-wasip2 target is not installed; run:\n\n    rustup target add wasm32-wasip2\n\nthen build again."
            );
        }
        panic!("building plugins/ for wasm32-wasip2 failed:\n{stderr}");
    }
    let out = target_dir.join("wasm32-wasip2").join("release");
    // The built-in generators embedded by src/runtime/plugin.rs.
    for built_in in ["random.wasm", "mirror.wasm", "flatten.wasm"] {
        let path = out.join(built_in);
        assert!(
            path.is_file(),
            "plugins build did not produce {}",
            path.display()
        );
    }
    println!("cargo:rustc-env=KONTAIN_PLUGINS_DIR={}", out.display());
}
