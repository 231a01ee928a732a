//! Support for the privileged (tier-3) dataplane tests.
//!
//! Every test starts with [`isolate`], which moves its own test thread into a fresh network
//! namespace, so nothing a test does to links, addresses, routes or sysctls can reach the
//! host's namespace, and tests running in parallel threads do not see each other. Named
//! namespaces (which live in `/run/netns`, shared by the whole machine) get unique names and
//! are removed by [`NamedNs`]'s `Drop`, also when the test panics.
#![allow(dead_code)] // each test binary uses a different part

use std::sync::atomic::{AtomicU32, Ordering};
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns::{self, Netns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Fails the test (never skips it) unless the process has CAP_NET_ADMIN and CAP_SYS_ADMIN.
pub fn require_privileges() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    for (bit, name) in [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ] {
        assert!(
            cap_eff & (1 << bit) != 0,
            "this privileged dataplane test needs {name} (it creates network namespaces and \
             links); run the tests as root, as the developer machines and CI do \
             (effective capabilities: {cap_eff:#x})"
        );
    }
}

/// Moves the calling test thread into a new, empty network namespace (with `lo` up) and
/// returns a handle to it.
pub fn isolate() -> Netns {
    require_privileges();
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET) failed: {e}; the test needs root"));
    let mut nl = Netlink::new().expect("netlink socket");
    let lo = nl.link_by_name("lo").unwrap().expect("lo exists");
    nl.set_up(lo.index).unwrap();
    Netns::current().expect("open own netns")
}

/// A name unique on this machine: the prefix, the pid and a counter.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A named namespace that is deleted when dropped.
pub struct NamedNs {
    /// Its name under /run/netns.
    pub name: String,
    /// An open handle.
    pub ns: Netns,
}

impl NamedNs {
    /// Creates `weft-test-<what>-<pid>-<n>`.
    pub fn new(what: &str) -> NamedNs {
        let name = unique_name(&format!("weft-test-{what}"));
        let ns = netns::create_named(&name)
            .unwrap_or_else(|e| panic!("create_named({name}): {}", chain(&e)));
        NamedNs { name, ns }
    }
}

impl Drop for NamedNs {
    fn drop(&mut self) {
        if let Err(e) = netns::delete_named(&self.name) {
            eprintln!("cannot delete test netns {}: {}", self.name, chain(&e));
        }
    }
}

/// The error and its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The inode of the calling thread's network namespace.
pub fn thread_netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat /proc/thread-self/ns/net")
        .ino()
}

/// Waits until link `index` (of `nl`'s namespace) is running: the kernel's link watch has seen
/// its carrier (operational state up, its transmit queue activated) and, for a bridge port, the
/// bridge forwards on it. The link watch runs deferred, and on a loaded machine late: a frame
/// sent over a veth whose peer just went up can be dropped until then.
pub fn wait_running(nl: &mut Netlink, index: u32) {
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::link::{
        BridgePortState, InfoBridgePort, InfoPortData, LinkAttribute, LinkInfo, LinkMessage, State,
    };
    use std::time::{Duration, Instant};

    fn running(link: &LinkMessage) -> bool {
        let oper_up = link
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::OperState(State::Up)));
        let port = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
                LinkInfo::PortData(InfoPortData::BridgePort(p)) => Some(p),
                _ => None,
            }),
            _ => None,
        });
        let forwarding = port.is_none_or(|p| {
            p.iter()
                .any(|a| matches!(a, InfoBridgePort::State(BridgePortState::Forwarding)))
        });
        oper_up && forwarding
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut get = LinkMessage::default();
        get.header.index = index;
        let answers = nl.request(RouteNetlinkMessage::GetLink(get), 0).unwrap();
        if answers
            .iter()
            .any(|m| matches!(m, RouteNetlinkMessage::NewLink(l) if running(l)))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "link {index} is not running 10 s after it went up"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
