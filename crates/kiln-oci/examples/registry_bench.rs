//! Driver for `bench/client/run.sh`: generates the benchmark images as OCI layouts, and pushes
//! or pulls them with kiln's registry client, printing the elapsed seconds and byte counters.
//!
//! ```text
//! registry_bench gen-big DIR BYTES        one layer of BYTES pseudo-random bytes
//! registry_bench gen-many DIR COUNT       COUNT small layers
//! registry_bench push DIR REF             layout image "latest" -> REF
//! registry_bench pull REF DIR             REF -> new layout DIR
//! ```

use std::io::Write;
use std::time::Instant;

use kiln_oci::{
    media_type, ClientConfig, Descriptor, Digest, ImageManifest, OciLayout, Platform, RawManifest,
    RegistryClient,
};

fn xorshift_fill(buf: &mut [u8], seed: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        let mut x = *seed;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *seed = x;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A tar holding one file of `size` pseudo-random bytes, written straight into a layout blob.
fn layer(layout: &OciLayout, name: &str, size: u64, seed: &mut u64) -> (Descriptor, Digest) {
    struct Gen<'a> {
        left: u64,
        seed: &'a mut u64,
    }
    impl std::io::Read for Gen<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = (buf.len() as u64).min(self.left) as usize;
            xorshift_fill(&mut buf[..n], self.seed);
            self.left -= n as u64;
            Ok(n)
        }
    }
    let dir = tempfile::tempdir_in(layout.root()).unwrap();
    let path = dir.path().join("layer.tar");
    {
        let f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).unwrap());
        let mut tar = tar::Builder::new(f);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(size);
        tar.append_data(&mut h, name, Gen { left: size, seed })
            .unwrap();
        tar.into_inner().unwrap().flush().unwrap();
    }
    let (d, n) = layout
        .write_blob_from_reader(std::fs::File::open(&path).unwrap())
        .unwrap();
    (Descriptor::new(media_type::OCI_LAYER_TAR, d.clone(), n), d)
}

fn write_image(layout: &OciLayout, layers: Vec<(Descriptor, Digest)>) {
    let diff_ids: Vec<Digest> = layers.iter().map(|(_, d)| d.clone()).collect();
    let config = serde_json::json!({
        "architecture": Platform::host().architecture, "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let cb = serde_json::to_vec(&config).unwrap();
    let cd = layout.write_blob(&cb).unwrap();
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(media_type::OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(media_type::OCI_CONFIG, cd, cb.len() as u64),
        layers: layers.into_iter().map(|(d, _)| d).collect(),
        subject: None,
        annotations: Default::default(),
    };
    let raw = RawManifest::from_image(&m);
    layout.write_blob(&raw.bytes).unwrap();
    layout.add_manifest(raw.descriptor(), "latest").unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: registry_bench gen-big DIR BYTES | gen-many DIR COUNT | push DIR REF | pull REF DIR";
    if args.len() != 4 {
        eprintln!("{usage}");
        std::process::exit(2);
    }
    let mut seed = 0x2545F4914F6CDD1Du64;
    match args[1].as_str() {
        "gen-big" => {
            let layout = OciLayout::create(&args[2]).unwrap();
            let size: u64 = args[3].parse().unwrap();
            let l = layer(&layout, "big.bin", size, &mut seed);
            write_image(&layout, vec![l]);
        }
        "gen-many" => {
            let layout = OciLayout::create(&args[2]).unwrap();
            let count: u64 = args[3].parse().unwrap();
            let layers = (0..count)
                .map(|i| layer(&layout, &format!("f{i}"), 1024 + (i * 37) % 3072, &mut seed))
                .collect();
            write_image(&layout, layers);
        }
        "push" | "pull" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = RegistryClient::new(ClientConfig::default()).unwrap();
            let start = Instant::now();
            rt.block_on(async {
                if args[1] == "push" {
                    let layout = OciLayout::open(&args[2]).unwrap();
                    let r = args[3].parse().unwrap();
                    client
                        .push_from_layout(&layout, "latest", &[r])
                        .await
                        .unwrap();
                } else {
                    let layout = OciLayout::create(&args[3]).unwrap();
                    let r = args[2].parse().unwrap();
                    client
                        .pull_to_layout(&r, &Platform::host(), &layout, "latest")
                        .await
                        .unwrap();
                }
            });
            let s = client.stats();
            println!(
                "{:.3} s  sent {} B  received {} B  requests {}",
                start.elapsed().as_secs_f64(),
                s.bytes_sent,
                s.bytes_received,
                s.requests
            );
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
