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

/// Runs persistcli, failing the test (with its output) unless it succeeds;
/// returns its stdout.
fn persistcli_ok(args: &[&str], dir: &std::path::Path) -> String {
    let out = persistcli(args, dir);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "persistcli {args:?} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs persistcli, failing the test unless it fails; returns its stderr.
fn persistcli_err(args: &[&str], dir: &std::path::Path) -> String {
    let out = persistcli(args, dir);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "persistcli {args:?} succeeded\n{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Runs a small demo on the embedded default in `dir`; returns the shard id
/// it printed.
fn demo(dir: &std::path::Path, batches: u32) -> String {
    let batches = batches.to_string();
    let stdout = persistcli_ok(&["demo", "--batches", &batches, "--batch-size", "300"], dir);
    assert!(
        stdout.contains("verified: snapshot and listen match the written data"),
        "{stdout}"
    );
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("shard id: "))
        .unwrap_or_else(|| panic!("no shard id in {stdout}"))
        .trim()
        .to_owned()
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn demo_writes_and_verifies_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let stdout = persistcli_ok(
        &["demo", "--batches", "4", "--batch-size", "500", "--metrics"],
        dir.path(),
    );
    assert!(
        stdout.contains("wrote      2000 updates in 4 batches"),
        "{stdout}"
    );
    // `--metrics` prints the client's counters: one committed append per
    // batch, plus the one that closes time 0.
    assert!(
        stdout.contains("persist_appends_total{outcome=\"committed\"} 5"),
        "{stdout}"
    );
    assert!(stdout.contains("sqlite://"), "{stdout}");
    assert!(
        stdout.contains("verified: snapshot and listen match the written data"),
        "{stdout}"
    );
    assert!(dir.path().join("persist-data/consensus.db").exists());
}

#[test]
fn demo_appends_to_an_existing_shard_and_verifies_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 2);
    let stdout = persistcli_ok(
        &[
            "demo",
            "--shard",
            &shard,
            "--batches",
            "2",
            "--batch-size",
            "100",
        ],
        dir.path(),
    );
    assert!(stdout.contains("at times 3..=4"), "{stdout}");
    assert!(stdout.contains("verified"), "{stdout}");
}

#[test]
fn inspect_state_shows_upper_batches_and_no_leftover_handles() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 3);
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    assert_eq!(state["shard_id"], shard.as_str());
    // Batches at times 1, 2 and 3 hold the updates (background compaction
    // may have merged some of them by now).
    assert_eq!(state["upper"], serde_json::json!(["4"]));
    let batches = state["batches"].as_array().unwrap();
    assert!((1..=4).contains(&batches.len()), "{state:#}");
    let lens: Vec<_> = batches.iter().map(|b| b["len"].as_u64().unwrap()).collect();
    assert_eq!(lens.iter().sum::<u64>(), 900, "{state:#}");
    assert_eq!(state["codecs"]["ts"], "u64");
    // The demo expires its handles.
    assert_eq!(state["writers"], serde_json::json!({}));
    assert_eq!(state["leased_readers"], serde_json::json!({}));

    let again = json(&persistcli_ok(
        &["inspect", "state", &shard, "--ts", "u64"],
        dir.path(),
    ));
    assert_eq!(again["upper"], state["upper"]);
    let stderr = persistcli_err(&["inspect", "state", &shard, "--ts", "i64"], dir.path());
    assert!(stderr.contains("has u64 times, not i64"), "{stderr}");
}

#[test]
fn inspect_state_of_a_missing_shard_fails_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let shard = "s00000000-0000-0000-0000-000000000001";
    for _ in 0..2 {
        let stderr = persistcli_err(&["inspect", "state", shard], dir.path());
        assert!(stderr.contains("does not exist"), "{stderr}");
    }
    let stderr = persistcli_err(&["inspect", "state", "not-a-shard"], dir.path());
    assert!(stderr.contains("invalid shard id"), "{stderr}");
}

