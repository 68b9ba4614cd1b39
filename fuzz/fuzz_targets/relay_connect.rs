#![no_main]
//! The relay's first-frame check and frame classification; see
//! `relay_frames` in crates/meshwire-server/src/fuzzing.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshwire_server::fuzzing::relay_frames(data);
});
