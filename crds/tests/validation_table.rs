//! The validation table (`e2e/validation/cases.yaml`) through the Rust side: every case is
//! read into its typed resource and checked with `validate()`; the verdict must be the
//! table's, and a rejection must name the table's field. The API-server side of the same
//! table is `e2e/validation/check-apiserver.sh`. The same holds for the table of updates
//! (`e2e/validation/updates.yaml`), judged by `NetworkSpec::validate_update`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use weft_crds::{
    ClusterSegmentationPolicy, FieldError, Network, PortForward, SegmentationPolicy, TrafficMirror,
};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    expect: Expect,
    #[serde(default)]
    field: Option<String>,
    object: Value,
}

#[derive(serde::Deserialize, PartialEq, Eq, Debug, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Accept,
    Reject,
}

fn cases() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/validation/cases.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

/// Where Rust finds a problem: the fields of its errors, or, when the object does not even fit
/// the typed resource (an unknown enum value, a missing required field), the path serde
/// stopped at and its message.
enum Verdict {
    Valid,
    Invalid(Vec<FieldError>),
    Unreadable { path: String, message: String },
}

fn judge<K: DeserializeOwned>(
    object: &Value,
    validate: impl Fn(&K) -> Result<(), Vec<FieldError>>,
) -> Verdict {
    match serde_path_to_error::deserialize::<_, K>(object.clone()) {
        Err(e) => Verdict::Unreadable {
            path: e.path().to_string(),
            message: e.inner().to_string(),
        },
        Ok(k) => match validate(&k) {
            Ok(()) => Verdict::Valid,
            Err(errors) => Verdict::Invalid(errors),
        },
    }
}

fn verdict(object: &Value) -> Verdict {
    match object["kind"].as_str() {
        Some("Network") => judge::<Network>(object, |n| n.spec.validate()),
        Some("PortForward") => judge::<PortForward>(object, |p| p.spec.validate()),
        Some("ClusterSegmentationPolicy") => {
            judge::<ClusterSegmentationPolicy>(object, |p| p.spec.validate())
        }
        Some("SegmentationPolicy") => judge::<SegmentationPolicy>(object, |p| p.spec.validate()),
        Some("TrafficMirror") => judge::<TrafficMirror>(object, |m| m.spec.validate()),
        other => panic!("no validate() for kind {other:?}"),
    }
}

