//! The CNI environment and network configuration parser: any `CNI_ARGS` and any stdin must parse
//! or give a coded error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first line is CNI_ARGS, the rest is the configuration on stdin.
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let args = String::from_utf8_lossy(&data[..split]);
    let stdin = data.get(split + 1..).unwrap_or_default();
    weft_cni::fuzz_parse(&args, stdin);
});
