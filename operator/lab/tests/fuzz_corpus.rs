//! The committed fuzz corpus of the lab file parser, replayed on the stable toolchain.

use std::path::Path;

#[test]
fn the_lab_file_fuzz_corpus_never_panics_and_the_example_is_accepted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/lab_file");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let accepted = std::str::from_utf8(&data)
            .map(weft_lab::file::fuzz_parse)
            .unwrap_or(false);
        if path.file_name().is_some_and(|n| n == "nat.yaml") {
            assert!(accepted, "the NAT example must be accepted");
        }
        count += 1;
    }
    assert!(count >= 1, "the corpus is missing from {}", dir.display());
}
