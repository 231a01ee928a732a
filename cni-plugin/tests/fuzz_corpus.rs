//! The committed fuzz corpus of the configuration parser, replayed on the stable toolchain: every
//! input parses or yields a coded error, and the named seeds give their expected answer.

use std::path::Path;

/// The named seeds and the code each must give (0: parses). Each must exist: a renamed or
/// minimized-away seed fails the test instead of silently skipping its check.
const SEEDS: &[(&str, u32)] = &[
    ("add.txt", 0),
    ("check.txt", 0),
    ("gc.txt", 0),
    ("vlan-trunk.txt", 0),
    ("bad-json.txt", 6),
    ("bad-args.txt", 4),
    ("node-paths.txt", 7),
    ("bad-network.txt", 7),
];

fn parse(data: &[u8]) -> u32 {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let args = String::from_utf8_lossy(&data[..split]);
    weft_cni::fuzz_parse(&args, data.get(split + 1..).unwrap_or_default())
}

#[test]
fn the_cni_conf_fuzz_corpus_never_panics_and_the_named_seeds_give_their_codes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cni_conf");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        parse(&std::fs::read(&path).unwrap_or_else(|e| panic!("{e}")));
        count += 1;
    }
    assert!(
        count > SEEDS.len(),
        "the corpus is missing from {}",
        dir.display()
    );
    for (name, want) in SEEDS {
        let path = dir.join(name);
        let data = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("seed {} is missing ({e})", path.display()));
        assert_eq!(parse(&data), *want, "{name}");
    }
}
