//! Validation errors and the checks shared by the resources.
//!
//! The apiserver enforces the CRD schema and its CEL rules; the standalone node agent and
//! `weft lab` read YAML without an apiserver, so every rule is also written here in Rust
//! (`NetworkSpec::validate`, `PortForwardSpec::validate`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::fmt;

/// One invalid field: where (`spec.subnets[1]`) and what is wrong, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field's path from the object root, as the apiserver writes it, e.g. `spec.subnets[1]`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Collects field errors.
#[derive(Debug, Default)]
pub(crate) struct Errors(Vec<FieldError>);

impl Errors {
    pub(crate) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    pub(crate) fn finish(self) -> Result<(), Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Pattern of a Linux interface name as weft accepts it (a conservative subset of what the
/// kernel allows: no `/`, `:`, whitespace, and not `.` or `..`).
pub const IFNAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$";

/// Pattern of a DNS-1123 subdomain: the names of Networks, Pods and VirtualMachines.
pub const DNS1123_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Pattern of a port name (a DNS-1123 label of at most 15 characters, like a container port name).
pub const PORT_NAME_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Most `matchLabels` entries of a label selector.
pub const MAX_SELECTOR_LABELS: usize = 32;
/// Most `matchExpressions` of a label selector.
pub const MAX_SELECTOR_EXPRESSIONS: usize = 32;
/// Most `values` of one selector expression.
pub const MAX_SELECTOR_VALUES: usize = 64;
/// Longest label key: a DNS subdomain prefix (253), `/`, and a name (63).
pub const MAX_LABEL_KEY_LEN: usize = 317;
/// Longest label value.
pub const MAX_LABEL_VALUE_LEN: usize = 63;
/// The operators of a selector expression.
pub const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];

/// Does `name` match [`IFNAME_PATTERN`]? The pattern is the Network API's own rule, stricter
/// than the kernel's (weft's one interface-name rule, `weft_dataplane::names::ifname_problem`,
/// which this crate does not depend on): every name it admits is one the kernel accepts, and the
/// API server enforces the same pattern, so the two checks must agree.
pub fn matches_ifname_pattern(name: &str) -> bool {
    match name.as_bytes().split_first() {
        Some((first, rest)) => {
            first.is_ascii_alphanumeric()
                && rest.len() <= 14
                && rest
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        }
        None => false,
    }
}

fn is_dns1123_label_like(label: &str) -> bool {
    let bytes = label.as_bytes();
    let ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            ok(first) && ok(last) && bytes.iter().all(|b| ok(b) || *b == b'-')
        }
        _ => false,
    }
}

/// Does `name` match [`DNS1123_SUBDOMAIN_PATTERN`] and fit in 253 characters?
pub fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns1123_label_like)
}

/// Does `name` match [`PORT_NAME_PATTERN`] and fit in 15 characters?
pub fn is_valid_port_name(name: &str) -> bool {
    name.len() <= 15 && is_dns1123_label_like(name)
}

