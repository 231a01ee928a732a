//! A pod's own problems as Kubernetes Events on the pod: a limit annotation that turned
//! invalid after the pod started, a host port another workload on the node holds, ... The
//! agent's log and status file have every problem; a pod's users look at `kubectl describe
//! pod`. The agent reconciles often and finds the same problems each time, so
//! [`Announced`] remembers what was published per pod and says which problems are new: one
//! that appears, or whose message changes, is published once; one that stays is not
//! published again; a pod without problems (gone, or fixed) is forgotten; an Event the API
//! server did not take is forgotten too ([`Announced::forget`]), so the next reconcile that
//! still finds the problem publishes it again. Pure: the Kubernetes source
//! ([`super::kube::KubeSource`]) sends the Events.

use crate::model::{Problem, WorkloadReason};
use std::collections::{BTreeMap, BTreeSet};

/// The `action` of the Events of pod problems: what the agent failed to do as asked.
pub const APPLY: &str = "Apply";

/// A Warning Event to publish on a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod (a VM's launcher pod).
    pub pod: String,
    /// The Event's `reason` (CamelCase).
    pub reason: &'static str,
    /// The Event's `action`.
    pub action: &'static str,
    /// The Event's note: what is wrong and how to fix it.
    pub note: String,
    /// Whether a repeat of the Event folds into a series on the Event already published (an
    /// anomaly that comes back), rather than being an Event of its own. kube-runtime's
    /// recorder folds by pod, reason and action whatever the note: a pod problem whose message
    /// changed must not fold into the Event of its old message.
    pub folds: bool,
}

/// The pod problems published so far: pod (`namespace`, `name`) → its problems' reasons and
/// messages. Only pods with problems now are held.
#[derive(Debug, Default)]
pub struct Announced {
    by_pod: BTreeMap<(String, String), BTreeSet<(WorkloadReason, String)>>,
}

impl Announced {
    /// The Events for `problems` (one reconcile's, every kind) that were not published for the
    /// last reconcile's: pod problems only (a `Container` problem has no pod to put an Event on;
    /// the log has it). Remembers `problems` for the next call.
    pub fn update(&mut self, problems: &[Problem]) -> Vec<PodEvent> {
        let mut now: BTreeMap<(String, String), BTreeSet<(WorkloadReason, String)>> =
            BTreeMap::new();
        for p in problems.iter().filter(|p| p.kind == "Pod") {
            let (Some(reason), Some((namespace, pod))) = (p.reason, p.object.split_once('/'))
            else {
                continue;
            };
            now.entry((namespace.to_owned(), pod.to_owned()))
                .or_default()
                .insert((reason, p.message.clone()));
        }
        let mut events = Vec::new();
        for ((namespace, pod), problems) in &now {
            let before = self.by_pod.get(&(namespace.clone(), pod.clone()));
            for (reason, message) in problems {
                if before.is_some_and(|b| b.contains(&(*reason, message.clone()))) {
                    continue;
                }
                events.push(PodEvent {
                    namespace: namespace.clone(),
                    pod: pod.clone(),
                    reason: reason.as_str(),
                    action: APPLY,
                    note: message.clone(),
                    folds: false,
                });
            }
        }
        self.by_pod = now;
        events
    }

    /// Forgets that `event` was published (the API server did not take it): the next
    /// [`Announced::update`] that still finds its problem returns it again.
    pub fn forget(&mut self, event: &PodEvent) {
        let key = (event.namespace.clone(), event.pod.clone());
        let Some(problems) = self.by_pod.get_mut(&key) else {
            return;
        };
        problems
            .retain(|(reason, message)| reason.as_str() != event.reason || *message != event.note);
        if problems.is_empty() {
            self.by_pod.remove(&key);
        }
    }

