//! Parsing the CNI environment and network configuration into a validated [`Invocation`].
//!
//! The netconf is read once from stdin into serde structs and validated once: a bad value is
//! CNI code 7 naming the field, undecodable JSON is code 6, a missing or bad `CNI_*` variable is
//! code 4. Unknown keys are ignored (the spec allows runtimes and Multus to add their own).

use crate::error::{self, CniError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use weft_dataplane::names;
use weft_dataplane::proto::{Bandwidth, PortMapping, Rate};
use weft_dataplane::vlan::VlanRange;

/// The CNI spec versions this plugin accepts and can answer in.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest supported spec version.
pub const CURRENT_VERSION: &str = "1.1.0";

/// `(major, minor, patch)` of a spec version, for ordering.
fn version_key(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

/// The version to answer in for a request whose input is `stdin`: its `cniVersion` when weft
/// supports it (even if the rest of the input is bad), else [`CURRENT_VERSION`].
///
/// Only `cniVersion` is decoded: the other keys are skipped, not built into a tree of values
/// (the configuration is decoded once, into its own types, by [`parse_conf`]). An input of
/// nothing but white space (a VERSION without input) is not parsed at all: a parse error
/// computes its position with a byte search whose first use asks the CPU for its features, and
/// under a hypervisor each `cpuid` traps to it.
pub fn reply_version(stdin: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Asked {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return CURRENT_VERSION.to_string();
    }
    serde_json::from_slice::<Asked>(stdin)
        .ok()
        .and_then(|a| a.cni_version)
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| CURRENT_VERSION.to_string())
}

/// The command exists in the spec version the configuration asks for: CHECK since 0.4.0, GC and
/// STATUS since 1.1.0; otherwise code 1 (as the reference plugins' skel answers).
pub fn require_command_in_version(command: Command, version: &str) -> Result<(), CniError> {
    let since = match command {
        Command::Check => "0.4.0",
        Command::Gc | Command::Status => "1.1.0",
        Command::Add | Command::Del | Command::Version => return Ok(()),
    };
    if version_key(version) >= version_key(since) {
        return Ok(());
    }
    Err(CniError::new(
        error::INCOMPATIBLE_VERSION,
        format!("config version does not allow {}", command.name()),
        format!(
            "cniVersion {version:?}: {} exists since CNI spec {since}; the runtime must not send it for this configuration",
            command.name()
        ),
    ))
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach.
    Add,
    /// Detach.
    Del,
    /// Verify an attachment.
    Check,
    /// Report supported versions.
    Version,
    /// Garbage-collect attachments not in the valid list.
    Gc,
    /// Is the plugin ready for ADD?
    Status,
}

impl Command {
    /// The `CNI_COMMAND` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }

    fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            other => {
                return Err(CniError::new(
                    error::INVALID_ENV,
                    "unknown CNI_COMMAND",
                    format!(
                        "CNI_COMMAND={other:?}; expected one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                    ),
                ));
            }
        })
    }
}

/// A `{containerID, ifname}` pair from `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ValidAttachment {
    /// Container id.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name.
    pub ifname: String,
}

/// Addresses requested by the runtime (`runtimeConfig.ips` or `args.cni.ips`): plain addresses or
/// CIDRs (Multus passes CIDRs; only the address part counts).
#[derive(Debug, Default, Clone, Deserialize)]
struct RuntimeConfig {
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    mac: Option<String>,
    /// Host ports (the `portMappings` capability; read from `runtimeConfig` only).
    #[serde(default, rename = "portMappings")]
    port_mappings: Vec<RawPortMapping>,
    /// Bandwidth (the `bandwidth` capability; read from `runtimeConfig` only).
    #[serde(default)]
    bandwidth: Option<RawBandwidth>,
}

/// `runtimeConfig.bandwidth` as kubelet's runtimes send it: rates in bits per second, bursts in
/// bits (`{"ingressRate": 10000000, "ingressBurst": 4294967295, ...}`); containerd's CRI
/// (go-cni's BandWidth, without JSON tags) sends the Go field names, `{"IngressRate": ...}`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBandwidth {
    #[serde(alias = "IngressRate")]
    ingress_rate: Option<i128>,
    #[serde(alias = "IngressBurst")]
    ingress_burst: Option<i128>,
    #[serde(alias = "EgressRate")]
    egress_rate: Option<i128>,
    #[serde(alias = "EgressBurst")]
    egress_burst: Option<i128>,
}

/// One `runtimeConfig.portMappings` entry as CRI-O and podman send it:
/// `{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}`. containerd's
/// CRI (go-cni) sends its Go field names, `{"HostPort": 8080, "ContainerPort": 80, ...}`, which
/// the reference plugins read because Go matches JSON keys without regard to case.
#[derive(Debug, Default, Clone, Deserialize)]
struct RawPortMapping {
    #[serde(rename = "hostPort", alias = "HostPort")]
    host_port: Option<i64>,
    #[serde(rename = "containerPort", alias = "ContainerPort")]
    container_port: Option<i64>,
    #[serde(default, alias = "Protocol")]
    protocol: Option<String>,
    #[serde(default, rename = "hostIP", alias = "HostIP")]
    host_ip: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct Args {
    #[serde(default)]
    cni: Option<RuntimeConfig>,
}

/// The raw network configuration, as the runtime sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    network: Option<String>,
    state_dir: Option<PathBuf>,
    agent_socket: Option<PathBuf>,
    log_file: Option<PathBuf>,
    log_level: Option<String>,
    default_route: Option<bool>,
    agent_timeout_ms: Option<u64>,
    #[serde(default)]
    runtime_config: Option<RuntimeConfig>,
    #[serde(default)]
    args: Option<Args>,
    prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<ValidAttachment>>,
    attachment: Option<String>,
    tap: Option<RawTap>,
    vlan_trunk: Option<Vec<RawVlanTrunk>>,
}

