#![no_main]
//! See `check_state_import` in fuzz/checks.rs.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| meshwire_fuzz::checks::check_state_import(data));
