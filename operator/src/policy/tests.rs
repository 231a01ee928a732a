use super::*;
use crate::model::{Resources, parse_manifests};

fn resources(yaml: &str) -> Resources {
    let mut r = Resources::default();
    parse_manifests(yaml, "test", &mut r);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    r
}

fn member(ns: &str, name: &str, labels: &[(&str, &str)], network: &str, ip: &str) -> Member {
    Member {
        namespace: ns.into(),
        name: name.into(),
        labels: std::sync::Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        network: network.into(),
        ips: vec![ip.parse().unwrap()],
        local: true,
        port: None,
    }
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {env: prod}}
---
apiVersion: v1
kind: Namespace
metadata: {name: tools, labels: {team: ops}}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: net}
spec: {mode: NAT, subnets: [10.0.0.0/16]}
---
apiVersion: weft.dev/v1alpha1
kind: Network
metadata: {name: closed}
spec: {mode: NAT, subnets: [10.1.0.0/16], security: {defaultAction: Deny}}
"#;

fn members() -> Vec<Member> {
    vec![
        member("shop", "web", &[("tier", "web")], "net", "10.0.0.2"),
        member("shop", "app", &[("tier", "app")], "net", "10.0.0.3"),
        member("shop", "db", &[("tier", "db")], "net", "10.0.0.4"),
        member("tools", "ops", &[], "net", "10.0.0.5"),
        member("default", "q", &[], "closed", "10.1.0.2"),
    ]
}

fn compiled(policies: &str, members: &[Member]) -> Compiled {
    let res = resources(&format!("{BASE}\n---\n{policies}"));
    let c = compile_resources(&res, members);
    assert!(c.problems.is_empty(), "{:?}", c.problems);
    c
}

fn tcp(src: &str, dst: &str, port: u16) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: L4Protocol::Tcp,
        port: Some(port),
        icmp: None,
    }
}

const WEB: &str = "10.0.0.2";
const APP: &str = "10.0.0.3";
const DB: &str = "10.0.0.4";
const OPS: &str = "10.0.0.5";
const Q: &str = "10.1.0.2";
const OUTSIDE: &str = "192.168.50.1";

const POLICIES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: guard-db}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {podSelector: {matchLabels: {tier: db}}}}
  ingress:
    - {name: deny-ops, action: Deny, from: [{namespaces: {matchLabels: {team: ops}}}]}
    - {name: pass-prod, action: Pass, from: [{namespaces: {matchLabels: {env: prod}}}]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: lockdown}
spec:
  tier: Admin
  priority: 20
  subject: {pods: {podSelector: {matchLabels: {tier: db}}}}
  ingress: [{name: deny-rest, action: Deny}]
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: admin-ssh}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
    - {name: ssh-from-ops, action: Accept, from: [{namespaces: {matchLabels: {team: ops}}}], protocols: [{protocol: TCP, port: 22}]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: prod-baseline}
spec:
  tier: Baseline
  priority: 100
  subject: {namespaces: {matchLabels: {env: prod}}}
  ingress:
    - {name: monitoring, action: Accept, protocols: [{protocol: TCP, port: 9100}]}
    - {name: deny-all, action: Deny}
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: db-from-app, namespace: shop}
spec:
  subject: {podSelector: {matchLabels: {tier: db}}}
  ingress:
    - {name: sql, action: Allow, from: [{pods: {podSelector: {matchLabels: {tier: app}}}}], protocols: [{protocol: TCP, port: 5432}]}
    - {name: not-8, action: Deny, from: [{pods: {podSelector: {matchLabels: {tier: app}}}}], protocols: [{protocol: TCP, portRange: {start: 5433, end: 5440}}]}
    - {name: sql-8, action: Allow, from: [{pods: {podSelector: {matchLabels: {tier: app}}}}], protocols: [{protocol: TCP, port: 5438}]}
"#;

fn decide(c: &Compiled, p: Packet) -> Decision {
    c.decide(&p)
}

