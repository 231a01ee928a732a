//! Every manifest in the repository's top-level `examples/*.yaml` parses into weft's types and
//! passes `validate()`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use serde_json::Value;
use std::path::{Path, PathBuf};
use weft_crds::{Network, PortForward};

fn example_files() -> Vec<PathBuf> {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

#[test]
fn examples_parse_and_validate() {
    let files = example_files();
    let mut checked = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()));
        for (i, doc) in docs.into_iter().enumerate() {
            let at = format!("{} document {}", path.display(), i + 1);
            let api_version = doc
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let kind = doc
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if !api_version.starts_with("weft.dev/") {
                // Other kinds (e.g. a Pod to forward to) are not ours to check.
                continue;
            }
            assert_eq!(api_version, weft_crds::constants::API_VERSION, "{at}");
            let errors = match kind.as_str() {
                "Network" => {
                    let n: Network =
                        serde_json::from_value(doc).unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(n.metadata.name.is_some(), "{at}: no metadata.name");
                    n.spec.validate()
                }
                "PortForward" => {
                    let p: PortForward =
                        serde_json::from_value(doc).unwrap_or_else(|e| panic!("{at}: {e}"));
                    assert!(p.metadata.name.is_some(), "{at}: no metadata.name");
                    p.spec.validate()
                }
                other => panic!("{at}: unknown weft kind {other}"),
            };
            if let Err(errs) = errors {
                let list: Vec<String> = errs.iter().map(ToString::to_string).collect();
                panic!("{at} ({kind}) is invalid:\n{}", list.join("\n"));
            }
            checked.push(format!(
                "{}:{kind}",
                path.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    for expected in [
        "network-nat.yaml:Network",
        "network-bridge.yaml:Network",
        "portforward.yaml:PortForward",
    ] {
        assert!(
            checked.iter().any(|c| c == expected),
            "no {expected} among {checked:?}"
        );
    }
}

#[test]
fn documented_examples_use_the_documented_features() {
    let read = |name: &str| -> Value {
        let p = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples")).join(name);
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&std::fs::read_to_string(p).unwrap()).unwrap();
        docs.into_iter()
            .find(|d| {
                d.get("apiVersion").and_then(Value::as_str)
                    == Some(weft_crds::constants::API_VERSION)
            })
            .unwrap_or_else(|| panic!("{name}: no weft resource"))
    };
    let nat: Network = serde_json::from_value(read("network-nat.yaml")).unwrap();
    assert_eq!(nat.metadata.name.as_deref(), Some("nat-demo"));
    assert!(
        nat.spec.subnet_v4().is_some() && nat.spec.subnet_v6().is_some(),
        "nat-demo is dual-stack"
    );

    let bridge: Network = serde_json::from_value(read("network-bridge.yaml")).unwrap();
    assert_eq!(bridge.spec.mode, weft_crds::NetworkMode::Bridge);
    assert_eq!(
        bridge.spec.bridge.as_ref().map(|b| b.uplink.as_str()),
        Some("eth1")
    );
    assert_eq!(bridge.spec.vlan(), Some(10));

    let pf: PortForward = serde_json::from_value(read("portforward.yaml")).unwrap();
    let ports = pf.spec.forward_ports();
    assert!(
        ports.iter().any(|p| p.node_ports.0 == p.node_ports.1),
        "a single port"
    );
    assert!(
        ports.iter().any(|p| p.node_ports.0 < p.node_ports.1),
        "a port range"
    );
    assert!(
        pf.spec.allow_from.as_ref().is_some_and(|a| !a.is_empty()),
        "allowFrom"
    );
}
