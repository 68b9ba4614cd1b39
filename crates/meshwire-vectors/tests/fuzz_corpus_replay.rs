#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Replays every committed corpus file of the `vector_file` fuzz target
//! (`fuzz/corpus/vector_file/`) through the very check the target runs
//! (`fuzz/vector_checks.rs`), on the stable toolchain. A missing or empty
//! corpus directory fails. The other targets' corpora are replayed by
//! `crates/meshwire-proto/tests/fuzz_corpus_replay.rs`.

#[path = "../../../fuzz/vector_checks.rs"]
mod vector_checks;

use std::path::{Path, PathBuf};

#[test]
fn vector_file_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/vector_file");
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
        if std::panic::catch_unwind(|| vector_checks::check_vector_file(&data)).is_err() {
            panic!(
                "vector_file: corpus file {} fails its check (message above)",
                file.display()
            );
        }
    }
    println!("vector_file: {} corpus files checked", files.len());
}