/// One `vlanTrunk` entry, spelled like the reference bridge plugin's (`minID`/`maxID`;
/// `minId`/`maxId` are accepted too).
#[derive(Debug, Clone, Deserialize)]
struct RawVlanTrunk {
    id: Option<i64>,
    #[serde(rename = "minID", alias = "minId")]
    min_id: Option<i64>,
    #[serde(rename = "maxID", alias = "maxId")]
    max_id: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawTap {
    queues: Option<u32>,
    owner: Option<u32>,
    group: Option<u32>,
    vnet_hdr: Option<bool>,
}

/// A VM's tap (`"attachment": "tap"`): how the VMM will open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConf {
    /// Queues (`tap.queues`, or `CNI_ARGS TAP_QUEUES`): more than one makes it multi-queue.
    pub queues: u32,
    /// The user allowed to open it (QEMU's, 107 in KubeVirt).
    pub owner: Option<u32>,
    /// The group allowed to open it.
    pub group: Option<u32>,
    /// Frames carry a virtio-net header (vhost-net).
    pub vnet_hdr: bool,
}

/// How the workload is wired to the network's bridge.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AttachmentKind {
    /// A veth pair: the workload's end gets the addresses (pods).
    #[default]
    Veth,
    /// A veth pair into the workload's namespace, joined there by a bridge to a tap the VMM
    /// opens: the guest's NIC wears the MAC and addresses (VMs).
    Tap(TapConf),
}

/// The validated network configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Conf {
    /// The spec version the runtime speaks; results are given in it.
    pub cni_version: String,
    /// The network configuration's name.
    pub name: String,
    /// The weft network to attach to.
    pub network: Option<String>,
    /// weft's state dir on the node (the node's choice, see [`NodePaths`]).
    pub state_dir: PathBuf,
    /// The agent's socket (the node's choice).
    pub agent_socket: PathBuf,
    /// Log file (the node's choice; stderr only when absent).
    pub log_file: Option<PathBuf>,
    /// Log level.
    pub log_level: tracing::Level,
    /// Whether to install default routes via the network's gateway.
    pub default_route: bool,
    /// How long to wait for the agent.
    pub agent_timeout: std::time::Duration,
    /// Requested static addresses.
    pub static_ips: Vec<IpAddr>,
    /// Requested MAC.
    pub static_mac: Option<[u8; 6]>,
    /// The previous result (CHECK, DEL).
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments that must be kept.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Veth (pods) or tap (VMs).
    pub attachment: AttachmentKind,
    /// The VM's identity given by `CNI_ARGS VM_NAME` (`namespace/name`); otherwise the agent
    /// is asked for the pod's `vm.kubevirt.io/name` label.
    pub vm: Option<String>,
    /// `vlanTrunk`: the VLANs the port carries tagged besides the network's own (a trunk port;
    /// empty: an access port). Each must be among the Network's `spec.bridge.trunkVlans`.
    pub vlan_trunk: Vec<VlanRange>,
    /// `runtimeConfig.portMappings`: the workload's host ports (on `CNI_IFNAME`).
    pub port_mappings: Vec<PortMapping>,
    /// `runtimeConfig.bandwidth`: the workload's bandwidth limits (on `CNI_IFNAME`).
    pub bandwidth: Option<weft_dataplane::proto::Bandwidth>,
}

/// Where weft keeps its node state, where the agent listens and where the plugin logs: the
/// node's choice, never the network configuration's. Whoever may write a
/// NetworkAttachmentDefinition controls the configuration Multus hands the plugin, and root
/// would otherwise create, follow symlinks to and trust files wherever it said.
///
/// The runtime's environment may set them (`WEFT_STATE_DIR`, `WEFT_AGENT_SOCKET`,
/// `WEFT_LOG_FILE`, absolute paths: the lab and tests do); otherwise they are the compiled-in
/// defaults (`/var/lib/weft`, `/run/weft/agent.sock`, no log file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePaths {
    /// weft's state dir.
    pub state_dir: PathBuf,
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// The plugin's log file, besides stderr.
    pub log_file: Option<PathBuf>,
}

impl Default for NodePaths {
    fn default() -> Self {
        NodePaths {
            state_dir: PathBuf::from(names::DEFAULT_STATE_DIR),
            agent_socket: PathBuf::from(names::DEFAULT_AGENT_SOCKET),
            log_file: None,
        }
    }
}

/// The `CNI_*` environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Env {
    /// The node's locations (from `WEFT_*` variables or the defaults).
    pub node: NodePaths,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS` as key/value pairs.
    pub args: BTreeMap<String, String>,
}

/// Everything one invocation needs.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The command.
    pub command: Command,
    /// The spec version to answer in: the configuration's (for VERSION: the one asked for when
    /// weft supports it, else the newest).
    pub cni_version: String,
    /// The environment.
    pub env: Env,
    /// The configuration (absent for VERSION).
    pub conf: Option<Conf>,
}

/// Reads the command from the environment (`CNI_COMMAND`).
pub fn command_from_env(get: &dyn Fn(&str) -> Option<String>) -> Result<Command, CniError> {
    match get("CNI_COMMAND") {
        Some(c) => Command::parse(&c),
        None => Err(CniError::new(
            error::INVALID_ENV,
            "CNI_COMMAND is not set",
            "the weft CNI plugin is run by a container runtime with CNI_COMMAND set to ADD, DEL, CHECK, VERSION, GC or STATUS",
        )),
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`).
pub fn parse_cni_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CniError::new(
                error::INVALID_ENV,
                "invalid CNI_ARGS",
                format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Reads the `CNI_*` variables and the node's `WEFT_*` locations.
pub fn env_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
    let absolute = |k: &str| -> Result<Option<PathBuf>, CniError> {
        match non_empty(k).map(PathBuf::from) {
            Some(p) if !p.is_absolute() => Err(CniError::new(
                error::INVALID_ENV,
                format!("invalid {k}"),
                format!("{k}={} is not an absolute path", p.display()),
            )),
            other => Ok(other),
        }
    };
    let defaults = NodePaths::default();
    let node = NodePaths {
        state_dir: absolute("WEFT_STATE_DIR")?.unwrap_or(defaults.state_dir),
        agent_socket: absolute("WEFT_AGENT_SOCKET")?.unwrap_or(defaults.agent_socket),
        log_file: absolute("WEFT_LOG_FILE")?,
    };
    Ok(Env {
        node,
        container_id: non_empty("CNI_CONTAINERID"),
        netns: non_empty("CNI_NETNS"),
        ifname: non_empty("CNI_IFNAME"),
        args: parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?,
    })
}

