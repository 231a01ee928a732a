//! The committed fuzz corpus of the configuration parser, replayed on the stable toolchain: every
//! input parses or yields a coded error, and the valid seeds still parse.

use std::path::Path;

#[test]
fn the_cni_conf_fuzz_corpus_never_panics_and_valid_seeds_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cni_conf");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{e}"));
        let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
        let args = String::from_utf8_lossy(&data[..split]);
        let code = weft_cni::fuzz_parse(&args, data.get(split + 1..).unwrap_or_default());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if ["add.txt", "check.txt", "gc.txt", "vlan-trunk.txt"].contains(&name.as_str()) {
            assert_eq!(code, 0, "{name} must parse");
        } else if name == "bad-json.txt" {
            assert_eq!(code, 6, "{name} is undecodable JSON");
        } else if name == "bad-args.txt" {
            assert_eq!(code, 4, "{name} has a CNI_ARGS entry without '='");
        }
        count += 1;
    }
    assert!(count >= 4, "the corpus is missing from {}", dir.display());
}
