//! Fuzz target: a Directory message from untrusted bytes, decoded and validated the way the
//! coordinator checks a submitted input tree and an agent one it materialises
//! (`tree::validate_directory`, `tree::walk_tree`). The first byte picks the depth.
#![no_main]

use archfarm_proto::{tree, v1, Digest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&depth, bytes)) = data.split_first() else {
        return;
    };
    let depth = usize::from(depth % 8);
    if let Ok(dir) = v1::Directory::decode(bytes) {
        if tree::validate_directory(".", depth, &dir).is_ok() {
            for s in &dir.symlinks {
                assert!(!tree::symlink_escapes(depth, &s.target), "{s:?}");
            }
            // The canonical encoding decodes to the same, still valid, Directory.
            let canonical = tree::encode_directory(&dir);
            let again =
                v1::Directory::decode(canonical.as_slice()).expect("canonical bytes decode");
            assert_eq!(again, dir);
            assert!(tree::validate_directory(".", depth, &again).is_ok());
            assert_eq!(tree::directory_digest(&dir), Digest::of(&canonical));
        }
    }
    // The bytes as the root blob of a stored tree: decoded, held to the canonical encoding,
    // validated; any child directory is missing from this one-blob store.
    let root = Digest::of(bytes);
    if let Ok((dirs, files)) = tree::walk_tree(root, |d| (*d == root).then(|| bytes.to_vec())) {
        assert_eq!(dirs.len(), 1);
        let dir = &dirs[&root];
        assert!(
            dir.directories.is_empty(),
            "a child directory cannot be in the store"
        );
        assert_eq!(tree::encode_directory(dir), bytes);
        assert!(files.len() <= dir.files.len());
        assert!(tree::validate_directory(".", 0, dir).is_ok());
    }
});
