//! A JSON view of a shard's state for people and tools.

use std::fmt::Debug;

use differential_dataflow::lattice::Lattice;
use serde_json::{Value, json};
use timely::progress::{Antichain, Timestamp};

use crate::internal::state::State;

fn frontier<T: Debug>(frontier: &Antichain<T>) -> Value {
    Value::Array(
        frontier
            .elements()
            .iter()
            .map(|t| Value::String(format!("{t:?}")))
            .collect(),
    )
}

/// The state as JSON. Times are rendered with `Debug`; blob keys, sizes
/// and ids as they are stored.
pub(crate) fn state_json<T: Timestamp + Lattice + persist_types::Codec64>(
    state: &State<T>,
) -> Value {
    let batches: Vec<Value> = state
        .batches
        .iter()
        .map(|b| {
            json!({
                "lower": frontier(b.desc.lower()),
                "upper": frontier(b.desc.upper()),
                "since": frontier(b.desc.since()),
                "len": b.len,
                "parts": b.parts.iter().map(|p| json!({
                    "key": p.key,
                    "len": p.len,
                    "encoded_size_bytes": p.encoded_size_bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let writers: serde_json::Map<String, Value> = state
        .writers
        .iter()
        .map(|(id, w)| {
            let value = json!({
                "purpose": w.purpose,
                "last_heartbeat_ms": w.last_heartbeat_ms,
                "lease_duration_ms": w.lease_duration_ms,
                "most_recent_write_upper": frontier(&w.most_recent_write_upper),
            });
            (id.to_string(), value)
        })
        .collect();
    let leased_readers: serde_json::Map<String, Value> = state
        .leased_readers
        .iter()
        .map(|(id, r)| {
            let value = json!({
                "purpose": r.purpose,
                "since": frontier(&r.since),
                "seqno": r.seqno.0,
                "last_heartbeat_ms": r.last_heartbeat_ms,
                "lease_duration_ms": r.lease_duration_ms,
            });
            (id.to_string(), value)
        })
        .collect();
    let critical_readers: serde_json::Map<String, Value> = state
        .critical_readers
        .iter()
        .map(|(id, r)| {
            let value = json!({
                "purpose": r.purpose,
                "since": frontier(&r.since),
                "opaque": format!("{:02x?}", r.opaque),
                "opaque_codec": r.opaque_codec,
            });
            (id.to_string(), value)
        })
        .collect();
    json!({
        "shard_id": state.shard_id.to_string(),
        "seqno": state.seqno.0,
        "walltime_ms": state.walltime_ms,
        "codecs": state.codecs,
        "since": frontier(&state.since),
        "upper": frontier(&state.upper),
        "finalized": state.is_finalized(),
        "batches": batches,
        "writers": writers,
        "leased_readers": leased_readers,
        "critical_readers": critical_readers,
    })
}