    /// How many pods have problems published.
    pub fn pods(&self) -> usize {
        self.by_pod.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(object: &str, reason: WorkloadReason, message: &str) -> Problem {
        Problem {
            kind: "Pod",
            object: object.into(),
            message: message.into(),
            reason: Some(reason),
        }
    }

    const BAD_LIMIT: &str = "annotation weft.dev/max-connections: \"lots\" is not a whole number from 1 to 1000000; write one, e.g. \"100\", or remove the annotation";

    fn published(events: &[PodEvent]) -> Vec<(String, &str, &str)> {
        events
            .iter()
            .map(|e| {
                (
                    format!("{}/{}", e.namespace, e.pod),
                    e.reason,
                    e.note.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn a_pod_problem_is_published_when_it_appears_and_not_while_it_stays() {
        let mut announced = Announced::default();
        let problems = [pod(
            "prod/web",
            WorkloadReason::InvalidLimitAnnotation,
            BAD_LIMIT,
        )];
        let events = announced.update(&problems);
        assert_eq!(
            published(&events),
            [("prod/web".to_owned(), "InvalidLimitAnnotation", BAD_LIMIT)]
        );
        assert_eq!(events[0].action, APPLY);
        assert!(!events[0].folds);
        assert!(announced.update(&problems).is_empty(), "the same problem");
        assert!(announced.update(&problems).is_empty(), "and again");
    }

    #[test]
    fn a_changed_message_is_published_again_and_a_second_problem_alone() {
        let mut announced = Announced::default();
        announced.update(&[pod(
            "prod/web",
            WorkloadReason::InvalidLimitAnnotation,
            BAD_LIMIT,
        )]);
        let changed = BAD_LIMIT.replace("lots", "many");
        let conflict = "tcp host port 8080 is already used by pod prod/api; it is not forwarded";
        let events = announced.update(&[
            pod("prod/web", WorkloadReason::InvalidLimitAnnotation, &changed),
            pod("prod/web", WorkloadReason::HostPortConflict, conflict),
        ]);
        assert_eq!(
            published(&events),
            [
                (
                    "prod/web".to_owned(),
                    "InvalidLimitAnnotation",
                    changed.as_str()
                ),
                ("prod/web".to_owned(), "HostPortConflict", conflict),
            ]
        );
        // The conflict stays, the annotation is fixed: nothing new.
        assert!(
            announced
                .update(&[pod("prod/web", WorkloadReason::HostPortConflict, conflict)])
                .is_empty()
        );
    }

    #[test]
    fn problems_of_containers_and_other_kinds_publish_nothing() {
        let mut announced = Announced::default();
        let events = announced.update(&[
            Problem {
                kind: "Container",
                object: "0123456789abcdef".into(),
                message: BAD_LIMIT.into(),
                reason: Some(WorkloadReason::InvalidLimitAnnotation),
            },
            Problem {
                kind: "PortForward",
                object: "prod/web".into(),
                message: "spec.network: Network blue does not exist; create it or fix the name"
                    .into(),
                reason: None,
            },
        ]);
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(announced.pods(), 0);
    }

    #[test]
    fn pods_without_problems_are_forgotten_and_a_problem_back_is_published_again() {
        let mut announced = Announced::default();
        let web = [pod(
            "prod/web",
            WorkloadReason::InvalidLimitAnnotation,
            BAD_LIMIT,
        )];
        announced.update(&web);
        announced.update(&[pod(
            "prod/db",
            WorkloadReason::InvalidLimitAnnotation,
            BAD_LIMIT,
        )]);
        assert_eq!(announced.pods(), 1, "web (gone or fixed) is forgotten");
        assert!(announced.update(&[]).is_empty());
        assert_eq!(announced.pods(), 0);
        assert_eq!(announced.update(&web).len(), 1, "back: published again");
    }

    #[test]
    fn an_event_the_api_server_did_not_take_is_published_again_by_the_next_update() {
        let mut announced = Announced::default();
        let conflict = "tcp host port 8080 is already used by pod prod/api; it is not forwarded";
        let problems = [
            pod(
                "prod/web",
                WorkloadReason::InvalidLimitAnnotation,
                BAD_LIMIT,
            ),
            pod("prod/web", WorkloadReason::HostPortConflict, conflict),
        ];
        let events = announced.update(&problems);
        assert_eq!(events.len(), 2);
        announced.forget(&events[1]);
        assert_eq!(
            published(&announced.update(&problems)),
            [("prod/web".to_owned(), "HostPortConflict", conflict)],
            "the one that failed, not the one taken"
        );
        assert!(
            announced.update(&problems).is_empty(),
            "taken the second time"
        );
        // A failure reported after the problem went away changes nothing.
        announced.update(&[]);
        announced.forget(&events[0]);
        assert_eq!(announced.pods(), 0);
    }
}
