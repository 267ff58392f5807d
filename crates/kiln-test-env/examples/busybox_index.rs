//! Pushes the busybox index of linux/amd64 and linux/arm64 (made here, see
//! `kiln_test_env::multiarch`) to a plain-HTTP registry and prints its reference; with
//! `--binfmt`, first makes sure arm64 binaries run here (root). For `bench/multiplatform`.
//!
//! `cargo run -p kiln-test-env --example busybox_index -- [--binfmt] HOST:PORT REPO`

use kiln_test_env::multiarch::{ensure_binfmt, push_busybox_index};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let binfmt = args.first().is_some_and(|a| a == "--binfmt");
    if binfmt {
        args.remove(0);
    }
    let [registry, repo] = args.as_slice() else {
        eprintln!("usage: busybox_index [--binfmt] HOST:PORT REPO");
        std::process::exit(2);
    };
    if binfmt {
        if let Err(e) = ensure_binfmt("arm64") {
            eprintln!("busybox_index: arm64 emulation: {e}");
            std::process::exit(1);
        }
    }
    println!("{}", push_busybox_index(registry, repo));
}
