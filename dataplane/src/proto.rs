//! The protocol between the `weft` CNI binary and the node agent: one JSON request and one
//! JSON reply (two for [`Request::Attach`]), each a single line, over the agent's Unix socket.
//!
//! ADD attaches: the agent allocates the interfaces and answers with them, then confirms that
//! the node's rules for them are in force; DEL detaches. The CNI gives the agent a short
//! deadline: an agent that does not answer makes ADD fail closed (CNI code 11, try again later).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One host port of a workload (the runtime's `runtimeConfig.portMappings`, a pod's
/// `hostPort`): connections to the node's `host_ip` (any of the node's addresses when `None`
/// or unspecified, see [`PortMapping::host_address`]) on `host_port` go to the workload's
/// `container_port`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The node's port.
    pub host_port: u16,
    /// The workload's port.
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Only this address of the node; it applies to the workload's address of its family
    /// alone.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "hostIP")]
    pub host_ip: Option<IpAddr>,
}

/// One direction's bandwidth limit, in the units of the CNI `bandwidth` capability: a rate
/// in bits per second and a burst in bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    /// Bits per second.
    pub bits_per_second: u64,
    /// The burst, in bits.
    pub burst_bits: u64,
}

/// The bandwidth the runtime asked for (the CNI `bandwidth` capability): `ingress` into the
/// workload, `egress` out of it.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Bandwidth {
    /// Into the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Rate>,
    /// Out of the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Rate>,
}

impl PortMapping {
    /// The one node address it is limited to; `None` for any address of the node (no
    /// `hostIP`) or of one family (an unspecified one, `0.0.0.0` or `::`, which the portmap
    /// plugin takes for any address of its family: see [`PortMapping::family`]).
    pub fn host_address(&self) -> Option<IpAddr> {
        self.host_ip.filter(|h| !h.is_unspecified())
    }

    /// The address family it is limited to: that of its `hostIP`, unspecified or not; `None`
    /// (both) without one. `Some(true)` for IPv4.
    pub fn family(&self) -> Option<bool> {
        self.host_ip.map(|h| h.is_ipv4())
    }

    /// Would both claim the same connections on a node: same protocol and port, and host
    /// addresses that overlap (equal, or either one any address of the other's family).
    pub fn clashes(&self, other: &PortMapping) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.family(), other.family()) {
                (Some(a), Some(b)) if a != b => false,
                _ => match (self.host_address(), other.host_address()) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                },
            }
    }
}

impl std::fmt::Display for PortMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "host port {}/{} on {ip}", self.host_port, self.protocol),
            None => write!(f, "host port {}/{}", self.host_port, self.protocol),
        }
    }
}

