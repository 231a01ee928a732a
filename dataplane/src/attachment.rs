//! One ADD's attachments: what the CNI asks for ([`Ask`], sent as
//! [`Request::Attach`](crate::proto::Request::Attach)), the interfaces that makes
//! ([`interfaces`]), and what each one's allocation asks of the IPAM store
//! ([`alloc_request`]). The agent allocates with them when the CNI sends an `Attach`; the CNI
//! itself only when its agent cannot (an older agent, the stand-in of the CNI's tests).

use crate::codes::{IFNAME_TAKEN, INVALID_CONFIG};
use crate::ipam::{AllocRequest, Allocation, Attachment, Held, IpamStore};
use crate::names;
use crate::proto::{self, Endpoint, MigrationSource, PortMapping, Reply, Restore};
use crate::state::NetworkState;
use crate::vlan::{self, VlanRange};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What one ADD asks for: the runtime's environment and the configuration's fields the
/// allocation depends on. Static addresses, MAC, `vlanTrunk` and host ports belong to
/// `CNI_IFNAME` (`ifname`) only.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ask {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `K8S_POD_NAMESPACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// The configuration's Network: the one interface when the pod's
    /// [`proto::NETWORKS_ANNOTATION`] lists none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// The VM identity the runtime gave (`VM_NAME`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// A VM's attachment (`"attachment": "tap"`): a migrating or stopped VM keeps its
    /// addresses and MAC.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tap: bool,
    /// Wanted addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub static_ips: Vec<IpAddr>,
    /// Wanted MAC (`aa:bb:cc:dd:ee:ff`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_mac: Option<String>,
    /// `vlanTrunk`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan_trunk: Vec<VlanRange>,
    /// The runtime's `portMappings`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
    /// The runtime's `bandwidth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<crate::proto::Bandwidth>,
}

/// What the agent knows of the pod (its answer to an identity question).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The VM the pod runs (`namespace/name`).
    pub vm: Option<String>,
    /// Its [`proto::NETWORKS_ANNOTATION`].
    pub networks: Option<String>,
    /// Where the VM runs now, by network (this ADD is a live migration's target).
    pub migration: BTreeMap<String, MigrationSource>,
    /// Where the VM ran last, by network (a cold start here).
    pub restore: BTreeMap<String, Restore>,
}

impl Identity {
    /// From the agent's reply.
    pub fn of(reply: &Reply) -> Identity {
        Identity {
            vm: reply.vm.clone(),
            networks: reply.networks.clone(),
            migration: reply.migration.clone(),
            restore: reply.restore.clone(),
        }
    }
}

/// An error of the ask, with its CNI code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskError {
    /// The CNI code.
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// The field, what is wrong and the fix.
    pub details: String,
}

impl AskError {
    fn invalid(msg: &str, details: String) -> AskError {
        AskError {
            code: INVALID_CONFIG,
            msg: msg.to_string(),
            details,
        }
    }
}

/// One interface of an ADD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Its Network.
    pub network: String,
    /// Its name in the workload.
    pub ifname: String,
    /// `CNI_IFNAME` for an extra interface of the pod's annotation (its DEL removes it too);
    /// `None` for `CNI_IFNAME` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The pod's default route goes through it (when the configuration asks for one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default_route: bool,
    /// One of the Networks of the pod's annotation (not the configuration's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub annotated: bool,
}

impl Interface {
    /// An error's `details` naming this interface when the pod's annotation asked for it.
    pub fn annotate(&self, details: &str) -> String {
        if !self.annotated {
            return details.to_string();
        }
        format!(
            "{details} (interface {} on Network {} of the pod's {} annotation)",
            self.ifname,
            self.network,
            proto::NETWORKS_ANNOTATION
        )
    }
}

