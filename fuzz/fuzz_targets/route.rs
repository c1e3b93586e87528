#![no_main]
//! See `larder_fuzz::route` for what this target checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_fuzz::route(data));
