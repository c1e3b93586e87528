#![no_main]
//! See `larder_fuzz::reference` for what this target checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_fuzz::reference(data));
