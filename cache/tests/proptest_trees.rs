//! Property tests over random directory trees: the directory digest does not depend on
//! the order files were written in, and every committed tree checks Ok under its digest.

mod common;

use common::{new_cache, write_tree};
use proptest::prelude::*;
use rlhf_cache::{digest_dir, ArtifactHealth};
use std::collections::BTreeMap;

/// Random trees: paths `d<i>/…/f<j>` (directories and files never share a name), up to
/// three levels deep, with 0..64 random bytes each (empty files included).
fn trees() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    let path = (prop::collection::vec(0u8..3, 0..3), 0u8..4).prop_map(|(dirs, file)| {
        let mut parts: Vec<String> = dirs.iter().map(|d| format!("d{d}")).collect();
        parts.push(format!("f{file}"));
        parts.join("/")
    });
    prop::collection::btree_map(path, prop::collection::vec(any::<u8>(), 0..64), 0..12)
}

fn as_slices(tree: &BTreeMap<String, Vec<u8>>) -> Vec<(&str, &[u8])> {
    tree.iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn digest_dir_is_deterministic_for_any_tree(tree in trees()) {
        let forward = tempfile::tempdir().unwrap();
        let backward = tempfile::tempdir().unwrap();
        let files = as_slices(&tree);
        write_tree(forward.path(), &files);
        let reversed: Vec<_> = files.iter().rev().copied().collect();
        write_tree(backward.path(), &reversed);
        let digest = digest_dir(forward.path()).unwrap();
        prop_assert_eq!(&digest, &digest_dir(backward.path()).unwrap());
        prop_assert_eq!(&digest, &digest_dir(forward.path()).unwrap());
    }

    #[test]
    fn commit_then_check_artifact_is_ok_for_any_tree(tree in trees()) {
        let (_dir, cache) = new_cache();
        let staging = cache.staging_dir().unwrap();
        write_tree(staging.path(), &as_slices(&tree));
        let expected = digest_dir(staging.path()).unwrap();
        let digest = cache.commit_artifact(staging).unwrap();
        prop_assert_eq!(&digest, &expected);
        prop_assert_eq!(cache.check_artifact(&digest), ArtifactHealth::Ok);
        let info = &cache.list_artifacts().unwrap()[0];
        prop_assert_eq!(info.files, tree.len());
        prop_assert_eq!(info.bytes, tree.values().map(|b| b.len() as u64).sum::<u64>());
    }
}
