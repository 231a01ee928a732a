//! The endpoints on this node: registered by the CNI, and rebuilt from the IPAM store (which
//! survives agent restarts) at start and on every resync.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tracing::warn;
use weft_dataplane::ipam::{IpamStore, Reservation};
use weft_dataplane::proto::Endpoint;
use weft_dataplane::state::NetworkState;

type Key = (String, String, String);

/// How long an unregistered endpoint stays out even if a resync still finds its allocation
/// (DEL unregisters before it releases the addresses).
const TOMBSTONE: Duration = Duration::from_secs(120);

/// The endpoints of this node.
#[derive(Debug, Default)]
pub struct EndpointStore {
    endpoints: BTreeMap<Key, Endpoint>,
    gone: BTreeMap<Key, Instant>,
    /// What changed since [`EndpointStore::take_changes`]: each changed key with its endpoint
    /// before the first change (`None`: there was none). `None` as a whole after a resync or
    /// before the first take: the changes are unknown.
    journal: Option<BTreeMap<Key, Option<Endpoint>>>,
    /// The VM reservations of the IPAM stores, by (network, VM, interface): read at every
    /// resync, and brought up to date by each registration of a VM's interface.
    reservations: BTreeMap<Key, Reservation>,
    /// The endpoints mapping each host port (protocol, port), for
    /// [`EndpointStore::host_port_clash`]: a registration looks at those alone, not at every
    /// endpoint.
    host_ports: BTreeMap<(String, u16), BTreeSet<Key>>,
}

/// The endpoints that changed: the old versions (removed or replaced) and the new ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Endpoints gone, or replaced by a changed version.
    pub removed: Vec<Endpoint>,
    /// Endpoints new, or the changed versions.
    pub added: Vec<Endpoint>,
}

/// Adds (`add`) or removes endpoint `ep`'s host ports, under its key `k`, in `index`.
fn index_host_ports(
    index: &mut BTreeMap<(String, u16), BTreeSet<Key>>,
    k: &Key,
    ep: &Endpoint,
    add: bool,
) {
    for m in &ep.port_mappings {
        let port = (m.protocol.clone(), m.host_port);
        if add {
            index.entry(port).or_default().insert(k.clone());
        } else if let Some(holders) = index.get_mut(&port) {
            holders.remove(k);
            if holders.is_empty() {
                index.remove(&port);
            }
        }
    }
}

fn key(network: &str, container_id: &str, ifname: &str) -> Key {
    (network.into(), container_id.into(), ifname.into())
}

impl EndpointStore {
    /// Loads every allocation of every network from the IPAM store.
    pub fn load(state_dir: &Path) -> Self {
        let mut s = EndpointStore::default();
        s.resync(state_dir);
        s
    }

    /// Re-reads the IPAM store: adds what it holds (unless recently unregistered), drops what it
    /// no longer holds.
    pub fn resync(&mut self, state_dir: &Path) {
        let now = Instant::now();
        self.gone.retain(|_, t| now.duration_since(*t) < TOMBSTONE);
        let mut fresh = BTreeMap::new();
        let mut reservations = BTreeMap::new();
        let mut names: Vec<String> = NetworkState::list(state_dir).unwrap_or_default();
        for n in IpamStore::networks(state_dir) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        for network in names {
            let Ok(store) = IpamStore::open(state_dir, &network) else {
                continue;
            };
            match store.contents() {
                Ok((allocs, reserved)) => {
                    for r in reserved {
                        reservations.insert(key(&network, &r.owner, &r.ifname), r);
                    }
                    for a in allocs {
                        let k = key(&network, &a.container_id, &a.ifname);
                        if self.gone.contains_key(&k) {
                            continue;
                        }
                        let ep = self
                            .endpoints
                            .get(&k)
                            .cloned()
                            .unwrap_or_else(|| Endpoint::from_allocation(&network, &a));
                        fresh.insert(k, ep);
                    }
                }
                Err(e) => {
                    warn!(%network, error = %crate::error_chain(&e), "cannot read IPAM store")
                }
            }
        }
        self.endpoints = fresh;
        self.reservations = reservations;
        self.journal = None;
        self.host_ports.clear();
        for (k, ep) in &self.endpoints {
            index_host_ports(&mut self.host_ports, k, ep, true);
        }
    }

