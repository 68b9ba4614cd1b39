//! The checks the fuzz targets run. They live in files beside `src/` so that
//! the stable replay tests (`crates/meshwire-proto/tests/fuzz_corpus_replay.rs`
//! and `crates/meshwire-vectors/tests/fuzz_corpus_replay.rs`) can include the
//! very same code with `#[path]` and run every corpus file through it.

#[path = "../checks.rs"]
pub mod checks;

#[path = "../knock_checks.rs"]
pub mod knock_checks;

#[path = "../vector_checks.rs"]
pub mod vector_checks;
