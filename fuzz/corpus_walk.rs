//! Walks a committed fuzz corpus for the stable replay tests (included with
//! `#[path]` by crates/meshwire-proto and crates/meshwire-vectors).

use std::path::{Path, PathBuf};

/// `fuzz/corpus/<target>`, from a crate under `crates/`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

/// Runs `check` on every file of `fuzz/corpus/<target>`; returns how many.
/// A missing or empty corpus fails: it would check nothing.
pub fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {} is missing: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "corpus {} is empty: it would check nothing",
        dir.display()
    );
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!(
                "{target}: corpus file {} fails its check (message above)",
                file.display()
            );
        }
    }
    println!("{target}: {} corpus files checked", files.len());
    files.len()
}
