//! The crash harness's parts: the agent child, the processes, the ledger
//! and the round driver (see `tests/crash_harness.rs`).

pub mod agent;
pub mod driver;
pub mod ledger;
pub mod procs;
