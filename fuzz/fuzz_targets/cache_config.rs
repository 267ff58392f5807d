//! Fuzzes cache import: the config blob of a remote cache ref (the cache graph, read by
//! `CacheGraph::from_manifest`), and the manifest that carries it.
//!
//! Input: the first byte picks the manifest (bit 0 clear: a kiln cache manifest with
//! `byte >> 1 & 15` layers, the rest of the input is the config blob; bit 0 set: the rest is
//! `manifest JSON 0x00 config blob`, so the manifest's own parsing is fuzzed too).
//! A graph that imports must survive what an export does with it, and export to bytes that
//! import to the same graph.
#![no_main]

use kiln_cache::{CacheGraph, RetentionPolicy, ARTIFACT_TYPE, CONFIG_MEDIA_TYPE};
use kiln_oci::{Descriptor, Digest, ImageManifest};
use libfuzzer_sys::fuzz_target;

fn cache_manifest(layers: u8) -> ImageManifest {
    ImageManifest {
        schema_version: 2,
        media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor::of_bytes(CONFIG_MEDIA_TYPE, b"{}"),
        layers: (0..layers)
            // Layer 3 repeats layer 1's blob: the graph stores a blob listed twice once.
            .map(|i| if i == 3 { 1 } else { i })
            .map(|i| {
                Descriptor::new(
                    "application/vnd.oci.image.layer.v1.tar+gzip",
                    Digest::sha256_of(&[i]),
                    100 + u64::from(i),
                )
            })
            .collect(),
        subject: None,
        annotations: Default::default(),
    }
}

/// Everything the cache's users see of a graph, for comparing two graphs.
fn view(g: &CacheGraph) -> Vec<String> {
    let mut out: Vec<String> = g
        .keys()
        .map(|k| format!("{k} {:?} {:?}", g.lookup(k), g.last_used(k)))
        .collect();
    out.extend(g.mounts().map(|(id, l)| format!("mount {id} {l:?}")));
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let (manifest, config) = if first & 1 == 0 {
        (cache_manifest((first >> 1) & 15), rest)
    } else {
        let cut = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let Ok(m) = serde_json::from_slice::<ImageManifest>(&rest[..cut]) else {
            return;
        };
        (m, rest.get(cut + 1..).unwrap_or_default())
    };
    let Ok(graph) = CacheGraph::from_manifest(&manifest, config) else {
        return;
    };
    let before = view(&graph);
    for k in graph.keys() {
        let chain = graph.lookup(k).expect("every key has a chain");
        assert!(chain.iter().all(|l| graph.layers().contains(l)));
    }

    // Export round trip: what kiln writes back it must read back, unchanged.
    let (m2, c2) = graph.to_manifest();
    let again = CacheGraph::from_manifest(&m2, &c2).expect("an exported graph imports");
    assert_eq!(view(&again), before, "export then import changes the graph");
    assert_eq!(again.to_config(), c2, "export is deterministic");

    // What an export does with an imported graph: merge, prune, age out.
    let mut merged = CacheGraph::new();
    merged.merge_missing(&graph);
    assert_eq!(
        view(&merged),
        before,
        "merging into an empty graph copies it"
    );
    merged.retain_blobs(|d| d.hex().as_bytes()[0] % 2 == 0);
    let (m3, c3) = merged.to_manifest();
    CacheGraph::from_manifest(&m3, &c3).expect("a pruned graph imports");
    let mut aged = graph.clone();
    let policy = RetentionPolicy {
        max_age: Some(std::time::Duration::from_secs(7 * 86_400)),
        max_records: Some(2),
    };
    aged.retain_recent(&policy, 1_900_000_000);
    assert!(aged.len() <= 2);
    let (m4, c4) = aged.to_manifest();
    CacheGraph::from_manifest(&m4, &c4).expect("an aged-out graph imports");
});
