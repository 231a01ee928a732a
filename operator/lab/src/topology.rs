//! Building and removing the lab's namespaces, links, agents and workloads.
//!
//! Everything the lab creates is recorded in `/run/weft-lab/<name>/lab.json` as it is created,
//! so `weft-lab down`, a Ctrl-C and the next run can remove it even after a crash.

use super::file::{LabFile, Workload};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, Instant};
use weft_dataplane::names;
use weft_dataplane::netlink::{Netlink, RouteSpec};
use weft_dataplane::netns::{self, Netns};

/// The operator binary whose `agent` runs in each node namespace, next to `weft-lab`.
pub const OPERATOR_BINARY: &str = "weft-operator";

/// Workload name → [(network, addresses on it)].
pub type Addresses = BTreeMap<String, Vec<(String, Vec<IpAddr>)>>;

/// A guest's relay readied for a new tap: the relay, the standby's id, its writer, the
/// interface and the VM's MAC on it.
type Switch = (Arc<super::vmm::Relay>, usize, std::fs::File, String, String);

/// Held (shared) while the lab creates a namespace, starts an agent or runs the CNI plugin;
/// an interrupt takes it (exclusive) for good, so nothing is created after the interrupt's
/// removal has listed what there is. A plugin whose ADD fails undoes it, and without an agent
/// to answer, it releases the addresses itself, making the store's directory again under the
/// lab's: the removal waits for it.
static BUILDING: RwLock<()> = RwLock::new(());
/// Set once the lab is interrupted: creating anything more fails.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// How long an interrupt waits for what is being created before it removes the lab anyway
/// (a plugin waits for its agent for less).
const STOP_WAIT: Duration = Duration::from_secs(30);

/// Leave to create something (a namespace, an agent, a CNI call), unless the lab was
/// interrupted. Several may be created at once.
fn building() -> anyhow::Result<RwLockReadGuard<'static, ()>> {
    let interrupted = || INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
    if interrupted() {
        anyhow::bail!("the lab was interrupted");
    }
    let guard = BUILDING.read().unwrap_or_else(|e| e.into_inner());
    if interrupted() {
        anyhow::bail!("the lab was interrupted");
    }
    Ok(guard)
}

/// On Ctrl-C or SIGTERM (`status` 130), or a panic: stops further building, waits for what is
/// being created, removes the lab `name`, and exits without releasing the building lock.
pub fn abandon(name: &str, status: i32) -> ! {
    let guard = stop_building();
    // Standard error may be gone too (`2>&1 | head`): writing must not panic.
    let _ = writeln!(std::io::stderr(), "removing lab {name}");
    let _ = down_by_name(name);
    std::mem::forget(guard);
    std::process::exit(status)
}

/// Makes every later [`building`] fail and waits for those in progress, if any, for at most
/// [`STOP_WAIT`] (a panic while something is created must not wait for itself); `None` when
/// they did not end in time.
fn stop_building() -> Option<RwLockWriteGuard<'static, ()>> {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + STOP_WAIT;
    loop {
        match BUILDING.try_write() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

/// Root of the lab's files.
pub const LAB_ROOT: &str = "/run/weft-lab";

/// What the lab has created so far (persisted).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Named network namespaces.
    pub namespaces: Vec<String>,
    /// Agent process ids.
    pub agents: Vec<u32>,
}

