//! Every file under `policies/examples/` parses and validates.

use std::path::Path;

use meshflow_policies::documents::{read_dir_texts, PolicySet};

fn visit(dir: &Path, count: &mut usize) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            visit(&path, count);
        }
    }
    let mut set = PolicySet::default();
    for (file, text) in read_dir_texts(dir).unwrap() {
        set.add_file(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        *count += 1;
    }
}

#[test]
fn every_example_policy_parses() {
    let mut count = 0;
    visit(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        &mut count,
    );
    assert!(count >= 1, "no example files found");
}