/// One workload attachment on one network, as the CNI registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The weft network.
    pub network: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_IFNAME` inside the workload.
    pub ifname: String,
    /// The host side of the attachment (veth or tap).
    pub host_ifname: String,
    /// The workload's MAC.
    pub mac: String,
    /// The workload's addresses.
    pub ips: Vec<IpAddr>,
    /// Kubernetes namespace of the workload (`K8S_POD_NAMESPACE`), when known.
    #[serde(default)]
    pub pod_namespace: Option<String>,
    /// Kubernetes name of the workload (`K8S_POD_NAME`), when known.
    #[serde(default)]
    pub pod_name: Option<String>,
    /// `CNI_NETNS`.
    #[serde(default)]
    pub netns: Option<String>,
    /// The VM's stable identity (`namespace/name`), for a VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// A live migration's target: the port passes nothing until the VM announces itself on it
    /// (the RARP QEMU sends when it resumes) or the source is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// The VLANs the port carries tagged besides the network's own (the attachment's
    /// `vlanTrunk`, on a network with `spec.bridge.vlanFiltering`); empty for an access port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlan_trunk: Vec<crate::vlan::VlanRange>,
    /// The workload's host ports (its `CNI_IFNAME` interface only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
    /// The bandwidth the runtime asked for (its `CNI_IFNAME` interface only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Bandwidth>,
}

/// A request from the CNI to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", rename_all_fields = "camelCase")]
// One request per connection, decoded once: the size of the `Register` variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Request {
    /// Is the agent up and has it reconciled the node?
    Ping,
    /// ADD: the agent finds the pod's VM and Networks, allocates each interface's addresses
    /// (it keeps the IPAM store) and answers twice: first with the interfaces
    /// ([`Reply::attached`]), which the CNI wires meanwhile, then once their rules are in force
    /// (or with its refusal, having released the addresses). An agent that does not know the
    /// request (an older one) answers a bad request: the CNI then allocates and registers
    /// itself.
    Attach {
        /// What the ADD asks for.
        ask: crate::attachment::Ask,
    },
    /// A new endpoint: put the node's rules for it in force, then answer.
    Register {
        /// The endpoint.
        endpoint: Endpoint,
    },
    /// An endpoint is gone.
    Unregister {
        /// The network.
        network: String,
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
    },
    /// DEL of one attachment: the agent unregisters it and releases its addresses, answers,
    /// and then takes its rules out (in its next batch, before any later request's) and leaves
    /// its host link to the namespace's teardown, deleting it itself if the runtime keeps the
    /// namespace (removing set elements and deleting a veth each wait for an RCU grace period;
    /// the DEL does not). An agent that cannot (an older one, or an error) answers not ok: the
    /// CNI then deletes and releases itself.
    Detach {
        /// The network.
        network: String,
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// `CNI_IFNAME`.
        ifname: String,
        /// Also detach the interfaces the ADD of `ifname` made from the pod's
        /// [`NETWORKS_ANNOTATION`] (the allocations of `container_id` whose parent is `ifname`,
        /// on any network), and name them in [`Reply::detached`]. An agent that does not know
        /// the field (an older one) answers without that list: the CNI then finds and detaches
        /// them itself.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        with_extras: bool,
    },
    /// A CNI operation finished (for the agent's metrics; the reply is not waited for long).
    Report {
        /// `ADD` or `DEL`.
        command: String,
        /// Whether it succeeded.
        ok: bool,
        /// How long it took, in microseconds.
        micros: u64,
    },
    /// Which VM does this pod run (KubeVirt's `vm.kubevirt.io/name` label)? The answer's `vm`
    /// is the VM's stable identity, `namespace/name`, or absent for a plain pod.
    Identity {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
        /// The VM identity the runtime gave (`CNI_ARGS VM_NAME`), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm: Option<String>,
    },
    /// A pending port's VM announced itself there: activate it (sent by the agent's NFLOG
    /// reader to the agent's own queue).
    Activate {
        /// The host-side port.
        host_ifname: String,
    },
}

/// A VM running on another node while its migration target is being attached here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSource {
    /// The node the VM runs on now.
    pub node: String,
    /// Its addresses on the network, kept.
    pub ips: Vec<IpAddr>,
    /// Its MAC, kept.
    pub mac: String,
}

/// A stopped VM's addresses and MAC on a network, as another node keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Restore {
    /// The node that keeps them (where the VM ran last).
    pub node: String,
    /// The addresses.
    pub ips: Vec<IpAddr>,
    /// The MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// When an attachment there last took them (Unix seconds): a newer reservation of the VM
    /// on this node wins.
    pub since: u64,
}

/// The pod annotation naming the weft Networks a pod wants, in order (`"nat-demo,lan"`, or a
/// JSON list of [`NetworkSelection`]s): one CNI ADD creates an interface on each, the first (or
/// the one marked `defaultRoute`) with the default route.
pub const NETWORKS_ANNOTATION: &str = "weft.dev/networks";

/// One Network of a pod's [`NETWORKS_ANNOTATION`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkSelection {
    /// The Network.
    pub name: String,
    /// The interface's name in the pod (the first Network's is always `CNI_IFNAME`; the others
    /// default to `net1`, `net2`…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The pod's default route goes through this Network (at most one; default: the first).
    #[serde(default)]
    pub default_route: bool,
}

/// Parses a pod's [`NETWORKS_ANNOTATION`]: `"nat-demo,lan"`, or
/// `[{"name": "nat-demo"}, {"name": "lan", "interface": "lan0", "defaultRoute": true}]`. An
/// empty value is an empty list. The error names the annotation, what is wrong and the fix.
pub fn parse_networks_annotation(value: &str) -> Result<Vec<NetworkSelection>, String> {
    let a = NETWORKS_ANNOTATION;
    let list: Vec<NetworkSelection> = if value.trim_start().starts_with('[') {
        serde_json::from_str(value).map_err(|e| {
            format!(
                "{a}: not a list of networks: {e}; write [{{\"name\": \"nat-demo\"}}, {{\"name\": \"lan\", \"interface\": \"lan0\", \"defaultRoute\": true}}] (keys name, interface, defaultRoute) or \"nat-demo,lan\""
            )
        })?
    } else {
        value
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| NetworkSelection {
                name: n.to_string(),
                ..NetworkSelection::default()
            })
            .collect()
    };
    let mut names: Vec<&str> = Vec::new();
    let mut interfaces: Vec<&str> = Vec::new();
    for (i, n) in list.iter().enumerate() {
        if let Some(problem) = crate::names::network_name_problem(&n.name) {
            return Err(format!(
                "{a}: {problem}; list Network names separated by commas, e.g. \"nat-demo,lan\""
            ));
        }
        if names.contains(&n.name.as_str()) {
            return Err(format!(
                "{a}: Network {} is listed twice; one interface per Network",
                n.name
            ));
        }
        names.push(&n.name);
        if let Some(ifname) = &n.interface {
            if i == 0 {
                return Err(format!(
                    "{a}: the first Network ({}) gets the runtime's interface (CNI_IFNAME, eth0); leave its interface out",
                    n.name
                ));
            }
            let ok = !ifname.is_empty()
                && ifname.len() <= 15
                && ifname != "."
                && ifname != ".."
                && ifname
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
            if !ok {
                return Err(format!(
                    "{a}: interface {ifname:?} of Network {} is not an interface name; use 1 to 15 letters, digits, '-', '_' or '.'",
                    n.name
                ));
            }
            if interfaces.contains(&ifname.as_str()) {
                return Err(format!(
                    "{a}: interface {ifname} is named twice; give each Network its own"
                ));
            }
            interfaces.push(ifname);
        }
    }
    if list.iter().filter(|n| n.default_route).count() > 1 {
        return Err(format!(
            "{a}: more than one Network has defaultRoute: true; a pod has one default route"
        ));
    }
    Ok(list)
}

/// The label KubeVirt puts on a VM's virt-launcher pod: the VM's name.
pub const VM_NAME_LABEL: &str = "vm.kubevirt.io/name";

/// The agent's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// The request was carried out.
    pub ok: bool,
    /// The agent has reconciled the node at least once.
    #[serde(default)]
    pub ready: bool,
    /// What went wrong, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For [`Request::Identity`]: the VM the pod runs, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// For [`Request::Identity`]: the pod's [`NETWORKS_ANNOTATION`], as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<String>,
    /// For [`Request::Identity`]: the VM runs on other nodes now (a live migration's target),
    /// by network.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub migration: std::collections::BTreeMap<String, MigrationSource>,
    /// For [`Request::Identity`]: the VM runs nowhere and another node holds its newest
    /// reservation (it stopped there): the addresses and MAC it gets back, by network.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub restore: std::collections::BTreeMap<String, Restore>,
    /// For [`Request::Attach`] (its first answer): the interfaces and their addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attached: Vec<crate::attachment::Attached>,
    /// The CNI error code of a failure, when the agent knows it (an allocation's, an invalid
    /// annotation's), with its short message (`error` has the details).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    /// The short message that goes with `code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// For [`Request::Detach`] with `with_extras`: the interfaces detached with the one asked
    /// for (none is an empty list; `None` from an agent that does not detach them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached: Option<Vec<DetachedInterface>>,
}

