//! The pods the controller checks the nodes' publications against ([`crate::model::peers`]):
//! every pod bound to a node, kept as the node it is bound to and its labels, nothing else.
//!
//! A node's agent publishes its workloads with their labels; the WorkloadSlices carry a
//! workload only for a pod the API server binds to that node, with the pod's own labels. A
//! pod bound, relabelled, moved or deleted therefore changes what its node may vouch for:
//! [`PodDirectory`] counts such changes per node (a pod's status, written far more often,
//! counts nothing), and a [`super::slices::Book`] vouches again for a node whose count moved.

use crate::model::peers::{PodFacts, Pods};
use crate::model::shared::{LabelSets, Names};
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// The pods bound to nodes, and per node how often what is known of its pods changed.
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: Pods,
    generations: HashMap<String, u64>,
    listed: bool,
}

impl PodDirectory {
    /// The pods bound to nodes.
    pub fn pods(&self) -> &Pods {
        &self.pods
    }

    /// How often what is known of the pods bound to `node` changed: equal counts, same pods.
    pub fn generation(&self, node: &str) -> u64 {
        self.generations.get(node).copied().unwrap_or_default()
    }

    /// Whether the first full list of pods is in (until then no node may vouch for anything).
    pub fn listed(&self) -> bool {
        self.listed
    }

    /// Moves the count of each of `nodes` on by one.
    fn bump(&mut self, nodes: &BTreeSet<String>) {
        for node in nodes {
            *self.generations.entry(node.clone()).or_default() += 1;
        }
    }

    /// Records the pod `namespace/name` as `facts` (`None`: deleted, or bound to no node);
    /// returns the nodes whose pods changed (the node it was bound to and the one it is).
    pub fn apply(
        &mut self,
        namespace: &str,
        name: &str,
        facts: Option<PodFacts>,
    ) -> BTreeSet<String> {
        let before = match &facts {
            Some(f) if self.pods.get(namespace, name) == Some(f) => return BTreeSet::new(),
            Some(f) => self.pods.insert(namespace, name, f.clone()),
            None => self.pods.remove(namespace, name),
        };
        let changed = before
            .iter()
            .chain(&facts)
            .map(|f| f.node.to_string())
            .collect();
        self.bump(&changed);
        changed
    }

    /// Replaces every pod with `pods` (a full list); returns the nodes whose pods changed.
    pub fn relist(&mut self, pods: Pods) -> BTreeSet<String> {
        let changed: BTreeSet<String> = self
            .pods
            .iter()
            .filter(|(ns, name, f)| pods.get(ns, name) != Some(*f))
            .chain(
                pods.iter()
                    .filter(|(ns, name, f)| self.pods.get(ns, name) != Some(*f)),
            )
            .map(|(_, _, f)| f.node.to_string())
            .collect();
        self.bump(&changed);
        self.pods = pods;
        self.listed = true;
        changed
    }
}

/// The annotation the kubelet puts on the mirror pod of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the controller keeps of `pod`: `(namespace, name, facts)`, the node names shared
/// through `nodes` and the labels through `labels`; `None` for a pod bound to no node.
pub fn facts_of(
    pod: &Pod,
    nodes: &mut Names,
    labels: &mut LabelSets,
) -> Option<(String, String, PodFacts)> {
    let node = nodes.get(pod.spec.as_ref()?.node_name.as_deref()?);
    let mut set = Arc::new(pod.metadata.labels.clone().unwrap_or_default());
    labels.share(&mut set);
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION));
    Some((
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
        PodFacts {
            node,
            labels: set,
            mirror,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(node: &str, app: &str) -> Option<PodFacts> {
        Some(PodFacts {
            node: node.into(),
            labels: Arc::new([("app".into(), app.into())].into()),
            mirror: false,
        })
    }

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_node_s_count_moves_when_its_pods_do_and_only_then() {
        let mut d = PodDirectory::default();
        assert_eq!(d.apply("ns", "web", facts("n1", "web")), set(&["n1"]));
        // The same facts again (a status update): nothing changed.
        assert!(d.apply("ns", "web", facts("n1", "web")).is_empty());
        assert_eq!(d.generation("n1"), 1);
        // Relabelled.
        assert_eq!(d.apply("ns", "web", facts("n1", "db")), set(&["n1"]));
        // Bound to another node (deleted and made again under its name): both nodes.
        assert_eq!(d.apply("ns", "web", facts("n2", "db")), set(&["n1", "n2"]));
        assert_eq!((d.generation("n1"), d.generation("n2")), (3, 1));
        assert_eq!(d.apply("ns", "web", None), set(&["n2"]));
        assert!(d.apply("ns", "web", None).is_empty());
        assert!(d.pods().is_empty());
        // A full list: the nodes of the pods that appeared, went or changed.
        d.apply("ns", "a", facts("n1", "a"));
        d.apply("ns", "b", facts("n2", "b"));
        d.apply("ns", "c", facts("n3", "c"));
        let mut all = Pods::default();
        all.insert("ns", "a", facts("n1", "a").unwrap());
        all.insert("ns", "b", facts("n2", "x").unwrap());
        all.insert("ns", "d", facts("n4", "d").unwrap());
        assert!(!d.listed());
        assert_eq!(d.relist(all.clone()), set(&["n2", "n3", "n4"]));
        assert!(d.listed());
        assert_eq!(d.pods(), &all);
        assert_eq!(d.generation("n1"), 4);
    }

    #[test]
    fn a_pod_is_kept_by_its_node_and_labels_and_an_unbound_one_not_at_all() {
        let (mut names, mut labels) = (Names::default(), LabelSets::default());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "web", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": []},
        }))
        .unwrap();
        let (ns, name, f) = facts_of(&pod, &mut names, &mut labels).unwrap();
        assert_eq!((ns.as_str(), name.as_str()), ("ns", "web"));
        assert_eq!(f, facts("n1", "web").unwrap());
        // A second pod of the same labels shares them.
        let (_, _, g) = facts_of(&pod, &mut names, &mut labels).unwrap();
        assert!(Arc::ptr_eq(&f.labels, &g.labels));
        let pending: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "ns", "name": "new"},
            "spec": {"containers": []},
        }))
        .unwrap();
        assert!(facts_of(&pending, &mut names, &mut labels).is_none());
        let mirror: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "kube-system", "name": "etcd-n1",
                         "annotations": {"kubernetes.io/config.mirror": "0123abcd"}},
            "spec": {"nodeName": "n1", "containers": []},
        }))
        .unwrap();
        assert!(facts_of(&mirror, &mut names, &mut labels).unwrap().2.mirror);
        assert!(!f.mirror);
    }
}