#[test]
fn inspect_blob_lists_the_parts_of_the_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 3);
    let other = demo(dir.path(), 1);
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    let mut parts: Vec<(String, u64)> = state["batches"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b["parts"].as_array().unwrap().clone())
        .map(|p| {
            (
                p["key"].as_str().unwrap().to_owned(),
                p["encoded_size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    parts.sort();
    assert!((1..=3).contains(&parts.len()), "{state:#}");

    let blobs = json(&persistcli_ok(&["inspect", "blob", &shard], dir.path()));
    let listed: Vec<(String, u64)> = blobs["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["key"].as_str().unwrap().to_owned(),
                b["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    // Every part state references is listed; so may be parts compaction
    // replaced that garbage collection has not deleted yet, and rollups.
    for part in &parts {
        assert!(listed.contains(part), "{part:?} missing from {blobs:#}");
    }
    assert_eq!(blobs["count"].as_u64().unwrap(), listed.len() as u64);
    assert_eq!(
        blobs["total_bytes"].as_u64().unwrap(),
        listed.iter().map(|(_, size)| size).sum::<u64>()
    );
    assert!(listed.iter().all(|(key, _)| !key.starts_with(&other)));
}

#[test]
fn finalize_refuses_an_open_shard_and_succeeds_after_close() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 2);

    let before = json(&persistcli_ok(&["inspect", "blob", &shard], dir.path()));
    let stderr = persistcli_err(&["admin", "finalize", &shard], dir.path());
    assert!(stderr.contains("still open"), "{stderr}");
    assert!(stderr.contains("persistcli admin close"), "{stderr}");
    let blobs = json(&persistcli_ok(&["inspect", "blob", &shard], dir.path()));
    assert!(blobs["count"].as_u64().unwrap() >= 1);
    assert_eq!(blobs, before, "a refused finalize deletes nothing");

    let stdout = persistcli_ok(&["admin", "close", &shard], dir.path());
    assert!(stdout.contains("closed shard"), "{stdout}");
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    assert_eq!(state["since"], serde_json::json!([]));
    assert_eq!(state["upper"], serde_json::json!([]));
    let stdout = persistcli_ok(&["admin", "close", &shard], dir.path());
    assert!(stdout.contains("already closed"), "{stdout}");

    let stdout = persistcli_ok(&["admin", "finalize", &shard], dir.path());
    assert!(stdout.contains("finalized shard"), "{stdout}");
    let blobs = json(&persistcli_ok(&["inspect", "blob", &shard], dir.path()));
    assert_eq!(blobs["count"], 0, "{blobs:#}");
    assert_eq!(blobs["blobs"], serde_json::json!([]));
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    assert_eq!(state["finalized"], true);

    // Finalizing again is a no-op; the shard cannot be written any more.
    persistcli_ok(&["admin", "finalize", &shard], dir.path());
    let stderr = persistcli_err(&["demo", "--shard", &shard], dir.path());
    assert!(stderr.contains("finalized"), "{stderr}");
}

#[test]
fn admin_refuses_a_missing_shard_without_creating_it() {
    let dir = tempfile::tempdir().unwrap();
    let shard = "s00000000-0000-0000-0000-000000000002";
    for command in ["finalize", "close"] {
        let stderr = persistcli_err(&["admin", command, shard], dir.path());
        assert!(stderr.contains("does not exist"), "{stderr}");
    }
    let stderr = persistcli_err(&["inspect", "state", shard], dir.path());
    assert!(stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn new_subcommands_name_a_bad_location_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let shard = "s00000000-0000-0000-0000-000000000003";
    let bad_blob = ["--blob", "ftp://example/x"];
    for command in [
        &["demo"][..],
        &["bench", "--appends", "1"],
        &["inspect", "state", shard],
        &["inspect", "blob", shard],
        &["admin", "close", shard],
        &["admin", "finalize", shard],
        &["controller", "demo"],
    ] {
        let args: Vec<&str> = command.iter().chain(&bad_blob).copied().collect();
        let stderr = persistcli_err(&args, dir.path());
        assert!(stderr.contains("open blob store"), "{stderr}");
        assert!(
            stderr.contains("unsupported blob uri scheme \"ftp\""),
            "{stderr}"
        );
    }
    let stderr = persistcli_err(
        &["demo", "--consensus", "postgres://u:hunter2@127.0.0.1:1/db"],
        dir.path(),
    );
    assert!(stderr.contains("open consensus"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn close_fails_naming_a_live_reader_that_holds_the_since() {
    use std::sync::Arc;

    use persist_client::{Diagnostics, PersistClientCache, PersistConfig};
    use persist_types::{PersistLocation, StringSchema};

    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let location = PersistLocation::embedded(&dir.path().join("persist-data"));
    let reader = runtime.block_on(async {
        let client = PersistClientCache::new(PersistConfig::default())
            .open(location)
            .await
            .unwrap();
        client
            .open_leased_reader::<String, String, u64, i64>(
                shard.parse().unwrap(),
                Arc::new(StringSchema::default()),
                Arc::new(StringSchema::default()),
                Diagnostics::from_purpose("a reader in the test"),
            )
            .await
            .unwrap()
    });

    let stderr = persistcli_err(&["admin", "close", &shard], dir.path());
    assert!(stderr.contains("other readers hold its since"), "{stderr}");
    assert!(stderr.contains("a reader in the test"), "{stderr}");
    let stderr = persistcli_err(&["admin", "finalize", &shard], dir.path());
    assert!(stderr.contains("still open"), "{stderr}");

    runtime.block_on(reader.expire());
    persistcli_ok(&["admin", "close", &shard], dir.path());
    persistcli_ok(&["admin", "finalize", &shard], dir.path());
}

#[test]
fn other_types_are_inspected_and_refused_by_name() {
    use std::sync::Arc;

    use persist_client::{Diagnostics, PersistClientCache, PersistConfig};
    use persist_types::{PersistLocation, ShardId, U64Schema};
    use timely::progress::Antichain;

    let dir = tempfile::tempdir().unwrap();
    let shard = ShardId::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let location = PersistLocation::embedded(&dir.path().join("persist-data"));
    runtime.block_on(async {
        let client = PersistClientCache::new(PersistConfig::default())
            .open(location)
            .await
            .unwrap();
        let (mut write, read) = client
            .open::<u64, u64, i64, i64>(
                shard,
                Arc::new(U64Schema::default()),
                Arc::new(U64Schema::default()),
                Diagnostics::for_tests(),
            )
            .await
            .unwrap();
        write
            .compare_and_append(
                &[((1u64, 2u64), -5i64, 1i64)],
                Antichain::from_elem(i64::MIN),
                Antichain::from_elem(7),
            )
            .await
            .unwrap()
            .unwrap();
        write.expire().await;
        read.expire().await;
    });
    let shard = shard.to_string();

    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    assert_eq!(state["codecs"]["ts"], "i64");
    assert_eq!(state["upper"], serde_json::json!(["7"]));
    let stderr = persistcli_err(&["inspect", "state", &shard, "--ts", "u64"], dir.path());
    assert!(stderr.contains("has i64 times, not u64"), "{stderr}");

    for args in [
        &["demo", "--shard", &shard][..],
        &["admin", "close", &shard],
        &["admin", "finalize", &shard],
    ] {
        let stderr = persistcli_err(args, dir.path());
        assert!(
            stderr.contains("holds (key u64, value u64, time i64, diff i64)"),
            "{stderr}"
        );
        assert!(
            stderr.contains("only shards of (key String, value String, time u64, diff i64)"),
            "{stderr}"
        );
    }
}

#[test]
fn controller_demo_finalizes_the_dropped_table_and_reruns_with_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("controller-data");
    let data_dir = data_dir.to_str().unwrap();
    let mut u2_shards = Vec::new();
    for epoch in 1..=2 {
        let stdout = persistcli_ok(&["controller", "demo", "--data-dir", data_dir], dir.path());
        assert!(
            stdout.contains(&format!("opened the controller of epoch {epoch} ")),
            "{stdout}"
        );
        assert!(
            stdout.contains("snapshot of u1 at time 4: 15 rows"),
            "{stdout}"
        );
        let last = stdout.lines().last().unwrap_or_default();
        let shard = last
            .strip_prefix("finalized shard ")
            .and_then(|rest| rest.strip_suffix(" of dropped collection u2"))
            .unwrap_or_else(|| panic!("unexpected last line {last:?}\n{stdout}"));
        let state = json(&persistcli_ok(
            &["inspect", "state", shard, "--data-dir", data_dir],
            dir.path(),
        ));
        assert_eq!(state["finalized"], true, "{state:#}");
        u2_shards.push(shard.to_owned());
        // The first run's u1 is left to the next run, which retires it.
        assert_eq!(stdout.contains("retired u1 of an earlier run"), epoch > 1);
    }
    assert_ne!(u2_shards[0], u2_shards[1], "every run uses new shards");
    assert!(
        !dir.path().join("persist-data").exists(),
        "--data-dir is used"
    );
}

#[test]
fn admin_compact_merges_the_batches_of_a_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shard = demo(dir.path(), 6);
    let stdout = persistcli_ok(&["admin", "compact", &shard], dir.path());
    assert!(stdout.contains("compacted shard"), "{stdout}");
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    let batches = state["batches"].as_array().unwrap();
    // Six equal batches merge geometrically down to very few.
    assert!(batches.len() <= 3, "{state:#}");
    let total: u64 = batches.iter().map(|b| b["len"].as_u64().unwrap()).sum();
    assert_eq!(total, 1800, "{state:#}");
    // The data reads back the same.
    let stdout = persistcli_ok(
        &[
            "demo",
            "--shard",
            &shard,
            "--batches",
            "1",
            "--batch-size",
            "10",
        ],
        dir.path(),
    );
    assert!(stdout.contains("verified"), "{stdout}");
}

#[test]
fn bench_appends_exactly_and_every_listener_receives_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let out = persistcli(
        &[
            "bench",
            "--appends",
            "200",
            "--rate",
            "0",
            "--writers",
            "2",
            "--readers",
            "2",
            "--batch-size",
            "5",
            "--key-space",
            "50",
            "--report-interval",
            "200ms",
            "--json",
        ],
        dir.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json(&stdout);
    assert_eq!(summary["appends"], 200, "{summary:#}");
    assert_eq!(summary["updates"], 1000, "{summary:#}");
    assert!(summary["stopped_early"].is_null(), "{summary:#}");
    assert!(summary["appends_per_sec"].as_f64().unwrap() > 0.0);
    let latency = &summary["append_latency_ms"];
    let (p50, p99) = (
        latency["p50"].as_f64().unwrap(),
        latency["p99"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{latency}");
    let listen = &summary["listen"];
    assert_eq!(listen["all_received"], true, "{summary:#}");
    assert_eq!(listen["updates_received"], serde_json::json!([1000, 1000]));

    let shard = &summary["shard"];
    // Time 0 is left empty; the appends take times 1 to 200.
    assert_eq!(shard["upper"], 201, "{summary:#}");
    assert_eq!(shard["expected_upper"], 201);
    let batches = shard["batches"].as_u64().unwrap();
    assert!((1..=201).contains(&batches), "{summary:#}");
    assert!(shard["state_bytes"].as_u64().unwrap() > 0);
    // Garbage collection truncates the log as rollups are written.
    assert!(shard["consensus_entries"].as_u64().unwrap() >= 1);
    let blob = shard["blob_bytes"].as_u64().unwrap();
    let referenced = shard["referenced_bytes"].as_u64().unwrap();
    let live = shard["consolidated_bytes"].as_u64().unwrap();
    assert!(blob >= referenced && referenced > 0, "{summary:#}");
    assert!(live > 0 && shard["live_records"].as_u64().unwrap() <= 50);
    assert!(shard["open_ms"].as_f64().unwrap() > 0.0);
    assert!(shard["baseline_open_ms"].as_f64().unwrap() > 0.0);
    let limit = shard["batches_limit"].as_f64().unwrap();
    assert!((limit - 2.0 * 200f64.log2()).abs() < 1e-9);
    for check in ["batches", "blob_bytes", "state_bytes", "open_time"] {
        assert!(summary["checks"][check]["pass"].is_boolean(), "{summary:#}");
    }

    // The periodic lines went to stderr; the shards were removed.
    let id = summary["shard_id"].as_str().unwrap();
    let blobs = json(&persistcli_ok(&["inspect", "blob", id], dir.path()));
    assert_eq!(blobs["count"], 0, "{blobs:#}");
    let state = json(&persistcli_ok(&["inspect", "state", id], dir.path()));
    assert_eq!(state["finalized"], true);
}

#[test]
fn bench_prints_pass_fail_lines_and_fails_with_check() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "bench",
        "--duration",
        "300ms",
        "--rate",
        "50",
        "--readers",
        "0",
        "--since-follows-upper",
        "false",
        "--keep",
    ];
    let stdout = persistcli_ok(&args, dir.path());
    for check in [
        "batches in state",
        "blob bytes",
        "bytes whole (latest consensus entry",
        "open ",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| (l.starts_with("PASS  ") || l.starts_with("FAIL  ")) && l.contains(check)),
            "{check}: {stdout}"
        );
    }
    let shard = stdout
        .lines()
        .find_map(|l| l.strip_prefix("shard id:  "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no shard id in {stdout}"))
        .to_owned();
    // With --keep the shard is left for inspection, its since held at 0.
    let state = json(&persistcli_ok(&["inspect", "state", &shard], dir.path()));
    assert_eq!(state["since"], serde_json::json!(["0"]), "{state:#}");
    assert_eq!(state["leased_readers"], serde_json::json!({}));

    // With the since held back nothing can compact, so at least the batch
    // count fails; --check turns that into a non-zero exit.
    let with_check: Vec<&str> = args.iter().copied().chain(["--check"]).collect();
    let out = persistcli(&with_check, dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    if stdout.contains("FAIL  ") {
        assert!(!out.status.success(), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("shard-health checks failed"), "{stderr}");
    } else {
        assert!(out.status.success(), "{stdout}");
    }
}

#[test]
fn dataflow_demo_maintains_and_follows_a_shard_on_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    for workers in ["1", "3"] {
        let stdout = persistcli_ok(
            &[
                "dataflow-demo",
                "--workers",
                workers,
                "--times",
                "8",
                "--events",
                "400",
                "--keys",
                "50",
            ],
            dir.path(),
        );
        assert!(stdout.contains("sqlite://"), "{stdout}");
        assert!(stdout.contains("time    7:"), "{stdout}");
        assert!(
            stdout.contains(
                "verified: what the source read equals the desired collection at every time 0..8"
            ),
            "{stdout}"
        );
    }
    assert!(dir.path().join("persist-data/consensus.db").exists());
}