/// The interfaces of an ADD: when the pod's annotation lists Networks, one on each
/// (`CNI_IFNAME` on the first; the annotation's interface names or `net1`, `net2`… on the
/// others; the default route through the one marked `defaultRoute`, else the first);
/// otherwise one on the configuration's Network.
///
/// `held`: the interfaces the container holds already ([`held`]).
/// Those of other ADDs (the interfaces another `CNI_IFNAME`'s ADD made from the annotation, or
/// another runtime attachment, as Multus adds them as `net1`, `net2`…) keep their names: `net1`,
/// `net2`… skip them, and a `CNI_IFNAME` or an annotation's interface name that is one of them
/// is refused (code 107), for the two would share one host link. This ADD's own, from an
/// earlier attempt, are found again.
pub fn interfaces(
    ask: &Ask,
    identity: &Identity,
    held: &[Held],
) -> Result<Vec<Interface>, AskError> {
    // Names of the container's interfaces that another ADD made.
    let others: Vec<&Held> = held
        .iter()
        .filter(|h| match h.parent.as_deref() {
            None => h.ifname != ask.ifname,
            Some(p) => p != ask.ifname,
        })
        .collect();
    let taken_by_other = |ifname: &str, field: &str| -> Result<(), AskError> {
        match others.iter().find(|h| h.ifname == ifname) {
            None => Ok(()),
            Some(h) => Err(AskError {
                code: IFNAME_TAKEN,
                msg: format!("interface {ifname} already exists in the container"),
                details: format!(
                    "{field}: interface {ifname} of container {} is already attached to Network {} by {}; choose another interface name{}",
                    ask.container_id,
                    h.network,
                    crate::ipam::made_by(h.parent.as_deref()),
                    if h.parent.is_some() {
                        " (with Multus, the network selection's interface), or name the annotation's interfaces yourself"
                    } else {
                        ""
                    }
                ),
            }),
        }
    };
    taken_by_other(&ask.ifname, "CNI_IFNAME")?;
    let list = identity
        .networks
        .as_deref()
        .map(proto::parse_networks_annotation)
        .transpose()
        .map_err(|e| AskError::invalid("invalid pod annotation", e))?
        .unwrap_or_default();
    if list.is_empty() {
        let network = ask.network.clone().ok_or_else(|| {
            AskError::invalid(
                "invalid network configuration field network",
                "network: missing; name the weft Network to attach to (e.g. \"network\": \"nat-demo\")"
                    .to_string(),
            )
        })?;
        return Ok(vec![Interface {
            network,
            ifname: ask.ifname.clone(),
            parent: None,
            default_route: true,
            annotated: false,
        }]);
    }
    // The runtime's interface is the first Network's: another that names it would make a
    // second link under the same names, and wiring it would undo the first.
    if let Some(clash) = list
        .iter()
        .skip(1)
        .find(|n| n.interface.as_deref() == Some(ask.ifname.as_str()))
    {
        return Err(AskError::invalid(
            "invalid pod annotation",
            format!(
                "{}: interface {} of Network {} is the runtime's interface (CNI_IFNAME), which the first Network gets; name another interface or leave it out (net1, net2… are chosen then)",
                proto::NETWORKS_ANNOTATION,
                ask.ifname,
                clash.name
            ),
        ));
    }
    let via = list.iter().position(|n| n.default_route).unwrap_or(0);
    for n in list.iter().skip(1) {
        if let Some(name) = &n.interface {
            taken_by_other(
                name,
                &format!(
                    "{}: Network {}'s interface",
                    proto::NETWORKS_ANNOTATION,
                    n.name
                ),
            )?;
        }
    }
    let mut taken: Vec<&str> = vec![ask.ifname.as_str()];
    taken.extend(list.iter().filter_map(|n| n.interface.as_deref()));
    taken.extend(others.iter().map(|h| h.ifname.as_str()));
    let mut n = 1;
    let mut out = Vec::new();
    for (i, selection) in list.iter().enumerate() {
        let ifname = if i == 0 {
            ask.ifname.clone()
        } else if let Some(name) = &selection.interface {
            name.clone()
        } else {
            loop {
                let name = format!("net{n}");
                n += 1;
                if !taken.contains(&name.as_str()) {
                    break name;
                }
            }
        };
        out.push(Interface {
            network: selection.name.clone(),
            ifname,
            parent: (i > 0).then(|| ask.ifname.clone()),
            default_route: i == via,
            annotated: true,
        });
    }
    Ok(out)
}

