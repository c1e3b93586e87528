#![no_main]
//! See `larder_fuzz::admission` for what this target checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_fuzz::admission(data));
