//! The `weft` CNI binary.

/// dlmalloc keeps the memory the plugin frees for its next allocations. musl's allocator, which
/// the static build would use otherwise, maps and unmaps pages for small allocations: parsing
/// one netlink answer cost a dozen `mmap`/`munmap` calls, a third of an ADD's system calls
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() {
    weft_cni::install_panic_hook();
    std::process::exit(weft_cni::run());
}