/// The interfaces container `ask.container_id` holds already, as [`interfaces`] needs them
/// ([`IpamStore::held`] under `state_dir`). Without an annotation the ADD makes one interface,
/// on the configuration's Network, whose store refuses the name itself when another ADD's
/// interface holds it there ([`crate::ipam::IpamError::InterfaceTaken`]): that store is not
/// read, so a node with one Network reads none.
/// With stores that wait for their lock or not (`wait`): without waiting, a store whose lock a
/// write holds makes it [`crate::ipam::IpamError::Busy`].
pub fn held(
    state_dir: &std::path::Path,
    ask: &Ask,
    identity: &Identity,
    wait: bool,
) -> Result<Vec<Held>, crate::ipam::IpamError> {
    let annotated = identity
        .networks
        .as_deref()
        .is_some_and(|n| !n.trim().is_empty());
    let skip = ask.network.as_deref().filter(|_| !annotated);
    IpamStore::held_or_busy(state_dir, &ask.container_id, skip, wait)
}

/// The Network the pod's annotation marks `defaultRoute`, if it marks one.
pub fn marked_default_route(identity: &Identity) -> Option<String> {
    let list = proto::parse_networks_annotation(identity.networks.as_deref()?).ok()?;
    list.into_iter().find(|n| n.default_route).map(|n| n.name)
}

/// A default route the annotation asks for on a Network (`net`) without a gateway would
/// silently be none: code 7 naming the annotation.
pub fn check_default_route(net: &NetworkState) -> Result<(), AskError> {
    if net.gateway_v4.is_none() && net.gateway_v6.is_none() {
        return Err(AskError::invalid(
            "invalid pod annotation",
            format!(
                "{}: Network {} has no gateway (spec.gateway) for the pod's default route; set one, or mark another Network defaultRoute",
                proto::NETWORKS_ANNOTATION,
                net.name
            ),
        ));
    }
    Ok(())
}

/// A trunk port (`vlanTrunk`) needs a Network whose bridge filters VLANs, and carries only
/// VLANs of its `spec.bridge.trunkVlans`: otherwise code 7 naming the field and the fix.
pub fn check_trunk(trunk: &[VlanRange], net: &NetworkState) -> Result<(), AskError> {
    if trunk.is_empty() {
        return Ok(());
    }
    let summary = "invalid network configuration field vlanTrunk";
    let Some(filtering) = &net.vlan_filtering else {
        return Err(AskError::invalid(
            summary,
            format!(
                "vlanTrunk: the bridge of Network {} does not filter VLANs, so its ports cannot be trunks; set spec.bridge.vlanFiltering: true and list the VLANs in spec.bridge.trunkVlans, or remove vlanTrunk",
                net.name
            ),
        ));
    };
    for (i, r) in trunk.iter().enumerate() {
        if !vlan::covers(&filtering.trunk, r) {
            let allowed: Vec<String> = filtering.trunk.iter().map(ToString::to_string).collect();
            let allowed = if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            };
            let own = if r.contains(filtering.own) {
                format!(
                    " (VLAN {} is the network's own, which every port carries untagged)",
                    filtering.own
                )
            } else {
                String::new()
            };
            return Err(AskError::invalid(
                summary,
                format!(
                    "vlanTrunk[{i}]: VLAN {r} is not among the trunk VLANs of Network {} (spec.bridge.trunkVlans: {allowed}){own}; add it to trunkVlans or remove it from vlanTrunk",
                    net.name
                ),
            ));
        }
    }
    Ok(())
}