/// An interface the agent detached along with the one a DEL named ([`Reply::detached`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachedInterface {
    /// Its network.
    pub network: String,
    /// Its name in the workload.
    pub ifname: String,
}

/// How the agent's reply to a request it cannot decode begins.
pub const BAD_REQUEST: &str = "bad request: ";

impl Reply {
    /// A success reply.
    pub fn ok(ready: bool) -> Self {
        Reply {
            ok: true,
            ready,
            error: None,
            vm: None,
            networks: None,
            migration: Default::default(),
            restore: Default::default(),
            attached: Vec::new(),
            code: None,
            msg: None,
            detached: None,
        }
    }
    /// A failure reply.
    pub fn error(ready: bool, msg: impl Into<String>) -> Self {
        Reply {
            ok: false,
            error: Some(msg.into()),
            ..Reply::ok(ready)
        }
    }

    /// A failure with its CNI code and short message.
    pub fn failed(
        ready: bool,
        code: u32,
        msg: impl Into<String>,
        details: impl Into<String>,
    ) -> Self {
        Reply {
            code: Some(code),
            msg: Some(msg.into()),
            ..Reply::error(ready, details)
        }
    }

    /// The agent could not decode the request: an older agent, which does not know it.
    pub fn is_bad_request(&self) -> bool {
        !self.ok
            && self
                .error
                .as_deref()
                .is_some_and(|e| e.starts_with(BAD_REQUEST))
    }
}

