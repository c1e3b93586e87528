//! The fuzz targets' corpus, replayed on every `cargo test`: each file under
//! `fuzz/corpus/<target>/` (and `fuzz/regressions/<target>/`, inputs of crashes that were fixed)
//! goes through the same function its `cargo fuzz` target runs (`fuzz/src/lib.rs`, compiled
//! here too), so every property the fuzzers checked is checked again without cargo-fuzz or a
//! nightly compiler. See fuzz/README.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

#[path = "../../fuzz/src/lib.rs"]
mod targets;

/// Runs every input of `target` through `check`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let dir = fuzz.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "fuzz target `{target}` fails on {} (reproduce: cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run {target} {})",
                path.display(),
                path.display()
            );
            count += 1;
        }
    }
    count
}

macro_rules! corpus_test {
    ($name:ident) => {
        #[test]
        fn $name() {
            let n = replay(stringify!($name), targets::$name);
            assert!(n > 0, "no corpus for `{}`", stringify!($name));
        }
    };
}

corpus_test!(route);
corpus_test!(reference);
corpus_test!(admission);
corpus_test!(docker_config);
corpus_test!(www_authenticate);
corpus_test!(range);
