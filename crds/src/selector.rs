//! Label selectors, matched the way Kubernetes matches them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::BTreeMap;

/// Does `selector` select an object with `labels`?
///
/// Same semantics as Kubernetes (`metav1.LabelSelectorAsSelector` then `Matches`):
/// - every `matchLabels` entry must be present with that value;
/// - `In`: the label is present and its value is listed; `NotIn`: the label is absent or its
///   value is not listed; `Exists`: the label is present; `DoesNotExist`: it is absent;
/// - all entries and expressions must hold (AND);
/// - an empty selector (no `matchLabels`, no `matchExpressions`) matches everything;
/// - an invalid selector (unknown operator, `In`/`NotIn` without values, `Exists`/`DoesNotExist`
///   with values) matches nothing, as Kubernetes refuses to build a selector from it.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    if !labels_ok {
        return false;
    }
    selector.match_expressions.iter().flatten().all(|expr| {
        let values = expr.values.as_deref().unwrap_or_default();
        let value = labels.get(&expr.key);
        match expr.operator.as_str() {
            "In" => !values.is_empty() && value.is_some_and(|v| values.contains(v)),
            "NotIn" => !values.is_empty() && value.is_none_or(|v| !values.contains(v)),
            "Exists" => values.is_empty() && value.is_some(),
            "DoesNotExist" => values.is_empty() && value.is_none(),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn exprs(list: Vec<LabelSelectorRequirement>) -> LabelSelector {
        LabelSelector {
            match_expressions: Some(list),
            match_labels: None,
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        assert!(selector_matches(
            &LabelSelector::default(),
            &labels(&[("a", "b")])
        ));
        let empty_lists = LabelSelector {
            match_expressions: Some(vec![]),
            match_labels: Some(BTreeMap::new()),
        };
        assert!(selector_matches(&empty_lists, &labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_need_every_pair() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web"), ("tier", "front")])),
            match_expressions: None,
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "front"), ("x", "y")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("app", "web")])));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "back")])
        ));
        assert!(!selector_matches(&sel, &labels(&[])));
    }

    #[test]
    fn in_needs_the_label_with_a_listed_value() {
        let sel = exprs(vec![expr("env", "In", &["prod", "staging"])]);
        assert!(selector_matches(&sel, &labels(&[("env", "prod")])));
        assert!(selector_matches(&sel, &labels(&[("env", "staging")])));
        assert!(!selector_matches(&sel, &labels(&[("env", "dev")])));
        assert!(!selector_matches(&sel, &labels(&[])));
    }

    #[test]
    fn not_in_matches_absent_labels_and_unlisted_values() {
        let sel = exprs(vec![expr("env", "NotIn", &["prod"])]);
        assert!(selector_matches(&sel, &labels(&[])));
        assert!(selector_matches(&sel, &labels(&[("env", "dev")])));
        assert!(!selector_matches(&sel, &labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_look_at_the_key_only() {
        let exists = exprs(vec![expr("gpu", "Exists", &[])]);
        assert!(selector_matches(&exists, &labels(&[("gpu", "")])));
        assert!(selector_matches(&exists, &labels(&[("gpu", "a100")])));
        assert!(!selector_matches(&exists, &labels(&[("cpu", "x")])));
        let absent = exprs(vec![expr("gpu", "DoesNotExist", &[])]);
        assert!(!selector_matches(&absent, &labels(&[("gpu", "")])));
        assert!(selector_matches(&absent, &labels(&[("cpu", "x")])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                expr("env", "In", &["prod"]),
                expr("canary", "DoesNotExist", &[]),
            ]),
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("env", "prod"), ("canary", "1")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "db"), ("env", "prod")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("env", "dev")])
        ));
    }

    #[test]
    fn invalid_selectors_match_nothing() {
        let all = labels(&[("env", "prod"), ("gpu", "x")]);
        for bad in [
            expr("env", "In", &[]),
            expr("env", "NotIn", &[]),
            expr("gpu", "Exists", &["x"]),
            expr("nope", "DoesNotExist", &["x"]),
            expr("env", "Equals", &["prod"]),
            expr("env", "in", &["prod"]),
        ] {
            assert!(
                !selector_matches(&exprs(vec![bad.clone()]), &all),
                "{bad:?}"
            );
        }
    }
}