fn parse_ip_or_cidr(s: &str) -> Option<IpAddr> {
    let addr = s.split('/').next().unwrap_or(s);
    addr.parse().ok()
}

fn parse_level(s: &str) -> Option<tracing::Level> {
    match s.to_ascii_lowercase().as_str() {
        "error" => Some(tracing::Level::ERROR),
        "warn" | "warning" => Some(tracing::Level::WARN),
        "info" => Some(tracing::Level::INFO),
        "debug" => Some(tracing::Level::DEBUG),
        "trace" => Some(tracing::Level::TRACE),
        _ => None,
    }
}

fn invalid(field: &str, msg: impl std::fmt::Display) -> CniError {
    CniError::new(
        error::INVALID_CONFIG,
        format!("invalid network configuration field {field}"),
        format!("{field}: {msg}"),
    )
}

/// Decodes and validates the network configuration.
pub fn parse_conf(stdin: &[u8], env: &Env) -> Result<Conf, CniError> {
    parse(stdin, env, false)
}

/// [`parse_conf`] for a DEL: what only an ADD uses (static addresses and MAC, a tap's queues,
/// `vlanTrunk`, port mappings, bandwidth), a workload's or an attachment author's to write, is
/// ignored when it is wrong rather than failing the DEL: the ADD refused it already, and a DEL
/// that fails on it would leave the runtime unable to tear the sandbox down.
pub fn parse_conf_for_del(stdin: &[u8], env: &Env) -> Result<Conf, CniError> {
    parse(stdin, env, true)
}

/// `r`, or with `lenient` (a DEL) its default when it is an error.
fn only_for_add<T: Default>(lenient: bool, r: Result<T, CniError>) -> Result<T, CniError> {
    match r {
        Err(e) if lenient => {
            tracing::debug!(error = %e.details, "ignored in a DEL: only an ADD uses it");
            Ok(T::default())
        }
        other => other,
    }
}

fn parse(stdin: &[u8], env: &Env, lenient: bool) -> Result<Conf, CniError> {
    let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            error::DECODE,
            "cannot decode the network configuration",
            format!("stdin is not a valid CNI network configuration: {e}"),
        )
    })?;
    let cni_version = raw
        .cni_version
        .ok_or_else(|| invalid("cniVersion", "missing; set it to \"1.1.0\""))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            error::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "cniVersion {cni_version:?} is not supported; weft supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = raw
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("name", "missing; give the network configuration a name"))?;
    match raw.plugin_type.as_deref() {
        Some(names::CNI_TYPE) => {}
        Some(other) => {
            return Err(invalid(
                "type",
                format!("{other:?} given to the weft binary; set it to \"weft\""),
            ));
        }
        None => return Err(invalid("type", "missing; set it to \"weft\"")),
    }
    if let Some(problem) = raw.network.as_deref().and_then(names::network_name_problem) {
        return Err(invalid("network", problem));
    }
    let log_level = match raw.log_level.as_deref() {
        None => {
            if cfg!(debug_assertions) {
                tracing::Level::DEBUG
            } else {
                tracing::Level::WARN
            }
        }
        Some(l) => parse_level(l).ok_or_else(|| {
            invalid(
                "logLevel",
                format!("{l:?}; use error, warn, info, debug or trace"),
            )
        })?,
    };
    let (static_ips, static_mac) = only_for_add(
        lenient,
        static_addresses(raw.runtime_config.as_ref(), raw.args.as_ref(), env),
    )?;
    let attachment = match (raw.attachment.as_deref(), raw.tap) {
        (None | Some("veth"), None) => AttachmentKind::Veth,
        (None | Some("veth"), Some(_)) => {
            return Err(invalid(
                "tap",
                "only allowed with \"attachment\": \"tap\"; remove it or set the attachment",
            ));
        }
        (Some("tap"), tap) => {
            let tap = tap.unwrap_or(RawTap {
                queues: None,
                owner: None,
                group: None,
                vnet_hdr: None,
            });
            let queues = match env.args.get("TAP_QUEUES") {
                Some(q) => q.parse::<u32>().map_err(|_| {
                    CniError::new(
                        error::INVALID_ENV,
                        "invalid CNI_ARGS",
                        format!("CNI_ARGS TAP_QUEUES={q:?} is not a number"),
                    )
                }),
                None => Ok(tap.queues.unwrap_or(1)),
            }
            .and_then(|queues| {
                if (1..=256).contains(&queues) {
                    Ok(queues)
                } else {
                    Err(invalid(
                        "tap.queues",
                        format!("{queues} is out of range; use 1 to 256 (one per vCPU)"),
                    ))
                }
            });
            let queues = only_for_add(lenient, queues.map(Some))?.unwrap_or(1);
            AttachmentKind::Tap(TapConf {
                queues,
                owner: tap.owner,
                group: tap.group,
                vnet_hdr: tap.vnet_hdr.unwrap_or(true),
            })
        }
        (Some(other), _) => {
            return Err(invalid(
                "attachment",
                format!("{other:?}; use \"veth\" (pods) or \"tap\" (VMs)"),
            ));
        }
    };
    let vm = match env.args.get("VM_NAME") {
        None => None,
        Some(v) if v.contains('/') => Some(v.clone()),
        Some(v) => Some(format!(
            "{}/{v}",
            env.args
                .get("K8S_POD_NAMESPACE")
                .map_or("default", String::as_str)
        )),
    };
    let vlan_trunk = only_for_add(
        lenient,
        raw.vlan_trunk
            .as_deref()
            .map(parse_vlan_trunk)
            .transpose()
            .map(Option::unwrap_or_default),
    )?;
    let port_mappings = only_for_add(
        lenient,
        raw.runtime_config
            .as_ref()
            .map(|rc| parse_port_mappings(&rc.port_mappings))
            .transpose()
            .map(Option::unwrap_or_default),
    )?;
    let bandwidth = only_for_add(
        lenient,
        raw.runtime_config
            .as_ref()
            .and_then(|rc| rc.bandwidth.as_ref())
            .map(parse_bandwidth)
            .transpose()
            .map(Option::flatten),
    )?;
    // The node's locations; the configuration may only repeat them (conflists written by older
    // agents do).
    for (field, given, node, what) in [
        (
            "stateDir",
            &raw.state_dir,
            Some(&env.node.state_dir),
            "where weft keeps its state",
        ),
        (
            "agentSocket",
            &raw.agent_socket,
            Some(&env.node.agent_socket),
            "where the agent listens",
        ),
        (
            "logFile",
            &raw.log_file,
            env.node.log_file.as_ref(),
            "where the plugin logs",
        ),
    ] {
        if let Some(given) = given
            && Some(given) != node
        {
            return Err(invalid(
                field,
                format!(
                    "{} is not the node's ({}): the node decides {what}, not a network configuration (which a NetworkAttachmentDefinition's author controls); remove {field} from the configuration",
                    given.display(),
                    node.map_or_else(|| "none".to_string(), |p| p.display().to_string()),
                ),
            ));
        }
    }
    let timeout_ms = raw.agent_timeout_ms.unwrap_or(5000);
    if !(10..=60_000).contains(&timeout_ms) {
        return Err(invalid(
            "agentTimeoutMs",
            format!("{timeout_ms} is out of range; use 10 to 60000"),
        ));
    }
    Ok(Conf {
        cni_version,
        name,
        network: raw.network,
        state_dir: env.node.state_dir.clone(),
        agent_socket: env.node.agent_socket.clone(),
        log_file: env.node.log_file.clone(),
        log_level,
        default_route: raw.default_route.unwrap_or(true),
        agent_timeout: std::time::Duration::from_millis(timeout_ms),
        static_ips,
        static_mac,
        prev_result: raw.prev_result,
        valid_attachments: raw.valid_attachments,
        attachment,
        vm,
        vlan_trunk,
        port_mappings,
        bandwidth,
    })
}

