//! Network namespaces: open, enter (with a restoring guard), run a closure inside one, and
//! create or delete named ones the way `ip netns add|del` does.
//!
//! This is the one module of weft that calls `setns(2)` (clippy's `disallowed-methods` bans
//! `nix::sched::setns` everywhere else). `setns(CLONE_NEWNET)` changes the namespace of the
//! calling **thread** only, so:
//!
//! - [`run_in`] is the safe default: it runs a closure on a fresh, scoped `std::thread` that
//!   enters the namespace and then ends, so the caller's thread is never switched. Sockets
//!   opened there stay bound to that namespace after the thread ends (see
//!   [`crate::netlink::Netlink::in_netns`]).
//! - [`enter`] switches the calling thread and returns a guard that switches it back on drop,
//!   on error paths too. Never call it on a thread that runs async tasks (a tokio worker or a
//!   `spawn_blocking` thread that is reused): every later task on that thread would run in the
//!   wrong namespace.
#![allow(clippy::disallowed_methods)] // this module owns setns

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tracing::{debug, error};

/// Where named network namespaces live (the iproute2 convention).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The namespace of the calling thread, as seen through procfs.
const THREAD_SELF_NET: &str = "/proc/thread-self/ns/net";

/// Serializes the one-time preparation of [`NETNS_RUN_DIR`] inside this process.
static RUN_DIR_LOCK: Mutex<()> = Mutex::new(());

