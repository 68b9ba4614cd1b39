//! The storage conformance suite on the in-process backend (two handles =
//! two clones of one store).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod storage_support;

use meshwire_server::storage::{Storage, StorageLimits};
use storage_support::Pair;

async fn open(limits: StorageLimits) -> Option<Pair> {
    let a = Storage::memory(limits);
    Some(Pair {
        b: a.clone(),
        a,
        guard: Box::new(()),
        sweeps: true,
    })
}

conformance!(open);
