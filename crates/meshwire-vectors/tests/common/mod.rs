//! Where the test binaries find the reference vectors, and how they say
//! that they skipped a test.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The reference runtimes' golden vectors: `$MESHWIRE_SHARED_VECTORS`, else
/// `../shared/vectors` beside the repository (where CI puts them). They are
/// not part of the repository.
pub fn shared_vectors_dir() -> PathBuf {
    std::env::var_os("MESHWIRE_SHARED_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/vectors"))
}

/// [`shared_vectors_dir`] when it exists; otherwise the calling test says
/// it skipped (see [`skipped`]) and gets None.
pub fn shared_vectors() -> Option<PathBuf> {
    let dir = shared_vectors_dir();
    if dir.is_dir() {
        Some(dir)
    } else {
        skipped(&format!(
            "no shared vectors at {} (set MESHWIRE_SHARED_VECTORS to their folder)",
            dir.display()
        ));
        None
    }
}

/// Prints `SKIPPED <test>: <reason>` straight to the process's stderr:
/// libtest captures only `print!`/`eprint!`, so the line shows without
/// `--nocapture`, next to the test's `ok`.
pub fn skipped(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}
