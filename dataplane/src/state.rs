//! The runtime state files the agent writes and the CNI binary reads.
//!
//! Layout under the state dir (default `/var/lib/weft`):
//! - `node.json`: the agent's readiness ([`NodeState`]); STATUS answers 50 while it is missing.
//! - `networks/<name>.json`: what the CNI needs to attach a workload to one network
//!   ([`NetworkState`]).
//! - `ipam/<name>/`: the IPAM store (see [`crate::ipam`]).
//!
//! Every file is written atomically (temp file, fsync, rename), so a reader never sees half a file.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// Errors reading or writing state files.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A state file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A state file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A network name that is not a DNS-1123 subdomain (it would name a file elsewhere).
    #[error("{problem}")]
    InvalidNetwork {
        /// What is wrong with it.
        problem: String,
    },
    /// A state file holds something that is not valid state.
    #[error("{path} is corrupt; remove it and let the agent rewrite it")]
    Decode {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    /// True when the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StateError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// The mode of a network, as the CNI sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// Private subnet behind the node, masqueraded egress.
    #[serde(rename = "NAT")]
    Nat,
    /// Bridged onto the node's uplink.
    Bridge,
}

/// What the CNI binary needs to attach a workload to one network on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkState {
    /// The Network's name.
    pub name: String,
    /// NAT or Bridge.
    pub mode: NetworkMode,
    /// The Linux bridge workloads attach to.
    pub bridge: String,
    /// MTU of workload interfaces.
    pub mtu: u32,
    /// The network's IPv4 subnet (workload addresses carry its prefix length).
    pub subnet_v4: Option<Ipv4Net>,
    /// The network's IPv6 subnet.
    pub subnet_v6: Option<Ipv6Net>,
    /// IPv4 gateway (on the bridge).
    pub gateway_v4: Option<Ipv4Addr>,
    /// IPv6 gateway (on the bridge).
    pub gateway_v6: Option<Ipv6Addr>,
    /// This node's IPv4 block: workloads on this node get addresses from it.
    pub block_v4: Option<Ipv4Net>,
    /// This node's IPv6 block.
    pub block_v6: Option<Ipv6Net>,
    /// Addresses never handed out.
    #[serde(default)]
    pub exclude: Vec<IpNet>,
    /// Whether anti-spoofing is on for this network's ports.
    #[serde(default = "yes")]
    pub anti_spoofing: bool,
    /// `spec.bridge.vlanFiltering`: the bridge filters VLANs; workload ports are access ports
    /// on the network's own VLAN and may be trunks of its trunk VLANs. `None`: no filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan_filtering: Option<crate::vlan::VlanFiltering>,
}

fn yes() -> bool {
    true
}

impl NetworkState {
    /// The IPAM pool of the network on this node: its blocks, subnets, gateways and excluded
    /// ranges.
    pub fn pool(&self) -> crate::ipam::Pool {
        let mut gateways = Vec::new();
        if let Some(g) = self.gateway_v4 {
            gateways.push(std::net::IpAddr::V4(g));
        }
        if let Some(g) = self.gateway_v6 {
            gateways.push(std::net::IpAddr::V6(g));
        }
        crate::ipam::Pool {
            block_v4: self.block_v4,
            block_v6: self.block_v6,
            subnet_v4: self.subnet_v4,
            subnet_v6: self.subnet_v6,
            gateways,
            exclude: self.exclude.clone(),
        }
    }

    /// Path of a network's state file.
    pub fn path(state_dir: &Path, network: &str) -> PathBuf {
        state_dir.join("networks").join(format!("{network}.json"))
    }

    /// Reads the state of `network`.
    pub fn read(state_dir: &Path, network: &str) -> Result<Self, StateError> {
        check_network(network)?;
        read_json(&Self::path(state_dir, network))
    }

    /// Writes it atomically.
    pub fn write(&self, state_dir: &Path) -> Result<(), StateError> {
        check_network(&self.name)?;
        write_json(&Self::path(state_dir, &self.name), self)
    }