#[test]
fn admin_deny_is_final_and_names_the_rule() {
    let c = compiled(POLICIES, &members());
    let d = decide(&c, tcp(OPS, DB, 5432));
    assert!(!d.allowed);
    let step = d.ingress.unwrap();
    assert_eq!(
        step.rule.unwrap().to_string(),
        "ClusterSegmentationPolicy guard-db rule deny-ops"
    );
    assert!(step.reason.contains("Admin tier"), "{}", step.reason);
}

#[test]
fn admin_accept_skips_namespace_policies_and_baseline() {
    let c = compiled(POLICIES, &members());
    // db is isolated by db-from-app, and Baseline denies everything, but Admin Accept wins.
    let d = decide(&c, tcp(OPS, DB, 22));
    assert!(d.allowed, "{}", d.summary());
    assert_eq!(d.ingress.unwrap().rule.unwrap().rule, "ssh-from-ops");
}

#[test]
fn pass_hands_over_to_namespace_policies_where_deny_beats_allow() {
    let c = compiled(POLICIES, &members());
    // Passed by guard-db (prod), so lockdown's deny-rest never sees it; db-from-app allows sql.
    let d = decide(&c, tcp(APP, DB, 5432));
    assert!(d.allowed, "{}", d.summary());
    assert_eq!(d.ingress.unwrap().rule.unwrap().rule, "sql");
    // The namespace Deny beats the later Allow, whatever their order.
    let d = decide(&c, tcp(APP, DB, 5438));
    assert!(!d.allowed);
    assert_eq!(d.ingress.unwrap().rule.unwrap().rule, "not-8");
    // web is passed too, but db is isolated and nothing allows web.
    let d = decide(&c, tcp(WEB, DB, 5432));
    assert!(!d.allowed);
    let step = d.ingress.unwrap();
    assert!(step.rule.is_none());
    assert!(step.reason.contains("isolated"), "{}", step.reason);
    // The Pass that led there is part of the step.
    assert_eq!(
        step.passed,
        ["Pass by ClusterSegmentationPolicy guard-db rule pass-prod (Admin tier)"]
    );
}

#[test]
fn pass_hops_before_a_default_decision_are_recorded_per_tier() {
    let c = compiled(
        r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: hand-over}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {podSelector: {matchLabels: {tier: db}}}}
  ingress: [{name: to-baseline, action: Pass}, {name: never, action: Deny}]
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: base}
spec:
  tier: Baseline
  priority: 1
  subject: {pods: {podSelector: {matchLabels: {tier: db}}}}
  ingress: [{name: to-default, action: Pass}]
"#,
        &members(),
    );
    let d = decide(&c, tcp(OUTSIDE, DB, 5432));
    let step = d.ingress.unwrap();
    assert!(step.rule.is_none(), "the Network's default decides");
    assert!(step.reason.contains("defaultAction"), "{}", step.reason);
    assert_eq!(
        step.passed,
        [
            "Pass by ClusterSegmentationPolicy hand-over rule to-baseline (Admin tier)",
            "Pass by ClusterSegmentationPolicy base rule to-default (Baseline tier)"
        ]
    );
    // No Pass taken: nothing recorded.
    let d = decide(&c, tcp(OUTSIDE, WEB, 80));
    assert!(d.ingress.unwrap().passed.is_empty());
}

#[test]
fn without_pass_the_next_admin_policy_decides() {
    let c = compiled(POLICIES, &members());
    // The outside is neither ops nor prod: guard-db does not match, lockdown denies.
    let d = decide(&c, tcp(OUTSIDE, DB, 5432));
    assert!(!d.allowed);
    assert_eq!(d.ingress.unwrap().rule.unwrap().rule, "deny-rest");
    assert!(d.egress.is_none(), "the outside has no egress policy here");
}

