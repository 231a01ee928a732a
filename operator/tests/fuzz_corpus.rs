//! The committed fuzz corpus of the policy compiler, replayed on the stable toolchain (the lab
//! file parser's is `operator/lab/tests/fuzz_corpus.rs`).

use std::path::Path;

#[test]
fn the_policy_fuzz_corpus_never_panics_and_the_segmentation_example_is_accepted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/policy");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let accepted = std::str::from_utf8(&data)
            .map(weft_operator::policy::fuzz_compile)
            .unwrap_or(false);
        if path.file_name().is_some_and(|n| n == "segmentation.yaml") {
            assert!(accepted, "the segmentation example must be accepted");
        }
        count += 1;
    }
    assert!(count >= 1, "the corpus is missing from {}", dir.display());
}
