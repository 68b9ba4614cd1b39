#![no_main]
//! See `check_decrypt` in fuzz/checks.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshwire_fuzz::checks::check_decrypt(data));
