//! The check behind the `vector_file` fuzz target, shared by the target
//! (through `fuzz/src/lib.rs`) and the stable replay test
//! `crates/meshwire-vectors/tests/fuzz_corpus_replay.rs`, which includes this
//! file with `#[path]`. It may use only std and `meshwire_vectors`.

/// The `vector_file` target: `verify_document` must not panic on any text;
/// when it reads the document, every result names the label it was given.
pub fn check_vector_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(results) = meshwire_vectors::verify_document(text, "fuzz") {
        for result in &results {
            assert_eq!(result.file, "fuzz", "result carries the wrong label: {result}");
        }
    }
}
