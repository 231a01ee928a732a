//! Installing the `weft` CNI binary and the conflist on the node.

use serde_json::json;
use std::path::{Path, PathBuf};
use weft_dataplane::names;
use weft_dataplane::state::{self, StateError};

/// The conflist's `cniVersion`: the newest version every libcni in use understands.
pub const CONFLIST_VERSION: &str = "1.0.0";
/// The conflist's `cniVersions` (read by libcni 1.2 and later, which picks the newest it knows).
pub const CONFLIST_VERSIONS: &[&str] = &["1.0.0", "1.1.0"];

/// The annotation that marks a Network as the default of the conflist (`"true"`).
pub const DEFAULT_NETWORK_ANNOTATION: &str = "weft.dev/default-network";

/// The Network the conflist names, and why (the NodeNetwork's `DefaultNetwork` condition).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DefaultNetwork {
    /// The Network (`None`: no Network is realized on the node).
    pub name: Option<String>,
    /// Why: `Flag`, `Annotated`, `Only`, `FirstNAT`, `First` or `NoNetwork`.
    pub reason: &'static str,
    /// The same for people, with how to choose another.
    pub message: String,
}

/// Chooses the conflist's default Network among those realized on the node (`realized`), the
/// same way on every node and every reconcile:
/// 1. `--default-network` (`flag`), realized here or not (ADD then answers "try again later");
/// 2. else the Network annotated `weft.dev/default-network: "true"` (alphabetically first if
///    several are);
/// 3. else the only Network realized on the node;
/// 4. else the alphabetically first NAT Network, else the alphabetically first Network.
pub fn choose_default_network(
    flag: Option<&str>,
    realized: &[String],
    networks: &[weft_crds::Network],
) -> DefaultNetwork {
    let how = format!(
        "set --default-network (chart value agent.defaultNetwork) or annotate one Network {DEFAULT_NETWORK_ANNOTATION}: \"true\" to choose another"
    );
    if let Some(f) = flag {
        let here = if realized.iter().any(|n| n == f) {
            String::new()
        } else {
            " (not realized on this node yet: ADD answers \"try again later\" until it is)"
                .to_string()
        };
        return DefaultNetwork {
            name: Some(f.to_string()),
            reason: "Flag",
            message: format!("{f}, set by --default-network{here}"),
        };
    }
    let mut names: Vec<&String> = realized.iter().collect();
    names.sort();
    names.dedup();
    let spec = |n: &str| {
        networks
            .iter()
            .find(|net| net.metadata.name.as_deref() == Some(n))
    };
    let marked: Vec<&String> = names
        .iter()
        .copied()
        .filter(|n| {
            spec(n).is_some_and(|net| {
                net.metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(DEFAULT_NETWORK_ANNOTATION))
                    .is_some_and(|v| v == "true")
            })
        })
        .collect();
    if let Some(first) = marked.first() {
        let others = if marked.len() > 1 {
            format!(
                "; also annotated, ignored: {}",
                marked[1..]
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        };
        return DefaultNetwork {
            name: Some(first.to_string()),
            reason: "Annotated",
            message: format!("{first}, annotated {DEFAULT_NETWORK_ANNOTATION}{others}"),
        };
    }
    match names.as_slice() {
        [] => DefaultNetwork {
            name: None,
            reason: "NoNetwork",
            message: format!(
                "no Network is realized on this node: pods without the weft.dev/networks annotation cannot be attached; {how}"
            ),
        },
        [only] => DefaultNetwork {
            name: Some(only.to_string()),
            reason: "Only",
            message: format!("{only}, the only Network realized on this node"),
        },
        several => {
            let nat = several
                .iter()
                .find(|n| spec(n).is_some_and(|net| net.spec.mode == weft_crds::NetworkMode::Nat));
            let all = several
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            match nat {
                Some(n) => DefaultNetwork {
                    name: Some(n.to_string()),
                    reason: "FirstNAT",
                    message: format!(
                        "{n}, the alphabetically first NAT Network of those realized here ({all}); {how}"
                    ),
                },
                None => DefaultNetwork {
                    name: Some(several[0].to_string()),
                    reason: "First",
                    message: format!(
                        "{}, the alphabetically first of the Networks realized here ({all}); {how}",
                        several[0]
                    ),
                },
            }
        }
    }
}

/// Where the CNI pieces go.
#[derive(Debug, Clone)]
pub struct CniInstall {
    /// The CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The `weft` binary to install.
    pub binary: PathBuf,
    /// weft's state dir. The plugin does not learn it from the conflist: it reads
    /// `WEFT_STATE_DIR` from the runtime's environment, else `/var/lib/weft`.
    pub state_dir: PathBuf,
    /// The agent socket (the plugin: `WEFT_AGENT_SOCKET`, else `/run/weft/agent.sock`).
    pub socket: PathBuf,
}

impl CniInstall {
    /// Path of the conflist.
    pub fn conflist_path(&self) -> PathBuf {
        self.conf_dir.join(names::CONFLIST_NAME)
    }

    /// The conflist text for the given default network.
    pub fn conflist(&self, network: Option<&str>) -> String {
        // No stateDir, agentSocket or logFile: the plugin takes them from the node (the
        // runtime's WEFT_* environment, else its compiled-in defaults), never from a
        // configuration.
        let mut plugin = json!({
            "type": names::CNI_TYPE,
            "capabilities": {"ips": true, "mac": true, "portMappings": true, "bandwidth": true},
        });
        if let Some(n) = network {
            plugin["network"] = json!(n);
        }
        // libcni before 1.2 (containerd 1.6/1.7, podman 4) knows results up to 1.0.0 and rejects
        // the whole list otherwise; libcni 1.2+ picks the newest of `cniVersions` it knows, so
        // it still gets GC and STATUS (1.1.0).
        let conf = json!({
            "cniVersion": CONFLIST_VERSION,
            "cniVersions": CONFLIST_VERSIONS,
            "name": "weft",
            "plugins": [plugin],
        });
        serde_json::to_string_pretty(&conf).unwrap_or_default() + "\n"
    }