    /// Remembers `k`'s endpoint before its first change since the last take.
    fn note(&mut self, k: &Key) {
        if let Some(journal) = &mut self.journal
            && !journal.contains_key(k)
        {
            journal.insert(k.clone(), self.endpoints.get(k).cloned());
        }
    }

    /// The changes since the last call (`None` when they are unknown: the first call, or a
    /// resync in between); the journal starts afresh.
    pub fn take_changes(&mut self) -> Option<Changes> {
        let journal = self.journal.replace(BTreeMap::new())?;
        let mut changes = Changes::default();
        for (k, old) in journal {
            let new = self.endpoints.get(&k);
            if old.as_ref() == new {
                continue;
            }
            changes.removed.extend(old);
            changes.added.extend(new.cloned());
        }
        Some(changes)
    }

    /// Activates a pending port (a live migration's target whose VM arrived); the endpoint, if
    /// it was pending.
    pub fn activate(&mut self, host_ifname: &str, state_dir: &Path) -> Option<Endpoint> {
        let k = self
            .endpoints
            .iter()
            .find(|(_, e)| e.host_ifname == host_ifname && e.pending)
            .map(|(k, _)| k.clone())?;
        self.note(&k);
        let ep = self.endpoints.get_mut(&k)?;
        ep.pending = false;
        // Remembered in the IPAM store, so a restarted agent does not hold the port again.
        let att = weft_dataplane::ipam::Attachment {
            container_id: ep.container_id.clone(),
            ifname: ep.ifname.clone(),
        };
        if let Err(e) = IpamStore::open(state_dir, &ep.network)
            .and_then(|s| s.update(&att, |a| a.pending = false))
        {
            warn!(port = %host_ifname, error = %crate::error_chain(&e), "cannot record the activation");
        }
        Some(ep.clone())
    }

    /// Forgets the reservations, kept for at least `min_age` seconds and unused by any
    /// attachment here, of the KubeVirt VMs that `exists` does not know any more (deleted from
    /// the API); returns `(network, vm)` of each.
    pub fn forget_deleted(
        &mut self,
        state_dir: &Path,
        exists: &dyn Fn(&str) -> bool,
        now: u64,
        min_age: u64,
    ) -> Vec<(String, String)> {
        let stale = |r: &Reservation| {
            r.kubevirt && !exists(&r.owner) && now.saturating_sub(r.since) >= min_age
        };
        let mut candidates: Vec<(String, String)> = self
            .reservations
            .iter()
            .filter(|(_, r)| stale(r))
            .map(|((network, owner, _), _)| (network.clone(), owner.clone()))
            .collect();
        candidates.dedup();
        let mut out = Vec::new();
        for (network, owner) in candidates {
            let Ok(store) = IpamStore::open(state_dir, &network) else {
                continue;
            };
            match store.forget_idle(&owner, stale) {
                Ok(0) => {}
                Ok(_) => {
                    self.reservations
                        .retain(|(n, o, _), r| !(n == &network && o == &owner && stale(r)));
                    out.push((network, owner));
                }
                Err(e) => {
                    warn!(%network, vm = %owner, error = %crate::error_chain(&e), "cannot forget a deleted VM's reservation")
                }
            }
        }
        out
    }

    /// The VM reservations of this node, as published for the other nodes.
    pub fn reservations(&self) -> Vec<weft_crds::NodeReservation> {
        self.reservations
            .iter()
            .map(|((network, _, _), r)| weft_crds::NodeReservation {
                vm: r.owner.clone(),
                network: network.clone(),
                ifname: r.ifname.clone(),
                ips: r.ips.iter().map(|ip| ip.to_string()).collect(),
                mac: r.mac.clone(),
                since: i64::try_from(r.since).unwrap_or(i64::MAX),
            })
            .collect()
    }

    /// Adds or replaces an endpoint.
    pub fn register(&mut self, ep: Endpoint) {
        // A VM's interface took its reservation (the IPAM store made or renewed it).
        if let Some(vm) = &ep.vm {
            let rk = key(&ep.network, vm, &ep.ifname);
            let kubevirt = self.reservations.get(&rk).is_some_and(|r| r.kubevirt);
            self.reservations.insert(
                rk,
                Reservation {
                    owner: vm.clone(),
                    ifname: ep.ifname.clone(),
                    ips: ep.ips.clone(),
                    mac: Some(ep.mac.clone()),
                    since: super::now(),
                    kubevirt,
                },
            );
        }
        let k = key(&ep.network, &ep.container_id, &ep.ifname);
        self.gone.remove(&k);
        self.note(&k);
        if let Some(old) = self.endpoints.get(&k) {
            index_host_ports(&mut self.host_ports, &k, old, false);
        }
        index_host_ports(&mut self.host_ports, &k, &ep, true);
        self.endpoints.insert(k, ep);
    }

