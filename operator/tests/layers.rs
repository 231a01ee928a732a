//! The operator's modules depend on each other one way (docs/architecture.md, "Pieces"):
//! `model ← policy ← agent ← cli` and `model ← controller ← agent, cli`. Read from the sources: every
//! `crate::<module>` a module's files name must be one its layer may use.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The operator's top-level modules.
const MODULES: [&str; 6] = ["agent", "cli", "controller", "model", "policy", "uninstall"];

/// What each module may use.
fn allowed(module: &str) -> &'static [&'static str] {
    match module {
        "model" | "uninstall" => &[],
        "controller" => &["model"],
        "policy" => &["model"],
        "agent" => &["model", "policy", "controller"],
        "cli" => &["agent", "controller", "model", "policy", "uninstall"],
        other => panic!("unknown module {other}: add it to MODULES and to allowed()"),
    }
}

/// Files that may break their module's rule, and why.
const EXCEPTIONS: [(&str, &str); 1] = [(
    "policy/fuzz.rs",
    "the compiler's fuzz harness (tests and fuzz builds only) checks the agent's whole table",
)];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The modules `text` names as `crate::<module>`.
fn used(text: &str) -> BTreeSet<&'static str> {
    MODULES
        .into_iter()
        .filter(|m| {
            text.match_indices(&format!("crate::{m}"))
                .any(|(i, found)| {
                    // A whole name: `crate::agent` but not `crate::agents`.
                    !text[i + found.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                })
        })
        .collect()
}

#[test]
fn the_operator_s_modules_depend_on_each_other_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    let mut checked = 0;
    for module in MODULES {
        let mut files = Vec::new();
        let dir = src.join(module);
        if dir.is_dir() {
            sources(&dir, &mut files);
        }
        let file = src.join(format!("{module}.rs"));
        if file.is_file() {
            files.push(file);
        }
        assert!(!files.is_empty(), "module {module} has no sources");
        for file in files {
            let relative = file
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if EXCEPTIONS.iter().any(|(f, _)| *f == relative) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            checked += 1;
            for m in used(&text) {
                if m != module && !allowed(module).contains(&m) {
                    broken.push(format!("{relative} uses crate::{m}"));
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} files read");
    assert!(
        broken.is_empty(),
        "dependencies against the layers (model ← policy ← agent ← cli, controller ← agent, cli):\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn the_check_sees_a_dependency_upwards() {
    assert_eq!(
        used("use crate::agent::firewall;\nuse crate::model::Resources;"),
        BTreeSet::from(["agent", "model"])
    );
    assert!(used("crate::agents::x").is_empty());
    assert!(!allowed("policy").contains(&"agent"));
}
