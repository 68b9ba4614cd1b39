#![no_main]
//! See `check_knock` in fuzz/knock_checks.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshwire_fuzz::knock_checks::check_knock(data));
