//! Kernel parameters under `/proc/sys`.
//!
//! Keys are dotted like `sysctl(8)` (`net.ipv4.ip_forward`), or slashed when a component
//! itself contains a dot (`net/ipv4/conf/eth0.100/forwarding`), or a full path under
//! `/proc/sys`.
//!
//! **Namespaces:** the `net.*` entries belong to the network namespace of the calling
//! *thread* (procfs resolves them for the thread that opens the file). To read or set them in
//! another namespace, call these functions inside [`crate::netns::run_in`].

use std::io;
use std::path::{Component, Path, PathBuf};

/// The root of the sysctl tree.
pub const PROC_SYS: &str = "/proc/sys";

/// The environment variable that moves the sysctl tree: a container runtime mounts `/proc/sys`
/// read-only in an unprivileged container and refuses mounts inside `/proc`, so the agent's pod
/// mounts the node's `/proc/sys/net` at `/host/proc/sys/net` and sets `WEFT_PROC_SYS=/host/proc/sys`.
/// The `net.*` entries still resolve to the network namespace of the thread that opens them.
pub const PROC_SYS_ENV: &str = "WEFT_PROC_SYS";

/// The root in force: `$WEFT_PROC_SYS` when it is an absolute path, else [`PROC_SYS`].
pub fn root() -> &'static Path {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| root_from(std::env::var_os(PROC_SYS_ENV)))
}

fn root_from(value: Option<std::ffi::OsString>) -> PathBuf {
    match value.map(PathBuf::from) {
        Some(p) if p.is_absolute() && !p.components().any(|c| c == Component::ParentDir) => p,
        _ => PathBuf::from(PROC_SYS),
    }
}

/// Errors of sysctl access.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The key does not name a file under `/proc/sys`.
    #[error("invalid sysctl key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Reading the value failed.
    #[error("cannot read sysctl {key} ({path})")]
    Read {
        /// The key.
        key: String,
        /// The file.
        path: PathBuf,
        /// The cause (`NotFound` when the kernel has no such parameter).
        #[source]
        source: io::Error,
    },
    /// Writing the value failed.
    #[error("cannot set sysctl {key} to {value:?} ({path})")]
    Write {
        /// The key.
        key: String,
        /// The value that was written.
        value: String,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl SysctlError {
    /// True when the parameter does not exist (for example IPv6 is disabled, or an interface
    /// of that name is not in this namespace).
    pub fn is_not_found(&self) -> bool {
        match self {
            SysctlError::Read { source, .. } | SysctlError::Write { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
            }
            SysctlError::InvalidKey { .. } => false,
        }
    }
}

/// The file of `key` under `/proc/sys`.
pub fn path_of(key: &str) -> Result<PathBuf, SysctlError> {
    let invalid = |reason| SysctlError::InvalidKey {
        key: key.to_string(),
        reason,
    };
    let relative: PathBuf = if let Some(rest) = key.strip_prefix("/proc/sys/") {
        PathBuf::from(rest)
    } else if key.starts_with('/') {
        return Err(invalid("absolute path outside /proc/sys"));
    } else if key.contains('/') {
        PathBuf::from(key)
    } else {
        key.split('.').collect()
    };
    if relative.as_os_str().is_empty() {
        return Err(invalid("empty"));
    }
    for c in relative.components() {
        match c {
            Component::Normal(s) if !s.is_empty() => {}
            _ => return Err(invalid("'..', '.' or empty component")),
        }
    }
    if !key.starts_with('/') && key.split(['.', '/']).any(str::is_empty) {
        return Err(invalid("empty component"));
    }
    Ok(root().join(relative))
}

/// Reads `key`, without the trailing newline.
pub fn get(key: &str) -> Result<String, SysctlError> {
    let path = path_of(key)?;
    match std::fs::read_to_string(&path) {
        Ok(v) => Ok(v.trim_end_matches('\n').to_string()),
        Err(source) => Err(SysctlError::Read {
            key: key.to_string(),
            path,
            source,
        }),
    }
}

/// Writes `value` to `key`.
pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    let path = path_of(key)?;
    std::fs::write(&path, value.as_bytes()).map_err(|source| SysctlError::Write {
        key: key.to_string(),
        value: value.to_string(),
        path,
        source,
    })
}

/// Writes `value` to `key` unless it already holds it (compared after trimming whitespace);
/// returns whether it wrote.
pub fn set_if_different(key: &str, value: &str) -> Result<bool, SysctlError> {
    let current = get(key)?;
    if normalize(&current) == normalize(value) {
        return Ok(false);
    }
    set(key, value)?;
    Ok(true)
}

/// Multi-value sysctls (`net.ipv4.ip_local_port_range`) read back tab-separated.
fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_keys_map_to_proc_sys() {
        assert_eq!(
            path_of("net.ipv4.ip_forward").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
    }

    #[test]
    fn slashed_keys_keep_dots_in_components() {
        assert_eq!(
            path_of("net/ipv4/conf/eth0.100/forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
    }

    #[test]
    fn full_paths_are_accepted() {
        assert_eq!(
            path_of("/proc/sys/net/ipv6/conf/all/forwarding").unwrap(),
            PathBuf::from("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }

    #[test]
    fn escaping_keys_are_rejected() {
        for bad in [
            "",
            "net..ipv4",
            "../etc/passwd",
            "net/../../etc",
            "/etc/passwd",
            "/proc/sys/../self/environ",
            "/proc/sysrq-trigger",
            ".net",
        ] {
            assert!(
                matches!(path_of(bad), Err(SysctlError::InvalidKey { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn values_compare_by_words() {
        assert_eq!(normalize("32768\t60999\n"), normalize("32768 60999"));
    }

    #[test]
    fn missing_key_is_not_found() {
        let e = get("net.weft.no_such_key").unwrap_err();
        assert!(e.is_not_found(), "{e:?}");
    }

    #[test]
    fn the_root_moves_only_to_an_absolute_path() {
        assert_eq!(
            root_from(Some("/host/proc/sys".into())),
            PathBuf::from("/host/proc/sys")
        );
        assert_eq!(root_from(None), PathBuf::from(PROC_SYS));
        assert_eq!(
            root_from(Some("host/proc/sys".into())),
            PathBuf::from(PROC_SYS)
        );
        assert_eq!(
            root_from(Some("/host/../etc".into())),
            PathBuf::from(PROC_SYS)
        );
    }
}
