#![no_main]
//! One registry request through the real router; see `registry_request` in
//! crates/meshwire-server/src/fuzzing.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    meshwire_server::fuzzing::registry_request(data);
});