/// Checks the structure of a label selector the way Kubernetes does when it turns one into a
/// selector: known operators, values for `In`/`NotIn` only, and non-empty keys. Lengths are
/// counted in characters, as the API server counts a schema's `maxLength`.
pub(crate) fn check_selector(selector: &LabelSelector, field: &str, errors: &mut Errors) {
    if let Some(labels) = &selector.match_labels {
        if labels.len() > MAX_SELECTOR_LABELS {
            errors.push(
                format!("{field}.matchLabels"),
                format!(
                    "has {} labels; at most {MAX_SELECTOR_LABELS} are allowed",
                    labels.len()
                ),
            );
        }
        for (key, value) in labels {
            if key.is_empty() {
                errors.push(
                    format!("{field}.matchLabels"),
                    "a label key must not be empty",
                );
            }
            if value.chars().count() > MAX_LABEL_VALUE_LEN {
                errors.push(
                    format!("{field}.matchLabels.{key}"),
                    format!("a label value has at most {MAX_LABEL_VALUE_LEN} characters"),
                );
            }
        }
    }
    let exprs = selector.match_expressions.as_deref().unwrap_or_default();
    if exprs.len() > MAX_SELECTOR_EXPRESSIONS {
        errors.push(
            format!("{field}.matchExpressions"),
            format!(
                "has {} expressions; at most {MAX_SELECTOR_EXPRESSIONS} are allowed",
                exprs.len()
            ),
        );
    }
    for (i, expr) in exprs.iter().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        if expr.key.is_empty() {
            errors.push(format!("{at}.key"), "must not be empty; name a label key");
        }
        if expr.key.chars().count() > MAX_LABEL_KEY_LEN {
            errors.push(
                format!("{at}.key"),
                format!("a label key has at most {MAX_LABEL_KEY_LEN} characters"),
            );
        }
        let values = expr.values.as_deref().unwrap_or_default();
        if values.len() > MAX_SELECTOR_VALUES {
            errors.push(
                format!("{at}.values"),
                format!(
                    "has {} values; at most {MAX_SELECTOR_VALUES} are allowed",
                    values.len()
                ),
            );
        }
        for (j, v) in values.iter().enumerate() {
            if v.chars().count() > MAX_LABEL_VALUE_LEN {
                errors.push(
                    format!("{at}.values[{j}]"),
                    format!("a label value has at most {MAX_LABEL_VALUE_LEN} characters"),
                );
            }
        }
        let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
        match expr.operator.as_str() {
            "In" | "NotIn" if !has_values => errors.push(
                format!("{at}.values"),
                format!(
                    "operator {} needs at least one value; list the label values to match",
                    expr.operator
                ),
            ),
            "Exists" | "DoesNotExist" if has_values => errors.push(
                format!("{at}.values"),
                format!(
                    "operator {} takes no values; remove values or use In/NotIn",
                    expr.operator
                ),
            ),
            op if SELECTOR_OPERATORS.contains(&op) => {}
            other => errors.push(
                format!("{at}.operator"),
                format!("unknown operator {other:?}; use In, NotIn, Exists or DoesNotExist"),
            ),
        }
    }
}

