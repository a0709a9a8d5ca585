//! `persistcli` as a user runs it.

use std::process::{Command, Output};

fn persistcli(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_persistcli"))
        .args(args)
        .current_dir(dir)
        .env_remove("PERSIST_BLOB_URI")
        .env_remove("PERSIST_CONSENSUS_URI")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run persistcli")
}

#[test]
fn check_passes_on_the_embedded_default_and_is_repeatable() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = persistcli(
            &["check", "--blob-size", "4096", "--cas-count", "3"],
            dir.path(),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("location is healthy"), "{stdout}");
        assert!(stdout.contains("sqlite://"), "{stdout}");
    }
    assert!(dir.path().join("persist-data/consensus.db").exists());
    let blob_dir = dir.path().join("persist-data/blob");
    assert_eq!(
        std::fs::read_dir(blob_dir).unwrap().count(),
        0,
        "the probe blob is removed"
    );
}

#[test]
fn check_names_a_bad_location_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let out = persistcli(
        &[
            "check",
            "--consensus",
            "postgres://u:hunter2@127.0.0.1:1/db",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("open consensus"), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");

    let out = persistcli(&["check", "--blob", "ftp://example/x"], dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unsupported blob uri scheme \"ftp\""),
        "{stderr}"
    );
}