#[test]
fn baseline_applies_to_workloads_no_namespace_policy_isolates() {
    let c = compiled(POLICIES, &members());
    let d = decide(&c, tcp(OPS, WEB, 80));
    assert!(!d.allowed);
    assert_eq!(
        d.ingress.as_ref().unwrap().rule.as_ref().unwrap().rule,
        "deny-all"
    );
    assert!(d.ingress.unwrap().reason.contains("Baseline"));
    let d = decide(&c, tcp(OPS, WEB, 9100));
    assert!(d.allowed);
    assert_eq!(d.ingress.unwrap().rule.unwrap().rule, "monitoring");
}

#[test]
fn the_network_default_decides_last() {
    let c = compiled(POLICIES, &members());
    // tools/ops has no policy: egress to the outside falls to net's default Allow.
    let d = decide(&c, tcp(OPS, OUTSIDE, 80));
    assert!(d.allowed);
    assert!(d.egress.unwrap().reason.contains("defaultAction is Allow"));
    // closed's default is Deny, both ways.
    let d = decide(&c, tcp(Q, OUTSIDE, 80));
    assert!(!d.allowed);
    assert!(d.egress.unwrap().reason.contains("defaultAction is Deny"));
    let d = decide(&c, tcp(OUTSIDE, Q, 80));
    assert!(!d.allowed);
}

#[test]
fn both_directions_must_allow() {
    let policies = r#"
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: web-egress, namespace: shop}
spec:
  subject: {podSelector: {matchLabels: {tier: web}}}
  egress:
    - {name: to-app, action: Allow, to: [{pods: {podSelector: {matchLabels: {tier: app}}}}]}
"#;
    let c = compiled(policies, &members());
    assert!(decide(&c, tcp(WEB, APP, 8080)).allowed);
    let d = decide(&c, tcp(WEB, OPS, 22));
    assert!(!d.allowed);
    assert!(d.egress.as_ref().is_some_and(|s| !s.allowed));
    assert!(
        d.ingress.as_ref().is_some_and(|s| s.allowed),
        "ops itself would accept"
    );
    assert!(
        d.summary().starts_with("denied: egress of shop/web"),
        "{}",
        d.summary()
    );
}

#[test]
fn protocols_ports_and_icmp_match_exactly() {
    let policies = r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: p}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress:
    - name: ping
      action: Deny
      protocols: [{protocol: ICMP, icmpType: 8}, {protocol: UDP, portRange: {start: 5000, end: 5010}}]
"#;
    let c = compiled(policies, &members());
    let mut p = tcp(WEB, APP, 5005);
    assert!(decide(&c, p).allowed, "TCP is not listed");
    p.protocol = L4Protocol::Udp;
    assert!(!decide(&c, p).allowed);
    p.port = Some(5011);
    assert!(decide(&c, p).allowed);
    p.protocol = L4Protocol::Icmp;
    p.port = None;
    p.icmp = Some((8, 0));
    assert!(!decide(&c, p).allowed);
    p.icmp = Some((0, 0));
    assert!(decide(&c, p).allowed, "an echo reply is not type 8");
}

#[test]
fn workloads_change_set_elements_never_rules() {
    let few = compiled(POLICIES, &members()[..2]);
    let mut many = members();
    for i in 0..200 {
        many.push(member(
            "shop",
            &format!("w{i}"),
            &[("tier", if i % 2 == 0 { "db" } else { "app" })],
            "net",
            &format!("10.0.{}.{}", 10 + i / 200, 10 + i % 200),
        ));
    }
    let lots = compiled(POLICIES, &many);
    assert_eq!(render::chains(&few), render::chains(&lots));
    let names =
        |c: &Compiled| -> Vec<String> { render::sets(c).into_iter().map(|s| s.name).collect() };
    assert_eq!(names(&few), names(&lots));
    let elements: usize = render::sets(&lots).iter().map(|s| s.elements.len()).sum();
    assert!(elements > 200);
}

