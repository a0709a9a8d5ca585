//! The sink and the source across two timely processes (cluster mode over
//! loopback), sharing a `file://` blob store and a `sqlite://` consensus
//! log: this test binary runs itself twice as the two processes.
//!
//! It has its own `main` (`harness = false`): started with the role
//! variable set it is one of the two processes; otherwise it is the test.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use differential_dataflow::AsCollection;
use persist::{open_blob, open_consensus};
use persist_client::{Diagnostics, PersistClient, PersistConfig};
use persist_operators::{
    PersistSinkArgs, Record, RecordSchema, ShardSourceArgs, persist_sink, shard_source,
};
use persist_types::{PersistLocation, ShardId};
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};
use timely::progress::Antichain;

/// Tells a child process its role: `process;address0,address1;dir;shard`.
const ROLE: &str = "PERSIST_OPERATORS_CLUSTER_ROLE";
const THREADS: usize = 2;
const TIMES: u64 = 10;

type Row = Record<String, String, String>;

async fn client_of(dir: &Path) -> PersistClient {
    let location = PersistLocation::embedded(dir);
    let blob = open_blob(&location.blob_uri).await.expect("blob");
    let consensus = open_consensus(&location.consensus_uri)
        .await
        .expect("consensus");
    PersistClient::new(PersistConfig::default(), blob, consensus)
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

fn wait(mut child: Child, what: &str) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        if start.elapsed() > GUARD {
            let _ = child.kill();
            panic!("{what} timed out");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[allow(clippy::print_stdout)] // This binary's report, as a harness prints.
fn main() {
    match std::env::var(ROLE) {
        Ok(role) => cluster_child(&role),
        Err(_) => {
            two_processes_roundtrip_over_loopback();
            // The harness's usual report line (this binary has no harness).
            println!("test two_processes_roundtrip_over_loopback ... ok");
        }
    }
}

fn two_processes_roundtrip_over_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shard = ShardId::new();
    // Hold the since at 0 so every time can be compared afterwards.
    let rt = runtime();
    let client = rt.block_on(client_of(dir.path()));
    let _hold = rt
        .block_on(client.open_leased_reader::<Row, (), u64, i64>(
            shard,
            Arc::new(RecordSchema::default()),
            Arc::new(Default::default()),
            Diagnostics::for_tests(),
        ))
        .expect("valid usage");
    let addresses = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
    let exe = std::env::current_exe().expect("test binary");
    let children: Vec<Child> = (0..2)
        .map(|process| {
            Command::new(&exe)
                .env(
                    ROLE,
                    format!("{process};{addresses};{};{shard}", dir.path().display()),
                )
                .spawn()
                .expect("spawn a process")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        wait(child, &format!("process {i}"));
    }
    let mut actual = Vec::new();
    for process in 0..2 {
        let text = std::fs::read_to_string(out_file(dir.path(), process)).expect("output");
        for line in text.lines() {
            let f: Vec<&str> = line.split('\t').collect();
            let (t, r) = (f[2].parse().expect("time"), f[3].parse().expect("diff"));
            actual.push(((f[0].to_owned(), f[1].to_owned()), t, r));
        }
    }
    let expected: Vec<Update> = (0..2 * THREADS)
        .flat_map(|w| (0..TIMES).flat_map(move |t| generated(w, t)))
        .collect();
    assert!(!actual.is_empty());
    assert_equal_at(&actual, &expected, 0..TIMES + 2);
}

fn out_file(dir: &Path, process: usize) -> PathBuf {
    dir.join(format!("out-{process}.tsv"))
}

/// One of the two processes, as `role` (see [`ROLE`]) says.
fn cluster_child(role: &str) {
    let parts: Vec<&str> = role.split(';').collect();
    let process: usize = parts[0].parse().expect("process index");
    let addresses: Vec<String> = parts[1].split(',').map(str::to_owned).collect();
    let dir = PathBuf::from(parts[2]);
    let shard: ShardId = parts[3].parse().expect("shard id");
    let rt = runtime();
    let client = rt.block_on(client_of(&dir));
    let handle = rt.handle().clone();
    let config = timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: THREADS,
            process,
            addresses,
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    };
    let guards = timely::execute(config, move |worker| {
        let collected = Rc::new(RefCell::new(Vec::new()));
        let args = PersistSinkArgs::<String, String, String>::new(
            "cluster-sink",
            client.clone(),
            shard,
            handle.clone(),
        );
        let (mut input, token) = worker.dataflow(|scope| {
            let (input, ok) = scope.new_input::<Update>();
            let (_e, errs) = scope.new_input::<(String, u64, i64)>();
            let token = persist_sink(ok.as_collection(), errs.as_collection(), args);
            (input, token)
        });
        let sink_collected = Rc::clone(&collected);
        let source = ShardSourceArgs::<Row, (), u64>::new(
            "cluster-reader",
            client.clone(),
            shard,
            handle.clone(),
        )
        .as_of(Antichain::from_elem(0));
        let (probe, _source) = worker.dataflow(|scope| {
            let out = shard_source::<Row, (), u64, i64, _>(scope, source, |_, _| true);
            let (probe, _) = out
                .ok
                .inner
                .inspect(move |((row, ()), t, r)| {
                    if let Record::Data(k, v) = row {
                        sink_collected
                            .borrow_mut()
                            .push(((k.clone(), v.clone()), *t, *r));
                    }
                })
                .probe();
            (probe, out.token)
        });
        let me = worker.index();
        for t in 0..TIMES {
            for u in generated(me, t) {
                input.send(u);
            }
            input.advance_to(t + 1);
            worker.step();
        }
        drop(input);
        step_until(worker, "the read back", || probe.done());
        step_until(worker, "the sink to see the seal", || {
            token.persisted_frontier().is_empty()
        });
        collected.borrow().clone()
    })
    .expect("timely cluster starts");
    let mut lines = String::new();
    for result in guards.join() {
        for ((k, v), t, r) in result.expect("worker succeeds") {
            lines.push_str(&format!("{k}\t{v}\t{t}\t{r}\n"));
        }
    }
    std::fs::write(out_file(&dir, process), lines).expect("write output");
}
