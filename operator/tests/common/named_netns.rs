//! A named network namespace of a test's own, deleted on drop (also when the test panics).
//! Tests run in parallel: names carry the process id.

use weft_dataplane::netns::{self, Netns};

/// A named network namespace, deleted on drop.
pub struct NamedNetns {
    /// Its name (`/run/netns/<name>`).
    pub name: String,
    /// The namespace.
    pub ns: Netns,
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        if let Err(e) = netns::delete_named(&self.name) {
            eprintln!("cannot delete test netns {}: {e}", self.name);
        }
    }
}

/// Creates namespace `<prefix><pid><tag>`; fails the test without root.
pub fn create(prefix: &str, tag: &str) -> NamedNetns {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces): run the tests as root"
    );
    let name = format!("{prefix}{}{tag}", std::process::id());
    let ns = netns::create_named(&name).expect("create the test netns");
    NamedNetns { name, ns }
}
