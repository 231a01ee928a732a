//! The pods the controller checks the nodes' publications against ([`crate::model::peers`]):
//! every pod bound to a node, kept as the node it is bound to and its labels, nothing else.
//!
//! A node's agent publishes its workloads with their labels; the WorkloadSlices carry a
//! workload only for a pod the API server binds to that node, with the pod's own labels. A
//! pod bound, relabelled, moved or deleted therefore changes what its node may vouch for:
//! [`PodDirectory`] counts such changes per node (a pod's status, written far more often,
//! counts nothing), and a [`super::slices::Book`] vouches again for a node whose count moved.
//!
//! A deleted pod stays [`DEPARTED_GRACE`] as departed: its node's agent publishes the DEL
//! after the pod's deletion (at once for a force-deleted pod, whose object goes before its
//! sandbox), and a workload of a departed pod is left out of the slices without a problem.
//! Past the grace, a node still publishing it gets one ("no pod ... is bound").

use crate::model::peers::{PodFacts, Pods};
use crate::model::shared::{LabelSets, Names};
use k8s_openapi::api::core::v1::Pod;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a deleted pod's node may still publish its workloads without a problem.
pub const DEPARTED_GRACE: Duration = Duration::from_secs(30);

/// The pods bound to nodes, and per node how often what is known of its pods changed.
#[derive(Debug, Default)]
pub struct PodDirectory {
    pods: Pods,
    generations: HashMap<String, u64>,
    listed: bool,
    /// When each departed pod (namespace, name) departed.
    departed_at: HashMap<(String, String), Instant>,
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

    /// Records the pod `namespace/name` as `facts` (`None`: deleted, or bound to no node: it
    /// departs, at `now`); returns the nodes whose pods changed (the node it was bound to and
    /// the one it is).
    pub fn apply(
        &mut self,
        namespace: &str,
        name: &str,
        facts: Option<PodFacts>,
        now: Instant,
    ) -> BTreeSet<String> {
        let facts = match facts {
            Some(f) => {
                self.departed_at
                    .remove(&(namespace.to_owned(), name.to_owned()));
                f
            }
            None => match self.pods.get(namespace, name) {
                Some(f) if !f.departed => {
                    let f = PodFacts {
                        departed: true,
                        ..f.clone()
                    };
                    self.depart(namespace, name, now);
                    f
                }
                _ => return BTreeSet::new(),
            },
        };
        if self.pods.get(namespace, name) == Some(&facts) {
            return BTreeSet::new();
        }
        let before = self.pods.insert(namespace, name, facts.clone());
        let changed = before
            .iter()
            .chain([&facts])
            .map(|f| f.node.to_string())
            .collect();
        self.bump(&changed);
        changed
    }

    fn depart(&mut self, namespace: &str, name: &str, now: Instant) {
        self.departed_at
            .insert((namespace.to_owned(), name.to_owned()), now);
    }

    /// Forgets the pods departed [`DEPARTED_GRACE`] or longer before `now`; returns the nodes
    /// they were bound to.
    pub fn expire(&mut self, now: Instant) -> BTreeSet<String> {
        let over: Vec<(String, String)> = self
            .departed_at
            .extract_if(|_, at| now.saturating_duration_since(*at) >= DEPARTED_GRACE)
            .map(|(key, _)| key)
            .collect();
        let changed: BTreeSet<String> = over
            .iter()
            .filter_map(|(namespace, name)| self.pods.remove(namespace, name))
            .map(|f| f.node.to_string())
            .collect();
        self.bump(&changed);
        changed
    }

