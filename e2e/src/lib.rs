//! End-to-end tests live in `tests/`; this is what they share (test support: it panics).
#![allow(clippy::expect_used)]

use std::path::PathBuf;

/// `target/<profile>/weft-operator`, next to the `weft` binary; both are built by
/// `cargo build --workspace` (and by `cargo test --workspace`, since their crates have tests).
pub fn operator_binary() -> PathBuf {
    binary("weft-operator")
}

/// `target/<profile>/weft-lab`, which runs the `weft-operator` agent and the `weft` binary found
/// next to it; all three are built by `cargo build --workspace`.
pub fn lab_binary() -> PathBuf {
    let lab = binary("weft-lab");
    operator_binary();
    lab
}

/// `target/<profile>/<name>`; fails unless it and the `weft` binary are there.
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = dir.join(name);
    assert!(
        bin.exists() && dir.join("weft").exists(),
        "{} and weft are missing: run `cargo build --workspace` first (make test does)",
        bin.display()
    );
    bin
}

/// Fails the test unless it runs as root (the lab makes network namespaces).
pub fn require_root() {
    assert!(
        is_root(),
        "the lab needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces: run the tests as root"
    );
}

/// Whether the effective user is root.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
