//! Leftovers of killed builds are moved aside when a build starts and deleted by prune, so
//! a build never deletes a large tree just before creating its own files.

use std::fs;
use std::path::Path;

use kiln_store::{PruneOptions, Store};

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(t) if t.is_file() => 1,
            _ => 0,
        })
        .sum()
}

#[test]
fn reclaimed_leftovers_go_to_the_trash_and_prune_deletes_them() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("state");
    let store = Store::open(&root).unwrap();
    // A snapshot dir with no record: what a build killed mid-step leaves.
    let leftover = root.join("snapshots/987654");
    for d in 0..20 {
        let dir = leftover.join(format!("fs/node_modules/pkg{d}/lib"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..50 {
            fs::write(dir.join(format!("f{f}.js")), "module.exports = 0;\n").unwrap();
        }
    }
    assert!(!store.fsck(false).unwrap().is_clean());

    assert_eq!(store.reclaim_leftovers().unwrap(), 1);
    assert!(
        !leftover.exists(),
        "the leftover is no longer a snapshot dir"
    );
    let trash = root.join("snapshots/trash");
    assert_eq!(
        count_files(&trash),
        1000,
        "reclaiming moved the tree aside without deleting its files"
    );
    let fsck = store.fsck(false).unwrap();
    assert!(
        fsck.is_clean(),
        "the trash is not a leftover: {:?}",
        fsck.problems
    );

    let report = store.prune(&PruneOptions::default()).unwrap();
    assert_eq!(report.trash, 1);
    assert_eq!(count_files(&trash), 0);
    assert_eq!(fs::read_dir(&trash).unwrap().count(), 0);
    assert_eq!(store.prune(&PruneOptions::default()).unwrap().trash, 0);
}
