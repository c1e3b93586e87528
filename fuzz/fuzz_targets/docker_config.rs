#![no_main]
//! See `larder_fuzz::docker_config` for what this target checks.

libfuzzer_sys::fuzz_target!(|data: &[u8]| larder_fuzz::docker_config(data));