    /// The networks whose state files exist.
    pub fn list(state_dir: &Path) -> Result<Vec<String>, StateError> {
        let dir = state_dir.join("networks");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateError::Read { path: dir, source }),
        };
        let mut names = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_suffix(".json") {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

fn check_network(network: &str) -> Result<(), StateError> {
    match crate::names::network_name_problem(network) {
        Some(problem) => Err(StateError::InvalidNetwork { problem }),
        None => Ok(()),
    }
}

/// The agent's readiness on this node; the CNI's STATUS reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    /// The node's name.
    pub node: String,
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// The agent has reconciled the node at least once since it started.
    pub ready: bool,
    /// Unix time of the last successful reconcile.
    pub reconciled_at: u64,
    /// The agent's version.
    pub version: String,
}

impl NodeState {
    /// Path of the node state file.
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("node.json")
    }
    /// Reads it.
    pub fn read(state_dir: &Path) -> Result<Self, StateError> {
        read_json(&Self::path(state_dir))
    }
    /// Writes it atomically.
    pub fn write(&self, state_dir: &Path) -> Result<(), StateError> {
        write_json(&Self::path(state_dir), self)
    }
}

/// Reads and decodes a JSON file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    let bytes = std::fs::read(path).map_err(|source| StateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| StateError::Decode {
        path: path.to_path_buf(),
        source,
    })
}

/// Encodes and writes a JSON file atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_atomic(path, &bytes)
}

/// Encodes and writes an informational JSON file (a status report): atomically replaced, but not
/// synced to disk, so it costs no fsync on a hot path.
pub fn write_json_unsynced<T: Serialize>(path: &Path, value: &T) -> Result<(), StateError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| StateError::Write {
        path: path.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    write_file(path, &bytes, false)
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, fsync, rename, and
/// fsync of the directory. Returns without touching the file when the content is unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    write_file(path, bytes, true)
}

fn write_file(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Ok(existing) = std::fs::read(path)
        && existing == bytes
    {
        return Ok(());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable && let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
}

/// Removes a file; a missing file is fine. Returns whether it existed.
pub fn remove_file(path: &Path) -> Result<bool, StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StateError::Write {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NetworkState {
        NetworkState {
            name: "nat-demo".into(),
            mode: NetworkMode::Nat,
            bridge: "wn-nat-demo".into(),
            mtu: 1500,
            subnet_v4: Some("10.10.0.0/16".parse().unwrap()),
            subnet_v6: Some("fd10::/64".parse().unwrap()),
            gateway_v4: Some("10.10.0.1".parse().unwrap()),
            gateway_v6: Some("fd10::1".parse().unwrap()),
            block_v4: Some("10.10.0.0/26".parse().unwrap()),
            block_v6: Some("fd10::/122".parse().unwrap()),
            exclude: vec![],
            anti_spoofing: true,
            vlan_filtering: None,
        }
    }

    #[test]
    fn network_state_round_trips_and_lists() {
        let dir = tempfile::tempdir().unwrap();
        let s = sample();
        s.write(dir.path()).unwrap();
        assert_eq!(NetworkState::read(dir.path(), "nat-demo").unwrap(), s);
        assert_eq!(NetworkState::list(dir.path()).unwrap(), vec!["nat-demo"]);
        let missing = NetworkState::read(dir.path(), "other").unwrap_err();
        assert!(missing.is_not_found());
    }

    #[test]
    fn a_network_name_that_is_not_dns_1123_names_no_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut s = sample();
        for bad in ["../../victim", "a\",\"eth0", "Nat", ".."] {
            s.name = bad.to_string();
            assert!(
                matches!(s.write(&state), Err(StateError::InvalidNetwork { .. })),
                "{bad}"
            );
            assert!(matches!(
                NetworkState::read(&state, bad),
                Err(StateError::InvalidNetwork { .. })
            ));
        }
        assert!(!dir.path().join("victim.json").exists());
        assert!(!state.exists(), "nothing was written");
    }

    #[test]
    fn corrupt_state_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = NetworkState::path(dir.path(), "x");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"{not json").unwrap();
        let e = NetworkState::read(dir.path(), "x").unwrap_err();
        assert!(e.to_string().contains("x.json"), "{e}");
        assert!(!e.is_not_found());
    }
}
