//! Installing the `weft` CNI binary and the conflist on the node.

use serde_json::json;
use std::path::{Path, PathBuf};
use weft_dataplane::names;
use weft_dataplane::state::{self, StateError};

/// Where the CNI pieces go.
#[derive(Debug, Clone)]
pub struct CniInstall {
    /// The CNI binary directory (`/opt/cni/bin`).
    pub bin_dir: PathBuf,
    /// The CNI configuration directory (`/etc/cni/net.d`).
    pub conf_dir: PathBuf,
    /// The `weft` binary to install.
    pub binary: PathBuf,
    /// weft's state dir (written into the conflist).
    pub state_dir: PathBuf,
    /// The agent socket (written into the conflist).
    pub socket: PathBuf,
}

impl CniInstall {
    /// Path of the conflist.
    pub fn conflist_path(&self) -> PathBuf {
        self.conf_dir.join(names::CONFLIST_NAME)
    }

    /// The conflist text for the given default network.
    pub fn conflist(&self, network: Option<&str>) -> String {
        let mut plugin = json!({
            "type": names::CNI_TYPE,
            "stateDir": self.state_dir,
            "agentSocket": self.socket,
            "capabilities": {"ips": true, "mac": true, "portMappings": true},
        });
        if let Some(n) = network {
            plugin["network"] = json!(n);
        }
        let conf = json!({
            "cniVersion": "1.1.0",
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
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["plugins"][0]["type"], "weft");
        assert_eq!(v["plugins"][0]["network"], "nat-demo");
        assert!(inst.install(None).unwrap(), "the default network changed");
        assert_eq!(inst.uninstall().unwrap().len(), 2);
        assert!(inst.uninstall().unwrap().is_empty());
    }
}
