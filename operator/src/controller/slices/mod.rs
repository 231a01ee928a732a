//! The Networks' WorkloadSlices: what the agents of other nodes need of a Network's workloads.
//!
//! Each agent publishes its node's workload interfaces and VM reservations in its NodeNetwork
//! status. The controller copies the entries each node may vouch for ([`crate::model::peers`]:
//! addresses of the node's own blocks, or reserved there for a VM that moved) into the
//! Network's WorkloadSlices, at most [`MAX_SLICE_ENTRIES`] entries a slice, and agents watch
//! the slices of the Networks they realize (label [`weft_crds::NETWORK_LABEL`]). A pod's start
//! therefore rewrites one slice, sent to the agents of that Network's nodes only, instead of
//! its node's whole NodeNetwork sent to every agent.
//!
//! Placement is stable ([`place`]): an entry stays in the slice that holds it while it is
//! published; departed entries leave holes that the next entries fill, lowest index first; a
//! slice that empties is kept (empty) for the next ones. Slices are owned by their Network and
//! go with it (garbage collection): the controller never deletes one.
//!
//! Slices are written by their own kube-runtime controller of Networks, without the debounce of
//! the Network controller: a NodeNetwork event wakes it for the Networks whose published
//! entries changed on that node, and a slice deleted by hand wakes it for its Network. Its work
//! per event is that node's: each Network's [`Book`] keeps the slices between reconciles and
//! vouches again only for the nodes whose publication changed.

use super::{Context, Error, FIELD_MANAGER, name_of};
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tracing::{debug, warn};
use weft_crds::workloadslice::{MAX_SLICE_ENTRIES, network_label_value, slice_index, slice_name};
use weft_crds::{
    NETWORK_LABEL, Network, SliceReservation, SliceWorkload, WORKLOAD_SLICE_KIND, WorkloadSlice,
    WorkloadSliceSpec,
};

/// How many slices of one Network the controller writes at once.
const SLICE_WRITES: usize = 8;

mod book;
pub use book::{Book, Stored};

/// What identifies a workload entry ([`SliceWorkload::key`]), owned.
type WorkloadKey = (String, String, String, Vec<String>);
/// What identifies a reservation entry ([`SliceReservation::key`]), owned.
type ReservationKey = (String, String, String);

fn workload_key(w: &SliceWorkload) -> WorkloadKey {
    let (node, namespace, name, ips) = w.key();
    (node.into(), namespace.into(), name.into(), ips.to_vec())
}

fn reservation_key(r: &SliceReservation) -> ReservationKey {
    let (node, vm, ifname) = r.key();
    (node.into(), vm.into(), ifname.into())
}

/// Entries by what identifies them (the last of two with one key wins).
type Keyed = (
    BTreeMap<WorkloadKey, SliceWorkload>,
    BTreeMap<ReservationKey, SliceReservation>,
);

fn keyed(workloads: Vec<SliceWorkload>, reservations: Vec<SliceReservation>) -> Keyed {
    (
        workloads
            .into_iter()
            .map(|w| (workload_key(&w), w))
            .collect(),
        reservations
            .into_iter()
            .map(|r| (reservation_key(&r), r))
            .collect(),
    )
}

/// The slices of a Network (by index) that hold `workloads` and `reservations`, starting from
/// `current`: every entry still published stays in the slice that holds it (with what is
/// published now), entries no longer published leave, and new ones fill the slices with room,
/// lowest index first, then new slices at the next indexes. An entry held by two slices (two
/// writes that crossed) stays in the lower one. Slices that end up empty are in the result
/// (empty), so that what they held is removed.
pub fn place(
    workloads: Vec<SliceWorkload>,
    reservations: Vec<SliceReservation>,
    current: &BTreeMap<usize, WorkloadSliceSpec>,
    network: &str,
) -> BTreeMap<usize, WorkloadSliceSpec> {
    let (mut want_w, mut want_r) = keyed(workloads, reservations);
    let mut out = BTreeMap::new();
    for (&index, spec) in current {
        let mut kept = WorkloadSliceSpec {
            network: network.to_owned(),
            ..WorkloadSliceSpec::default()
        };
        for w in &spec.workloads {
            if kept.len() < MAX_SLICE_ENTRIES
                && let Some(now) = want_w.remove(&workload_key(w))
            {
                // An entry unchanged stays shared with the slice that holds it.
                kept.workloads
                    .push(if **w == now { w.clone() } else { Arc::new(now) });
            }
        }
        for r in &spec.reservations {
            if kept.len() < MAX_SLICE_ENTRIES
                && let Some(now) = want_r.remove(&reservation_key(r))
            {
                kept.reservations.push(now);
            }
        }
        out.insert(index, kept);
    }
    fill(
        &mut out,
        network,
        want_w.into_values(),
        want_r.into_values(),
    );
    out
}