    /// The first host port of `ep` that another endpoint already holds, with that endpoint
    /// (a re-registration of the same attachment holds nothing against itself).
    pub fn host_port_clash<'a>(
        &'a self,
        ep: &'a Endpoint,
    ) -> Option<(&'a weft_dataplane::proto::PortMapping, &'a Endpoint)> {
        let k = key(&ep.network, &ep.container_id, &ep.ifname);
        ep.port_mappings.iter().find_map(|m| {
            self.host_ports
                .get(&(m.protocol.clone(), m.host_port))?
                .iter()
                .filter(|other| **other != k)
                .filter_map(|other| self.endpoints.get(other))
                .filter(|e| !e.pending)
                .find(|e| e.port_mappings.iter().any(|o| o.clashes(m)))
                .map(|e| (m, e))
        })
    }

    /// Removes an endpoint; returns it, if it was registered.
    pub fn unregister(
        &mut self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Option<Endpoint> {
        let k = key(network, container_id, ifname);
        self.note(&k);
        let gone = self.endpoints.remove(&k);
        if let Some(ep) = &gone {
            index_host_ports(&mut self.host_ports, &k, ep, false);
        }
        self.gone.insert(k, Instant::now());
        gone
    }

    /// All endpoints, in a stable order.
    pub fn list(&self) -> Vec<Endpoint> {
        self.endpoints.values().cloned().collect()
    }

    /// Every endpoint, lent.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// The live migration targets waiting for their VM.
    pub fn pending(&self) -> Vec<Endpoint> {
        self.endpoints
            .values()
            .filter(|e| e.pending)
            .cloned()
            .collect()
    }

    /// How many live migration targets wait for their VM.
    pub fn pending_count(&self) -> usize {
        self.endpoints.values().filter(|e| e.pending).count()
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// None?
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }
}

/// The workload addresses (link-local ones included) and host ports the node's endpoints hold,
/// each counted by the endpoints holding it (two do during a live migration), kept up to date
/// by the endpoints' changes; and those no endpoint holds any more since they were last taken
/// ([`Departures::take_gone`]), whose per-address state the kernel's dynamic sets may still
/// hold.
#[derive(Debug, Default)]
pub struct Departures {
    addresses: BTreeMap<IpAddr, usize>,
    ports: BTreeMap<String, usize>,
    gone_addresses: BTreeSet<IpAddr>,
    gone_ports: BTreeSet<String>,
}

