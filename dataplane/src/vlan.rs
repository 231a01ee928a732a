//! VLANs of a VLAN-filtering bridge's ports (`spec.bridge.vlanFiltering`): what a port should
//! carry, and the changes that bring a port's VLANs as the kernel reports them to that.
//!
//! A Network with VLAN filtering has an own VLAN (`spec.bridge.vlan`, or 1, the bridge's default
//! untagged VLAN, when unset) and may allow extra VLANs (`spec.bridge.trunkVlans`):
//! - a workload port is an access port on the own VLAN (PVID, egress untagged), plus the
//!   trunk VLANs its attachment asks for (`vlanTrunk`), tagged; the bridge's default VLAN 1 is
//!   removed from it unless that is the own VLAN;
//! - the uplink keeps VLAN 1 as PVID untagged (the node's own untagged traffic stays as it was)
//!   and carries the own VLAN and every trunk VLAN tagged;
//! - the bridge itself keeps its default (VLAN 1, PVID untagged): the node's addresses on it
//!   stay untagged.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The VLAN a bridge gives untagged frames of a port that has no other PVID
/// (`IFLA_BR_VLAN_DEFAULT_PVID`'s default).
pub const DEFAULT_PVID: u16 = 1;

/// An inclusive range of VLAN IDs (`min == max` for one VLAN).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VlanRange {
    /// First VLAN ID.
    pub min: u16,
    /// Last VLAN ID.
    pub max: u16,
}

impl VlanRange {
    /// One VLAN.
    pub fn one(id: u16) -> VlanRange {
        VlanRange { min: id, max: id }
    }

    /// Whether `id` lies in the range.
    pub fn contains(&self, id: u16) -> bool {
        (self.min..=self.max).contains(&id)
    }

    /// The IDs of the range.
    pub fn ids(&self) -> impl Iterator<Item = u16> {
        self.min..=self.max
    }
}

impl std::fmt::Display for VlanRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Whether every ID of `inner` lies in one of `outer`.
pub fn covers(outer: &[VlanRange], inner: &VlanRange) -> bool {
    inner.ids().all(|id| outer.iter().any(|o| o.contains(id)))
}

/// The VLAN IDs of `ranges`, each once, in order.
pub fn ids(ranges: &[VlanRange]) -> Vec<u16> {
    let mut out: Vec<u16> = ranges.iter().flat_map(VlanRange::ids).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The VLANs of a network whose bridge filters VLANs (`spec.bridge.vlanFiltering`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VlanFiltering {
    /// The network's own VLAN (`spec.bridge.vlan`, or [`DEFAULT_PVID`]): workload ports are
    /// access ports on it.
    pub own: u16,
    /// The VLANs trunk ports and the uplink may carry tagged (`spec.bridge.trunkVlans`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trunk: Vec<VlanRange>,
}

impl VlanFiltering {
    /// What the uplink carries.
    pub fn uplink(&self) -> PortVlans {
        PortVlans::uplink(self.own, &self.trunk)
    }

    /// What a workload port with the trunk VLANs `trunk` (none for an access port) carries.
    pub fn workload(&self, trunk: &[VlanRange]) -> PortVlans {
        PortVlans::workload(self.own, trunk)
    }
}

/// One VLAN of a bridge port (`bridge vlan show`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortVlan {
    /// The VLAN ID.
    pub vid: u16,
    /// Untagged frames arriving on the port join this VLAN (`pvid`).
    pub pvid: bool,
    /// Frames of this VLAN leave the port untagged (`untagged`).
    pub untagged: bool,
}

impl PortVlan {
    /// A tagged VLAN of a trunk.
    pub fn tagged(vid: u16) -> PortVlan {
        PortVlan {
            vid,
            pvid: false,
            untagged: false,
        }
    }

    /// The access VLAN: PVID and egress untagged.
    pub fn access(vid: u16) -> PortVlan {
        PortVlan {
            vid,
            pvid: true,
            untagged: true,
        }
    }
}

/// What one port of a VLAN-filtering bridge should carry: `pvid` untagged, `tagged` tagged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortVlans {
    /// The access VLAN (PVID, egress untagged).
    pub pvid: u16,
    /// The VLANs carried tagged.
    pub tagged: Vec<VlanRange>,
}

impl PortVlans {
    /// A workload port: access on `own`, `trunk` tagged.
    pub fn workload(own: u16, trunk: &[VlanRange]) -> PortVlans {
        PortVlans {
            pvid: own,
            tagged: trunk.to_vec(),
        }
    }