/// Puts the entries `workloads`, then `reservations`, into the slices with room, lowest index
/// first, then into new slices after the last; returns the indexes of the slices it filled.
fn fill(
    slices: &mut BTreeMap<usize, WorkloadSliceSpec>,
    network: &str,
    mut workloads: impl ExactSizeIterator<Item = SliceWorkload>,
    mut reservations: impl ExactSizeIterator<Item = SliceReservation>,
) -> BTreeSet<usize> {
    let mut filled = BTreeSet::new();
    let mut pending = workloads.len() + reservations.len();
    let mut next = slices.keys().next_back().map_or(0, |i| i + 1);
    let mut indexes = slices.keys().copied().collect::<Vec<_>>().into_iter();
    while pending > 0 {
        let index = indexes.next().unwrap_or_else(|| {
            next += 1;
            next - 1
        });
        let slice = slices.entry(index).or_insert_with(|| WorkloadSliceSpec {
            network: network.to_owned(),
            ..WorkloadSliceSpec::default()
        });
        while slice.len() < MAX_SLICE_ENTRIES && pending > 0 {
            if let Some(w) = workloads.next() {
                slice.workloads.push(Arc::new(w));
            } else if let Some(r) = reservations.next() {
                slice.reservations.push(r);
            }
            pending -= 1;
            filled.insert(index);
        }
    }
    filled
}

/// The slices of `network` in the store, by index: those named after it and labelled with it.
fn stored_slices(ctx: &Context, network: &str) -> Stored {
    let label = network_label_value(network);
    ctx.stores
        .slices
        .state()
        .into_iter()
        .filter(|s| {
            s.spec.network == network
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(NETWORK_LABEL))
                    == Some(&label)
        })
        .filter_map(|s| Some((slice_index(network, &s.name_any())?, s)))
        .collect()
}

/// Writes the WorkloadSlices of `net` (leader only).
pub async fn reconcile(net: Arc<Network>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = publish(&net, &ctx).await;
    ctx.metrics.reconciled(WORKLOAD_SLICE_KIND, start.elapsed());
    match &result {
        Ok(_) => ctx.succeeded(&format!("slices/{}", net.name_any())),
        Err(e) => ctx.metrics.failed(WORKLOAD_SLICE_KIND, e.reason()),
    }
    result
}

async fn publish(net: &Network, ctx: &Context) -> Result<Action, Error> {
    let name = name_of(net)?;
    if !ctx.is_leader() || net.metadata.deletion_timestamp.is_some() {
        // Another replica writes; a deleted Network's slices go with it.
        return Ok(Action::await_change());
    }
    let stored = stored_slices(ctx, &name);
    let nodes = ctx.stores.node_networks.state();
    let deletions = ctx.stores.slice_deletions.load(Ordering::Relaxed);
    let (changed, problems) = {
        let pods = ctx.stores.pods.read().await;
        if !pods.listed() {
            // Until every pod is known, no node can be vouched for: the full list wakes every
            // Network again.
            return Ok(Action::await_change());
        }
        let mut books = ctx.slice_books.lock().unwrap_or_else(|e| e.into_inner());
        let book = books.entry(name.clone()).or_default();
        let changed = book.update(&name, &nodes, &pods, &stored, deletions);
        (changed, book.problems())
    };
    let written = write(net, ctx, &name, changed).await;
    refused(ctx, net, &name, problems).await;
    written.map(|()| Action::await_change())
}