impl Departures {
    /// Follows the endpoints' changes since the last call: `Some` when they are known (the old
    /// versions removed, the new ones added), `None` otherwise, when every endpoint of
    /// `endpoints` is counted anew.
    pub fn follow<'a>(
        &mut self,
        changes: Option<&Changes>,
        endpoints: impl Iterator<Item = &'a Endpoint>,
    ) {
        let Some(changes) = changes else {
            // Counted anew; what left before and is held again leaves the gone sets as it is
            // counted, and what was held and is not any more joins them.
            let mut now = Departures {
                gone_addresses: std::mem::take(&mut self.gone_addresses),
                gone_ports: std::mem::take(&mut self.gone_ports),
                ..Departures::default()
            };
            for e in endpoints {
                now.add(e);
            }
            let left = self
                .addresses
                .keys()
                .filter(|ip| !now.addresses.contains_key(ip));
            now.gone_addresses.extend(left);
            let left = self.ports.keys().filter(|p| !now.ports.contains_key(*p));
            now.gone_ports.extend(left.cloned());
            *self = now;
            return;
        };
        for e in &changes.removed {
            self.remove(e);
        }
        for e in &changes.added {
            self.add(e);
        }
    }

    fn add(&mut self, e: &Endpoint) {
        for ip in crate::agent::plan::addresses_of(e) {
            *self.addresses.entry(ip).or_default() += 1;
            self.gone_addresses.remove(&ip);
        }
        *self.ports.entry(e.host_ifname.clone()).or_default() += 1;
        self.gone_ports.remove(&e.host_ifname);
    }

    fn remove(&mut self, e: &Endpoint) {
        for ip in crate::agent::plan::addresses_of(e) {
            if let Some(n) = self.addresses.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.addresses.remove(&ip);
                    self.gone_addresses.insert(ip);
                }
            }
        }
        if let Some(n) = self.ports.get_mut(&e.host_ifname) {
            *n -= 1;
            if *n == 0 {
                self.ports.remove(&e.host_ifname);
                self.gone_ports.insert(e.host_ifname.clone());
            }
        }
    }

    /// Whether any address or port left since the last take.
    pub fn any_gone(&self) -> bool {
        !self.gone_addresses.is_empty() || !self.gone_ports.is_empty()
    }

    /// The addresses and ports that left since the last take, forgotten.
    pub fn take_gone(&mut self) -> (Vec<IpAddr>, Vec<String>) {
        (
            std::mem::take(&mut self.gone_addresses)
                .into_iter()
                .collect(),
            std::mem::take(&mut self.gone_ports).into_iter().collect(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use weft_dataplane::ipam::{AllocRequest, Attachment, Pool};
    use weft_dataplane::proto::PortMapping;

    /// Endpoint `eth0` of container `cid` on network `n`, with address `ip`.
    pub(crate) fn ep(cid: &str, ip: &str, pending: bool) -> Endpoint {
        Endpoint {
            network: "n".into(),
            container_id: cid.into(),
            ifname: "eth0".into(),
            host_ifname: format!("wf{cid}"),
            mac: "0a:58:0a:0a:00:02".into(),
            ips: vec![ip.parse().unwrap()],
            pod_namespace: None,
            pod_name: None,
            netns: None,
            vm: None,
            pending,
            vlan_trunk: vec![],
            port_mappings: vec![],
            bandwidth: None,
        }
    }

    fn with_mac(mut e: Endpoint, mac: &str) -> Endpoint {
        e.mac = mac.into();
        e
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = list.iter().map(|s| s.parse().unwrap()).collect();
        v.sort();
        v
    }

    /// The store's changes since the last take, followed.
    fn follow(d: &mut Departures, eps: &mut EndpointStore) {
        let changes = eps.take_changes();
        d.follow(changes.as_ref(), eps.iter());
    }

    #[test]
    fn departures_are_the_addresses_and_ports_no_endpoint_holds_any_more() {
        let mut eps = EndpointStore::default();
        let mut d = Departures::default();
        eps.register(with_mac(ep("a", "10.0.0.2", false), "0a:58:0a:00:00:02"));
        eps.register(with_mac(ep("b", "10.0.0.3", false), "0a:58:0a:00:00:03"));
        follow(&mut d, &mut eps);
        assert!(!d.any_gone());
        eps.unregister("n", "a", "eth0");
        follow(&mut d, &mut eps);
        assert!(d.any_gone());
        let (gone, ports) = d.take_gone();
        // Its link-local address too, from its MAC.
        assert_eq!(gone, ips(&["10.0.0.2", "fe80::858:aff:fe00:2"]));
        assert_eq!(ports, ["wfa"]);
        assert_eq!(d.take_gone(), (vec![], vec![]), "taken once");
        // Back before the take: not gone.
        eps.unregister("n", "b", "eth0");
        follow(&mut d, &mut eps);
        eps.register(with_mac(ep("b", "10.0.0.3", false), "0a:58:0a:00:00:03"));
        follow(&mut d, &mut eps);
        assert!(!d.any_gone());
    }

    #[test]
    fn an_address_two_endpoints_hold_stays_while_one_of_them_does() {
        let mut eps = EndpointStore::default();
        let mut d = Departures::default();
        // A live migration: the VM's address on its source port and its pending target's.
        eps.register(ep("src", "10.0.0.9", false));
        eps.register(ep("dst", "10.0.0.9", true));
        follow(&mut d, &mut eps);
        eps.unregister("n", "src", "eth0");
        follow(&mut d, &mut eps);
        assert_eq!(d.take_gone(), (vec![], vec!["wfsrc".to_string()]));
        eps.unregister("n", "dst", "eth0");
        follow(&mut d, &mut eps);
        assert_eq!(
            d.take_gone(),
            (
                ips(&["10.0.0.9", "fe80::858:aff:fe0a:2"]),
                vec!["wfdst".to_string()]
            )
        );
    }

    #[test]
    fn unknown_changes_count_every_endpoint_anew_and_keep_what_left_before() {
        let dir = tempfile::tempdir().unwrap();
        let mut eps = EndpointStore::default();
        let mut d = Departures::default();
        eps.register(with_mac(ep("a", "10.0.0.2", false), "0a:58:0a:00:00:02"));
        eps.register(with_mac(ep("b", "10.0.0.3", false), "0a:58:0a:00:00:03"));
        eps.register(with_mac(ep("c", "10.0.0.4", false), "0a:58:0a:00:00:04"));
        follow(&mut d, &mut eps);
        eps.unregister("n", "c", "eth0");
        follow(&mut d, &mut eps);
        // A resync (here of an empty store, which keeps none) makes the changes unknown.
        eps.resync(dir.path());
        eps.register(with_mac(ep("b", "10.0.0.3", false), "0a:58:0a:00:00:03"));
        let changes = eps.take_changes();
        assert_eq!(changes, None);
        d.follow(changes.as_ref(), eps.iter());
        let (gone, ports) = d.take_gone();
        assert_eq!(
            gone,
            ips(&[
                "10.0.0.2",
                "10.0.0.4",
                "fe80::858:aff:fe00:2",
                "fe80::858:aff:fe00:4"
            ])
        );
        assert_eq!(ports, ["wfa", "wfc"]);
        eps.unregister("n", "b", "eth0");
        follow(&mut d, &mut eps);
        assert_eq!(d.take_gone().1, ["wfb"], "counted anew, then followed");
    }

    #[test]
    fn the_journal_names_what_changed_since_the_last_take() {
        let dir = tempfile::tempdir().unwrap();
        let mut eps = EndpointStore::default();
        eps.register(ep("a", "10.0.0.2", false));
        assert_eq!(eps.take_changes(), None, "unknown before the first take");
        assert_eq!(eps.take_changes(), Some(Changes::default()));
        eps.register(ep("b", "10.0.0.3", true));
        eps.register(ep("c", "10.0.0.4", false));
        eps.unregister("n", "c", "eth0");
        eps.unregister("n", "a", "eth0");
        eps.register(ep("a", "10.0.0.9", false));
        assert!(eps.activate("wfb", dir.path()).is_some());
        let c = eps.take_changes().unwrap();
        assert_eq!(
            c.removed,
            [ep("a", "10.0.0.2", false)],
            "a replaced; c came and went"
        );
        assert_eq!(
            c.added,
            [ep("a", "10.0.0.9", false), ep("b", "10.0.0.3", false)]
        );
        eps.resync(dir.path());
        assert_eq!(eps.take_changes(), None, "a resync forgets what changed");
    }

    #[test]
    fn deleted_kubevirt_vms_lose_their_idle_reservations_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), "lan").unwrap();
        let pool = Pool {
            block_v4: Some("10.10.0.0/26".parse().unwrap()),
            subnet_v4: Some("10.10.0.0/16".parse().unwrap()),
            ..Pool::default()
        };
        let vm = |pod: &str, owner: &str, kubevirt: bool| AllocRequest {
            attachment: Attachment {
                container_id: pod.into(),
                ifname: "eth0".into(),
            },
            owner: Some(owner.into()),
            owner_kubevirt: kubevirt,
            ..AllocRequest::default()
        };
        // gone: a deleted KubeVirt VM, stopped; running: deleted from the API but still
        // attached; named: a runtime's VM_NAME identity; kept: a VM that exists.
        for (pod, owner, kubevirt, release) in [
            ("p1", "default/gone", true, true),
            ("p2", "default/running", true, false),
            ("p3", "default/named", false, true),
            ("p4", "default/kept", true, true),
        ] {
            store.allocate(&pool, vm(pod, owner, kubevirt)).unwrap();
            if release {
                store
                    .release(&Attachment {
                        container_id: pod.into(),
                        ifname: "eth0".into(),
                    })
                    .unwrap();
            }
        }
        let mut eps = EndpointStore::load(dir.path());
        assert_eq!(eps.reservations().len(), 4, "published");
        let exists = |vm: &str| vm == "default/kept";
        let since = |eps: &EndpointStore, vm: &str| {
            eps.reservations()
                .into_iter()
                .find(|r| r.network == "lan" && r.vm == vm)
                .map(|r| u64::try_from(r.since).unwrap())
        };
        let now = since(&eps, "default/gone").unwrap();
        assert!(
            eps.forget_deleted(dir.path(), &exists, now, 300).is_empty(),
            "too young"
        );
        assert_eq!(
            eps.forget_deleted(dir.path(), &exists, now + 300, 300),
            [("lan".to_string(), "default/gone".to_string())]
        );
        let mut left: Vec<String> = store
            .reservations()
            .unwrap()
            .into_iter()
            .map(|r| r.owner)
            .collect();
        left.sort();
        assert_eq!(left, ["default/kept", "default/named", "default/running"]);
        assert_eq!(eps.reservations().len(), 3);
        assert!(since(&eps, "default/gone").is_none());
    }

    #[test]
    fn forget_vm_drops_a_stopped_vms_reservations_and_keeps_an_attached_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool {
            block_v4: Some("10.10.0.0/26".parse().unwrap()),
            ..Pool::default()
        };
        for (network, release) in [("lan", true), ("nat", false)] {
            let store = IpamStore::open(dir.path(), network).unwrap();
            let att = Attachment {
                container_id: "launcher".into(),
                ifname: "eth0".into(),
            };
            store
                .allocate(
                    &pool,
                    AllocRequest {
                        attachment: att.clone(),
                        owner: Some("default/vm-a".into()),
                        ..AllocRequest::default()
                    },
                )
                .unwrap();
            if release {
                store.release(&att).unwrap();
            }
        }
        let (forgotten, attached) = crate::agent::forget_vm(dir.path(), "default/vm-a").unwrap();
        assert_eq!(forgotten, ["lan"]);
        assert_eq!(attached, ["nat"]);
        let lan = IpamStore::open(dir.path(), "lan").unwrap();
        assert!(lan.reservations().unwrap().is_empty());
        let nat = IpamStore::open(dir.path(), "nat").unwrap();
        assert_eq!(nat.reservations().unwrap().len(), 1);
    }

    #[test]
    fn resync_reads_ipam_and_respects_unregister() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), "nat-demo").unwrap();
        let pool = Pool {
            block_v4: Some("10.10.0.0/26".parse().unwrap()),
            block_v6: None,
            subnet_v4: Some("10.10.0.0/16".parse().unwrap()),
            subnet_v6: None,
            gateways: vec!["10.10.0.1".parse().unwrap()],
            exclude: vec![],
        };
        for c in ["a", "b"] {
            store
                .allocate(
                    &pool,
                    AllocRequest {
                        attachment: Attachment {
                            container_id: c.into(),
                            ifname: "eth0".into(),
                        },
                        static_ips: vec![],
                        mac: None,
                        host_ifname: None,
                        pod_namespace: Some("default".into()),
                        pod_name: Some(format!("pod-{c}")),
                        netns: None,
                        owner: None,
                        parent: None,
                        ..AllocRequest::default()
                    },
                )
                .unwrap();
        }
        let mut eps = EndpointStore::load(dir.path());
        assert_eq!(eps.len(), 2);
        // A restarted agent knows each port's MAC again (the guard holds ports to it): the CNI
        // derived it from the address, and so does the store.
        let a = eps
            .list()
            .into_iter()
            .find(|e| e.container_id == "a")
            .unwrap();
        assert_eq!(a.mac, "0a:58:0a:0a:00:02", "{a:?}");
        eps.unregister("nat-demo", "a", "eth0");
        eps.resync(dir.path());
        assert_eq!(
            eps.len(),
            1,
            "an unregistered endpoint stays out until released"
        );
        store
            .release(&Attachment {
                container_id: "b".into(),
                ifname: "eth0".into(),
            })
            .unwrap();
        eps.resync(dir.path());
        assert_eq!(eps.len(), 0);
    }

    fn mapping(port: u16, protocol: &str, host_ip: Option<&str>) -> PortMapping {
        PortMapping {
            host_port: port,
            container_port: 80,
            protocol: protocol.into(),
            host_ip: host_ip.map(|h| h.parse().unwrap()),
        }
    }

    #[test]
    fn a_host_port_another_endpoint_holds_clashes_and_the_holder_is_named() {
        let mut eps = EndpointStore::default();
        let mut web = ep("web", "10.0.0.2", false);
        web.port_mappings = vec![mapping(8080, "tcp", None)];
        eps.register(web.clone());
        let mut thief = ep("thief", "10.0.0.3", false);
        thief.port_mappings = vec![mapping(8080, "tcp", Some("192.0.2.1"))];
        let (m, holder) = eps.host_port_clash(&thief).unwrap();
        assert_eq!((m.host_port, holder.container_id.as_str()), (8080, "web"));
        // Another protocol, another port, or web itself registering again: no clash.
        for (port, protocol) in [(8080, "udp"), (8081, "tcp")] {
            thief.port_mappings = vec![mapping(port, protocol, None)];
            assert!(eps.host_port_clash(&thief).is_none(), "{port}/{protocol}");
        }
        assert!(eps.host_port_clash(&web).is_none());
        // Two distinct host addresses share a port.
        let mut one = ep("one", "10.0.0.4", false);
        one.port_mappings = vec![mapping(9000, "tcp", Some("192.0.2.1"))];
        eps.register(one);
        let mut two = ep("two", "10.0.0.5", false);
        two.port_mappings = vec![mapping(9000, "tcp", Some("192.0.2.2"))];
        assert!(eps.host_port_clash(&two).is_none());
        // An unspecified host address is any address of its family (as the portmap plugin
        // takes it): 0.0.0.0 clashes with one's IPv4 address, :: does not.
        two.port_mappings = vec![mapping(9000, "tcp", Some("0.0.0.0"))];
        assert_eq!(eps.host_port_clash(&two).unwrap().1.container_id, "one");
        two.port_mappings = vec![mapping(9000, "tcp", Some("::"))];
        assert!(eps.host_port_clash(&two).is_none());
        // Both clash with web's port on every address.
        for any in ["0.0.0.0", "::"] {
            two.port_mappings = vec![mapping(8080, "tcp", Some(any))];
            assert_eq!(eps.host_port_clash(&two).expect(any).1.container_id, "web");
        }
        // Web registered again on another port gives 8080 up; unregistered, 8081 too.
        web.port_mappings = vec![mapping(8081, "tcp", None)];
        eps.register(web.clone());
        assert!(eps.host_port_clash(&two).is_none(), "8080 is free");
        two.port_mappings = vec![mapping(8081, "tcp", None)];
        assert_eq!(eps.host_port_clash(&two).unwrap().1.container_id, "web");
        eps.unregister(&web.network, &web.container_id, &web.ifname);
        assert!(eps.host_port_clash(&two).is_none(), "8081 is free");
        // A port both versions map stays held.
        web.port_mappings = vec![mapping(8081, "tcp", None), mapping(53, "udp", None)];
        eps.register(web.clone());
        web.port_mappings = vec![mapping(8081, "tcp", Some("192.0.2.1"))];
        eps.register(web);
        assert_eq!(eps.host_port_clash(&two).unwrap().1.container_id, "web");
        two.port_mappings = vec![mapping(53, "udp", None)];
        assert!(eps.host_port_clash(&two).is_none(), "53/udp is free");
    }

    #[test]
    fn host_ports_survive_a_resync_from_the_ipam_store_and_go_with_the_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = IpamStore::open(dir.path(), "n").unwrap();
        let pool = Pool {
            block_v4: Some("10.10.0.0/26".parse().unwrap()),
            subnet_v4: Some("10.10.0.0/16".parse().unwrap()),
            ..Pool::default()
        };
        let att = Attachment {
            container_id: "web".into(),
            ifname: "eth0".into(),
        };
        store
            .allocate(
                &pool,
                AllocRequest {
                    attachment: att.clone(),
                    port_mappings: vec![mapping(8080, "tcp", None)],
                    ..AllocRequest::default()
                },
            )
            .unwrap();
        // An agent started after the ADD (or resyncing) still forwards the host port, and
        // knows it held.
        let mut eps = EndpointStore::load(dir.path());
        assert_eq!(eps.list()[0].port_mappings, [mapping(8080, "tcp", None)]);
        let mut other = ep("other", "10.10.0.9", false);
        other.port_mappings = vec![mapping(8080, "tcp", None)];
        assert_eq!(eps.host_port_clash(&other).unwrap().1.container_id, "web");
        eps.resync(dir.path());
        assert_eq!(eps.list()[0].port_mappings.len(), 1);
        assert!(eps.host_port_clash(&other).is_some());
        // GC (or a DEL the agent missed) releases the allocation: the host port goes with it.
        store.release(&att).unwrap();
        eps.resync(dir.path());
        assert!(eps.is_empty());
        assert!(eps.host_port_clash(&other).is_none());
    }
}