/// The port guards' stop flag: dropping it stops them.
pub struct PortGuards(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for PortGuards {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running lab.
pub struct Lab {
    /// Its name.
    pub name: String,
    /// The lab file.
    pub spec: LabFile,
    /// Resource documents, written into every node's manifests dir.
    pub docs: Vec<serde_json::Value>,
    /// Its directory.
    pub dir: PathBuf,
    record: Mutex<Record>,
    /// Workload name → (node, [(network, ifname)]).
    attachments: Mutex<BTreeMap<String, Vec<(String, String)>>>,
    /// Workload name → [(network, addresses)].
    addresses: Mutex<Addresses>,
    /// (VM, guest NIC) → the relay between the NIC and its launcher taps.
    relays: Mutex<BTreeMap<(String, String), Arc<super::vmm::Relay>>>,
    /// VMs migrated: name → the node they run on now (their launcher is `m-`).
    moved: Mutex<BTreeMap<String, String>>,
}

/// A lab's name: the file stem plus a hash of its path, so two files never collide.
pub fn lab_name(path: &Path, name: Option<&str>) -> String {
    if let Some(n) = name {
        return sanitize(n, 16);
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let digest = Sha256::digest(canonical.to_string_lossy().as_bytes());
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "lab".into());
    format!("{}-{:02x}{:02x}", sanitize(&stem, 10), digest[0], digest[1])
}

fn sanitize(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    if out.is_empty() { "lab".into() } else { out }
}

fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// Whether the kernel makes 802.1Q sub-interfaces: tries one on a veth in a scratch namespace
/// (removed again); the error says why not.
pub fn kernel_has_vlans(lab: &str) -> Result<(), String> {
    let name = format!("wl-{lab}-vlanprobe");
    let ns = netns::create_named(&name).map_err(|e| e.to_string())?;
    let result = (|| -> Result<(), String> {
        let mut nl = Netlink::in_netns(&ns).map_err(|e| e.to_string())?;
        nl.create_veth_pair("probe0", "probe1", None, None)
            .map_err(|e| e.to_string())?;
        let parent = nl
            .link_by_name("probe0")
            .map_err(|e| e.to_string())?
            .ok_or("probe veth missing")?;
        nl.create_vlan("probe0.10", parent.index, 10, None, None)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })();
    let _ = netns::delete_named(&name);
    result
}

/// Whether the kernel has VLAN-filtering bridges: tries to turn filtering on for a bridge in a
/// scratch namespace (removed again); the error says why not.
pub fn kernel_has_vlan_filtering(lab: &str) -> Result<(), String> {
    let name = format!("wl-{lab}-vfprobe");
    let ns = netns::create_named(&name).map_err(|e| e.to_string())?;
    let result = (|| -> Result<(), String> {
        let mut nl = Netlink::in_netns(&ns).map_err(|e| e.to_string())?;
        let index = nl
            .create_bridge("probebr", None, None, None)
            .map_err(|e| e.to_string())?;
        nl.set_vlan_filtering(index, true)
            .map_err(|e| e.to_string())
    })();
    let _ = netns::delete_named(&name);
    result
}

/// Removes a lab by name; returns whether there was one.
pub fn down_by_name(name: &str) -> anyhow::Result<bool> {
    let dir = lab_dir(name);
    let record: Option<Record> = std::fs::read(dir.join("lab.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut found = dir.exists();
    if let Some(r) = &record {
        stop_agents(&r.agents);
    }
    // Namespaces named after the lab are removed even when the record is lost.
    let prefix = format!("wl-{name}-");
    let mut namespaces: Vec<String> = record.map(|r| r.namespaces).unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with(&prefix) && !namespaces.contains(&n) {
                namespaces.push(n);
            }
        }
    }
    for ns in namespaces {
        if netns::delete_named(&ns).unwrap_or(false) {
            found = true;
        }
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(found)
}

fn stop_agents(pids: &[u32]) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for pid in pids {
        let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    for pid in pids {
        let p = Pid::from_raw(*pid as i32);
        while kill(p, None).is_ok() && Instant::now() < deadline {
            // Reap it if it is our child.
            let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            std::thread::sleep(Duration::from_millis(20));
        }
        if kill(p, None).is_ok() {
            let _ = kill(p, Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(p, None);
        }
    }
}

impl Lab {
    /// Prepares a lab (creates its directory and record; builds nothing yet).
    pub fn new(name: &str, spec: LabFile, docs: Vec<serde_json::Value>) -> anyhow::Result<Self> {
        let dir = lab_dir(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lab = Lab {
            name: name.to_string(),
            spec,
            docs,
            dir,
            record: Mutex::new(Record::default()),
            attachments: Mutex::new(BTreeMap::new()),
            addresses: Mutex::new(BTreeMap::new()),
            relays: Mutex::new(BTreeMap::new()),
            moved: Mutex::new(BTreeMap::new()),
        };
        lab.save()?;
        Ok(lab)
    }

    fn save(&self) -> anyhow::Result<()> {
        let record = self
            .record
            .lock()
            .map_err(|_| anyhow::anyhow!("lab record poisoned"))?
            .clone();
        weft_dataplane::state::write_json(&self.dir.join("lab.json"), &record)?;
        Ok(())
    }

    fn ns_name(&self, role: &str, name: &str) -> String {
        format!("wl-{}-{role}-{name}", self.name)
    }

    fn create_ns(&self, role: &str, name: &str) -> anyhow::Result<Netns> {
        let ns_name = self.ns_name(role, name);
        let _building = building()?;
        {
            let mut r = self
                .record
                .lock()
                .map_err(|_| anyhow::anyhow!("lab record poisoned"))?;
            r.namespaces.push(ns_name.clone());
        }
        self.save()?;
        let ns = netns::create_named(&ns_name)
            .with_context(|| format!("creating network namespace {ns_name}"))?;
        netns::run_in(&ns, || {
            weft_dataplane::sysctl::set("net.ipv6.conf.all.accept_dad", "0")
        })??;
        netns::run_in(&ns, || {
            weft_dataplane::sysctl::set("net.ipv6.conf.default.accept_dad", "0")
        })??;
        let mut nl = Netlink::in_netns(&ns)?;
        if let Some(lo) = nl.link_by_name("lo")? {
            nl.set_up(lo.index)?;
        }
        Ok(ns)
    }

    fn open_ns(&self, role: &str, name: &str) -> anyhow::Result<Netns> {
        let ns_name = self.ns_name(role, name);
        Netns::open(netns::named_path(&ns_name))
            .with_context(|| format!("opening network namespace {ns_name}"))
    }

    /// The LAN namespace (the outside host lives on its bridge).
    pub fn lan_ns(&self) -> anyhow::Result<Netns> {
        self.open_ns("lan", "0")
    }

    /// A node's namespace.
    pub fn node_ns(&self, node: &str) -> anyhow::Result<Netns> {
        self.open_ns("n", node)
    }

    /// A workload's namespace: a pod's own, a VM's guest.
    pub fn workload_ns(&self, w: &str) -> anyhow::Result<Netns> {
        self.open_ns(self.workload_role(w), w)
    }

    fn workload_role(&self, w: &str) -> &'static str {
        if self
            .spec
            .workloads
            .iter()
            .any(|x| x.name == w && x.kind == "VM")
        {
            "g"
        } else {
            "w"
        }
    }

    /// The namespace name of `outside`, a node or a workload (for `ip -n`).
    pub fn ns_name_of(&self, name: &str) -> String {
        if name == "outside" {
            self.ns_name("lan", "0")
        } else if self.spec.nodes.iter().any(|n| n.name == name) {
            self.ns_name("n", name)
        } else {
            self.ns_name(self.workload_role(name), name)
        }
    }

    /// The namespace of `outside`, a node or a workload.
    pub fn ns_of(&self, name: &str) -> anyhow::Result<Netns> {
        if name == "outside" {
            self.lan_ns()
        } else if self.spec.nodes.iter().any(|n| n.name == name) {
            self.node_ns(name)
        } else {
            self.workload_ns(name)
        }
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }

    /// The LAN, the outside host and the nodes' uplinks.
    pub fn build_network(&self) -> anyhow::Result<()> {
        let lan = self.create_ns("lan", "0")?;
        let mut lan_nl = Netlink::in_netns(&lan)?;
        let bridge = lan_nl.create_bridge("lan0", None, None, None)?;
        lan_nl.set_up(bridge)?;
        lan_nl.add_address(bridge, self.spec.lan.gateway, true)?;
        if let Some(g6) = self.spec.lan.gateway6 {
            lan_nl.add_address(bridge, g6, true)?;
        }
        for (i, node) in self.spec.nodes.iter().enumerate() {
            let ns = self.create_ns("n", &node.name)?;
            let mut nl = Netlink::in_netns(&ns)?;
            let lan_side = format!("n{i}-{}", sanitize(&node.name, 10));
            nl.create_veth_pair("eth0", &lan_side, Some(lan.fd()), None)
                .with_context(|| format!("wiring node {} to the LAN", node.name))?;
            let peer = lan_nl
                .link_by_name(&lan_side)?
                .ok_or_else(|| anyhow::anyhow!("LAN side {lan_side} missing"))?;
            lan_nl.set_master(peer.index, Some(bridge))?;
            lan_nl.set_up(peer.index)?;
            let eth0 = nl
                .link_by_name("eth0")?
                .ok_or_else(|| anyhow::anyhow!("eth0 of node {} missing", node.name))?;
            nl.add_address(eth0.index, node.address, true)?;
            if let Some(a6) = node.address6 {
                nl.add_address(eth0.index, a6, true)?;
            }
            nl.set_up(eth0.index)?;
            nl.replace_route(&RouteSpec {
                dst: "0.0.0.0/0".parse()?,
                gateway: Some(self.spec.lan.gateway.addr()),
                oif: Some(eth0.index),
                src: None,
            })?;
            if let (Some(g6), Some(_)) = (self.spec.lan.gateway6, node.address6) {
                nl.replace_route(&RouteSpec {
                    dst: "::/0".parse()?,
                    gateway: Some(g6.addr()),
                    oif: Some(eth0.index),
                    src: None,
                })?;
            }
            // The node's manifests: the resources, plus a Pod per workload of this node (labels).
            let manifests = self.node_dir(&node.name).join("manifests");
            std::fs::create_dir_all(&manifests)?;
            let mut items = self.docs.clone();
            // A VM's migration target (or new launcher) runs here later: its pod carries the same
            // labels.
            for w in self.spec.workloads.iter().filter(|w| {
                w.node == node.name
                    || w.migrate_to.as_deref() == Some(node.name.as_str())
                    || w.restart_on.as_deref() == Some(node.name.as_str())
            }) {
                let mut labels = w.labels.clone();
                if w.kind == "VM" {
                    // As KubeVirt labels a VM's virt-launcher pod.
                    labels.insert(
                        weft_dataplane::proto::VM_NAME_LABEL.to_string(),
                        w.name.clone(),
                    );
                }
                items.push(json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": w.name, "namespace": w.namespace, "labels": labels,
                                 "annotations": w.annotations},
                }));
            }
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
            std::fs::write(
                manifests.join("lab.json"),
                serde_json::to_vec_pretty(&list)?,
            )?;
        }
        Ok(())
    }

    /// Emulates the LAN switch's port guard of the nodes that ask for it (`portGuard`): while a
    /// node's `eth0` has a master, its LAN-side port is down. Stops when the returned flag drops.
    pub fn start_port_guards(&self) -> anyhow::Result<PortGuards> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (i, node) in self.spec.nodes.iter().enumerate() {
            if !node.port_guard {
                continue;
            }
            let node_ns = self.node_ns(&node.name)?;
            let lan = self.lan_ns()?;
            let lan_side = format!("n{i}-{}", sanitize(&node.name, 10));
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut node_nl = Netlink::in_netns(&node_ns)?;
                let mut lan_nl = Netlink::in_netns(&lan)?;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let bridged = node_nl
                        .link_by_name("eth0")?
                        .is_some_and(|l| l.master.is_some());
                    if let Some(port) = lan_nl.link_by_name(&lan_side)?
                        && port.up == bridged
                    {
                        if bridged {
                            lan_nl.set_down(port.index)?;
                        } else {
                            lan_nl.set_up(port.index)?;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            });
        }
        Ok(PortGuards(stop))
    }

    /// Waits until every node's agent has every other node's workload interfaces in its policy
    /// groups (nodes whose uplink change rolled back hold none and are not waited for).
    pub fn wait_peers(&self, timeout: Duration) -> anyhow::Result<()> {
        let counts: BTreeMap<String, usize> = {
            let addresses = self.addresses();
            let mut c = BTreeMap::new();
            for w in &self.spec.workloads {
                *c.entry(w.node.clone()).or_insert(0) +=
                    addresses.get(&w.name).map_or(0, |nets| nets.len());
            }
            c
        };
        let total: usize = counts.values().sum();
        let deadline = Instant::now() + timeout;
        for node in self.spec.nodes.iter().filter(|n| !n.port_guard) {
            let want = total - counts.get(&node.name).copied().unwrap_or(0);
            loop {
                let have = self.agent_count(&node.name, "peers");
                if have >= want {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the agent of node {} knows {have} of the {want} workload interfaces on other nodes after {}s",
                        node.name,
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Waits until the agent of `node` reports a rolled-back uplink change; returns the report.
    pub fn wait_rollback(&self, node: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.agent_status(node).and_then(|s| {
                s["problems"].as_array().and_then(|ps| {
                    ps.iter()
                        .filter_map(|p| p.as_str())
                        .find(|p| p.contains("rolled back"))
                        .map(str::to_string)
                })
            });
            if let Some(p) = found {
                return Ok(p);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "node {node} has portGuard, but its agent reported no rolled-back uplink change within {}s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the real agent in every node namespace.
    pub fn start_agents(&self) -> anyhow::Result<()> {
        // The agent and the CNI binary are the ones built next to this executable.
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow::anyhow!("cannot locate the weft binaries"))?;
        let operator = dir.join(OPERATOR_BINARY);
        let weft = dir.join(names::CNI_TYPE);
        for bin in [&operator, &weft] {
            if !bin.exists() {
                anyhow::bail!(
                    "{} is missing: build the workspace (`cargo build --workspace`)",
                    bin.display()
                );
            }
        }
        let nodes: Vec<String> = self.spec.nodes.iter().map(|n| n.name.clone()).collect();
        for node in &self.spec.nodes {
            let dir = self.node_dir(&node.name);
            let log = std::fs::File::create(dir.join("agent.log"))?;
            let labels: Vec<String> = node
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _building = building()?;
            let child = Command::new(&operator)
                .arg("agent")
                .arg("--netns")
                .arg(netns::named_path(&self.ns_name("n", &node.name)))
                .arg("--node-name")
                .arg(&node.name)
                .arg("--node-labels")
                .arg(labels.join(","))
                .arg("--nodes")
                .arg(nodes.join(","))
                .arg("--manifests")
                .arg(dir.join("manifests"))
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--socket")
                .arg(dir.join("agent.sock"))
                .arg("--cni-bin-dir")
                .arg(dir.join("cni-bin"))
                .arg("--cni-conf-dir")
                .arg(dir.join("cni-conf"))
                .arg("--cni-binary")
                .arg(&weft)
                .arg("--audit-log")
                .arg(dir.join("audit.jsonl"))
                .arg("--peers-dir")
                .arg(self.dir.join("peers"))
                // PortForwards may ask for a SYN proxy (the sysctl it sets is the node
                // namespace's own).
                .arg("--syn-proxy")
                // A TrafficMirror's remote collector may be on the LAN (the outside host).
                .arg("--mirror-collectors")
                .arg(
                    std::iter::once(self.spec.lan.gateway.trunc())
                        .chain(self.spec.lan.gateway6.map(|g| g.trunc()))
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                )
                .env(
                    "WEFT_LOG",
                    std::env::var("WEFT_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting the agent of node {}", node.name))?;
            {
                let mut r = self
                    .record
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lab record poisoned"))?;
                r.agents.push(child.id());
            }
            self.save()?;
        }
        Ok(())
    }

    /// Runs the `weft` binary in a node's namespace as a container runtime would.
    fn cni(
        &self,
        node: &str,
        command: &str,
        w: &Workload,
        network: &str,
        ifname: &str,
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        self.cni_as(node, command, w, network, ifname, "w")
    }

    /// [`Lab::cni`] for the workload's launcher `role`: `w` (where it started) or `m` (a
    /// migrated VM's target launcher, another pod with another container id).
    fn cni_as(
        &self,
        node: &str,
        command: &str,
        w: &Workload,
        network: &str,
        ifname: &str,
        role: &str,
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        let dir = self.node_dir(node);
        let conflist: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("cni-conf").join(names::CONFLIST_NAME))
                .with_context(|| format!("the agent of {node} has not written its conflist"))?,
        )?;
        let mut conf = conflist["plugins"][0].clone();
        // As libcni 1.2+ does: the newest of `cniVersions` (weft knows them all), else
        // `cniVersion`.
        conf["cniVersion"] = conflist["cniVersions"]
            .as_array()
            .and_then(|v| v.last())
            .unwrap_or(&conflist["cniVersion"])
            .clone();
        conf["name"] = conflist["name"].clone();
        if network.is_empty() {
            if let Some(o) = conf.as_object_mut() {
                o.remove("network");
            }
        } else {
            conf["network"] = json!(network);
        }
        if ifname != "eth0" {
            conf["defaultRoute"] = json!(false);
        }
        if w.kind == "VM" {
            conf["attachment"] = json!("tap");
            conf["tap"] = json!({"queues": 1, "vnetHdr": false});
        }
        let mut args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
            w.namespace, w.name
        );
        if ifname == "eth0" {
            if !w.ips.is_empty() {
                let ips: Vec<String> = w.ips.iter().map(|i| i.to_string()).collect();
                args.push_str(&format!(";IP={}", ips.join(",")));
            }
            if let Some(mac) = &w.mac {
                args.push_str(&format!(";MAC={mac}"));
            }
            if !w.host_ports.is_empty() {
                conf["runtimeConfig"] = json!({"portMappings": w.host_ports});
            }
        }
        if w.kind == "VM" {
            args.push_str(&format!(";VM_NAME={}", w.name));
        }
        let container_id = match role {
            "w" => format!("lab-{}-{}", self.name, w.name),
            other => format!("lab-{}-{}-{other}", self.name, w.name),
        };
        let netns_path = netns::named_path(&self.ns_name(role, &w.name));
        let bin_dir = dir.join("cni-bin");
        let state_dir = dir.join("state");
        let agent_socket = dir.join("agent.sock");
        let stdin = serde_json::to_vec(&conf)?;
        let ns = self.node_ns(node)?;
        let command = command.to_string();
        let ifname = ifname.to_string();
        // Until the plugin has exited: an interrupt waits for it before removing the lab.
        let _building = building()?;
        let output = netns::run_in(&ns, move || -> std::io::Result<std::process::Output> {
            let mut child = Command::new(bin_dir.join(names::CNI_TYPE))
                .env_clear()
                .env("CNI_COMMAND", &command)
                .env("CNI_CONTAINERID", &container_id)
                .env("CNI_NETNS", &netns_path)
                .env("CNI_IFNAME", &ifname)
                .env("CNI_PATH", &bin_dir)
                .env("CNI_ARGS", &args)
                // The node's locations, as a runtime's environment gives them: the plugin
                // takes none from the configuration.
                .env("WEFT_STATE_DIR", &state_dir)
                .env("WEFT_AGENT_SOCKET", &agent_socket)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?;
            if let Some(mut s) = child.stdin.take() {
                s.write_all(&stdin)?;
            }
            child.wait_with_output()
        })??;
        let value: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        if !output.status.success() && value.is_null() {
            anyhow::bail!(
                "weft exited with {} and no JSON: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok((output.status.success(), value))
    }

    /// Waits until every node's agent answers STATUS.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for node in &self.spec.nodes {
            let probe = Workload {
                name: "status".into(),
                namespace: "default".into(),
                node: node.name.clone(),
                kind: "Pod".into(),
                labels: BTreeMap::new(),
                networks: vec![],
                annotations: BTreeMap::new(),
                listen: vec![],
                ips: vec![],
                mac: None,
                host_ports: vec![],
                migrate_to: None,
                restart_on: None,
            };
            let conflist = self
                .node_dir(&node.name)
                .join("cni-conf")
                .join(names::CONFLIST_NAME);
            loop {
                let last = if conflist.exists() {
                    match self.cni(&node.name, "STATUS", &probe, "", "eth0") {
                        Ok((true, _)) => break,
                        Ok((false, v)) => v.to_string(),
                        Err(e) => e.to_string(),
                    }
                } else {
                    "no conflist yet".to_string()
                };
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(self.node_dir(&node.name).join("agent.log"))
                        .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let log = lines[lines.len().saturating_sub(20)..].join("\n");
                    anyhow::bail!(
                        "the agent of node {} did not become ready: {last}\nagent log:\n{log}",
                        node.name
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Creates each workload's namespace and runs CNI ADD for each of its networks.
    /// `after_each` runs right after a workload's last ADD returned, before the next one starts.
    pub fn start_workloads(
        &self,
        mut after_each: impl FnMut(&Workload) -> anyhow::Result<()>,
    ) -> anyhow::Result<BTreeMap<String, Vec<IpAddr>>> {
        let mut out = BTreeMap::new();
        for w in &self.spec.workloads {
            self.create_ns("w", &w.name)?;
            if w.kind == "VM" {
                self.create_ns("g", &w.name)?;
            }
            let mut ips = Vec::new();
            if w.annotated_networks().is_some() {
                // One ADD; the CNI reads the annotation (through the agent) and makes every
                // interface. Its result lists bridge, host end and pod interface per network.
                let first = w.networks.first().cloned().unwrap_or_default();
                self.attachments
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lab attachments poisoned"))?
                    .entry(w.name.clone())
                    .or_default()
                    .push((first.clone(), "eth0".to_string()));
                let (ok, result) = self.cni(&w.node, "ADD", w, &first, "eth0")?;
                if !ok {
                    anyhow::bail!(
                        "CNI ADD of workload {} failed: {result}{}",
                        w.name,
                        self.problems_of(&w.node)
                    );
                }
                let mut per: Vec<(String, Vec<IpAddr>)> =
                    w.networks.iter().map(|n| (n.clone(), Vec::new())).collect();
                for ip in result["ips"].as_array().into_iter().flatten() {
                    let index = ip["interface"].as_u64().unwrap_or(0) as usize;
                    if let (Some(a), Some(slot)) = (
                        ip["address"]
                            .as_str()
                            .and_then(|a| a.parse::<ipnet::IpNet>().ok()),
                        per.get_mut(index / 3),
                    ) {
                        ips.push(a.addr());
                        slot.1.push(a.addr());
                    }
                }
                for (network, on) in &per {
                    self.check_not_a_host(w, network, on)?;
                }
                self.addresses
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lab addresses poisoned"))?
                    .entry(w.name.clone())
                    .or_default()
                    .extend(per);
                out.insert(w.name.clone(), ips);
                after_each(w)?;
                continue;
            }
            for (i, network) in w.networks.iter().enumerate() {
                let ifname = if i == 0 {
                    "eth0".to_string()
                } else {
                    format!("net{i}")
                };
                {
                    let mut a = self
                        .attachments
                        .lock()
                        .map_err(|_| anyhow::anyhow!("lab attachments poisoned"))?;
                    a.entry(w.name.clone())
                        .or_insert_with(Vec::new)
                        .push((network.clone(), ifname.clone()));
                }
                let (ok, result) = self.cni(&w.node, "ADD", w, network, &ifname)?;
                if !ok {
                    anyhow::bail!(
                        "CNI ADD of workload {} on network {network} failed: {result}{}",
                        w.name,
                        self.problems_of(&w.node)
                    );
                }
                if w.kind == "VM" {
                    self.boot_guest(w, &ifname, &result)?;
                }
                let mut on_network = Vec::new();
                for ip in result["ips"].as_array().into_iter().flatten() {
                    if let Some(a) = ip["address"].as_str()
                        && let Ok(net) = a.parse::<ipnet::IpNet>()
                    {
                        ips.push(net.addr());
                        on_network.push(net.addr());
                    }
                }
                self.check_not_a_host(w, network, &on_network)?;
                self.addresses
                    .lock()
                    .map_err(|_| anyhow::anyhow!("lab addresses poisoned"))?
                    .entry(w.name.clone())
                    .or_default()
                    .push((network.clone(), on_network));
            }
            out.insert(w.name.clone(), ips);
            after_each(w)?;
        }
        Ok(out)
    }

    /// A VM's NIC `ifname`: a tap in the guest namespace with the VM's MAC and the addresses and
    /// routes of the CNI result, and a VMM stand-in that relays frames between it and the tap
    /// weft made in the launcher namespace (the guest's traffic flows through weft's tap).
    fn boot_guest(
        &self,
        w: &Workload,
        ifname: &str,
        result: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let tap = &result["interfaces"][2];
        let launcher_tap = tap["name"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("the CNI result of VM {} names no tap", w.name))?
            .to_string();
        let mac = tap["mac"]
            .as_str()
            .and_then(names::parse_mac)
            .ok_or_else(|| anyhow::anyhow!("the CNI result of VM {} has no MAC", w.name))?;
        let mtu = tap["mtu"].as_u64().and_then(|m| u32::try_from(m).ok());
        let guest = self.open_ns("g", &w.name)?;
        let launcher = self.open_ns("w", &w.name)?;
        let nic = ifname.to_string();
        netns::run_in(&guest, || {
            weft_dataplane::tap::create_persistent_tap(&weft_dataplane::tap::TapSpec {
                name: &nic,
                owner: None,
                group: None,
                queues: 1,
                vnet_hdr: false,
                mtu,
                mac: Some(mac),
            })
        })??;
        let inner = netns::run_in(&guest, || weft_dataplane::tap::open_tap(&nic, false, false))??;
        let outer = netns::run_in(&launcher, || {
            weft_dataplane::tap::open_tap(&launcher_tap, false, false)
        })??;
        let relay = super::vmm::Relay::new(inner)?;
        relay.attach(outer)?;
        self.relays
            .lock()
            .map_err(|_| anyhow::anyhow!("lab relays poisoned"))?
            .insert((w.name.clone(), ifname.to_string()), relay);
        let mut nl = Netlink::in_netns(&guest)?;
        let link = nl
            .link_by_name(ifname)?
            .ok_or_else(|| anyhow::anyhow!("guest NIC {ifname} of VM {} missing", w.name))?;
        for ip in result["ips"].as_array().into_iter().flatten() {
            if let Some(a) = ip["address"].as_str() {
                nl.add_address(link.index, a.parse()?, true)?;
            }
        }
        nl.set_up(link.index)?;
        if ifname == "eth0" {
            for ip in result["ips"].as_array().into_iter().flatten() {
                if let Some(gw) = ip["gateway"].as_str() {
                    let gw: IpAddr = gw.parse()?;
                    nl.replace_route(&RouteSpec {
                        dst: if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.parse()?,
                        gateway: Some(gw),
                        oif: Some(link.index),
                        src: None,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// The (network, interface) pairs of workload `w`'s attachments.
    fn attached(&self, w: &Workload) -> anyhow::Result<Vec<(String, String)>> {
        Ok(self
            .attachments
            .lock()
            .map_err(|_| anyhow::anyhow!("lab attachments poisoned"))?
            .get(&w.name)
            .cloned()
            .unwrap_or_default())
    }

    /// Attaches VM `w`'s interfaces in a new launcher namespace on node `to` (CNI ADD per
    /// network), checks that each kept the VM's addresses, and readies a switch of the guest's
    /// relay to each new tap; returns the switches and what was kept, for the output.
    fn attach_vm_on(
        &self,
        w: &Workload,
        to: &str,
        attached: &[(String, String)],
        before: &Addresses,
        what: &str,
    ) -> anyhow::Result<(Vec<Switch>, Vec<String>)> {
        self.create_ns("m", &w.name)?;
        let target = self.open_ns("m", &w.name)?;
        let mut switch = Vec::new();
        let mut kept = Vec::new();
        for (network, ifname) in attached {
            let (ok, result) = self.cni_as(to, "ADD", w, network, ifname, "m")?;
            if !ok {
                anyhow::bail!("CNI ADD of VM {}'s {what} on {to} failed: {result}", w.name);
            }
            let ips: Vec<IpAddr> = result["ips"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|ip| ip["address"].as_str()?.parse::<ipnet::IpNet>().ok())
                .map(|n| n.addr())
                .collect();
            let had = before
                .get(&w.name)
                .and_then(|nets| nets.iter().find(|(n, _)| n == network))
                .map(|(_, ips)| ips.clone())
                .unwrap_or_default();
            if ips != had {
                anyhow::bail!(
                    "VM {} did not keep its addresses on {network}: {had:?} on {}, {ips:?} on {to}",
                    w.name,
                    w.node
                );
            }
            let tap = result["interfaces"][2]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mac = result["interfaces"][2]["mac"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let file = netns::run_in(&target, || {
                weft_dataplane::tap::open_tap(&tap, false, false)
            })??;
            let relay = self
                .relays
                .lock()
                .map_err(|_| anyhow::anyhow!("lab relays poisoned"))?
                .get(&(w.name.clone(), ifname.clone()))
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("VM {} has no relay for {ifname}", w.name))?;
            let (id, writer) = relay.attach_standby(file)?;
            switch.push((relay, id, writer, ifname.clone(), mac.clone()));
            kept.push(format!(
                "{network}: {} {mac}",
                ips.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        Ok((switch, kept))
    }

    /// Stops VM `w` on its node and starts it on node `to`, as KubeVirt does when a stopped VM
    /// is started again and scheduled elsewhere: the launcher's interfaces are deleted (CNI
    /// DEL), and once `to`'s agent no longer sees the VM running there, a new launcher is
    /// attached on `to`; it must get the VM's addresses and MAC back, active at once. Returns
    /// what happened, for the lab's output.
    pub fn restart_on(&self, w: &Workload, to: &str) -> anyhow::Result<String> {
        let attached = self.attached(w)?;
        let before = self.addresses();
        let peers = |node: &str| self.agent_count(node, "peers");
        // What `to`'s agent should see once the VM stopped: every other workload's interfaces
        // that run on another node now.
        let want: usize = self
            .spec
            .workloads
            .iter()
            .filter(|o| o.name != w.name)
            .filter(|o| self.node_now(&o.name) != to)
            .map(|o| before.get(&o.name).map_or(0, |nets| nets.len()))
            .sum();
        for (network, ifname) in &attached {
            let (ok, result) = self.cni_as(&w.node, "DEL", w, network, ifname, "w")?;
            if !ok {
                anyhow::bail!("CNI DEL of VM {}'s launcher failed: {result}", w.name);
            }
        }
        // The source's agent publishes the VM as stopped (its reservation, no workload), and
        // `to`'s agent reads that.
        let vm = format!("{}/{}", w.namespace, w.name);
        let published = self.dir.join("peers").join(format!("{}.json", w.node));
        let stopped = || {
            let Ok(file) = std::fs::read(&published) else {
                return false;
            };
            let Ok(p) = serde_json::from_slice::<serde_json::Value>(&file) else {
                return false;
            };
            let runs = p["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["vm"].as_str() == Some(vm.as_str()));
            let kept = p["reservations"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["vm"].as_str() == Some(vm.as_str()));
            !runs && kept
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !stopped() || peers(to) != want {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "15 s after VM {} stopped on {}: published as stopped {}, the agent of {to} knows {} workload interfaces on other nodes, not {want}",
                    w.name,
                    w.node,
                    stopped(),
                    peers(to),
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let (switch, kept) = self.attach_vm_on(w, to, &attached, &before, "new launcher")?;
        // Started before `to`'s agent saw the VM stop, the new launcher would be held like a
        // migration target, until the agent sees the VM runs nowhere else.
        let started = Instant::now();
        let pending = || self.agent_count(to, "pending");
        while pending() > 0 {
            if started.elapsed() > Duration::from_secs(10) {
                anyhow::bail!(
                    "VM {}'s new launcher on {to} is still held like a migration target after 10 s",
                    w.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let held = started.elapsed();
        for (relay, id, writer, _, _) in switch {
            relay.switch_to(id, writer)?;
        }
        self.moved
            .lock()
            .map_err(|_| anyhow::anyhow!("lab moved poisoned"))?
            .insert(w.name.clone(), to.to_string());
        Ok(format!(
            "{} stopped on {} and started on {to}: kept {}{}",
            w.name,
            w.node,
            kept.join("; "),
            if held > Duration::from_millis(50) {
                format!(" (held {} ms until {to} saw it stopped)", held.as_millis())
            } else {
                String::new()
            }
        ))
    }

    /// Live-migrates VM `w` to node `to`, as KubeVirt does with weft's tap binding: the target
    /// launcher gets its taps (the VM's addresses and MAC, the ports pending: nothing passes
    /// them), the guest switches over and announces itself (RARP, as QEMU does when the VM
    /// resumes), the target's agent activates the ports, then the source launcher is deleted.
    /// Returns what happened, for the lab's output.
    pub fn migrate(&self, w: &Workload, to: &str) -> anyhow::Result<String> {
        let attached = self.attached(w)?;
        let before = self.addresses();
        let (switch, kept) = self.attach_vm_on(w, to, &attached, &before, "migration target")?;
        let pending = |node: &str| self.agent_count(node, "pending");
        // The agent writes its status file after it answers the ADD: give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut waiting = pending(to);
        while waiting == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            waiting = pending(to);
        }
        if waiting == 0 {
            anyhow::bail!(
                "the migration target of VM {} on {to} is not pending",
                w.name
            );
        }
        // The switch-over: the guest now runs behind the target's taps and announces itself.
        let started = Instant::now();
        let guest = self.open_ns("g", &w.name)?;
        for (relay, id, writer, ifname, mac) in switch {
            relay.switch_to(id, writer)?;
            let mac = names::parse_mac(&mac)
                .ok_or_else(|| anyhow::anyhow!("VM {} has no MAC on {ifname}", w.name))?;
            let index = Netlink::in_netns(&guest)?
                .link_by_name(&ifname)?
                .ok_or_else(|| anyhow::anyhow!("guest NIC {ifname} missing"))?
                .index;
            netns::run_in(&guest, move || {
                weft_dataplane::frame::send(index, &weft_dataplane::frame::rarp_announce(mac))
            })??;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending(to) > 0 {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the migration target of VM {} on {to} was not activated",
                    w.name
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let activated = started.elapsed();
        // The source launcher goes, as KubeVirt deletes the source pod.
        for (network, ifname) in &attached {
            let (ok, result) = self.cni_as(&w.node, "DEL", w, network, ifname, "w")?;
            if !ok {
                anyhow::bail!(
                    "CNI DEL of VM {}'s migration source failed: {result}",
                    w.name
                );
            }
        }
        self.moved
            .lock()
            .map_err(|_| anyhow::anyhow!("lab moved poisoned"))?
            .insert(w.name.clone(), to.to_string());
        Ok(format!(
            "{} migrated {} -> {to}: {waiting} target port(s) pending until the VM announced itself, activated {} ms after the switch-over; kept {}",
            w.name,
            w.node,
            activated.as_millis(),
            kept.join("; ")
        ))
    }

    /// The node `name` runs on now: a node is itself, a migrated VM is on its target.
    pub fn node_now(&self, name: &str) -> String {
        if let Some(to) = self.moved.lock().ok().and_then(|m| m.get(name).cloned()) {
            return to;
        }
        self.spec
            .workloads
            .iter()
            .find(|w| w.name == name)
            .map(|w| w.node.clone())
            .unwrap_or_else(|| name.to_string())
    }

    /// A workload address that a LAN host (the outside host, a node) holds already: the
    /// Network's `ipam.exclude` must cover the LAN's hosts, or two hosts answer for it.
    fn check_not_a_host(&self, w: &Workload, network: &str, ips: &[IpAddr]) -> anyhow::Result<()> {
        let mut hosts: Vec<(String, IpAddr)> =
            vec![("the outside host".into(), self.spec.lan.gateway.addr())];
        hosts.extend(
            self.spec
                .lan
                .gateway6
                .map(|g| ("the outside host".to_string(), g.addr())),
        );
        for n in &self.spec.nodes {
            hosts.push((format!("node {}", n.name), n.address.addr()));
            hosts.extend(n.address6.map(|a| (format!("node {}", n.name), a.addr())));
        }
        for ip in ips {
            if let Some((host, _)) = hosts.iter().find(|(_, a)| a == ip) {
                anyhow::bail!(
                    "workload {} got {ip} on network {network}, the LAN address of {host}: add the LAN's hosts to the Network's ipam.exclude",
                    w.name
                );
            }
        }
        Ok(())
    }

    /// What the agent of `node` reports it could not do, as lines to append to an error.
    fn problems_of(&self, node: &str) -> String {
        let problems: Vec<String> = self
            .agent_status(node)
            .and_then(|s| s["problems"].as_array().cloned())
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().map(str::to_string))
            .collect();
        if problems.is_empty() {
            return String::new();
        }
        format!(
            "\nthe agent of {node} reports:\n  {}",
            problems.join("\n  ")
        )
    }

    /// Pod `to`'s IPv6 link-local address on a network that pod `from` is attached to as well,
    /// with the index of `from`'s interface there (the address's scope): read from their
    /// namespaces, as the kernel made the address (from the interface's MAC).
    pub fn link_local_target(
        &self,
        from: &str,
        to: &str,
    ) -> anyhow::Result<std::net::SocketAddrV6> {
        let attachments = self
            .attachments
            .lock()
            .map_err(|_| anyhow::anyhow!("lab attachments poisoned"))?
            .clone();
        let of = |w: &str| attachments.get(w).cloned().unwrap_or_default();
        let (theirs, mine) = of(to)
            .into_iter()
            .find_map(|(network, ifname)| {
                let mine = of(from).into_iter().find(|(n, _)| *n == network)?;
                Some((ifname, mine.1))
            })
            .with_context(|| format!("{from} and {to} share no network"))?;
        let mut source = Netlink::entering(&self.workload_ns(from)?)?;
        let scope = source
            .link_by_name(&mine)?
            .with_context(|| format!("{from} has no {mine}"))?
            .index;
        // Its own link-local address is the probe's source: usable once DAD is done.
        settled_link_local(&mut source, scope)
            .with_context(|| format!("{from}'s {mine} has no usable link-local address"))?;
        let mut target = Netlink::entering(&self.workload_ns(to)?)?;
        let link = target
            .link_by_name(&theirs)?
            .with_context(|| format!("{to} has no {theirs}"))?;
        let address = settled_link_local(&mut target, link.index)
            .with_context(|| format!("{to}'s {theirs} has no usable link-local address"))?;
        Ok(std::net::SocketAddrV6::new(address, 0, 0, scope))
    }

    /// Each workload's addresses per network.
    pub fn addresses(&self) -> Addresses {
        self.addresses.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// The agent's last status of a node.
    pub fn agent_status(&self, node: &str) -> Option<serde_json::Value> {
        std::fs::read(self.node_dir(node).join("state").join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// A count of the agent's last status of a node (`peers`, `pending`); 0 when it has none.
    fn agent_count(&self, node: &str, key: &str) -> usize {
        self.agent_status(node)
            .and_then(|s| s[key].as_u64())
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Removes everything: CNI DEL for every attachment, agents, namespaces, files.
    pub fn teardown(self) {
        let attachments = self
            .attachments
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default();
        let moved = self.moved.lock().map(|m| m.clone()).unwrap_or_default();
        for w in &self.spec.workloads {
            let (node, role) = match moved.get(&w.name) {
                Some(to) => (to.as_str(), "m"),
                None => (w.node.as_str(), "w"),
            };
            for (network, ifname) in attachments.get(&w.name).into_iter().flatten() {
                if let Ok((false, v)) = self.cni_as(node, "DEL", w, network, ifname, role) {
                    eprintln!("warning: CNI DEL of {} failed: {v}", w.name);
                }
            }
        }
        if let Err(e) = down_by_name(&self.name) {
            eprintln!("warning: removing lab {}: {e:#}", self.name);
        }
    }
}

/// The IPv6 link-local address of link `index` (in `nl`'s namespace) once duplicate address
/// detection is done with it (a second or so after the link came up); `None` when it has none
/// within 5 s.
fn settled_link_local(nl: &mut Netlink, index: u32) -> Option<std::net::Ipv6Addr> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = nl
            .addresses(Some(index))
            .ok()?
            .into_iter()
            .find_map(|a| match a.addr.addr() {
                IpAddr::V6(v6) if v6.is_unicast_link_local() && !a.dad_failed => {
                    Some((v6, a.tentative))
                }
                _ => None,
            });
        match found {
            Some((v6, false)) => return Some(v6),
            _ if Instant::now() >= deadline => return None,
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_waits_for_the_creations_in_progress_and_refuses_the_next() {
        // Two at once (a namespace, a CNI call)...
        let creating = building().unwrap();
        let also = std::thread::spawn(|| building().map(|_| ()).map_err(|e| e.to_string()))
            .join()
            .unwrap();
        assert_eq!(also, Ok(()));
        let another = std::thread::spawn(|| {
            let guard = building().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(guard);
        });
        std::thread::sleep(Duration::from_millis(50));
        let stopper = std::thread::spawn(|| {
            let guard = stop_building();
            assert!(guard.is_some(), "the creations ended in time");
            std::mem::forget(guard);
        });
        std::thread::sleep(Duration::from_millis(300));
        // The interrupt waits while something is being created...
        assert!(!stopper.is_finished());
        another.join().unwrap();
        drop(creating);
        stopper.join().unwrap();
        // ...and nothing is created after it.
        let next = std::thread::spawn(|| building().map(|_| ()).map_err(|e| e.to_string()));
        assert_eq!(next.join().unwrap().unwrap_err(), "the lab was interrupted");
    }
}
