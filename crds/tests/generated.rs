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
            let on_every_selector = location.ends_with(".matchExpressions[]")
                && weft_crds::cel::EVERY_SELECTOR_EXPRESSION
                    .iter()
                    .any(|r| r.to_json() == rule)
                || location.ends_with(".matchLabels")
                    && weft_crds::cel::EVERY_SELECTOR_LABELS
                        .iter()
                        .any(|r| r.to_json() == rule);
            assert!(
                on_every_selector
                    || weft_crds::cel::ATTACHED
                        .iter()
                        .any(|(c, l, r)| *c == name && *l == location && r.to_json() == rule),
                "{name} {location}: rule {rule} is not listed in weft_crds::cel::ATTACHED"
            );
        }
    }
}

#[test]
fn every_selector_carries_the_selector_rules() {
    // What `check_selector` refuses, the API server refuses too: an In without values, an
    // empty key of an expression or of matchLabels. Otherwise a selector the API server takes
    // makes the controller and the agents drop the whole object (a Network leaves every node).
    fn walk(path: &str, node: &Value, found: &mut Vec<(String, Value)>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            if props.contains_key("matchExpressions") && props.contains_key("matchLabels") {
                found.push((path.to_owned(), node.clone()));
            }
            for (k, v) in props {
                walk(&format!("{path}.{k}"), v, found);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, found);
        }
    }
    let rules_of = |path: &str, node: &Value| -> Vec<Value> {
        node.get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("{path}: no x-kubernetes-validations"))
            .clone()
    };
    let mut count = 0;
    for (name, schema) in schemas() {
        let mut found = Vec::new();
        walk(&name, &schema, &mut found);
        for (path, selector) in found {
            count += 1;
            let item = &selector["properties"]["matchExpressions"]["items"];
            let rules = rules_of(&format!("{path}.matchExpressions[]"), item);
            for r in weft_crds::cel::EVERY_SELECTOR_EXPRESSION {
                assert!(rules.contains(&r.to_json()), "{path}: {:?} missing", r.rule);
            }
            assert_eq!(
                item["properties"]["key"]["minLength"], 1,
                "{path}.matchExpressions[].key: an empty key is not refused"
            );
            let labels = &selector["properties"]["matchLabels"];
            let rules = rules_of(&format!("{path}.matchLabels"), labels);
            for r in weft_crds::cel::EVERY_SELECTOR_LABELS {
                assert!(rules.contains(&r.to_json()), "{path}: {:?} missing", r.rule);
            }
        }
    }
    assert!(count >= 10, "only {count} selectors found");
}

#[test]
fn policy_rule_actions_are_narrowed_to_the_kind() {
    for (name, want) in [
        (
            "clustersegmentationpolicies.weft.dev",
            vec!["Accept", "Deny", "Pass"],
        ),
        ("segmentationpolicies.weft.dev", vec!["Allow", "Deny"]),
    ] {
        let (_, schema) = schemas().into_iter().find(|(n, _)| n == name).unwrap();
        for direction in ["ingress", "egress"] {
            let action = node_at(&schema, &format!("spec.{direction}[].action")).unwrap();
            assert_eq!(
                action["enum"],
                serde_json::json!(want),
                "{name} {direction}"
            );
        }
    }
}

// ---- CEL cost: what the apiserver's estimator needs to price every rule ----
//
// kube-apiserver (apiextensions-apiserver `validation.go`) refuses a CRD when one rule's
// estimated cost exceeds StaticEstimatedCostLimit (10,000,000) or all rules of a schema
// together exceed StaticEstimatedCRDCostLimit (100,000,000). A rule's cost is its cost for one
// value times how often it can run: the product of the `maxItems` of every list above it. A
// string costs by its `maxLength` in bytes (four per character), a list or map without bound is
// priced as large as a whole request, and `!=` on IP/CIDR values has no price at all.

