//! Compiles `tests/c/test_chathub.c` against the generated header and the cdylib, and runs it.
//!
//! `.ci/run` runs the same binary under valgrind as well.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn target_dir() -> PathBuf {
    // The test binary lives in target/<profile>/deps; the cdylib one level up.
    let exe = std::env::current_exe().expect("test exe path");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>")
        .to_path_buf()
}

/// `cargo test` builds the library as an rlib only: build the cdylib the way a C user would.
fn build_cdylib(root: &std::path::Path) {
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    // The same features as this test build, so the rebuilt library does not replace the one the
    // other tests and doctests link against with a differently configured one.
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--lib", "--profile", profile, "--manifest-path"])
        .arg(root.join("Cargo.toml"));
    let features: Vec<&str> = [
        ("grpc", cfg!(feature = "grpc")),
        ("http", cfg!(feature = "http")),
        ("cuda", cfg!(feature = "cuda")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    if !features.is_empty() {
        cargo.arg(format!("--features={}", features.join(",")));
    }
    let status = cargo.status().expect("cargo runs");
    assert!(status.success(), "cargo build --lib failed");
}

#[test]
fn c_program_passes_against_the_cdylib() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let lib_dir = target_dir();
    build_cdylib(&root);
    assert!(
        lib_dir.join("libchathub.so").is_file(),
        "cdylib missing in {}",
        lib_dir.display()
    );
    let exe = lib_dir.join("test_chathub_c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread", "-o"])
        .arg(&exe)
        .arg(root.join("tests/c/test_chathub.c"))
        .arg("-I")
        .arg(root.join("bindings/c"))
        .arg("-L")
        .arg(&lib_dir)
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()))
        .arg("-lchathub")
        .status()
        .expect("a C compiler (cc) is installed");
    assert!(status.success(), "C test failed to compile");

    let out = Command::new(&exe)
        .arg(common::fixtures())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
