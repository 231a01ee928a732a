//! Entering, running in, creating and deleting network namespaces (tier 3). Each test first
//! moves its own thread into a fresh namespace; named namespaces get unique names and are
//! removed even when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod netlink_common;

use netlink_common::{NamedNs, isolate, thread_netns_inode, unique_name};
use weft_dataplane::netlink::Netlink;
use weft_dataplane::netns::{self, Netns, NetnsError};

#[test]
fn run_in_runs_inside_the_target_and_leaves_the_calling_thread_alone() {
    let own = isolate();
    let target = NamedNs::new("runin");
    let before = thread_netns_inode();
    assert_eq!(before, own.inode().unwrap());

    let inside = netns::run_in(&target.ns, thread_netns_inode).unwrap();
    assert_eq!(inside, target.ns.inode().unwrap());
    assert_ne!(inside, before);
    assert_eq!(thread_netns_inode(), before, "caller not switched");
}

#[test]
fn run_in_borrows_from_the_caller_and_returns_values() {
    let _own = isolate();
    let target = NamedNs::new("borrow");
    let names = ["a".to_string(), "b".to_string()];
    let joined = netns::run_in(&target.ns, || names.join(",")).unwrap();
    assert_eq!(joined, "a,b");
}

#[test]
fn a_panic_inside_run_in_is_an_error_and_the_caller_stays_put() {
    let _own = isolate();
    let target = NamedNs::new("panic");
    let before = thread_netns_inode();
    let err = netns::run_in(&target.ns, || -> u32 { panic!("boom in netns") }).unwrap_err();
    match &err {
        NetnsError::ThreadPanicked { message, .. } => assert!(message.contains("boom")),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(thread_netns_inode(), before);
}

#[test]
fn enter_switches_the_thread_and_the_guard_switches_it_back() {
    let own = isolate();
    let target = NamedNs::new("enter");
    {
        let _guard = netns::enter(&target.ns).unwrap();
        assert_eq!(thread_netns_inode(), target.ns.inode().unwrap());
        // A socket opened now belongs to the target.
        let mut nl = Netlink::new().unwrap();
        nl.create_bridge("wbr-in", None, None, None).unwrap();
    }
    assert_eq!(thread_netns_inode(), own.inode().unwrap());
    let mut here = Netlink::new().unwrap();
    assert_eq!(here.link_by_name("wbr-in").unwrap(), None);
    let mut there = Netlink::in_netns(&target.ns).unwrap();
    assert!(there.link_by_name("wbr-in").unwrap().is_some());
}

#[test]
fn the_guard_restores_on_early_error_returns_and_explicitly() {
    let own = isolate();
    let target = NamedNs::new("guard");

    fn fails_inside(ns: &Netns) -> Result<(), String> {
        let _guard = netns::enter(ns).map_err(|e| e.to_string())?;
        Err("something failed while inside".to_string())?;
        Ok(())
    }
    assert!(fails_inside(&target.ns).is_err());
    assert_eq!(thread_netns_inode(), own.inode().unwrap());

    let guard = netns::enter(&target.ns).unwrap();
    assert_eq!(thread_netns_inode(), target.ns.inode().unwrap());
    guard.restore().unwrap();
    assert_eq!(thread_netns_inode(), own.inode().unwrap());
}

#[test]
fn create_named_then_delete_named() {
    let _own = isolate();
    let name = unique_name("weft-test-named");
    let path = netns::named_path(&name);
    let ns = netns::create_named(&name).unwrap();
    // Delete it even if an assertion below fails.
    struct Cleanup<'a>(&'a str);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = netns::delete_named(self.0);
        }
    }
    let _cleanup = Cleanup(&name);

    assert_eq!(ns.path(), path);
    let reopened = Netns::open(&path).unwrap();
    assert_eq!(reopened.inode().unwrap(), ns.inode().unwrap());
    assert_ne!(ns.inode().unwrap(), thread_netns_inode(), "a new namespace");
    // Only lo, down, like `ip netns add`.
    let mut nl = Netlink::in_netns(&ns).unwrap();
    let links = nl.links().unwrap();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!((links[0].name.as_str(), links[0].up), ("lo", false));

    let again = netns::create_named(&name).unwrap_err();
    assert!(again.is_exists(), "{again}");
    assert!(
        Netns::open(&path).is_ok(),
        "a failed create leaves the existing one"
    );

    assert!(netns::delete_named(&name).unwrap());
    assert!(!path.exists());
    assert!(!netns::delete_named(&name).unwrap(), "second delete");
    let gone = Netns::open(&path).unwrap_err();
    assert!(gone.is_gone(), "{gone}");

    // An open handle keeps the namespace itself alive after the name is gone.
    let mut still = Netlink::in_netns(&ns).unwrap();
    assert!(still.link_by_name("lo").unwrap().is_some());
}

#[test]
fn the_run_dir_is_a_shared_mount_like_iproute2_makes_it() {
    let _own = isolate();
    let _named = NamedNs::new("shared");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(netns::NETNS_RUN_DIR))
        .expect("/run/netns is a mount point");
    assert!(line.contains("shared:"), "{line}");
}

#[test]
fn a_leftover_file_without_a_namespace_counts_as_gone() {
    let _own = isolate();
    let name = unique_name("weft-test-stale");
    let path = netns::named_path(&name);
    std::fs::create_dir_all(netns::NETNS_RUN_DIR).unwrap();
    std::fs::write(&path, b"").unwrap();
    let err = Netns::open(&path).unwrap_err();
    assert!(err.is_gone(), "{err}");
    assert!(
        netns::delete_named(&name).unwrap(),
        "removes the stale file"
    );
    assert!(!path.exists());
}

#[test]
fn current_is_the_thread_namespace() {
    let own = isolate();
    assert_eq!(own.inode().unwrap(), thread_netns_inode());
    let other = std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            Netns::current().unwrap().inode().unwrap()
        })
        .join()
        .unwrap()
    });
    assert_ne!(other, own.inode().unwrap());
}