/// Puts bounds on every label selector below `schema` (a JSON schema node): k8s-openapi's
/// `LabelSelector` schema has none, and the apiserver's CEL cost estimate multiplies by them.
/// The bounds are the ones [`check_selector`] enforces, and so are the rules
/// [`EVERY_SELECTOR_EXPRESSION`](crate::cel::EVERY_SELECTOR_EXPRESSION) each expression gets,
/// [`EVERY_SELECTOR_LABELS`](crate::cel::EVERY_SELECTOR_LABELS) each `matchLabels` gets, and an
/// expression's key's `minLength`: the API server refuses every selector `check_selector`
/// refuses, so no live object carries one the controller and the agents would then drop.
pub(crate) fn bound_label_selectors(schema: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let is_selector = obj
        .get("properties")
        .and_then(Value::as_object)
        .is_some_and(|p| p.contains_key("matchLabels") && p.contains_key("matchExpressions"));
    if is_selector && let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        if let Some(labels) = props.get_mut("matchLabels").and_then(Value::as_object_mut) {
            labels.insert("maxProperties".into(), json!(MAX_SELECTOR_LABELS));
            let rules: Vec<Value> = crate::cel::EVERY_SELECTOR_LABELS
                .iter()
                .map(|r| r.to_json())
                .collect();
            labels.insert("x-kubernetes-validations".into(), Value::Array(rules));
            if let Some(v) = labels
                .get_mut("additionalProperties")
                .and_then(Value::as_object_mut)
            {
                v.insert("maxLength".into(), json!(MAX_LABEL_VALUE_LEN));
            }
        }
        if let Some(exprs) = props
            .get_mut("matchExpressions")
            .and_then(Value::as_object_mut)
        {
            exprs.insert("maxItems".into(), json!(MAX_SELECTOR_EXPRESSIONS));
            if let Some(item) = exprs.get_mut("items").and_then(Value::as_object_mut) {
                let rules: Vec<Value> = crate::cel::EVERY_SELECTOR_EXPRESSION
                    .iter()
                    .map(|r| r.to_json())
                    .collect();
                item.insert("x-kubernetes-validations".into(), Value::Array(rules));
            }
            if let Some(item) = exprs
                .get_mut("items")
                .and_then(|i| i.get_mut("properties"))
                .and_then(Value::as_object_mut)
            {
                if let Some(key) = item.get_mut("key").and_then(Value::as_object_mut) {
                    key.insert("minLength".into(), json!(1));
                    key.insert("maxLength".into(), json!(MAX_LABEL_KEY_LEN));
                }
                if let Some(op) = item.get_mut("operator").and_then(Value::as_object_mut) {
                    op.insert("enum".into(), json!(SELECTOR_OPERATORS));
                }
                if let Some(values) = item.get_mut("values").and_then(Value::as_object_mut) {
                    values.insert("maxItems".into(), json!(MAX_SELECTOR_VALUES));
                    if let Some(v) = values.get_mut("items").and_then(Value::as_object_mut) {
                        v.insert("maxLength".into(), json!(MAX_LABEL_VALUE_LEN));
                    }
                }
            }
        }
        return;
    }
    for (key, child) in obj.iter_mut() {
        match key.as_str() {
            "properties" => {
                if let Some(props) = child.as_object_mut() {
                    props.values_mut().for_each(bound_label_selectors);
                }
            }
            "items" | "additionalProperties" => bound_label_selectors(child),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_error_displays_field_then_message() {
        let e = FieldError::new("spec.subnets[1]", "must be a CIDR");
        assert_eq!(e.to_string(), "spec.subnets[1]: must be a CIDR");
    }

    #[test]
    fn ifnames_follow_the_pattern() {
        for ok in [
            "eth1",
            "ens3f0",
            "bond0.100",
            "br-lan",
            "veth_x",
            "a",
            "abcdefghijklmno",
        ] {
            assert!(matches_ifname_pattern(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-eth",
            "eth 1",
            "eth/1",
            "eth:1",
            "abcdefghijklmnop",
            "ëth0",
        ] {
            assert!(!matches_ifname_pattern(bad), "{bad}");
        }
    }

    #[test]
    fn dns_subdomains_follow_the_pattern() {
        for ok in ["nat-demo", "a", "web-1.example", "0abc"] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in ["", "Nat", "-a", "a-", "a..b", ".a", "a_b", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }

    #[test]
    fn port_names_follow_the_pattern() {
        assert!(is_valid_port_name("http"));
        assert!(is_valid_port_name("rtp-media"));
        assert!(!is_valid_port_name("HTTP"));
        assert!(!is_valid_port_name("a.b"));
        assert!(!is_valid_port_name("sixteen-chars-xx"));
    }

    #[test]
    fn selector_lengths_are_counted_in_characters() {
        // The API server's maxLength counts characters: a value of 63 two-byte characters
        // passes it, so it must pass here too; 64 do not.
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let selector = |value: String, key: String| LabelSelector {
            match_labels: Some([("zone".into(), value.clone())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key,
                operator: "In".into(),
                values: Some(vec![value]),
            }]),
        };
        let errors_of = |sel: &LabelSelector| {
            let mut errors = Errors::default();
            check_selector(sel, "spec.nodeSelector", &mut errors);
            errors.0.len()
        };
        let most = selector(
            "é".repeat(MAX_LABEL_VALUE_LEN),
            "é".repeat(MAX_LABEL_KEY_LEN),
        );
        assert_eq!(errors_of(&most), 0);
        let past = selector(
            "é".repeat(MAX_LABEL_VALUE_LEN + 1),
            "é".repeat(MAX_LABEL_KEY_LEN + 1),
        );
        assert_eq!(errors_of(&past), 3);
    }

    #[test]
    fn selectors_past_the_schema_bounds_are_refused() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let expr = |op: &str, n: usize| LabelSelectorRequirement {
            key: "k".into(),
            operator: op.into(),
            values: Some((0..n).map(|i| i.to_string()).collect()),
        };
        let sel = LabelSelector {
            match_labels: Some(
                (0..=MAX_SELECTOR_LABELS)
                    .map(|i| (i.to_string(), "v".repeat(64)))
                    .collect(),
            ),
            match_expressions: Some(vec![expr("In", MAX_SELECTOR_VALUES + 1), expr("Near", 1)]),
        };
        let mut errors = Errors::default();
        check_selector(&sel, "spec.nodeSelector", &mut errors);
        let fields: Vec<String> = errors.0.into_iter().map(|e| e.field).collect();
        for want in [
            "spec.nodeSelector.matchLabels",
            "spec.nodeSelector.matchLabels.0",
            "spec.nodeSelector.matchExpressions[0].values",
            "spec.nodeSelector.matchExpressions[1].operator",
        ] {
            assert!(
                fields.iter().any(|f| f == want),
                "{want} missing in {fields:?}"
            );
        }
    }
}