/// One interface's allocation request, and whether its addresses and MAC are a VM's carried
/// from another node (a live migration's source, or where the stopped VM ran last).
pub fn alloc_request(ask: &Ask, identity: &Identity, iface: &Interface) -> (AllocRequest, bool) {
    let own = iface.parent.is_none();
    // The runtime's identity wins; a KubeVirt pod's comes from its label (the agent's answer).
    let kubevirt = ask.vm.is_none() && identity.vm.is_some();
    let owner = ask.vm.clone().or_else(|| identity.vm.clone());
    let vm = ask.tap && owner.is_some();
    let migration = identity.migration.get(&iface.network).filter(|_| vm);
    let restore = identity
        .restore
        .get(&iface.network)
        .filter(|_| vm && migration.is_none());
    let static_mac = match migration {
        Some(m) => names::parse_mac(&m.mac),
        None => ask
            .static_mac
            .as_deref()
            .and_then(names::parse_mac)
            .filter(|_| own),
    };
    let mac = static_mac.or_else(|| owner.as_deref().map(|o| names::vm_mac(o, &iface.ifname)));
    let req = AllocRequest {
        attachment: Attachment {
            container_id: ask.container_id.clone(),
            ifname: iface.ifname.clone(),
        },
        static_ips: match migration {
            Some(m) => m.ips.clone(),
            None if own => ask.static_ips.clone(),
            None => Vec::new(),
        },
        adopt: migration.is_some(),
        pending: migration.is_some(),
        owner_kubevirt: kubevirt,
        restore: restore.cloned(),
        vlan_trunk: if own {
            ask.vlan_trunk.clone()
        } else {
            Vec::new()
        },
        port_mappings: if own {
            ask.port_mappings.clone()
        } else {
            Vec::new()
        },
        bandwidth: ask.bandwidth.filter(|_| own),
        mac: mac.map(names::format_mac),
        host_ifname: Some(names::host_veth_name(&ask.container_id, &iface.ifname)),
        pod_namespace: ask.pod_namespace.clone(),
        pod_name: ask.pod_name.clone(),
        netns: Some(ask.netns.clone()),
        owner,
        parent: iface.parent.clone(),
    };
    (req, migration.is_some() || restore.is_some())
}

/// One interface as the agent allocated it (the first answer to an `Attach`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attached {
    /// The interface.
    #[serde(flatten)]
    pub interface: Interface,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its MAC.
    pub mac: String,
    /// Its host link's name.
    pub host_ifname: String,
    /// A VM's addresses and MAC carried from another node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub carried: bool,
}

