//! Choosing addresses (pure: works on the loaded [`StoreFile`]).

use super::{IpFamily, IpNet, IpamError, Pool, StoreFile};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn addr(family: IpFamily, n: u128) -> IpAddr {
    match family {
        // Callers only pass numbers from an IPv4 range.
        IpFamily::V4 => IpAddr::V4(Ipv4Addr::from(u32::try_from(n).unwrap_or(u32::MAX))),
        IpFamily::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Everything that decides which addresses of one family can be handed out.
struct Space {
    family: IpFamily,
    block: IpNet,
    /// The network's subnet (a migrating VM keeps an address of another node's block).
    subnet: Option<IpNet>,
    /// First and last address of the block.
    lo: u128,
    hi: u128,
    /// Never handed out, with the reason.
    reserved: BTreeMap<u128, String>,
    /// Excluded ranges (first, last, the range as written).
    excluded: Vec<(u128, u128, IpNet)>,
}

impl Space {
    fn new(pool: &Pool, family: IpFamily) -> Option<Space> {
        let (block, subnet): (IpNet, Option<IpNet>) = match family {
            IpFamily::V4 => (pool.block_v4?.into(), pool.subnet_v4.map(Into::into)),
            IpFamily::V6 => (pool.block_v6?.into(), pool.subnet_v6.map(Into::into)),
        };
        let mut reserved = BTreeMap::new();
        reserved.insert(
            num(block.network()),
            format!("the network address of block {block}"),
        );
        if let Some(subnet) = subnet {
            reserved.insert(
                num(subnet.network()),
                format!("the network address of subnet {subnet}"),
            );
        }
        if family == IpFamily::V4 {
            let (bcast, of) = match subnet {
                Some(s) => (s.broadcast(), format!("subnet {s}")),
                None => (block.broadcast(), format!("block {block}")),
            };
            reserved.insert(num(bcast), format!("the broadcast address of {of}"));
        }
        for gw in pool.gateways.iter().filter(|g| IpFamily::of(g) == family) {
            reserved.insert(num(*gw), format!("the gateway {gw}"));
        }
        let excluded = pool
            .exclude
            .iter()
            .filter(|n| IpFamily::of(&n.addr()) == family)
            .map(|n| (num(n.network()), num(n.broadcast()), n.trunc()))
            .collect();
        Some(Space {
            family,
            block,
            subnet,
            lo: num(block.network()),
            hi: num(block.broadcast()),
            reserved,
            excluded,
        })
    }

    /// Why `n` cannot be handed out (ignoring use), if it cannot.
    fn unusable(&self, n: u128) -> Option<String> {
        if let Some(reason) = self.reserved.get(&n) {
            return Some(reason.clone());
        }
        self.excluded
            .iter()
            .find(|(a, b, _)| *a <= n && n <= *b)
            .map(|(_, _, net)| format!("inside exclude {net}"))
    }

    /// The first free address in `[from, to]`.
    fn scan(&self, from: u128, to: u128, used: &BTreeSet<u128>) -> Option<u128> {
        let mut c = from;
        while c <= to {
            // Each step either returns, or moves past one excluded range, reserved or used
            // address: the loop is bounded by their number, not by the size of the block.
            if let Some(end) = self
                .excluded
                .iter()
                .filter(|(a, b, _)| *a <= c && c <= *b)
                .map(|(_, b, _)| *b)
                .max()
            {
                c = end.checked_add(1)?;
                continue;
            }
            if self.reserved.contains_key(&c) || used.contains(&c) {
                c = c.checked_add(1)?;
                continue;
            }
            return Some(c);
        }
        None
    }

    /// Round-robin: the first free address after `last`, wrapping around to the block's start.
    fn next_free(&self, last: Option<IpAddr>, used: &BTreeSet<u128>) -> Option<u128> {
        let start = match last.map(num) {
            Some(l) if self.lo <= l && l < self.hi => l + 1,
            _ => self.lo,
        };
        self.scan(start, self.hi, used).or_else(|| {
            if start > self.lo {
                self.scan(self.lo, start - 1, used)
            } else {
                None
            }
        })
    }
}

/// Picks the addresses of a new allocation (IPv4 first) and records the round-robin position.
pub(super) fn choose(
    network: &str,
    pool: &Pool,
    static_ips: &[IpAddr],
    adopt: bool,
    state: &mut StoreFile,
) -> Result<Vec<IpAddr>, IpamError> {
    let mut wanted: BTreeMap<IpFamily, IpAddr> = BTreeMap::new();
    for ip in static_ips {
        let family = IpFamily::of(ip);
        if let Some(first) = wanted.get(&family)
            && first != ip
        {
            return Err(IpamError::StaticFamilyTwice {
                family,
                first: *first,
                second: *ip,
            });
        }
        wanted.insert(family, *ip);
    }
    let spaces: Vec<Space> = [IpFamily::V4, IpFamily::V6]
        .into_iter()
        .filter_map(|f| Space::new(pool, f))
        .collect();
    for (family, ip) in &wanted {
        if !spaces.iter().any(|s| s.family == *family) {
            return Err(IpamError::StaticOutOfBlock {
                ip: *ip,
                block: None,
                network: network.to_string(),
            });
        }
    }
    if spaces.is_empty() {
        return Err(IpamError::NoBlock {
            network: network.to_string(),
        });
    }
    let mut ips = Vec::new();
    for space in &spaces {
        // A stopped VM's reserved addresses are as taken as running workloads' ones.
        // So is an IPv4 address whose derived MAC (`names::workload_mac`) a workload holds as
        // its static MAC: the next workload there would share that MAC, which the store
        // refuses (`IpamError::MacInUse`); another address is free.
        let held_macs = state
            .allocations
            .iter()
            .filter_map(|a| a.mac.as_deref())
            .chain(state.reservations.iter().filter_map(|r| r.mac.as_deref()))
            .filter_map(derived_from_mac);
        let used: BTreeSet<u128> = state
            .allocations
            .iter()
            .flat_map(|a| a.ips.iter().copied())
            .chain(
                state
                    .reservations
                    .iter()
                    .flat_map(|r| r.ips.iter().copied()),
            )
            .chain(held_macs)
            .filter(|ip| IpFamily::of(ip) == space.family)
            .map(num)
            .collect();
        if let Some(ip) = wanted.get(&space.family) {
            let n = num(*ip);
            // An adopted address (a VM migrating in) may lie in another node's block of the
            // subnet; any other static address must be in this node's block.
            let inside = if adopt {
                space.subnet.unwrap_or(space.block).contains(ip)
            } else {
                space.block.contains(ip)
            };
            if !inside {
                return Err(IpamError::StaticOutOfBlock {
                    ip: *ip,
                    block: Some(space.block),
                    network: network.to_string(),
                });
            }
            if let Some(reason) = space.unusable(n) {
                return Err(IpamError::StaticExcluded { ip: *ip, reason });
            }
            if let Some(holder) = state.allocations.iter().find(|a| a.ips.contains(ip)) {
                return Err(IpamError::StaticInUse {
                    ip: *ip,
                    container_id: holder.container_id.clone(),
                    ifname: holder.ifname.clone(),
                });
            }
            if let Some(r) = state.reservations.iter().find(|r| r.ips.contains(ip)) {
                return Err(IpamError::StaticInUse {
                    ip: *ip,
                    container_id: format!("VM {}", r.owner),
                    ifname: r.ifname.clone(),
                });
            }
            ips.push(*ip);
            continue;
        }
        let last = match space.family {
            IpFamily::V4 => state.last_v4.map(IpAddr::V4),
            IpFamily::V6 => state.last_v6.map(IpAddr::V6),
        };
        let n = space
            .next_free(last, &used)
            .ok_or_else(|| IpamError::Exhausted {
                network: network.to_string(),
                family: space.family,
                block: space.block,
            })?;
        let ip = addr(space.family, n);
        match ip {
            IpAddr::V4(a) => state.last_v4 = Some(a),
            IpAddr::V6(a) => state.last_v6 = Some(a),
        }
        ips.push(ip);
    }
    Ok(ips)
}

/// The IPv4 address whose derived MAC (`0a:58` and the address) `mac` is, if it is one.
fn derived_from_mac(mac: &str) -> Option<IpAddr> {
    match crate::names::parse_mac(mac)? {
        [0x0a, 0x58, a, b, c, d] => Some(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))),
        _ => None,
    }
}