const PER_RULE_LIMIT: u64 = 10_000_000;
const PER_SCHEMA_LIMIT: u64 = 100_000_000;

/// Every node below `node` with its path, its cardinality (how often a rule on it can run)
/// and whether a CEL rule on it or an ancestor can read it.
fn visit(
    path: &str,
    node: &Value,
    cardinality: u64,
    under_rule: bool,
    f: &mut dyn FnMut(&str, &Value, u64, bool),
) {
    let under_rule = under_rule || node.get("x-kubernetes-validations").is_some();
    f(path, node, cardinality, under_rule);
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            visit(&format!("{path}.{k}"), v, cardinality, under_rule, f);
        }
    }
    if let Some(items) = node.get("items") {
        let n = node
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        visit(
            &format!("{path}[]"),
            items,
            cardinality.saturating_mul(n),
            under_rule,
            f,
        );
    }
    if let Some(ap) = node.get("additionalProperties").filter(|v| v.is_object()) {
        let n = node
            .get("maxProperties")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        visit(
            &format!("{path}{{}}"),
            ap,
            cardinality.saturating_mul(n),
            under_rule,
            f,
        );
    }
}

#[test]
fn every_list_and_map_of_a_spec_is_bounded() {
    // Status is written by weft itself and carries no CEL rule, and so are WorkloadSlices (the
    // controller's copy of what the agents publish in status); everything users write is
    // bounded, so no rule's cardinality can grow unpriced.
    let mut problems = Vec::new();
    for (name, schema) in schemas() {
        if name.starts_with("workloadslices.") {
            continue;
        }
        let Some(spec) = schema.get("properties").and_then(|p| p.get("spec")) else {
            continue;
        };
        visit(
            &format!("{name} spec"),
            spec,
            1,
            false,
            &mut |path, node, _, _| match node.get("type").and_then(Value::as_str) {
                Some("array") if node.get("maxItems").is_none() => {
                    problems.push(format!("{path}: list without maxItems"))
                }
                Some("object")
                    if node
                        .get("additionalProperties")
                        .is_some_and(Value::is_object)
                        && node.get("maxProperties").is_none() =>
                {
                    problems.push(format!("{path}: map without maxProperties"))
                }
                _ => {}
            },
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_string_a_cel_rule_can_read_is_bounded() {
    let mut problems = Vec::new();
    for (name, schema) in schemas() {
        visit(
            &name,
            &schema,
            1,
            false,
            &mut |path, node, _, under_rule| {
                if under_rule
                    && node.get("type").and_then(Value::as_str) == Some("string")
                    && node.get("maxLength").is_none()
                    && node.get("enum").is_none()
                {
                    problems.push(format!("{path}: string without maxLength under a CEL rule"));
                }
            },
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Does `rule` compare IP or CIDR values with `!=`? The operands are the text between `!=` and
/// the nearest `,`, `(`, `&&`, `||`, `?` or `:` outside brackets on each side.
fn compares_addresses_with_not_equal(rule: &str) -> bool {
    fn is_address(operand: &str) -> bool {
        let o = operand.trim();
        let call = |f: &str| o.starts_with(f) && o.ends_with(')');
        call("ip(") && !o.contains(").family()") && !o.contains(").prefixLength()")
            || call("cidr(") && !o.contains(".family()") && !o.contains(".prefixLength()")
            || o.ends_with(".ip()")
            || o.ends_with(".masked()")
    }
    fn left(s: &str) -> &str {
        let mut depth = 0i32;
        let b = s.as_bytes();
        for i in (0..b.len()).rev() {
            match b[i] {
                b')' | b']' => depth += 1,
                b'(' | b'[' if depth == 0 => return &s[i + 1..],
                b'(' | b'[' => depth -= 1,
                b',' | b'?' | b':' if depth == 0 => return &s[i + 1..],
                b'&' | b'|' if depth == 0 && i > 0 && b[i - 1] == b[i] => return &s[i + 1..],
                _ => {}
            }
        }
        s
    }
    fn right(s: &str) -> &str {
        let mut depth = 0i32;
        let b = s.as_bytes();
        for i in 0..b.len() {
            match b[i] {
                b'(' | b'[' => depth += 1,
                b')' | b']' if depth == 0 => return &s[..i],
                b')' | b']' => depth -= 1,
                b',' | b'?' | b':' if depth == 0 => return &s[..i],
                b'&' | b'|' if depth == 0 && b.get(i + 1) == Some(&b[i]) => return &s[..i],
                _ => {}
            }
        }
        s
    }
    rule.match_indices("!=")
        .any(|(i, _)| is_address(left(&rule[..i])) || is_address(right(&rule[i + 2..])))
}

#[test]
fn the_not_equal_check_finds_address_comparisons() {
    assert!(compares_addresses_with_not_equal(
        "self.all(s, cidr(s).ip() != ip(g))"
    ));
    assert!(compares_addresses_with_not_equal(
        "ip(self) != ip('10.0.0.1') || true"
    ));
    assert!(compares_addresses_with_not_equal(
        "x || cidr(self) != cidr(self).masked()"
    ));
    assert!(!compares_addresses_with_not_equal(
        "!(cidr(s).ip() == ip(g))"
    ));
    assert!(!compares_addresses_with_not_equal(
        "cidr(s).ip().family() != 4 || y"
    ));
    assert!(!compares_addresses_with_not_equal("self.mode != 'Bridge'"));
}

#[test]
fn no_cel_rule_compares_addresses_with_not_equal() {
    // The apiserver's cost library prices `==` on IP and CIDR values but not `!=`, and then
    // rejects the rule as "more than 100x" over budget; `!(a == b)` is priced.
    for (crd, location, rule) in weft_crds::cel::ATTACHED {
        assert!(
            !compares_addresses_with_not_equal(rule.rule),
            "{crd} {location}: {:?} compares addresses with !=; write !(a == b)",
            rule.rule
        );
    }
}

/// A lower bound of one run of `rule` on a string of `max_len` characters: each parse of the
/// value (`isCIDR(self)`, `cidr(self)`, `isIP(self)`, `ip(self)`) traverses its bytes at 0.1 per
/// byte, four bytes per character.
fn string_rule_cost(rule: &str, max_len: u64) -> u64 {
    let parses = ["isCIDR(self)", "cidr(self)", "isIP(self)", "ip(self)"]
        .iter()
        .map(|f| rule.matches(f).count() as u64)
        .sum::<u64>();
    parses * (max_len * 4).div_ceil(10)
}

#[test]
fn address_rules_stay_inside_the_cost_budget() {
    // The rules on address strings dominate the cost: each run parses the string. The estimate
    // here is a lower bound of the apiserver's (it leaves out the operators), so it catches a
    // list bound raised past what the budget allows.
    for (name, schema) in schemas() {
        let mut total = 0u64;
        let mut problems = Vec::new();
        visit(
            &name,
            &schema,
            1,
            false,
            &mut |path, node, cardinality, _| {
                let Some(max_len) = node.get("maxLength").and_then(Value::as_u64) else {
                    return;
                };
                for rule in node
                    .get("x-kubernetes-validations")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let text = rule["rule"].as_str().unwrap_or_default();
                    let cost = cardinality.saturating_mul(string_rule_cost(text, max_len));
                    total = total.saturating_add(cost);
                    if cost > PER_RULE_LIMIT * 9 / 10 {
                        problems.push(format!(
                        "{path}: {text:?} runs up to {cardinality} times, estimated cost {cost} (limit {PER_RULE_LIMIT})"
                    ));
                    }
                }
            },
        );
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        assert!(
            total <= PER_SCHEMA_LIMIT / 2,
            "{name}: the address rules alone cost {total} (schema limit {PER_SCHEMA_LIMIT})"
        );
    }
}