#[test]
fn rules_render_per_family_protocol_and_stage() {
    let c = compiled(POLICIES, &members());
    let chains = render::chains(&c);
    let get = |name: &str| {
        chains
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .rules
            .clone()
    };
    let ingress = get("ingress");
    assert_eq!(ingress[0], "ip daddr != @local4 return");
    assert!(
        ingress.iter().any(|r| r.ends_with("tcp dport 22 return")),
        "{ingress:?}"
    );
    assert!(ingress.iter().any(|r| r.ends_with("goto ingress_ns")));
    let ns = get("ingress_ns");
    assert!(ns[0].starts_with("ip daddr != @iso_in4 goto ingress_base"));
    let deny_at = ns
        .iter()
        .position(|r| r.contains("5433-5440") && r.ends_with("drop"));
    let allow_at = ns.iter().position(|r| r.contains("dport 5432 return"));
    assert!(deny_at < allow_at, "namespace denies come first: {ns:?}");
    assert!(ns.last().unwrap().ends_with("drop"));
    let default = get("egress_default");
    assert!(default[0].starts_with("ip saddr @deny4 log prefix"));
}

#[test]
fn unknown_networks_and_invalid_policies_are_reported() {
    let res = resources(&format!(
        "{BASE}\n---\n{}",
        r#"
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: typo, namespace: shop}
spec:
  subject: {podSelector: {}, networks: [nett]}
  ingress: [{name: a, action: Allow}]
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: bad}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  egress: [{name: a, action: Allow}]
"#
    ));
    let c = compile_resources(&res, &members());
    let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("shop/typo") && t.contains("Network nett does not exist")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("bad") && t.contains("spec.egress[0].action")),
        "{text:?}"
    );
    // Its invalid rule (a namespace policy's action) denies all of its subject's egress.
    assert!(!c.egress.admin.is_empty());
    assert!(!decide(&c, tcp(WEB, APP, 80)).allowed);
}

/// A cluster policy that fails its checks (only one an older, looser schema admitted, or a
/// standalone agent's manifest) fails closed rule by rule: its valid rules hold, an invalid
/// Accept is left out, an invalid Deny or Pass denies all of the subject's traffic its way.
/// Dropping the policy, as before, dropped its Deny rules with it.
#[test]
fn an_invalid_cluster_policy_fails_closed_rule_by_rule() {
    let res = resources(&format!(
        "{BASE}\n---\n{}",
        r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: guard}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {matchLabels: {env: prod}}, podSelector: {matchLabels: {tier: db}}}}
  ingress:
    - {name: ops-ok, action: Accept, from: [{namespaces: {matchLabels: {team: ops}}}]}
    - {name: broken-accept, action: Accept, from: [{cidrs: ["10.0.0.300/32"]}]}
    - {name: broken-deny, action: Deny, from: [{cidrs: ["not-a-cidr"]}]}
  egress:
    - {name: broken-pass, action: Pass, protocols: [{protocol: ICMP, port: 80}]}
"#
    ));
    let c = compile_resources(&res, &members());
    let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    for field in [
        "spec.ingress[1].from[0].cidrs[0]",
        "spec.ingress[2].from[0].cidrs[0]",
        "spec.egress[0].protocols[0]",
    ] {
        assert!(
            text.iter()
                .any(|t| t.contains("guard") && t.contains(field) && t.contains("(fail closed)")),
            "{field}: {text:?}"
        );
    }
    assert_eq!(c.applies_to["ClusterSegmentationPolicy guard"], 1);
    // ops still reaches db (the valid Accept comes first); app no longer does (the broken
    // Deny denies everything), nor does db reach anyone (the broken Pass); the rest is open.
    assert!(decide(&c, tcp(OPS, DB, 5432)).allowed);
    assert!(!decide(&c, tcp(APP, DB, 5432)).allowed);
    assert!(!decide(&c, tcp(DB, APP, 80)).allowed);
    assert!(decide(&c, tcp(WEB, APP, 80)).allowed);
    let rules: Vec<&str> = c
        .ingress
        .admin
        .iter()
        .map(|r| r.origin.rule.as_str())
        .collect();
    assert_eq!(
        rules,
        ["ops-ok", "broken-deny"],
        "the broken Accept is left out"
    );
}