/// The static addresses and MAC asked for (`runtimeConfig`, `args.cni`, `CNI_ARGS`), checked.
fn static_addresses(
    runtime_config: Option<&RuntimeConfig>,
    args: Option<&Args>,
    env: &Env,
) -> Result<(Vec<IpAddr>, Option<[u8; 6]>), CniError> {
    let mut static_ips = Vec::new();
    let mut static_mac = None;
    let mut take = |field: &str, rc: &RuntimeConfig| -> Result<(), CniError> {
        for ip in &rc.ips {
            let parsed = parse_ip_or_cidr(ip).ok_or_else(|| {
                invalid(
                    &format!("{field}.ips"),
                    format!("{ip:?} is not an IP address"),
                )
            })?;
            if !static_ips.contains(&parsed) {
                static_ips.push(parsed);
            }
        }
        if let Some(mac) = &rc.mac {
            static_mac = Some(names::parse_mac(mac).ok_or_else(|| {
                invalid(
                    &format!("{field}.mac"),
                    format!("{mac:?} is not a MAC address"),
                )
            })?);
        }
        Ok(())
    };
    if let Some(rc) = runtime_config {
        take("runtimeConfig", rc)?;
    }
    if let Some(rc) = args.and_then(|a| a.cni.as_ref()) {
        take("args.cni", rc)?;
    }
    if let Some(ips) = env.args.get("IP") {
        for ip in ips.split(',').filter(|s| !s.is_empty()) {
            let parsed = parse_ip_or_cidr(ip).ok_or_else(|| {
                CniError::new(
                    error::INVALID_ENV,
                    "invalid CNI_ARGS",
                    format!("CNI_ARGS IP={ip:?} is not an IP address"),
                )
            })?;
            if !static_ips.contains(&parsed) {
                static_ips.push(parsed);
            }
        }
    }
    if let Some(mac) = env.args.get("MAC") {
        static_mac = Some(names::parse_mac(mac).ok_or_else(|| {
            CniError::new(
                error::INVALID_ENV,
                "invalid CNI_ARGS",
                format!("CNI_ARGS MAC={mac:?} is not a MAC address"),
            )
        })?);
    }
    if let Some(mac) = static_mac {
        let problem = if mac[0] & 1 == 1 {
            Some("a multicast (or the broadcast) address")
        } else if mac == [0; 6] {
            Some("the all-zero address, which no interface may have")
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(invalid(
                "mac",
                format!("{} is {problem}; use a unicast MAC", names::format_mac(mac)),
            ));
        }
    }
    Ok((static_ips, static_mac))
}

/// The result of the plugins before weft in a chain (`prevResult`), checked to be a CNI
/// result and kept whole (fields weft does not model, e.g. a route's `mtu` or DNS `search`,
/// go on as they are); `None` when weft comes first.
pub fn prev_result(conf: &Conf) -> Result<Option<serde_json::Value>, CniError> {
    conf.prev_result
        .clone()
        .map(|v| {
            serde_json::from_value::<crate::reply::CniResult>(v.clone())
                .map(|_| v)
                .map_err(|e| {
                    CniError::new(
                        error::DECODE,
                        "cannot decode prevResult",
                        format!("prevResult: {e}"),
                    )
                })
        })
        .transpose()
}

