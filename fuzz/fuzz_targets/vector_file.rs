#![no_main]
//! See `check_vector_file` in fuzz/vector_checks.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshwire_fuzz::vector_checks::check_vector_file(data));