/// Errors of network namespace operations. Each variant names the failed operation and the
/// namespace it was about.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}")]
    Open {
        /// The path that was opened.
        path: PathBuf,
        /// The cause (`NotFound` when the namespace is gone).
        #[source]
        source: io::Error,
    },
    /// The path exists but is not a network namespace (for example a `/run/netns` file whose
    /// namespace was already unmounted).
    #[error("{path} is not a network namespace (no nsfs mount)")]
    NotANetns {
        /// The path.
        path: PathBuf,
    },
    /// Reading the identity (inode) of a namespace failed.
    #[error("cannot stat network namespace {path}")]
    Stat {
        /// The namespace.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `setns` into the namespace failed.
    #[error("cannot enter network namespace {path}")]
    Enter {
        /// The namespace.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `setns` back into the previous namespace failed.
    #[error("cannot return to network namespace {path}")]
    Restore {
        /// The namespace the thread was in before.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A named namespace could not be created.
    #[error("cannot create network namespace {name}")]
    Create {
        /// The name under [`NETNS_RUN_DIR`].
        name: String,
        /// The cause (`AlreadyExists` when the name is taken).
        #[source]
        source: io::Error,
    },
    /// A named namespace could not be deleted.
    #[error("cannot delete network namespace {name}")]
    Delete {
        /// The name under [`NETNS_RUN_DIR`].
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The name is not usable as a file name under [`NETNS_RUN_DIR`].
    #[error("invalid network namespace name {name:?}: {reason}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The helper thread could not be started.
    #[error("cannot start a thread for network namespace {path}")]
    Spawn {
        /// The namespace.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The closure given to [`run_in`] (or the helper of [`create_named`]) panicked.
    #[error("the thread running in network namespace {path} panicked: {message}")]
    ThreadPanicked {
        /// The namespace.
        path: PathBuf,
        /// The panic message, when it was a string.
        message: String,
    },
}

impl NetnsError {
    /// True when the namespace does not exist (any more): its path is missing, or it is a
    /// leftover file with no namespace mounted on it. CNI DEL treats this as success.
    pub fn is_gone(&self) -> bool {
        match self {
            NetnsError::Open { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            NetnsError::NotANetns { .. } => true,
            _ => false,
        }
    }

    /// True when [`create_named`] failed because the name is already taken.
    pub fn is_exists(&self) -> bool {
        matches!(self, NetnsError::Create { source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
    }
}

/// An open network namespace: a file descriptor plus the path it was opened from.
///
/// Holding it keeps the namespace alive even if its `/run/netns` file is removed.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the network namespace at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`,
    /// `/proc/self/task/<tid>/ns/net`, a CNI_NETNS path, …) and checks that it is one.
    pub fn open(path: impl AsRef<Path>) -> Result<Netns, NetnsError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
            path: path.clone(),
            source: e.into(),
        })?;
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(NetnsError::NotANetns { path });
        }
        Ok(Netns { file, path })
    }

    /// Opens the network namespace of the calling thread (`/proc/thread-self/ns/net`).
    ///
    /// The recorded [`path`](Netns::path) names the thread (`/proc/<pid>/task/<tid>/ns/net`),
    /// since `thread-self` means something else on every thread.
    pub fn current() -> Result<Netns, NetnsError> {
        let ns = Netns::open(THREAD_SELF_NET)?;
        let path = PathBuf::from(format!(
            "/proc/{}/task/{}/ns/net",
            std::process::id(),
            nix::unistd::gettid()
        ));
        Ok(Netns {
            file: ns.file,
            path,
        })
    }

    /// The namespace's file descriptor, e.g. for `IFLA_NET_NS_FD`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode number: two handles refer to the same namespace exactly when
    /// their inodes are equal (all namespaces live on the one nsfs).
    pub fn inode(&self) -> Result<u64, NetnsError> {
        self.file
            .metadata()
            .map(|m| m.ino())
            .map_err(|source| NetnsError::Stat {
                path: self.path.clone(),
                source,
            })
    }
}

impl Netns {
    /// Is this the network namespace of the calling thread (the same device and inode as
    /// `/proc/thread-self/ns/net`)? A path that names it, `/proc/self/ns/net` or a bind mount of
    /// it, is the node's own namespace when the caller runs in the node's.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        // A `stat` through the thread's link: no file is opened for the comparison.
        let here = nix::sys::stat::stat(THREAD_SELF_NET).map_err(|e| NetnsError::Stat {
            path: PathBuf::from(THREAD_SELF_NET),
            source: e.into(),
        })?;
        let this = self.file.metadata().map_err(|source| NetnsError::Stat {
            path: self.path.clone(),
            source,
        })?;
        Ok((this.dev(), this.ino()) == (here.st_dev, here.st_ino))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Returned by [`enter`]: switches the thread back to its previous namespace when dropped.
///
/// It is neither `Send` nor `Sync`: it must be dropped on the thread that entered.
#[must_use = "dropping the guard immediately switches the thread back"]
#[derive(Debug)]
pub struct NetnsGuard {
    previous: Option<Netns>,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    /// Switches back now and reports failure, instead of leaving it to `Drop`.
    pub fn restore(mut self) -> Result<(), NetnsError> {
        match self.previous.take() {
            Some(prev) => restore_to(&prev),
            None => Ok(()),
        }
    }
}

fn restore_to(prev: &Netns) -> Result<(), NetnsError> {
    nix::sched::setns(prev.fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Restore {
        path: prev.path.clone(),
        source: e.into(),
    })
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.previous.take()
            && let Err(e) = restore_to(&prev)
        {
            // The thread would keep running in the wrong namespace and silently create links,
            // routes or sockets there. That is worse than stopping.
            error!(error = %e, "cannot restore the network namespace of this thread; aborting");
            std::process::abort();
        }
    }
}

/// Switches the calling thread into `ns` and returns a guard that switches it back on drop
/// (on error paths too).
///
/// Never call this on a thread that runs async tasks: use [`run_in`] there. If switching back
/// fails in `Drop` (it cannot in practice: the previous namespace is held open), the process
/// aborts rather than keep a thread in the wrong namespace; call [`NetnsGuard::restore`] to
/// handle that error yourself.
pub fn enter(ns: &Netns) -> Result<NetnsGuard, NetnsError> {
    let previous = Netns::current()?;
    nix::sched::setns(ns.fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
        path: ns.path.clone(),
        source: e.into(),
    })?;
    debug!(netns = %ns.path.display(), "entered network namespace");
    Ok(NetnsGuard {
        previous: Some(previous),
        _not_send: PhantomData,
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f` on a fresh scoped thread that first enters `ns`; returns what `f` returns.
///
/// The calling thread never changes namespace, so this is safe from async code (through
/// `spawn_blocking`) and from any thread. The helper thread ends with `f`; anything `f` opened
/// (sockets, files) stays bound to `ns`. Costs one thread start (tens of microseconds).
pub fn run_in<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn_scoped(scope, move || -> Result<T, NetnsError> {
                nix::sched::setns(ns.fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    NetnsError::Enter {
                        path: ns.path.clone(),
                        source: e.into(),
                    }
                })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Spawn {
                path: ns.path.clone(),
                source,
            })?;
        handle
            .join()
            .map_err(|payload| NetnsError::ThreadPanicked {
                path: ns.path.clone(),
                message: panic_message(payload.as_ref()),
            })?
    })
}

/// The path of the named namespace `name`: `/run/netns/<name>`.
pub fn named_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn check_name(name: &str) -> Result<(), NetnsError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name == "." || name == ".." {
        Some("not a file name")
    } else if name.contains('/') || name.contains('\0') {
        Some("contains '/' or NUL")
    } else if name.len() > 255 {
        Some("longer than 255 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(NetnsError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// True when `path` is itself a mount point (listed as one in `/proc/self/mountinfo`).
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let want = path.to_string_lossy();
    // Field 5 is the mount point; spaces and such are octal-escaped, /run/netns has none.
    Ok(info
        .lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|mp| mp == want)))
}

/// Makes sure [`NETNS_RUN_DIR`] exists and, like iproute2 does, is a mount point with shared
/// propagation, so namespaces mounted under it later show up in other mount namespaces that
/// bind it (a containerized agent, for instance).
fn prepare_run_dir() -> io::Result<()> {
    let _lock = RUN_DIR_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(NETNS_RUN_DIR);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    if !is_mount_point(dir)? {
        nix::mount::mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
    }
    nix::mount::mount(
        None::<&str>,
        dir,
        Some("none"),
        MsFlags::MS_SHARED | MsFlags::MS_REC,
        None::<&str>,
    )?;
    Ok(())
}

/// Creates the named network namespace `name`, like `ip netns add`: an empty file
/// `/run/netns/<name>` with a fresh network namespace bind-mounted on it. The new namespace
/// has only a `lo`, which is down.
///
/// Fails with [`NetnsError::is_exists`] when the name is taken. The calling thread's
/// namespace is not changed (the namespace is made on a helper thread).
pub fn create_named(name: &str) -> Result<Netns, NetnsError> {
    check_name(name)?;
    let create_err = |source: io::Error| NetnsError::Create {
        name: name.to_string(),
        source,
    };
    prepare_run_dir().map_err(create_err)?;
    let path = named_path(name);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)
        .map_err(create_err)?;
    let made = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("weft-netns-add".into())
            .spawn_scoped(scope, || -> io::Result<()> {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                nix::mount::mount(
                    Some(THREAD_SELF_NET),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )?;
                Ok(())
            })
            .map_err(|source| NetnsError::Spawn {
                path: path.clone(),
                source,
            })?
            .join()
            .map_err(|payload| NetnsError::ThreadPanicked {
                path: path.clone(),
                message: panic_message(payload.as_ref()),
            })
    });
    let result = match made {
        Ok(Ok(())) => Netns::open(&path),
        Ok(Err(source)) => Err(create_err(source)),
        Err(e) => Err(e),
    };
    if result.is_err() {
        let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&path);
    } else {
        debug!(netns = %name, "created named network namespace");
    }
    result
}

/// Deletes the named network namespace `name`, like `ip netns del`: lazily unmounts
/// `/run/netns/<name>` and removes the file. The namespace itself lives on while something
/// still uses it (a process, an open [`Netns`]).
///
/// Returns `Ok(false)` when there was no such file.
pub fn delete_named(name: &str) -> Result<bool, NetnsError> {
    check_name(name)?;
    let path = named_path(name);
    match nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a half-made or already unmounted namespace).
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => {
            return Err(NetnsError::Delete {
                name: name.to_string(),
                source: e.into(),
            });
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            debug!(netns = %name, "deleted named network namespace");
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(NetnsError::Delete {
            name: name.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_path_is_under_run_netns() {
        assert_eq!(named_path("w1"), PathBuf::from("/run/netns/w1"));
    }

    #[test]
    fn bad_names_are_rejected_before_touching_anything() {
        for bad in ["", ".", "..", "a/b", "x\0y"] {
            assert!(matches!(
                create_named(bad),
                Err(NetnsError::InvalidName { .. })
            ));
            assert!(matches!(
                delete_named(bad),
                Err(NetnsError::InvalidName { .. })
            ));
        }
    }

    #[test]
    fn missing_namespace_is_gone() {
        let e = Netns::open("/nonexistent/weft/netns").unwrap_err();
        assert!(e.is_gone(), "{e:?}");
    }

    #[test]
    fn regular_file_is_not_a_netns() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ns");
        std::fs::write(&f, b"").unwrap();
        let e = Netns::open(&f).unwrap_err();
        assert!(matches!(e, NetnsError::NotANetns { .. }));
        assert!(e.is_gone());
    }

    #[test]
    fn current_opens_the_thread_namespace() {
        let ns = Netns::current().unwrap();
        assert!(ns.path().to_string_lossy().contains("/task/"));
        assert!(ns.inode().unwrap() > 0);
    }

    #[test]
    fn the_process_own_namespace_is_current_and_a_named_one_is_not() {
        assert!(
            Netns::open("/proc/self/ns/net")
                .unwrap()
                .is_current()
                .unwrap()
        );
        assert!(Netns::current().unwrap().is_current().unwrap());
        let name = format!("weft-nstest-cur-{}", std::process::id());
        let other = create_named(&name).unwrap();
        let result = other.is_current();
        delete_named(&name).unwrap();
        assert!(!result.unwrap());
    }
}