/// `runtimeConfig.bandwidth`, checked: each rate 1000 to 10^15 bits per second (0 or absent:
/// no limit that way), a burst only with its rate, at most 4 GiB (the kernel counts it in 32
/// bits of bytes); a rate without a burst gets the agent's default burst. `None` when nothing
/// is limited.
fn parse_bandwidth(raw: &RawBandwidth) -> Result<Option<Bandwidth>, CniError> {
    const MAX_BURST_BITS: i128 = (u32::MAX as i128) * 8;
    let side = |dir: &str,
                rate: Option<i128>,
                burst: Option<i128>|
     -> Result<Option<Rate>, CniError> {
        let field = |name: &str| format!("runtimeConfig.bandwidth.{dir}{name}");
        let (rate, burst) = (rate.unwrap_or(0), burst.unwrap_or(0));
        if rate == 0 {
            if burst != 0 {
                return Err(invalid(
                    &field("Burst"),
                    format!("{burst} without {dir}Rate; set {dir}Rate too, or remove {dir}Burst"),
                ));
            }
            return Ok(None);
        }
        if !(1_000..=1_000_000_000_000_000).contains(&rate) {
            return Err(invalid(
                &field("Rate"),
                format!(
                    "{rate} is out of range; use 1000 to 10^15 bits per second, or 0 for no limit"
                ),
            ));
        }
        if !(0..=MAX_BURST_BITS).contains(&burst) {
            return Err(invalid(
                &field("Burst"),
                format!(
                    "{burst} is out of range; use 0 (a default burst) to {MAX_BURST_BITS} bits (4 GiB)"
                ),
            ));
        }
        Ok(Some(Rate {
            bits_per_second: rate as u64,
            burst_bits: burst as u64,
        }))
    };
    let b = Bandwidth {
        ingress: side("ingress", raw.ingress_rate, raw.ingress_burst)?,
        egress: side("egress", raw.egress_rate, raw.egress_burst)?,
    };
    Ok((b != Bandwidth::default()).then_some(b))
}

