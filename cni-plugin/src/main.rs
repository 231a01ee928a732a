//! The `weft` CNI binary.

fn main() {
    weft_cni::install_panic_hook();
    std::process::exit(weft_cni::run());
}