/// Errors talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The socket could not be reached (agent not running, or not yet).
    #[error("cannot connect to the weft agent at {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be sent or the reply not read in time.
    #[error("no answer from the weft agent at {path}")]
    Exchange {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The reply was not valid.
    #[error("the weft agent at {path} sent an invalid reply")]
    Decode {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Connects to the agent and sends `req` (one line), each step at most `timeout`.
fn send(socket: &Path, req: &Request, timeout: Duration) -> Result<UnixStream, ProtoError> {
    let stream = UnixStream::connect(socket).map_err(|source| ProtoError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    let ex = |source| ProtoError::Exchange {
        path: socket.to_path_buf(),
        source,
    };
    stream.set_read_timeout(Some(timeout)).map_err(ex)?;
    stream.set_write_timeout(Some(timeout)).map_err(ex)?;
    write_line(&stream, socket, req)?;
    Ok(stream)
}

/// Writes `req` as one line of JSON on `stream`, a connection to the agent at `socket`.
fn write_line(mut stream: &UnixStream, socket: &Path, req: &Request) -> Result<(), ProtoError> {
    let mut line = serde_json::to_vec(req).map_err(|source| ProtoError::Decode {
        path: socket.to_path_buf(),
        source,
    })?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|source| ProtoError::Exchange {
            path: socket.to_path_buf(),
            source,
        })
}

/// Sends `req` without waiting for the reply (the agent's answer goes nowhere): for reports whose
/// outcome changes nothing for the sender.
pub fn notify(socket: &Path, req: &Request, timeout: Duration) -> Result<(), ProtoError> {
    send(socket, req, timeout).map(drop)
}

/// Sends `req` and waits for the agent's reply, at most `timeout` for each step.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Reply, ProtoError> {
    Pending::start(socket, req, timeout)?.finish()
}

/// A request sent whose reply is not read yet: the sender works meanwhile (the CNI wires the
/// link while the agent puts the endpoint's rules in place) and then waits for the answer.
#[derive(Debug)]
pub struct Pending {
    reader: BufReader<UnixStream>,
    path: std::path::PathBuf,
}

impl Pending {
    /// Connects and sends `req`, each step at most `timeout` (as is reading the reply).
    pub fn start(socket: &Path, req: &Request, timeout: Duration) -> Result<Pending, ProtoError> {
        Ok(Pending {
            reader: BufReader::new(send(socket, req, timeout)?),
            path: socket.to_path_buf(),
        })
    }

    /// Waits for the reply.
    pub fn finish(mut self) -> Result<Reply, ProtoError> {
        self.answer()
    }

    /// Waits for the next reply line (an `Attach` is answered twice).
    pub fn answer(&mut self) -> Result<Reply, ProtoError> {
        let ex = |source| ProtoError::Exchange {
            path: self.path.clone(),
            source,
        };
        let mut reply = String::new();
        self.reader.read_line(&mut reply).map_err(ex)?;
        if reply.is_empty() {
            return Err(ex(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the agent closed the connection without a reply",
            )));
        }
        serde_json::from_str(&reply).map_err(|source| ProtoError::Decode {
            path: self.path.clone(),
            source,
        })
    }

    /// Sends `req` on this connection after its answers, without waiting for a reply, and
    /// closes it: a [`Request::Report`] on the connection of the request it reports spares a
    /// connection of its own. The agent reads one such line on every connection it answered.
    pub fn follow_with(self, req: &Request) -> Result<(), ProtoError> {
        write_line(self.reader.get_ref(), &self.path, req)
    }
}

#[cfg(test)]
mod annotation_tests {
    use super::*;

    fn names(v: &str) -> Vec<String> {
        parse_networks_annotation(v)
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect()
    }