/// `runtimeConfig.portMappings`, checked: ports 1 to 65535, protocol `tcp` (the default), `udp`
/// or `sctp` in any case, `hostIP` empty or an address. Exact repeats count once; two entries
/// that claim the same host port otherwise are an error.
fn parse_port_mappings(entries: &[RawPortMapping]) -> Result<Vec<PortMapping>, CniError> {
    let mut out: Vec<PortMapping> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let field = |name: &str| format!("runtimeConfig.portMappings[{i}].{name}");
        let port = |name: &str, v: Option<i64>| -> Result<u16, CniError> {
            match v {
                Some(p) if (1..=65535).contains(&p) => Ok(p as u16),
                Some(p) => Err(invalid(
                    &field(name),
                    format!("{p} is out of range; use 1 to 65535"),
                )),
                None => Err(invalid(
                    &field(name),
                    "missing; give a port from 1 to 65535",
                )),
            }
        };
        let host_port = port("hostPort", e.host_port)?;
        let container_port = port("containerPort", e.container_port)?;
        let protocol = match e
            .protocol
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("") | Some("tcp") => "tcp",
            Some("udp") => "udp",
            Some("sctp") => "sctp",
            Some(other) => {
                return Err(invalid(
                    &field("protocol"),
                    format!("{other:?}; use tcp, udp or sctp"),
                ));
            }
        };
        let host_ip =
            match e.host_ip.as_deref() {
                None | Some("") => None,
                Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| {
                    invalid(&field("hostIP"), format!("{ip:?} is not an IP address"))
                })?),
            };
        let m = PortMapping {
            host_port,
            container_port,
            protocol: protocol.to_string(),
            host_ip,
        };
        if out.contains(&m) {
            continue;
        }
        if let Some(other) = out.iter().find(|o| o.clashes(&m)) {
            return Err(invalid(
                &field("hostPort"),
                format!(
                    "{m} is asked for twice (to container ports {} and {})",
                    other.container_port, m.container_port
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// `vlanTrunk` as ranges: each entry one `id`, or `minID` and `maxID`, 1 to 4094.
fn parse_vlan_trunk(entries: &[RawVlanTrunk]) -> Result<Vec<VlanRange>, CniError> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let field = format!("vlanTrunk[{i}]");
        let (lo, hi) = match (e.id, e.min_id, e.max_id) {
            (Some(id), None, None) => (id, id),
            (None, Some(lo), Some(hi)) => (lo, hi),
            _ => {
                return Err(invalid(
                    &field,
                    "give either \"id\" (one VLAN) or \"minID\" and \"maxID\" (a range), e.g. {\"id\": 20} or {\"minID\": 100, \"maxID\": 110}",
                ));
            }
        };
        let vid = |v: i64| u16::try_from(v).ok().filter(|v| (1..=4094).contains(v));
        let (Some(min), Some(max)) = (vid(lo), vid(hi)) else {
            return Err(invalid(
                &field,
                format!(
                    "{} is not a VLAN ID; use 1 to 4094",
                    if vid(lo).is_none() { lo } else { hi }
                ),
            ));
        };
        if min > max {
            return Err(invalid(
                &field,
                format!("minID {min} is greater than maxID {max}; swap them"),
            ));
        }
        out.push(VlanRange { min, max });
    }
    Ok(out)
}

impl Conf {
    /// The weft network, or code 7 naming the field.
    pub fn require_network(&self) -> Result<&str, CniError> {
        self.network.as_deref().ok_or_else(|| {
            invalid(
                "network",
                "missing; name the weft Network to attach to (e.g. \"network\": \"nat-demo\")",
            )
        })
    }
}

impl Env {
    /// A required variable, or code 4 naming it.
    pub fn require<'a>(&self, name: &str, value: &'a Option<String>) -> Result<&'a str, CniError> {
        value.as_deref().ok_or_else(|| {
            CniError::new(
                error::INVALID_ENV,
                format!("{name} is not set"),
                format!("{name} is required for this command; the container runtime sets it"),
            )
        })
    }

    /// `CNI_CONTAINERID`, validated.
    pub fn container_id(&self) -> Result<&str, CniError> {
        let id = self.require("CNI_CONTAINERID", &self.container_id)?;
        if !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        {
            return Err(CniError::new(
                error::INVALID_ENV,
                "invalid CNI_CONTAINERID",
                format!(
                    "CNI_CONTAINERID {id:?} may only contain letters, digits, '_', '.' and '-'"
                ),
            ));
        }
        Ok(id)
    }

    /// `CNI_IFNAME`, validated as a Linux interface name.
    pub fn ifname(&self) -> Result<&str, CniError> {
        let name = self.require("CNI_IFNAME", &self.ifname)?;
        if !names::is_valid_ifname(name) {
            return Err(CniError::new(
                error::INVALID_ENV,
                "invalid CNI_IFNAME",
                format!(
                    "CNI_IFNAME {name:?} is not a valid interface name (1-15 bytes, no '/', ':' or spaces)"
                ),
            ));
        }
        Ok(name)
    }

    /// `CNI_NETNS`.
    pub fn netns(&self) -> Result<&str, CniError> {
        self.require("CNI_NETNS", &self.netns)
    }

    /// The Kubernetes namespace and name of the pod, from kubelet's `CNI_ARGS`.
    pub fn pod(&self) -> (Option<String>, Option<String>) {
        (
            self.args.get("K8S_POD_NAMESPACE").cloned(),
            self.args.get("K8S_POD_NAME").cloned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env {
            container_id: Some("c1".into()),
            netns: Some("/run/netns/x".into()),
            ifname: Some("eth0".into()),
            args: BTreeMap::new(),
            node: NodePaths::default(),
        }
    }

    #[test]
    fn parses_every_supported_version() {
        for v in SUPPORTED_VERSIONS {
            let c = parse_conf(
                format!(r#"{{"cniVersion":"{v}","name":"n","type":"weft","network":"nat-demo"}}"#)
                    .as_bytes(),
                &env(),
            )
            .unwrap();
            assert_eq!(c.cni_version, *v);
            assert_eq!(c.network.as_deref(), Some("nat-demo"));
            assert!(c.default_route);
        }
    }

    #[test]
    fn commands_newer_than_the_configuration_s_version_are_code_1() {
        for (command, version, ok) in [
            (Command::Gc, "1.1.0", true),
            (Command::Status, "1.1.0", true),
            (Command::Gc, "1.0.0", false),
            (Command::Status, "1.0.0", false),
            (Command::Status, "0.4.0", false),
            (Command::Check, "0.4.0", true),
            (Command::Check, "1.0.0", true),
            (Command::Check, "0.3.1", false),
            (Command::Add, "0.3.0", true),
            (Command::Del, "0.3.0", true),
        ] {
            let r = require_command_in_version(command, version);
            assert_eq!(r.is_ok(), ok, "{command:?} {version}");
            if let Err(e) = r {
                assert_eq!(e.code, error::INCOMPATIBLE_VERSION);
                assert!(e.details.contains(version), "{}", e.details);
            }
        }
    }

    #[test]
    fn replies_use_the_asked_version_when_supported() {
        assert_eq!(reply_version(br#"{"cniVersion":"1.0.0"}"#), "1.0.0");
        assert_eq!(
            reply_version(br#"{"cniVersion":"0.4.0","x":"#),
            CURRENT_VERSION
        );
        assert_eq!(
            reply_version(br#"{"cniVersion":"0.4.0","name":7}"#),
            "0.4.0",
            "a configuration that fails later still gets its own version"
        );
        assert_eq!(reply_version(br#"{"cniVersion":"9.9.9"}"#), CURRENT_VERSION);
        assert_eq!(reply_version(b""), CURRENT_VERSION);
        assert_eq!(reply_version(b" \n\t"), CURRENT_VERSION);
        assert_eq!(
            reply_version(
                br#"{"name":"n","plugins":[{"type":"weft","x":{"y":[1,2]}}],"cniVersion":"0.3.1"}"#
            ),
            "0.3.1",
            "the version is found wherever it is, past nested values"
        );
        assert_eq!(reply_version(br#"{"cniVersion":7}"#), CURRENT_VERSION);
        assert_eq!(reply_version(br#"["cniVersion","1.0.0"]"#), CURRENT_VERSION);
    }

    #[test]
    fn state_socket_and_log_locations_come_from_the_node_not_the_configuration() {
        let base = r#""cniVersion":"1.0.0","name":"n","type":"weft","network":"lan""#;
        let mut e = env();
        e.node.log_file = Some("/var/log/weft-cni.log".into());
        for (field, value) in [
            ("stateDir", "/tmp/fake-store"),
            ("agentSocket", "/tmp/fake.sock"),
            ("logFile", "/etc/passwd"),
        ] {
            let err = parse_conf(format!(r#"{{{base},"{field}":"{value}"}}"#).as_bytes(), &e)
                .unwrap_err();
            assert_eq!(err.code, error::INVALID_CONFIG, "{field}");
            assert!(
                err.details.starts_with(&format!("{field}:")),
                "{}",
                err.details
            );
            assert!(err.details.contains("remove"), "{}", err.details);
        }
        // Repeating the node's own locations is fine (conflists of older agents do).
        let c = parse_conf(
            format!(
                r#"{{{base},"stateDir":"/var/lib/weft","agentSocket":"/run/weft/agent.sock","logFile":"/var/log/weft-cni.log"}}"#
            )
            .as_bytes(),
            &e,
        )
        .unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/weft"));
        // Without a node log file, any logFile is refused.
        let err = parse_conf(
            format!(r#"{{{base},"logFile":"/var/log/weft-cni.log"}}"#).as_bytes(),
            &env(),
        )
        .unwrap_err();
        assert!(err.details.starts_with("logFile:"), "{}", err.details);
        // The node's locations come from WEFT_* variables, absolute only.
        let vars = |k: &str| match k {
            "WEFT_STATE_DIR" => Some("/srv/weft".to_string()),
            "WEFT_LOG_FILE" => Some("/var/log/w.log".to_string()),
            _ => None,
        };
        let node = env_from(&vars).unwrap().node;
        assert_eq!(node.state_dir, PathBuf::from("/srv/weft"));
        assert_eq!(
            node.agent_socket,
            PathBuf::from(names::DEFAULT_AGENT_SOCKET)
        );
        assert_eq!(node.log_file, Some(PathBuf::from("/var/log/w.log")));
        let relative =
            env_from(&|k: &str| (k == "WEFT_STATE_DIR").then(|| "state".to_string())).unwrap_err();
        assert_eq!(relative.code, error::INVALID_ENV);
        assert!(relative.details.contains("WEFT_STATE_DIR"));
    }

    #[test]
    fn bad_json_is_code_6() {
        let e = parse_conf(b"{", &env()).unwrap_err();
        assert_eq!(e.code, 6);
    }

    #[test]
    fn unsupported_version_is_code_1() {
        let e = parse_conf(
            br#"{"cniVersion":"9.9.9","name":"n","type":"weft"}"#,
            &env(),
        )
        .unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("1.1.0"));
    }

    #[test]
    fn wrong_type_and_bad_fields_are_code_7_naming_the_field() {
        let e = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"bridge"}"#,
            &env(),
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.details.starts_with("type:"), "{}", e.details);
        for bad in [
            "Bad_Name",
            "..",
            "../../victim",
            "a.",
            "-a",
            "a\\\",\\\"eth0",
        ] {
            let e = parse_conf(
                format!(r#"{{"cniVersion":"1.1.0","name":"n","type":"weft","network":"{bad}"}}"#)
                    .as_bytes(),
                &env(),
            )
            .unwrap_err();
            assert_eq!(e.code, error::INVALID_CONFIG, "{bad}");
            assert!(e.details.starts_with("network:"), "{}", e.details);
        }
        let e = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"weft","runtimeConfig":{"ips":["nope"]}}"#,
            &env(),
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.details.starts_with("runtimeConfig.ips:"), "{}", e.details);
        let e = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"weft","logLevel":"loud"}"#,
            &env(),
        )
        .unwrap_err();
        assert!(e.details.starts_with("logLevel:"), "{}", e.details);
    }

    #[test]
    fn static_ips_and_mac_come_from_runtime_config_and_cni_args() {
        let mut e = env();
        e.args = parse_cni_args("IgnoreUnknown=1;IP=10.0.0.9;MAC=0a:58:0a:00:00:09").unwrap();
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"weft","runtimeConfig":{"ips":["fd00::9/64"],"mac":"02:00:00:00:00:01"}}"#,
            &e,
        )
        .unwrap();
        assert_eq!(
            c.static_ips,
            vec![
                "fd00::9".parse::<IpAddr>().unwrap(),
                "10.0.0.9".parse().unwrap()
            ]
        );
        // CNI_ARGS MAC wins over runtimeConfig (it is the more specific request).
        assert_eq!(
            names::format_mac(c.static_mac.unwrap()),
            "0a:58:0a:00:00:09"
        );
    }

    #[test]
    fn bandwidth_comes_from_runtime_config_checked() {
        let parse = |bw: &str| {
            parse_conf(
                format!(
                    r#"{{"cniVersion":"1.1.0","name":"n","type":"weft","runtimeConfig":{{"bandwidth":{bw}}}}}"#
                )
                .as_bytes(),
                &env(),
            )
        };
        // containerd sends the annotation's rate and a burst of 2^32 - 1 bits.
        let c = parse(r#"{"ingressRate":10000000,"ingressBurst":4294967295}"#).unwrap();
        assert_eq!(
            c.bandwidth,
            Some(Bandwidth {
                ingress: Some(Rate {
                    bits_per_second: 10_000_000,
                    burst_bits: 4_294_967_295
                }),
                egress: None
            })
        );
        // containerd's CRI writes go-cni's field names (no JSON tags on its BandWidth).
        let c = parse(r#"{"IngressRate":10000000,"IngressBurst":4294967295,"EgressRate":2000000,"EgressBurst":0}"#)
            .unwrap();
        let bw = c.bandwidth.unwrap();
        assert_eq!(bw.ingress.unwrap().bits_per_second, 10_000_000);
        assert_eq!(bw.egress.unwrap().bits_per_second, 2_000_000);
        let c = parse(r#"{"egressRate":5000}"#).unwrap();
        assert_eq!(c.bandwidth.unwrap().egress.unwrap().burst_bits, 0);
        assert_eq!(
            parse(r#"{"ingressRate":0,"egressRate":0}"#)
                .unwrap()
                .bandwidth,
            None
        );
        for (bw, field) in [
            (r#"{"ingressBurst":1000}"#, "ingressBurst"),
            (r#"{"egressRate":999}"#, "egressRate"),
            (r#"{"egressRate":-5}"#, "egressRate"),
            (
                r#"{"ingressRate":1000000,"ingressBurst":99999999999999}"#,
                "ingressBurst",
            ),
        ] {
            let e = parse(bw).unwrap_err();
            assert_eq!(e.code, 7, "{bw}");
            assert!(
                e.details
                    .starts_with(&format!("runtimeConfig.bandwidth.{field}:")),
                "{bw}: {}",
                e.details
            );
        }
    }

    #[test]
    fn port_mappings_come_from_runtime_config_checked_and_once_each() {
        let parse = |pm: &str| {
            parse_conf(
                format!(
                    r#"{{"cniVersion":"1.1.0","name":"n","type":"weft","runtimeConfig":{{"portMappings":{pm}}}}}"#
                )
                .as_bytes(),
                &env(),
            )
        };
        let c = parse(
            r#"[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""},
                {"hostPort":8080,"containerPort":80,"protocol":"TCP","hostIP":""},
                {"hostPort":5353,"containerPort":53,"protocol":"udp","hostIP":"192.0.2.1"},
                {"hostPort":9000,"containerPort":9000}]"#,
        )
        .unwrap();
        assert_eq!(
            c.port_mappings,
            [
                PortMapping {
                    host_port: 8080,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: None
                },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: "udp".into(),
                    host_ip: Some("192.0.2.1".parse().unwrap())
                },
                PortMapping {
                    host_port: 9000,
                    container_port: 9000,
                    protocol: "tcp".into(),
                    host_ip: None
                },
            ]
        );
        for (bad, field) in [
            (r#"[{"hostPort":0,"containerPort":80}]"#, "[0].hostPort"),
            (
                r#"[{"hostPort":80,"containerPort":70000}]"#,
                "[0].containerPort",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80,"protocol":"icmp"}]"#,
                "[0].protocol",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80,"hostIP":"nope"}]"#,
                "[0].hostIP",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80},{"hostPort":80,"containerPort":81}]"#,
                "[1].hostPort",
            ),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, error::INVALID_CONFIG);
            assert!(
                e.details
                    .starts_with(&format!("runtimeConfig.portMappings{field}:")),
                "{bad}: {}",
                e.details
            );
        }
        assert!(parse("[]").unwrap().port_mappings.is_empty());
    }

    #[test]
    fn port_mappings_from_containerd_carry_go_field_names() {
        // What containerd's CRI passes for a pod's `hostPort` (go-cni's PortMapping has no
        // JSON tags).
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"weft","runtimeConfig":{"portMappings":[
                {"HostPort":8091,"ContainerPort":80,"Protocol":"tcp","HostIP":""},
                {"HostPort":5353,"ContainerPort":53,"Protocol":"udp","HostIP":"192.0.2.1"}]}}"#,
            &env(),
        )
        .unwrap();
        assert_eq!(
            c.port_mappings,
            [
                PortMapping {
                    host_port: 8091,
                    container_port: 80,
                    protocol: "tcp".into(),
                    host_ip: None
                },
                PortMapping {
                    host_port: 5353,
                    container_port: 53,
                    protocol: "udp".into(),
                    host_ip: Some("192.0.2.1".parse().unwrap())
                },
            ]
        );
    }

    #[test]
    fn tap_attachments_take_queues_from_the_conf_or_cni_args() {
        let conf = |j: &str, args: &[(&str, &str)]| {
            let mut e = env();
            for (k, v) in args {
                e.args.insert(k.to_string(), v.to_string());
            }
            parse_conf(j.as_bytes(), &e)
        };
        let base = r#"{"cniVersion":"1.0.0","name":"n","type":"weft","network":"lan""#;
        let c = conf(&format!("{base}}}"), &[]).unwrap();
        assert_eq!(c.attachment, AttachmentKind::Veth);
        let c = conf(
            &format!(r#"{base},"attachment":"tap","tap":{{"queues":4,"owner":107,"group":107}}}}"#),
            &[("VM_NAME", "vm-a"), ("K8S_POD_NAMESPACE", "prod")],
        )
        .unwrap();
        assert_eq!(
            c.attachment,
            AttachmentKind::Tap(TapConf {
                queues: 4,
                owner: Some(107),
                group: Some(107),
                vnet_hdr: true
            })
        );
        assert_eq!(c.vm.as_deref(), Some("prod/vm-a"));
        let c = conf(
            &format!(r#"{base},"attachment":"tap"}}"#),
            &[("TAP_QUEUES", "8")],
        )
        .unwrap();
        assert!(matches!(
            c.attachment,
            AttachmentKind::Tap(TapConf { queues: 8, .. })
        ));
        for (bad, field) in [
            (format!(r#"{base},"attachment":"macvtap"}}"#), "attachment"),
            (format!(r#"{base},"tap":{{"queues":2}}}}"#), "tap"),
            (
                format!(r#"{base},"attachment":"tap","tap":{{"queues":0}}}}"#),
                "tap.queues",
            ),
        ] {
            let e = conf(&bad, &[]).unwrap_err();
            assert_eq!(e.code, error::INVALID_CONFIG, "{bad}");
            assert!(
                e.msg.contains(field) || e.details.contains(field),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn vlan_trunks_take_the_reference_plugins_spelling_and_are_range_checked() {
        let parse = |trunk: &str| {
            parse_conf(
                format!(
                    r#"{{"cniVersion":"1.0.0","name":"lan","type":"weft","network":"lan","vlanTrunk":{trunk}}}"#
                )
                .as_bytes(),
                &env(),
            )
        };
        let conf = parse(r#"[{"id": 20}, {"minID": 100, "maxID": 110}, {"minId": 7, "maxId": 7}]"#)
            .unwrap();
        assert_eq!(
            conf.vlan_trunk,
            [
                VlanRange { min: 20, max: 20 },
                VlanRange { min: 100, max: 110 },
                VlanRange { min: 7, max: 7 }
            ]
        );
        for (bad, needle) in [
            (r#"[{"id": 0}]"#, "0 is not a VLAN ID"),
            (r#"[{"id": 4095}]"#, "4095 is not a VLAN ID"),
            (
                r#"[{"minID": 100, "maxID": 5000}]"#,
                "5000 is not a VLAN ID",
            ),
            (r#"[{"id": 20}, {"minID": 110, "maxID": 100}]"#, "swap them"),
            (r#"[{"minID": 100}]"#, "either \"id\""),
            (r#"[{"id": 5, "maxID": 6}]"#, "either \"id\""),
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, error::INVALID_CONFIG, "{bad}");
            assert!(
                e.details.starts_with("vlanTrunk[") && e.details.contains(needle),
                "{bad}: {}",
                e.details
            );
        }
        assert!(
            parse("[]").unwrap().vlan_trunk.is_empty(),
            "an empty trunk is an access port"
        );
    }

    #[test]
    fn env_errors_are_code_4_naming_the_variable() {
        assert_eq!(parse_cni_args("novalue").unwrap_err().code, 4);
        let mut e = env();
        e.ifname = Some("this-name-is-too-long".into());
        let err = e.ifname().unwrap_err();
        assert_eq!(err.code, 4);
        assert!(err.details.contains("CNI_IFNAME"));
        e.container_id = None;
        assert!(
            e.container_id()
                .unwrap_err()
                .msg
                .contains("CNI_CONTAINERID")
        );
        let cmd = command_from_env(&|_| Some("FROB".into())).unwrap_err();
        assert_eq!(cmd.code, 4);
    }

    #[test]
    fn valid_attachments_are_read_for_gc() {
        let c = parse_conf(
            br#"{"cniVersion":"1.1.0","name":"n","type":"weft","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
            &env(),
        )
        .unwrap();
        assert_eq!(
            c.valid_attachments.unwrap(),
            vec![ValidAttachment {
                container_id: "a".into(),
                ifname: "eth0".into()
            }]
        );
    }
}
