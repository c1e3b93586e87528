//! The docs stay true to the binary: every flag of `larder` and of each role, and the
//! environment variable clap reads it from, is described in docs/configuration.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The flags (`--name`) and variables (`LARDER_NAME`) a `--help` text lists, clap's own aside.
fn flags_and_variables(help: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut flags = BTreeSet::new();
    let mut variables = BTreeSet::new();
    let mut words = help.split_whitespace().peekable();
    while let Some(word) = words.next() {
        if let Some(name) = word.strip_prefix("--") {
            let name: String = name
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !name.is_empty() && name != "help" && name != "version" {
                flags.insert(format!("--{name}"));
            }
        }
        // clap prints `[env: LARDER_NAME=default]` or `[env: LARDER_NAME=]`.
        if word == "[env:"
            && let Some(next) = words.peek()
        {
            let variable = next.split(['=', ']']).next().unwrap_or_default();
            variables.insert(variable.to_owned());
        }
    }
    (flags, variables)
}

#[test]
fn every_flag_and_its_variable_is_documented() {
    let larder = larder_testkit::process::larder_binary().expect("the larder binary");
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).expect("docs/configuration.md");
    let mut missing = Vec::new();
    let mut seen = 0;
    for role in [
        None,
        Some("proxy"),
        Some("webhook"),
        Some("controller"),
        Some("prepare-disk"),
        Some("uninstall"),
    ] {
        let mut cmd = Command::new(&larder);
        cmd.args(role).arg("--help");
        let out = cmd.output().expect("larder --help runs");
        assert!(out.status.success(), "{role:?} --help failed");
        let (flags, variables) = flags_and_variables(&String::from_utf8(out.stdout).unwrap());
        seen += flags.len();
        let role = role.unwrap_or("larder");
        for flag in flags {
            // Documented as a table cell or in prose: `--flag` or `--flag VALUE`.
            if !doc.contains(&format!("`{flag}`")) && !doc.contains(&format!("`{flag} ")) {
                missing.push(format!("{role} {flag}"));
            }
        }
        for variable in variables {
            if !doc.contains(&format!("`{variable}`")) {
                missing.push(format!("{role} {variable}"));
            }
        }
    }
    assert!(
        seen > 40,
        "only {seen} flags found: the help format changed?"
    );
    assert!(
        missing.is_empty(),
        "not described in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn help_texts_are_read_as_clap_writes_them() {
    let help = "Usage: larder proxy [OPTIONS]\n\n      --listen <LISTEN>\n          Where to listen \
                [env: LARDER_LISTEN=127.0.0.1:7439]\n      --node-name <NODE_NAME>\n          \
                [env: LARDER_NODE_NAME=]\n  -h, --help\n          Print help\n";
    let (flags, variables) = flags_and_variables(help);
    assert_eq!(
        flags.into_iter().collect::<Vec<_>>(),
        ["--listen", "--node-name"]
    );
    assert_eq!(
        variables.into_iter().collect::<Vec<_>>(),
        ["LARDER_LISTEN", "LARDER_NODE_NAME"]
    );
}