/// Does `path` name `field` or something inside it (`spec.gateway[0]` names `spec.gateway`)?
fn names(path: &str, field: &str) -> bool {
    path == field
        || path
            .strip_prefix(field)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

#[test]
fn the_table_has_enough_cases_of_every_kind_with_unique_names() {
    let cases = cases();
    let mut seen = BTreeSet::new();
    for c in &cases {
        assert!(seen.insert(c.name.clone()), "{} twice", c.name);
        assert!(
            !c.name.is_empty()
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{}: names are kebab-case",
            c.name
        );
        assert!(
            c.object["metadata"]["name"].as_str().is_some(),
            "{}: no metadata.name",
            c.name
        );
        let namespaced = matches!(
            c.object["kind"].as_str(),
            Some("PortForward" | "SegmentationPolicy" | "TrafficMirror")
        );
        assert_eq!(
            c.object["metadata"]["namespace"].as_str() == Some("weft-validation"),
            namespaced,
            "{}: namespaced kinds go to weft-validation, others have no namespace",
            c.name
        );
        assert_eq!(
            c.field.is_some(),
            c.expect == Expect::Reject,
            "{}: field is for rejects",
            c.name
        );
    }
    let count = |expect: Expect| cases.iter().filter(|c| c.expect == expect).count();
    assert!(
        count(Expect::Reject) >= 40,
        "{} rejects",
        count(Expect::Reject)
    );
    assert!(
        count(Expect::Accept) >= 15,
        "{} accepts",
        count(Expect::Accept)
    );
    for kind in [
        "Network",
        "PortForward",
        "ClusterSegmentationPolicy",
        "SegmentationPolicy",
    ] {
        for expect in [Expect::Reject, Expect::Accept] {
            assert!(
                cases
                    .iter()
                    .any(|c| c.expect == expect && c.object["kind"] == kind),
                "no {expect:?} case of {kind}"
            );
        }
    }
}

#[test]
fn rust_validation_agrees_with_the_table() {
    let mut problems = Vec::new();
    for c in cases() {
        match (c.expect, verdict(&c.object)) {
            (Expect::Accept, Verdict::Valid) => {}
            (Expect::Accept, Verdict::Invalid(errors)) => problems.push(format!(
                "{}: accepted by the table, rejected by validate(): {}",
                c.name,
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            (Expect::Accept, Verdict::Unreadable { path, message }) => problems.push(format!(
                "{}: accepted by the table, unreadable in Rust at {path}: {message}",
                c.name
            )),
            (Expect::Reject, Verdict::Valid) => problems.push(format!(
                "{}: rejected by the table, accepted by validate()",
                c.name
            )),
            (Expect::Reject, Verdict::Invalid(errors)) => {
                let field = c.field.as_deref().unwrap_or_default();
                if !errors.iter().any(|e| names(&e.field, field)) {
                    problems.push(format!(
                        "{}: no error names {field}: {}",
                        c.name,
                        errors
                            .iter()
                            .map(|e| e.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ));
                }
            }
            (Expect::Reject, Verdict::Unreadable { path, message }) => {
                // An unknown enum value stops serde at the field; a missing field stops it at
                // the object that lacks it, and the message names the field.
                let field = c.field.as_deref().unwrap_or_default();
                let last = field.rsplit('.').next().unwrap_or_default();
                let named = names(&path, field)
                    || (names(field, &path) && message.contains(&format!("`{last}`")));
                if !named {
                    problems.push(format!(
                        "{}: unreadable at {path} ({message}), not at {field}",
                        c.name
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---- updates of live resources (e2e/validation/updates.yaml) ----

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Update {
    name: String,
    expect: Expect,
    #[serde(default)]
    field: Option<String>,
    old: Value,
    new: Value,
}

fn updates() -> Vec<Update> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/validation/updates.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap()
}

#[test]
fn the_update_table_covers_every_immutable_network_field_and_allowed_changes() {
    let updates = updates();
    let mut seen = BTreeSet::new();
    for u in &updates {
        assert!(seen.insert(u.name.clone()), "{} twice", u.name);
        for side in [&u.old, &u.new] {
            assert_eq!(side["metadata"]["name"], u.name.as_str(), "{}", u.name);
            assert_eq!(side["kind"], u.old["kind"], "{}: one kind", u.name);
        }
        assert_eq!(u.field.is_some(), u.expect == Expect::Reject, "{}", u.name);
    }
    for field in [
        "spec.mode",
        "spec.subnets",
        "spec.gateway",
        "spec.ipam.nodeBlockPrefix",
        "spec.ipam.nodeBlockPrefixV6",
        "spec.bridge.uplink",
        "spec.bridge.vlan",
        "spec.bridge.bridgeName",
        "spec.bridge.vlanFiltering",
    ] {
        assert!(
            updates.iter().any(|u| u.field.as_deref() == Some(field)),
            "no update case for {field}"
        );
    }
    for kind in ["Network", "PortForward"] {
        assert!(
            updates
                .iter()
                .any(|u| u.expect == Expect::Accept && u.old["kind"] == kind),
            "no accepted update of {kind}"
        );
    }
}

#[test]
fn rust_validate_update_agrees_with_the_update_table() {
    let mut problems = Vec::new();
    for u in updates() {
        // Both sides are valid resources: only the change is judged.
        for (side, object) in [("old", &u.old), ("new", &u.new)] {
            if !matches!(verdict(object), Verdict::Valid) {
                problems.push(format!("{}: {side} is not a valid resource", u.name));
            }
        }
        let result = match u.old["kind"].as_str() {
            Some("Network") => {
                let old: Network = serde_json::from_value(u.old.clone()).unwrap();
                let new: Network = serde_json::from_value(u.new.clone()).unwrap();
                new.spec.validate_update(&old.spec)
            }
            // No field of a PortForward is immutable.
            Some("PortForward") => Ok(()),
            other => panic!("{}: no validate_update() for kind {other:?}", u.name),
        };
        match (u.expect, result) {
            (Expect::Accept, Ok(())) => {}
            (Expect::Accept, Err(errors)) => problems.push(format!(
                "{}: accepted by the table, rejected by validate_update(): {errors:?}",
                u.name
            )),
            (Expect::Reject, Ok(())) => problems.push(format!(
                "{}: rejected by the table, accepted by validate_update()",
                u.name
            )),
            (Expect::Reject, Err(errors)) => {
                let field = u.field.as_deref().unwrap_or_default();
                if !errors.iter().any(|e| names(&e.field, field)) {
                    problems.push(format!("{}: no error names {field}: {errors:?}", u.name));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
