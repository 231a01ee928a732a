//! Tests of the generated CRDs: the committed YAML is up to date, every schema is structural,
//! and every CEL rule of `weft_crds::cel` sits where it belongs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] fns

use serde_json::Value;
use std::path::Path;

const REGENERATE: &str = "run `cargo run -p weft-crds --bin crdgen -- --write crds/generated`";

fn generated_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/generated"))
}

/// The openAPIV3Schema of each CRD, by CRD name.
fn schemas() -> Vec<(String, Value)> {
    weft_crds::crds()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .map(|s| serde_json::to_value(s).unwrap())
                .unwrap_or_else(|| panic!("{name} has no openAPIV3Schema"));
            (name, schema)
        })
        .collect()
}

#[test]
fn committed_crd_yaml_is_up_to_date() {
    let files = weft_crds::generated_files().unwrap();
    for (name, want) in &files {
        let path = generated_dir().join(name);
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; {REGENERATE}", path.display()));
        assert!(
            have == *want,
            "{} is stale (the Rust types changed); {REGENERATE}",
            path.display()
        );
    }
    // No leftovers from renamed or removed CRDs.
    let mut on_disk: Vec<String> = std::fs::read_dir(generated_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = files.into_iter().map(|(n, _)| n).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "crds/generated holds other files; {REGENERATE}"
    );
}

#[test]
fn committed_crd_yaml_parses_back_into_the_same_crds() {
    for crd in weft_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let text = std::fs::read_to_string(generated_dir().join(format!("{name}.yaml"))).unwrap();
        let parsed: Value = serde_saphyr::from_str(&text).unwrap();
        assert_eq!(
            parsed,
            serde_json::to_value(&crd).unwrap(),
            "{name}; {REGENERATE}"
        );
    }
}

/// Walks every schema node below `node` (properties, items, additionalProperties) and reports
/// the ones that break the structural-schema rules weft relies on.
fn check_structural(path: &str, node: &Value, problems: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        problems.push(format!("{path}: not a schema object"));
        return;
    };
    let has_type = obj.get("type").is_some_and(Value::is_string);
    let escape = [
        "x-kubernetes-int-or-string",
        "x-kubernetes-preserve-unknown-fields",
    ]
    .iter()
    .any(|k| obj.get(*k) == Some(&Value::Bool(true)));
    if !has_type && !escape {
        problems.push(format!("{path}: no type"));
    }
    for banned in [
        "$ref",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        if obj.contains_key(banned) {
            problems.push(format!("{path}: has {banned}"));
        }
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        problems.push(format!("{path}: additionalProperties: false"));
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            check_structural(&format!("{path}.{k}"), v, problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(&format!("{path}[]"), items, problems);
    }
    if let Some(ap) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        check_structural(&format!("{path}{{}}"), ap, problems);
    }
}

#[test]
fn every_schema_node_has_a_type() {
    for (name, schema) in schemas() {
        let mut problems = Vec::new();
        check_structural(&name, &schema, &mut problems);
        assert!(
            problems.is_empty(),
            "non-structural schema nodes:\n{}",
            problems.join("\n")
        );
    }
}

#[test]
fn every_field_is_documented() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    missing.push(p.clone());
                }
                walk(&p, v, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    for (name, schema) in schemas() {
        let mut missing = Vec::new();
        walk(&name, &schema, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description (kubectl explain shows nothing):\n{}",
            missing.join("\n")
        );
    }
}

/// The node at `location` (`spec.ports[].portRange`) below a schema.
fn node_at<'a>(schema: &'a Value, location: &str) -> Option<&'a Value> {
    let mut node = schema;
    for part in location.split('.') {
        let (field, items) = match part.strip_suffix("[]") {
            Some(f) => (f, true),
            None => (part, false),
        };
        node = node.get("properties")?.get(field)?;
        if items {
            node = node.get("items")?;
        }
    }
    Some(node)
}

#[test]
fn every_cel_rule_is_in_the_generated_schema_where_it_belongs() {
    let schemas = schemas();
    for (crd, location, rule) in weft_crds::cel::ATTACHED {
        let (_, schema) = schemas
            .iter()
            .find(|(n, _)| n == crd)
            .unwrap_or_else(|| panic!("no CRD {crd}"));
        let node =
            node_at(schema, location).unwrap_or_else(|| panic!("{crd}: no schema node {location}"));
        let rules = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{crd} {location}: no x-kubernetes-validations"));
        assert!(
            rules.contains(&rule.to_json()),
            "{crd} {location}: rule {:?} missing; have {rules:#?}",
            rule.rule
        );
    }
}

#[test]
fn no_cel_rule_is_left_unlisted() {
    // Every x-kubernetes-validations entry in the schemas is one of weft_crds::cel::ATTACHED,
    // so the list the tests (and reviewers) rely on is complete.
    fn collect(path: &str, node: &Value, out: &mut Vec<(String, Value)>) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            out.extend(rules.iter().map(|r| (path.to_owned(), r.clone())));
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                collect(&p, v, out);
            }
        }
        if let Some(items) = node.get("items") {
            collect(&format!("{path}[]"), items, out);
        }
    }
    for (name, schema) in schemas() {
        let mut found = Vec::new();
        collect("", &schema, &mut found);
        for (location, rule) in found {
            assert!(
                weft_crds::cel::ATTACHED
                    .iter()
                    .any(|(c, l, r)| *c == name && *l == location && r.to_json() == rule),
                "{name} {location}: rule {rule} is not listed in weft_crds::cel::ATTACHED"
            );
        }
    }
}

#[test]
fn cel_rules_are_bounded_for_the_cost_estimator() {
    // The apiserver rejects CEL rules whose worst-case cost it cannot bound: every string and
    // list a rule walks needs maxLength / maxItems.
    fn walk(path: &str, node: &Value, problems: &mut Vec<String>) {
        let ty = node.get("type").and_then(Value::as_str);
        if node.get("x-kubernetes-validations").is_some() {
            match ty {
                Some("string") if node.get("maxLength").is_none() => {
                    problems.push(format!("{path}: no maxLength"))
                }
                Some("array") if node.get("maxItems").is_none() => {
                    problems.push(format!("{path}: no maxItems"))
                }
                _ => {}
            }
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, problems);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
    }
    for (name, schema) in schemas() {
        let mut problems = Vec::new();
        walk(&name, &schema, &mut problems);
        // Lists and strings that object-level rules walk:
        for location in [
            "spec.subnets",
            "spec.gateway",
            "spec.ipam.exclude",
            "spec.bridge.trunkVlans",
            "spec.ports",
            "spec.allowFrom",
        ] {
            if let Some(node) = node_at(&schema, location) {
                if node.get("maxItems").is_none() {
                    problems.push(format!("{name} {location}: no maxItems"));
                }
                if let Some(items) = node.get("items")
                    && items.get("type").and_then(Value::as_str) == Some("string")
                    && items.get("maxLength").is_none()
                {
                    problems.push(format!("{name} {location}[]: no maxLength"));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