impl Endpoint {
    /// The endpoint an allocation on `network` registers.
    pub fn from_allocation(network: &str, a: &Allocation) -> Endpoint {
        Endpoint {
            network: network.to_string(),
            host_ifname: a.host_link_name(),
            mac: names::format_mac(a.effective_mac()),
            ips: a.ips.clone(),
            container_id: a.container_id.clone(),
            ifname: a.ifname.clone(),
            pod_namespace: a.pod_namespace.clone(),
            pod_name: a.pod_name.clone(),
            netns: a.netns.clone(),
            vm: a.owner.clone(),
            pending: a.pending,
            vlan_trunk: a.vlan_trunk.clone(),
            port_mappings: a.port_mappings.clone(),
            bandwidth: a.bandwidth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask() -> Ask {
        Ask {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/p".into(),
            network: Some("nat".into()),
            static_ips: vec!["10.0.0.9".parse().unwrap()],
            ..Ask::default()
        }
    }

    #[test]
    fn without_an_annotation_the_configuration_s_network_alone() {
        let list = interfaces(&ask(), &Identity::default(), &[]).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(
            (list[0].network.as_str(), list[0].ifname.as_str()),
            ("nat", "eth0")
        );
        assert_eq!(list[0].annotate("no block"), "no block");
        let none = Ask {
            network: None,
            ..ask()
        };
        let e = interfaces(&none, &Identity::default(), &[]).unwrap_err();
        assert_eq!(e.code, INVALID_CONFIG);
        assert!(e.details.starts_with("network:"), "{e:?}");
    }

    #[test]
    fn an_annotation_names_the_interfaces_and_the_default_route() {
        let identity = Identity {
            networks: Some(
                r#"[{"name": "a"}, {"name": "b", "interface": "net1"}, {"name": "c", "defaultRoute": true}]"#
                    .into(),
            ),
            ..Identity::default()
        };
        let list = interfaces(&ask(), &identity, &[]).unwrap();
        let names: Vec<(&str, &str, Option<&str>, bool)> = list
            .iter()
            .map(|i| {
                (
                    i.network.as_str(),
                    i.ifname.as_str(),
                    i.parent.as_deref(),
                    i.default_route,
                )
            })
            .collect();
        assert_eq!(
            list[1].annotate("no block"),
            "no block (interface net1 on Network b of the pod's weft.dev/networks annotation)"
        );
        // net1 is taken by b: c gets net2.
        assert_eq!(
            names,
            [
                ("a", "eth0", None, false),
                ("b", "net1", Some("eth0"), false),
                ("c", "net2", Some("eth0"), true)
            ]
        );
        let bad = Identity {
            networks: Some("A_B".into()),
            ..Identity::default()
        };
        assert_eq!(
            interfaces(&ask(), &bad, &[]).unwrap_err().code,
            INVALID_CONFIG
        );
    }

    fn ifnames(cni_ifname: &str, annotation: &str) -> Vec<String> {
        let ask = Ask {
            ifname: cni_ifname.into(),
            ..ask()
        };
        let identity = Identity {
            networks: Some(annotation.into()),
            ..Identity::default()
        };
        interfaces(&ask, &identity, &[])
            .unwrap()
            .into_iter()
            .map(|i| i.ifname)
            .collect()
    }

    fn held(network: &str, ifname: &str, parent: Option<&str>) -> Held {
        Held {
            network: network.into(),
            ifname: ifname.into(),
            parent: parent.map(Into::into),
        }
    }

    /// A second runtime attachment of the pod (Multus's `net1`) next to the interfaces the ADD
    /// of `eth0` made from the annotation (`net1`, `net2` on b and c): its own name or an
    /// annotation's name that another ADD holds is code 107 naming it, `net1`, `net2`… skip
    /// them, and an attempt again of the same ADD finds its own interfaces by their names.
    #[test]
    fn names_another_add_holds_are_refused_or_skipped_and_an_add_again_finds_its_own() {
        let first = [
            held("a", "eth0", None),
            held("b", "net1", Some("eth0")),
            held("c", "net2", Some("eth0")),
        ];
        let annotated = Identity {
            networks: Some("a,b,c".into()),
            ..Identity::default()
        };
        let multus = Ask {
            ifname: "net1".into(),
            network: Some("d".into()),
            ..ask()
        };
        let e = interfaces(&multus, &annotated, &first).unwrap_err();
        assert_eq!(e.code, IFNAME_TAKEN, "{e:?}");
        assert!(e.details.starts_with("CNI_IFNAME: interface net1"), "{e:?}");
        assert!(
            e.details.contains("Network b by the ADD of interface eth0"),
            "{e:?}"
        );
        // Without an annotation it is refused the same way.
        let e = interfaces(&multus, &Identity::default(), &first).unwrap_err();
        assert_eq!(e.code, IFNAME_TAKEN, "{e:?}");
        // A free name: its own extras skip the names held (net1, net2) and eth0.
        let free = Ask {
            ifname: "net9".into(),
            ..multus.clone()
        };
        let names: Vec<String> = interfaces(&free, &annotated, &first)
            .unwrap()
            .into_iter()
            .map(|i| i.ifname)
            .collect();
        assert_eq!(names, ["net9", "net3", "net4"]);
        // An annotation that names a held interface for one of its extras: refused.
        let named = Identity {
            networks: Some(r#"[{"name": "a"}, {"name": "b", "interface": "net2"}]"#.into()),
            ..Identity::default()
        };
        let e = interfaces(&free, &named, &first).unwrap_err();
        assert_eq!(e.code, IFNAME_TAKEN, "{e:?}");
        assert!(e.details.contains("Network b's interface"), "{e:?}");
        // The same ADD again (eth0 after a crash): its own names, as before.
        let again: Vec<(String, String)> = interfaces(&ask(), &annotated, &first)
            .unwrap()
            .into_iter()
            .map(|i| (i.network, i.ifname))
            .collect();
        assert_eq!(
            again,
            [
                ("a".to_string(), "eth0".to_string()),
                ("b".into(), "net1".into()),
                ("c".into(), "net2".into())
            ]
        );
        // Another runtime interface (net1, attached first) and its child (net3) keep their
        // names: eth0's extras skip them.
        let before = [held("d", "net1", None), held("b", "net3", Some("net1"))];
        let names: Vec<String> = interfaces(&ask(), &annotated, &before)
            .unwrap()
            .into_iter()
            .map(|i| i.ifname)
            .collect();
        assert_eq!(names, ["eth0", "net2", "net4"]);
    }

    #[test]
    fn extra_interfaces_are_named_net_n_and_never_clash_with_cni_ifname() {
        assert_eq!(ifnames("eth0", "a,b,c"), ["eth0", "net1", "net2"]);
        assert_eq!(ifnames("net1", "a,b,c"), ["net1", "net2", "net3"]);
        assert_eq!(ifnames("eth0", "a"), ["eth0"]);
        // Named interfaces keep their names; the others skip them.
        assert_eq!(
            ifnames(
                "eth0",
                r#"[{"name": "a"}, {"name": "b"}, {"name": "c", "interface": "net1"}]"#
            ),
            ["eth0", "net2", "net1"]
        );
        // An empty annotation: the configuration's Network.
        assert_eq!(ifnames("eth0", " "), ["eth0"]);
    }

    #[test]
    fn a_bad_annotation_is_code_7_naming_it() {
        for bad in [
            "nat-demo,LAN",
            "a,b,a",
            "lan@net1",
            r#"[{"name": "a", "mac": "x"}]"#,
            // Not DNS-1123 names, which a Network's name must be.
            "lan-",
            "-lan",
            "a..b",
            // Another interface named as the runtime's (CNI_IFNAME), which the first gets.
            r#"[{"name": "a"}, {"name": "b", "interface": "eth0"}]"#,
        ] {
            let identity = Identity {
                networks: Some(bad.into()),
                ..Identity::default()
            };
            let e = interfaces(&ask(), &identity, &[]).unwrap_err();
            assert_eq!(e.code, INVALID_CONFIG, "{bad}");
            assert!(e.details.contains("weft.dev/networks"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn statics_belong_to_cni_ifname_and_a_migrating_vm_keeps_its_own() {
        let (req, carried) = alloc_request(
            &ask(),
            &Identity::default(),
            &Interface {
                network: "nat".into(),
                ifname: "net1".into(),
                parent: Some("eth0".into()),
                default_route: false,
                annotated: true,
            },
        );
        assert!(req.static_ips.is_empty() && !carried);
        assert_eq!(req.parent.as_deref(), Some("eth0"));
        let vm = Ask {
            tap: true,
            vm: Some("default/vm1".into()),
            ..ask()
        };
        let identity = Identity {
            migration: BTreeMap::from([(
                "nat".to_string(),
                MigrationSource {
                    node: "n2".into(),
                    ips: vec!["10.0.1.5".parse().unwrap()],
                    mac: "02:00:00:00:00:05".into(),
                },
            )]),
            ..Identity::default()
        };
        let own = &interfaces(&vm, &identity, &[]).unwrap()[0];
        let (req, carried) = alloc_request(&vm, &identity, own);
        assert!(carried && req.adopt && req.pending);
        assert_eq!(req.static_ips, ["10.0.1.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(req.mac.as_deref(), Some("02:00:00:00:00:05"));
        assert!(!req.owner_kubevirt, "the runtime named the VM");
    }
}