    /// Replaces every pod with `pods` (a full list, at `now`): a pod known before and not
    /// listed departs; returns the nodes whose pods changed.
    pub fn relist(&mut self, mut pods: Pods, now: Instant) -> BTreeSet<String> {
        let before: Vec<(String, String, PodFacts)> = self
            .pods
            .iter()
            .filter(|(ns, name, _)| pods.get(ns, name).is_none())
            .map(|(ns, name, f)| (ns.to_owned(), name.to_owned(), f.clone()))
            .collect();
        for (ns, name, f) in before {
            if !f.departed {
                self.depart(&ns, &name, now);
            }
            pods.insert(
                &ns,
                &name,
                PodFacts {
                    departed: true,
                    ..f
                },
            );
        }
        self.departed_at
            .retain(|(ns, name), _| pods.get(ns, name).is_some_and(|f| f.departed));
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
            departed: false,
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
            departed: false,
        })
    }

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| (*n).to_owned()).collect()
    }

    fn departed(f: Option<PodFacts>) -> PodFacts {
        PodFacts {
            departed: true,
            ..f.unwrap()
        }
    }

    #[test]
    fn a_node_s_count_moves_when_its_pods_do_and_only_then() {
        let mut d = PodDirectory::default();
        let t0 = Instant::now();
        assert_eq!(d.apply("ns", "web", facts("n1", "web"), t0), set(&["n1"]));
        // The same facts again (a status update): nothing changed.
        assert!(d.apply("ns", "web", facts("n1", "web"), t0).is_empty());
        assert_eq!(d.generation("n1"), 1);
        // Relabelled.
        assert_eq!(d.apply("ns", "web", facts("n1", "db"), t0), set(&["n1"]));
        // Bound to another node (deleted and made again under its name): both nodes.
        assert_eq!(
            d.apply("ns", "web", facts("n2", "db"), t0),
            set(&["n1", "n2"])
        );
        assert_eq!((d.generation("n1"), d.generation("n2")), (3, 1));
        // Deleted: departed, then forgotten once the grace is over.
        assert_eq!(d.apply("ns", "web", None, t0), set(&["n2"]));
        assert!(d.apply("ns", "web", None, t0).is_empty());
        assert_eq!(
            d.pods().get("ns", "web"),
            Some(&departed(facts("n2", "db")))
        );
        assert!(d.expire(t0 + DEPARTED_GRACE / 2).is_empty());
        assert_eq!(d.expire(t0 + DEPARTED_GRACE), set(&["n2"]));
        assert!(d.pods().is_empty());
        assert_eq!(d.generation("n2"), 3);
        // A full list: the nodes of the pods that appeared, went or changed; a pod not listed
        // departs.
        d.apply("ns", "a", facts("n1", "a"), t0);
        d.apply("ns", "b", facts("n2", "b"), t0);
        d.apply("ns", "c", facts("n3", "c"), t0);
        let mut all = Pods::default();
        all.insert("ns", "a", facts("n1", "a").unwrap());
        all.insert("ns", "b", facts("n2", "x").unwrap());
        all.insert("ns", "d", facts("n4", "d").unwrap());
        assert!(!d.listed());
        let t1 = t0 + DEPARTED_GRACE;
        assert_eq!(d.relist(all.clone(), t1), set(&["n2", "n3", "n4"]));
        assert!(d.listed());
        all.insert("ns", "c", departed(facts("n3", "c")));
        assert_eq!(d.pods(), &all);
        assert_eq!(d.generation("n1"), 4);
        assert_eq!(d.expire(t1 + DEPARTED_GRACE), set(&["n3"]));
        assert!(d.pods().get("ns", "c").is_none());
    }

    #[test]
    fn a_pod_that_comes_back_is_not_forgotten_by_its_earlier_departure() {
        let mut d = PodDirectory::default();
        let t0 = Instant::now();
        d.apply("ns", "web", facts("n1", "web"), t0);
        d.apply("ns", "web", None, t0);
        // Made again under its name, on another node; then deleted again, later.
        let t1 = t0 + DEPARTED_GRACE / 2;
        assert_eq!(
            d.apply("ns", "web", facts("n2", "web"), t1),
            set(&["n1", "n2"])
        );
        assert!(d.expire(t0 + DEPARTED_GRACE).is_empty());
        assert_eq!(d.pods().get("ns", "web"), facts("n2", "web").as_ref());
        d.apply("ns", "web", None, t1);
        assert!(d.expire(t0 + DEPARTED_GRACE).is_empty());
        assert_eq!(
            d.pods().get("ns", "web"),
            Some(&departed(facts("n2", "web")))
        );
        assert_eq!(d.expire(t1 + DEPARTED_GRACE), set(&["n2"]));
        assert!(d.pods().is_empty());
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
