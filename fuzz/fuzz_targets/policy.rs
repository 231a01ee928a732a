//! The policy compiler: any policies, namespaces, networks and workload interfaces compile (with
//! problems reported) or are rejected, render to nft rules and trace without a panic, and the
//! compiler's properties hold (`weft_operator::policy::fuzz_compile` checks them).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        weft_operator::policy::fuzz_compile(text);
    }
});