    #[test]
    fn the_short_and_the_json_form_name_networks_in_order() {
        assert_eq!(names(" nat-demo, lan ,"), ["nat-demo", "lan"]);
        assert!(names("").is_empty());
        let l = parse_networks_annotation(
            r#"[{"name": "nat-demo"}, {"name": "lan", "interface": "lan0", "defaultRoute": true}]"#,
        )
        .unwrap();
        assert_eq!(
            l,
            [
                NetworkSelection {
                    name: "nat-demo".into(),
                    ..NetworkSelection::default()
                },
                NetworkSelection {
                    name: "lan".into(),
                    interface: Some("lan0".into()),
                    default_route: true
                }
            ]
        );
    }

    #[test]
    fn bad_annotations_name_the_annotation_and_the_fix() {
        for (value, says) in [
            ("nat-demo,Lan", "\"Lan\" is not a valid Network name"),
            ("lan-", "DNS-1123"),
            ("lan,lan", "listed twice"),
            (
                r#"[{"name": "lan"}, {"name": "x", "ips": ["10.0.0.1"]}]"#,
                "keys name, interface, defaultRoute",
            ),
            (
                r#"[{"name": "lan"}, {"name": "x", "interface": "this-name-is-too-long"}]"#,
                "1 to 15",
            ),
            (
                r#"[{"name": "lan", "interface": "eth1"}, {"name": "x"}]"#,
                "leave its interface out",
            ),
            (
                r#"[{"name": "a"}, {"name": "b", "interface": "n1"}, {"name": "c", "interface": "n1"}]"#,
                "named twice",
            ),
            (
                r#"[{"name": "a", "defaultRoute": true}, {"name": "b", "defaultRoute": true}]"#,
                "one default route",
            ),
            ("[not json", "not a list of networks"),
        ] {
            let e = parse_networks_annotation(value).unwrap_err();
            assert!(e.starts_with(NETWORKS_ANNOTATION), "{e}");
            assert!(e.contains(says), "{value}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn request_wire_format_is_tagged() {
        let r = Request::Unregister {
            network: "n".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"op":"unregister","network":"n","containerId":"c","ifname":"eth0"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    /// A DEL's `withExtras` and the answer's `detached` are left out when unused, so an older
    /// agent and an older CNI read what they always did; what an older CNI sends means "no".
    #[test]
    fn detach_with_extras_and_its_answer_on_the_wire() {
        let d = |with_extras| Request::Detach {
            network: "n".into(),
            container_id: "c".into(),
            ifname: "eth0".into(),
            with_extras,
        };
        let plain = r#"{"op":"detach","network":"n","containerId":"c","ifname":"eth0"}"#;
        assert_eq!(serde_json::to_string(&d(false)).unwrap(), plain);
        assert_eq!(serde_json::from_str::<Request>(plain).unwrap(), d(false));
        let with = serde_json::to_string(&d(true)).unwrap();
        assert!(with.ends_with(r#","withExtras":true}"#), "{with}");
        assert_eq!(serde_json::from_str::<Request>(&with).unwrap(), d(true));

        let older: Reply = serde_json::from_str(r#"{"ok":true,"ready":true}"#).unwrap();
        assert_eq!(older.detached, None);
        let answer = Reply {
            detached: Some(vec![DetachedInterface {
                network: "lan".into(),
                ifname: "net1".into(),
            }]),
            ..Reply::ok(true)
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert!(
            text.contains(r#""detached":[{"network":"lan","ifname":"net1"}]"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), answer);
        let none = serde_json::to_string(&Reply {
            detached: Some(vec![]),
            ..Reply::ok(true)
        })
        .unwrap();
        assert!(
            none.contains(r#""detached":[]"#),
            "an empty list is still an answer: {none}"
        );
    }

    #[test]
    fn call_round_trips_and_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let t = std::thread::spawn(move || {
            // First connection: answer. Second: stay silent.
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            assert!(line.contains("ping"));
            (&s).write_all(b"{\"ok\":true,\"ready\":true}\n").unwrap();
            let (s2, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(s2);
        });
        let reply = call(&sock, &Request::Ping, Duration::from_secs(2)).unwrap();
        assert_eq!(reply, Reply::ok(true));
        let err = call(&sock, &Request::Ping, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, ProtoError::Exchange { .. }), "{err:?}");
        t.join().unwrap();
        let gone = call(
            &dir.path().join("none.sock"),
            &Request::Ping,
            Duration::from_millis(50),
        );
        assert!(matches!(gone, Err(ProtoError::Connect { .. })));
    }
}
