//! The lab file parser: any text must load or be rejected with a message, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        weft_lab::file::fuzz_parse(text);
    }
});