/// A cluster policy whose subject fails its checks is not enforced at all: whom it would hold
/// is unknown.
#[test]
fn a_cluster_policy_with_an_invalid_subject_is_not_enforced() {
    let res = resources(&format!(
        "{BASE}\n---\n{}",
        r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: both}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}, pods: {podSelector: {}}}
  ingress: [{name: d, action: Deny}]
"#
    ));
    let c = compile_resources(&res, &members());
    let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("both")
            && t.contains("spec.subject")
            && t.contains("not enforced until it is fixed")),
        "{text:?}"
    );
    assert!(c.ingress.admin.is_empty());
}

/// A namespace policy that fails its checks (only one an older, looser schema admitted) fails
/// closed: none of its rules is enforced, and its subject stays isolated where it has rules
/// (dropping it would open the subject to everyone); one whose subject itself is wrong is not
/// enforced at all.
#[test]
fn an_invalid_namespace_policy_keeps_its_subject_isolated() {
    let res = resources(&format!(
        "{BASE}\n---\n{}",
        r#"
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: locked, namespace: shop}
spec:
  subject: {podSelector: {matchLabels: {tier: db}}}
  ingress: [{name: a, action: Accept, from: [{pods: {podSelector: {}}}]}]
"#
    ));
    let c = compile_resources(&res, &members());
    let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter().any(|t| t.contains("shop/locked")
            && t.contains("spec.ingress[0].action")
            && t.contains("its subject stays isolated where it has rules (fail closed)")),
        "{text:?}"
    );
    let subject = c.subjects["SegmentationPolicy shop/locked"];
    assert!(c.ingress.isolated.contains(&subject));
    assert!(!c.egress.isolated.contains(&subject));
    assert!(c.ingress.ns_allow.is_empty() && c.ingress.ns_deny.is_empty());
    assert_eq!(c.applies_to["SegmentationPolicy shop/locked"], 1);
    // The packets: db takes nothing now (its rule would have allowed app), the others are open.
    assert!(!decide(&c, tcp(APP, DB, 5432)).allowed);
    assert!(decide(&c, tcp(DB, APP, 80)).allowed);
}

#[test]
fn an_empty_cidrs_list_is_reported_not_compiled_into_a_rule_matching_nothing() {
    // The CRD schema wants at least one CIDR; without the check, this Deny compiled into a rule
    // that renders no nft rule and denies nothing.
    let res = resources(&format!(
        "{BASE}\n---\n{}",
        r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: empty}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {}}
  ingress: [{name: none, action: Deny, from: [{cidrs: []}]}]
"#
    ));
    let c = compile_resources(&res, &members());
    let text: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("empty") && t.contains("spec.ingress[0].from[0].cidrs")),
        "{text:?}"
    );
    // Reported, and denying everything (fail closed), not a rule matching nothing.
    assert!(!decide(&c, tcp(WEB, APP, 80)).allowed);
}

/// The copies of a broadcast or multicast to a workload's port meet the ingress chains again,
/// with the subject matched by the port's id (`meta priority`, which the bridge tags each copy
/// with) where the ingress chains match its addresses: same tiers, rules, verdicts and
/// default action (its drops counted, not audited, unless a rule asks). Checked by rewriting
/// the ingress chains.
#[test]
fn broadcast_copies_meet_the_ingress_chains_with_the_subject_matched_by_port() {
    let mut ms = members();
    for (i, m) in ms.iter_mut().enumerate() {
        m.port = Some(100 + u32::try_from(i).unwrap());
    }
    let c = compiled(
        r#"
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: admin}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {podSelector: {matchLabels: {tier: db}}}}
  ingress:
    - {name: ops-out, action: Deny, from: [{namespaces: {matchLabels: {team: ops}}}], log: true}
    - {name: lan, action: Accept, from: [{cidrs: [192.168.50.0/24, "fd50::/64"]}], protocols: [{protocol: UDP, port: 5353}]}
    - {name: rest, action: Pass}