    /// Copies the binary (atomically, only when it differs) and writes the conflist.
    /// Returns whether anything changed.
    pub fn install(&self, network: Option<&str>) -> Result<bool, StateError> {
        let mut changed = false;
        let target = self.bin_dir.join(names::CNI_TYPE);
        let bytes = std::fs::read(&self.binary).map_err(|source| StateError::Read {
            path: self.binary.clone(),
            source,
        })?;
        if std::fs::read(&target).ok().as_deref() != Some(bytes.as_slice()) {
            state::write_atomic(&target, &bytes)?;
            set_executable(&target)?;
            changed = true;
        }
        let conflist = self.conflist(network);
        let path = self.conflist_path();
        if std::fs::read_to_string(&path).ok().as_deref() != Some(conflist.as_str()) {
            state::write_atomic(&path, conflist.as_bytes())?;
            changed = true;
        }
        Ok(changed)
    }

    /// Removes the conflist and the binary (uninstall).
    pub fn uninstall(&self) -> Result<Vec<String>, StateError> {
        let mut removed = Vec::new();
        for p in [self.conflist_path(), self.bin_dir.join(names::CNI_TYPE)] {
            if state::remove_file(&p)? {
                removed.push(format!("removed {}", p.display()));
            }
        }
        Ok(removed)
    }
}

fn set_executable(path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        StateError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The `weft` binary next to the running executable (how images and the lab ship them).
pub fn default_cni_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(names::CNI_TYPE)))
        .unwrap_or_else(|| PathBuf::from(names::CNI_TYPE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, mode: &str, default: bool) -> weft_crds::Network {
        let annotations = if default {
            format!("annotations: {{{DEFAULT_NETWORK_ANNOTATION}: \"true\"}}")
        } else {
            String::new()
        };
        let yaml = format!(
            "apiVersion: weft.dev/v1alpha1\nkind: Network\nmetadata: {{name: {name}, {annotations}}}\nspec: {{mode: {mode}, subnets: [10.0.0.0/16]}}\n"
        );
        serde_saphyr::from_str(&yaml).unwrap()
    }

    #[test]
    fn a_second_network_still_leaves_a_deterministic_default() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let nets = [
            network("zeta", "NAT", false),
            network("alpha", "Bridge", false),
            network("nat-b", "NAT", false),
            network("nat-a", "NAT", false),
        ];
        let pick = |flag: Option<&str>, realized: &[&str], nets: &[weft_crds::Network]| {
            let d = choose_default_network(flag, &names(realized), nets);
            (d.name, d.reason)
        };
        assert_eq!(pick(None, &[], &nets), (None, "NoNetwork"));
        assert_eq!(pick(None, &["zeta"], &nets), (Some("zeta".into()), "Only"));
        // Two or more: the first NAT Network by name, whatever order they come in.
        for realized in [
            &["zeta", "alpha", "nat-b", "nat-a"][..],
            &["nat-a", "nat-b", "zeta", "alpha"][..],
        ] {
            assert_eq!(
                pick(None, realized, &nets),
                (Some("nat-a".into()), "FirstNAT")
            );
        }
        assert_eq!(
            pick(
                None,
                &["zeta", "alpha"],
                &[
                    network("zeta", "Bridge", false),
                    network("alpha", "Bridge", false)
                ]
            ),
            (Some("alpha".into()), "First")
        );
        // An annotation wins over the rule, the flag over both.
        let mut marked = nets.to_vec();
        marked.push(network("zz-main", "NAT", true));
        assert_eq!(
            pick(None, &["nat-a", "zz-main"], &marked),
            (Some("zz-main".into()), "Annotated")
        );
        assert_eq!(
            pick(Some("other"), &["nat-a", "zz-main"], &marked),
            (Some("other".into()), "Flag")
        );
        let d = choose_default_network(None, &names(&["nat-a", "zeta"]), &nets);
        assert!(d.message.contains("--default-network"), "{}", d.message);
        assert!(
            d.message.contains(DEFAULT_NETWORK_ANNOTATION),
            "{}",
            d.message
        );
    }

    #[test]
    fn install_is_idempotent_and_uninstall_removes_both() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("weft-src");
        std::fs::write(&bin, b"binary").unwrap();
        let inst = CniInstall {
            bin_dir: dir.path().join("bin"),
            conf_dir: dir.path().join("net.d"),
            binary: bin,
            state_dir: "/var/lib/weft".into(),
            socket: "/run/weft/agent.sock".into(),
        };
        assert!(inst.install(Some("nat-demo")).unwrap());
        assert!(!inst.install(Some("nat-demo")).unwrap());
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(inst.conflist_path()).unwrap()).unwrap();
        // libcni 1.1 (containerd 1.6/1.7) rejects results newer than 1.0.0; 1.2+ reads the list.
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][0]["network"], "nat-demo");
        assert_eq!(
            v["plugins"][0]["capabilities"],
            serde_json::json!({"ips": true, "mac": true, "portMappings": true, "bandwidth": true})
        );
        // The plugin refuses node locations from a configuration other than the node's own.
        for key in ["stateDir", "agentSocket", "logFile"] {
            assert!(v["plugins"][0].get(key).is_none(), "{key}");
        }
        assert!(inst.install(None).unwrap(), "the default network changed");
        assert_eq!(inst.uninstall().unwrap().len(), 2);
        assert!(inst.uninstall().unwrap().is_empty());
    }
}