/// Applies the slices `changed` of the Network `name`, and records the versions written in its
/// book; if one fails, the book is dropped (the next reconcile reads the store again).
async fn write(
    net: &Network,
    ctx: &Context,
    name: &str,
    changed: Vec<(usize, WorkloadSliceSpec)>,
) -> Result<(), Error> {
    if changed.is_empty() {
        return Ok(());
    }
    let api: Api<WorkloadSlice> = Api::all(ctx.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let owner = net.controller_owner_ref(&());
    let writes = changed.into_iter().map(|(index, spec)| {
        let (api, params, owner, network) = (&api, &params, owner.clone(), name);
        async move {
            let slice = slice_name(network, index);
            let mut metadata = json!({
                "name": slice,
                "labels": { NETWORK_LABEL: network_label_value(network) },
            });
            if let Some(owner) = owner {
                metadata["ownerReferences"] = json!([owner]);
            }
            let body = json!({
                "apiVersion": weft_crds::constants::API_VERSION,
                "kind": WORKLOAD_SLICE_KIND,
                "metadata": metadata,
                "spec": spec,
            });
            let applied = api
                .patch(&slice, params, &Patch::Apply(&body))
                .await
                .map_err(|source| Error::Api {
                    action: "apply",
                    kind: WORKLOAD_SLICE_KIND,
                    name: slice.clone(),
                    source,
                })?;
            debug!(slice = %slice, entries = spec.len(), "applied WorkloadSlice");
            Ok::<_, Error>((index, applied.metadata.resource_version))
        }
    });
    let mut results = futures::stream::iter(writes).buffer_unordered(SLICE_WRITES);
    let mut failed = None;
    let mut versions = Vec::new();
    while let Some(result) = results.next().await {
        match result {
            Ok(written) => versions.push(written),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let mut books = ctx.slice_books.lock().unwrap_or_else(|e| e.into_inner());
    if failed.is_some() {
        books.remove(name);
    } else if let Some(book) = books.get_mut(name) {
        for (index, version) in versions {
            book.written(index, version);
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `error_policy` of the WorkloadSlice controller: as [`super::error_policy`], with a backoff
/// of its own per Network (not shared with the Network controller's).
pub fn error_policy(net: Arc<Network>, err: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("slices/{}", net.name_any());
    warn!(network = %net.name_any(), reason = err.reason(), error = %crate::error_chain(err), "writing the WorkloadSlices failed");
    if err.is_transient() {
        Action::requeue(ctx.backoff(&key))
    } else {
        Action::await_change()
    }
}

/// Says what the nodes published that `network`'s slices leave out: a warning in the log and a
/// Warning Event on the Network, each time the list changes.
async fn refused(ctx: &Context, net: &Network, network: &str, problems: Vec<String>) {
    let changed = match ctx.refused.lock() {
        Ok(mut last) => {
            let before = last.get(network).cloned().unwrap_or_default();
            if problems.is_empty() {
                last.remove(network);
            } else {
                last.insert(network.to_owned(), problems.clone());
            }
            before != problems
        }
        Err(_) => false,
    };
    if !changed || problems.is_empty() {
        return;
    }
    for p in &problems {
        warn!(network = %network, problem = %p, "published workload left out of the WorkloadSlices");
    }
    let more = problems.len().saturating_sub(1);
    let note = if more > 0 {
        format!("{} (and {more} more)", problems[0])
    } else {
        problems[0].clone()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "PublishedAddressRefused".into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Publish".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &net.object_ref(&())).await {
        warn!(error = %crate::error_chain(&e), "cannot publish event");
    }
}

/// The Networks of which a change of the WorkloadSlice `slice` (deleted, or written by someone
/// else) may need a repair: the one it names, if its name is that Network's.
pub fn network_of(slice: &WorkloadSlice) -> Option<String> {
    let network = &slice.spec.network;
    slice_index(network, slice.metadata.name.as_deref()?)?;
    Some(network.clone())
}

/// Keys of the entries of `slices`, to check a placement keeps each entry once.
#[cfg(test)]
fn keys(slices: &BTreeMap<usize, WorkloadSliceSpec>) -> Vec<(usize, String)> {
    slices
        .iter()
        .flat_map(|(i, s)| {
            s.workloads
                .iter()
                .map(move |w| (*i, w.workload.name.clone()))
                .chain(
                    s.reservations
                        .iter()
                        .map(move |r| (*i, r.reservation.vm.clone())),
                )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(node: &str, name: &str, ip: &str) -> SliceWorkload {
        SliceWorkload {
            node: node.into(),
            workload: weft_crds::NodeWorkload {
                network: "blue".into(),
                namespace: "default".into(),
                name: name.into(),
                labels: Default::default(),
                ips: vec![ip.into()],
                vm: None,
                mac: None,
                active: true,
            },
        }
    }

    fn r(node: &str, vm: &str) -> SliceReservation {
        SliceReservation {
            node: node.into(),
            reservation: weft_crds::NodeReservation {
                vm: vm.into(),
                network: "blue".into(),
                ifname: "eth0".into(),
                ips: vec!["10.0.0.9".into()],
                mac: None,
                since: 1,
            },
        }
    }

    fn many(n: usize) -> Vec<SliceWorkload> {
        (0..n)
            .map(|i| {
                w(
                    "n1",
                    &format!("p{i:04}"),
                    &format!("10.0.{}.{}", i / 250, i % 250),
                )
            })
            .collect()
    }

    #[test]
    fn entries_fill_slices_of_at_most_the_limit_and_stay_where_they_are() {
        let first = place(many(250), vec![r("n2", "ns/vm")], &BTreeMap::new(), "blue");
        let sizes: Vec<usize> = first.values().map(WorkloadSliceSpec::len).collect();
        assert_eq!(sizes, [100, 100, 51]);
        assert!(first.values().all(|s| s.network == "blue"));
        assert_eq!(first[&2].reservations.len(), 1);
        // One pod goes from slice 0 and one comes: only slice 0 changes, the newcomer takes
        // the hole.
        let mut now = many(250);
        now.remove(3);
        now.push(w("n3", "new", "10.9.9.9"));
        let second = place(now, vec![r("n2", "ns/vm")], &first, "blue");
        let changed: Vec<usize> = second
            .iter()
            .filter(|(i, s)| first.get(i) != Some(s))
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(changed, [0]);
        assert!(
            second[&0]
                .workloads
                .iter()
                .any(|w| w.workload.name == "new")
        );
        // A label changed: the entry is rewritten in place.
        let mut relabelled = many(250);
        std::sync::Arc::make_mut(&mut relabelled[150].workload.labels)
            .insert("app".into(), "web".into());
        let third = place(relabelled, vec![], &first, "blue");
        assert_eq!(third[&1].workloads[50].workload.labels["app"], "web");
        // Everything gone: the slices stay, empty.
        let gone = place(vec![], vec![], &third, "blue");
        assert_eq!(gone.len(), 3);
        assert!(gone.values().all(WorkloadSliceSpec::is_empty));
    }

    #[test]
    fn an_entry_in_two_slices_stays_in_the_lower_and_full_slices_overflow_to_new_ones() {
        let mut current = BTreeMap::new();
        current.insert(
            4,
            WorkloadSliceSpec {
                network: "blue".into(),
                workloads: vec![
                    w("n1", "a", "10.0.0.1").into(),
                    w("n1", "b", "10.0.0.2").into(),
                ],
                ..WorkloadSliceSpec::default()
            },
        );
        current.insert(
            7,
            WorkloadSliceSpec {
                network: "blue".into(),
                workloads: vec![w("n1", "b", "10.0.0.2").into()],
                ..WorkloadSliceSpec::default()
            },
        );
        let out = place(
            vec![w("n1", "a", "10.0.0.1"), w("n1", "b", "10.0.0.2")],
            vec![],
            &current,
            "blue",
        );
        assert_eq!(keys(&out), [(4, "a".into()), (4, "b".into())]);
        assert!(out[&7].is_empty());
        // 230 others instead: slices 4 and 7 fill up, 8 takes the rest.
        let out = place(many(230), vec![], &out, "blue");
        let sizes: Vec<(usize, usize)> = out.iter().map(|(i, s)| (*i, s.len())).collect();
        assert_eq!(sizes, [(4, 100), (7, 100), (8, 30)]);
        let mut names: Vec<String> = keys(&out).into_iter().map(|(_, n)| n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 230, "each entry once");
    }

    #[test]
    fn only_a_slice_named_after_its_network_is_repaired() {
        let mut s = WorkloadSlice::new(
            "blue.2",
            WorkloadSliceSpec {
                network: "blue".into(),
                ..WorkloadSliceSpec::default()
            },
        );
        assert_eq!(network_of(&s), Some("blue".into()));
        s.spec.network = "red".into();
        assert_eq!(network_of(&s), None);
    }
}