    /// The uplink: VLAN 1 stays its PVID (the node's own untagged traffic), `own` (when not 1)
    /// and `trunk` are carried tagged.
    pub fn uplink(own: u16, trunk: &[VlanRange]) -> PortVlans {
        let mut tagged = trunk.to_vec();
        if own != DEFAULT_PVID {
            tagged.push(VlanRange::one(own));
        }
        tagged.sort();
        PortVlans {
            pvid: DEFAULT_PVID,
            tagged,
        }
    }

    /// Every VLAN of the port with its flags, by ID (the access VLAN wins over a tagged entry).
    pub fn entries(&self) -> Vec<PortVlan> {
        let mut by_id: BTreeMap<u16, PortVlan> = ids(&self.tagged)
            .into_iter()
            .map(|id| (id, PortVlan::tagged(id)))
            .collect();
        by_id.insert(self.pvid, PortVlan::access(self.pvid));
        by_id.into_values().collect()
    }
}

/// The changes that bring a port holding `current` to `want`: the entries to add (new, or
/// with other flags: adding an existing VLAN updates its flags) and the VLAN IDs to delete.
/// Additions come first so a port never holds no PVID while the access VLAN moves.
pub fn changes(current: &[PortVlan], want: &PortVlans) -> (Vec<PortVlan>, Vec<u16>) {
    let wanted = want.entries();
    let add: Vec<PortVlan> = wanted
        .iter()
        .filter(|w| !current.contains(w))
        .copied()
        .collect();
    let del: Vec<u16> = current
        .iter()
        .filter(|c| !wanted.iter().any(|w| w.vid == c.vid))
        .map(|c| c.vid)
        .collect();
    (add, del)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(min: u16, max: u16) -> VlanRange {
        VlanRange { min, max }
    }

    #[test]
    fn workload_ports_are_access_on_the_own_vlan_plus_their_trunk() {
        let p = PortVlans::workload(10, &[r(20, 20), r(100, 102)]);
        assert_eq!(
            p.entries(),
            [
                PortVlan::access(10),
                PortVlan::tagged(20),
                PortVlan::tagged(100),
                PortVlan::tagged(101),
                PortVlan::tagged(102)
            ]
        );
        // A new port of a filtering bridge holds the default VLAN 1: it goes.
        let (add, del) = changes(&[PortVlan::access(1)], &p);
        assert_eq!(add, p.entries());
        assert_eq!(del, [1]);
        // Applied: nothing to do.
        assert_eq!(changes(&p.entries(), &p), (vec![], vec![]));
    }

    #[test]
    fn the_uplink_keeps_vlan_1_untagged_and_carries_the_rest_tagged() {
        let p = PortVlans::uplink(10, &[r(20, 21)]);
        assert_eq!(
            p.entries(),
            [
                PortVlan::access(1),
                PortVlan::tagged(10),
                PortVlan::tagged(20),
                PortVlan::tagged(21)
            ]
        );
        let (add, del) = changes(&[PortVlan::access(1)], &p);
        assert_eq!(
            add,
            [
                PortVlan::tagged(10),
                PortVlan::tagged(20),
                PortVlan::tagged(21)
            ]
        );
        assert!(del.is_empty());
        // Without an own VLAN the network's traffic is VLAN 1 itself.
        assert_eq!(PortVlans::uplink(1, &[]).entries(), [PortVlan::access(1)]);
    }

    #[test]
    fn changed_flags_are_re_added_and_foreign_vlans_removed() {
        let want = PortVlans::workload(10, &[r(20, 20)]);
        let current = [
            PortVlan::tagged(10),
            PortVlan::tagged(20),
            PortVlan::tagged(30),
        ];
        let (add, del) = changes(&current, &want);
        assert_eq!(add, [PortVlan::access(10)]);
        assert_eq!(del, [30]);
    }

    #[test]
    fn ranges_cover_ids_and_print_like_the_bridge_tool() {
        let allowed = [r(20, 20), r(100, 199)];
        assert!(covers(&allowed, &r(20, 20)));
        assert!(covers(&allowed, &r(100, 110)));
        assert!(!covers(&allowed, &r(190, 200)));
        assert!(!covers(&allowed, &r(21, 21)));
        assert_eq!(r(100, 110).to_string(), "100-110");
        assert_eq!(VlanRange::one(20).to_string(), "20");
        assert_eq!(ids(&[r(3, 4), r(2, 3)]), [2, 3, 4]);
    }
}