---
apiVersion: weft.dev/v1alpha1
kind: SegmentationPolicy
metadata: {name: db, namespace: shop}
spec:
  subject: {podSelector: {matchLabels: {tier: db}}}
  ingress:
    - {name: app, action: Allow, from: [{pods: {podSelector: {matchLabels: {tier: app}}}}], protocols: [{protocol: ICMP}, {protocol: TCP, port: 5432}]}
    - {name: no-web, action: Deny, from: [{pods: {podSelector: {matchLabels: {tier: web}}}}]}
---
apiVersion: weft.dev/v1alpha1
kind: ClusterSegmentationPolicy
metadata: {name: base}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {}}
  ingress: [{name: none, action: Deny}]
"#,
        &ms,
    );
    let chains = render::chains(&c);
    let rules = |name: &str| -> Vec<String> {
        chains
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("chain {name}"))
            .rules
            .clone()
    };
    let copy = |rule: &str| -> Option<String> {
        if rule.contains(" != @local4 return") || rule.contains(" != @local6 return") {
            return None;
        }
        let mut r = rule
            .replace(" log prefix \"weft isolated-in deny \" group 2727", "")
            .replace(" log prefix \"weft default-in deny \" group 2727", "")
            .replace("log prefix \"weft isolated-in deny \" group 2727 ", "")
            .replace("ip daddr != @iso_in4 ", "meta priority != @iso_in_p ")
            .replace("ip6 daddr != @iso_in6 ", "meta priority != @iso_in_p ")
            .replace("ip daddr @deny4 ", "meta priority @deny_p ")
            .replace("ip6 daddr @deny6 ", "meta priority @deny_p ");
        for (family, v) in [("ipv4", "ip"), ("ipv6", "ip6")] {
            if let Some(rest) = r.strip_prefix(&format!("{v} daddr @g")) {
                let (group, rest) = rest.split_once('_').unwrap();
                let rest = &rest[1..];
                r = format!("meta nfproto {family} meta priority @g{group}_p{rest}");
            }
        }
        for stage in ["drop", "ns", "base", "default"] {
            r = r.replace(
                &format!("goto ingress_{stage}"),
                &format!("goto ingress_copy_{stage}"),
            );
        }
        Some(r)
    };
    for stage in ["", "_ns", "_base", "_default"] {
        let mut want: Vec<String> = rules(&format!("ingress{stage}"))
            .iter()
            .filter_map(|r| copy(r))
            .collect();
        // Both families' gates are one for ports.
        want.dedup();
        assert_eq!(
            rules(&format!("ingress_copy{stage}")),
            want,
            "ingress{stage}"
        );
    }
    assert_eq!(
        rules("ingress_copy_drop"),
        ["update @drops_inp { meta priority counter } drop"]
    );
    // The port sets: every local member's id, and each group's.
    let sets = render::sets(&c);
    let set = |name: &str| {
        sets.iter()
            .find(|s| s.name == name)
            .unwrap()
            .elements
            .clone()
    };
    assert_eq!(set("local_p").len(), ms.iter().filter(|m| m.local).count());
    let db = c.subjects["SegmentationPolicy shop/db"];
    assert_eq!(
        set(&format!("g{db}_p")),
        [weft_dataplane::names::classid_text(102)].into()
    );
    assert_eq!(set("iso_in_p"), set(&format!("g{db}_p")));
    assert_eq!(
        set("deny_p"),
        [weft_dataplane::names::classid_text(104)].into()
    );
    assert!(set("clash_p").is_empty());
}

/// Two local ports with one id (a chance of about n² / 2³²): neither id judges copies as a
/// member's, and the copies to both are dropped (`clash_p`).
#[test]
fn two_ports_with_one_id_are_left_out_of_the_port_sets_and_their_copies_dropped() {
    let mut ms = members();
    for m in &mut ms {
        m.port = Some(7);
    }
    ms[0].port = Some(8);
    let c = compiled("", &ms);
    assert_eq!(c.clash_ports, [7].into());
    assert_eq!(c.local_ports, [8].into());
    assert!(c.group_ports.iter().all(|g| !g.contains(&7)));
}
