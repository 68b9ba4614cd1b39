#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Replays every committed corpus file of the `vector_file` fuzz target
//! (`fuzz/corpus/vector_file/`) through the very check the target runs
//! (`fuzz/vector_checks.rs`), on the stable toolchain. A missing or empty
//! corpus directory fails. The other targets' corpora are replayed by
//! `crates/meshwire-proto/tests/fuzz_corpus_replay.rs`.

#[path = "../../../fuzz/vector_checks.rs"]
mod vector_checks;

#[path = "../../../fuzz/corpus_walk.rs"]
mod corpus_walk;

#[test]
fn vector_file_corpus() {
    assert!(corpus_walk::replay("vector_file", vector_checks::check_vector_file) > 0);
}
