use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field as RecordField;
use proptest::prelude::*;

use super::super::builder::EncodeOptions;
use super::super::{EncodedPart, MAX_STATS_KEY_BYTES, PartBuilder, PartCodecs, PartError};
use super::{BinaryColumn, catch_panics, decode_part, decode_unguarded};

type Update = (Vec<u8>, Vec<u8>, [u8; 8], [u8; 8]);

/// The Arrow schema parts map to: `k`, `v` non-null `Binary`; `t`, `d`
/// non-null `Int64`.
fn part_schema() -> Schema {
    Schema::new(vec![
        Field::new("k", DataType::Binary, false),
        Field::new("v", DataType::Binary, false),
        Field::new("t", DataType::Int64, false),
        Field::new("d", DataType::Int64, false),
    ])
}

fn codecs() -> PartCodecs {
    PartCodecs {
        key: "Vec<u8>".into(),
        val: "String".into(),
        ts: "u64".into(),
        diff: "i64".into(),
    }
}

fn encode(updates: &[Update], opts: &EncodeOptions) -> EncodedPart {
    let mut builder = PartBuilder::new(codecs());
    for (k, v, t, d) in updates {
        builder.push(k, v, *t, *d);
    }
    assert_eq!(builder.len(), updates.len());
    assert_eq!(builder.is_empty(), updates.is_empty());
    builder.encode(opts).unwrap()
}

fn assert_roundtrips(updates: &[Update], opts: &EncodeOptions) -> EncodedPart {
    let part = encode(updates, opts);
    assert_eq!(part.stats.len, updates.len() as u64);
    assert_eq!(part.stats.encoded_size_bytes, part.bytes.len() as u64);
    for (k, ..) in updates {
        assert!(part.stats.key_lower.as_slice() <= k.as_slice());
        if let Some(upper) = &part.stats.key_upper {
            assert!(k.as_slice() <= upper.as_slice());
        }
    }
    let decoded = decode_part(part.bytes.clone()).unwrap();
    assert_eq!(decoded.codecs(), &codecs());
    assert_eq!(decoded.len(), updates.len());
    assert_eq!(decoded.is_empty(), updates.is_empty());
    assert_eq!(decoded.iter().len(), updates.len());
    for (i, ((k, v, t, d), got)) in updates.iter().zip(decoded.iter()).enumerate() {
        assert_eq!((k.as_slice(), v.as_slice(), *t, *d), got, "update {i}");
        assert_eq!(decoded.get(i), got);
    }
    part
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn small_updates(n: usize) -> Vec<Update> {
    (0..n)
        .map(|i| {
            (
                format!("key{i:03}").into_bytes(),
                format!("val{i}").into_bytes(),
                (i as u64).to_le_bytes(),
                1i64.to_le_bytes(),
            )
        })
        .collect()
}

fn update() -> impl Strategy<Value = Update> {
    (
        proptest::collection::vec(any::<u8>(), 0..80),
        proptest::collection::vec(any::<u8>(), 0..80),
        any::<[u8; 8]>(),
        any::<[u8; 8]>(),
    )
}

proptest! {
    #[test]
    fn random_updates_roundtrip(mut updates in proptest::collection::vec(update(), 0..300)) {
        updates.sort();
        assert_roundtrips(&updates, &EncodeOptions::default());
    }

    #[test]
    fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        prop_assert!(decode_unguarded(Bytes::from(bytes)).is_err());
    }

    #[test]
    fn random_bytes_in_a_parquet_envelope_are_rejected(
        body in proptest::collection::vec(any::<u8>(), 0..2000),
        footer_len in 0u32..2100,
    ) {
        let mut bytes = b"PAR1".to_vec();
        bytes.extend(&body);
        bytes.extend(footer_len.to_le_bytes());
        bytes.extend(b"PAR1");
        prop_assert!(decode_unguarded(Bytes::from(bytes)).is_err());
    }
}

#[test]
fn empty_part_roundtrips() {
    let part = assert_roundtrips(&[], &EncodeOptions::default());
    assert_eq!(part.stats.len, 0);
    assert!(!part.stats.may_contain_key_range(b"", b"\xff"));
}

#[test]
fn empty_keys_and_vals_roundtrip() {
    let updates = vec![
        (vec![], vec![], [0; 8], [0; 8]),
        (vec![], vec![], [0xff; 8], [0x80; 8]),
        (vec![0], vec![], [1; 8], [2; 8]),
    ];
    assert_roundtrips(&updates, &EncodeOptions::default());
}

/// A column of nothing but empty values (the values of a shard of `()`
/// values) is not indexed at all, and still reads back, across pages and
/// row groups; one non-empty value makes it an indexed column again.
#[test]
fn all_empty_values_are_not_indexed() {
    let mut updates: Vec<Update> = (0..1000u32)
        .map(|i| (i.to_be_bytes().to_vec(), vec![], [1; 8], [1; 8]))
        .collect();
    let split = EncodeOptions {
        max_row_group_rows: Some(300),
        max_page_rows: Some(70),
        ..EncodeOptions::default()
    };
    for opts in [EncodeOptions::default(), split] {
        let part = assert_roundtrips(&updates, &opts);
        let decoded = decode_part(part.bytes).unwrap();
        assert!(matches!(decoded.vals, BinaryColumn::Empty { len: 1000 }));
        assert!(matches!(decoded.keys, BinaryColumn::Indexed { .. }));
    }
    updates[500].1 = vec![0];
    let part = assert_roundtrips(&updates, &EncodeOptions::default());
    let decoded = decode_part(part.bytes).unwrap();
    assert!(matches!(decoded.vals, BinaryColumn::Indexed { .. }));
}

#[test]
fn large_values_roundtrip() {
    let mut updates = small_updates(2000);
    updates.push((noise(200_000, 1), noise(3 << 20, 2), [7; 8], [9; 8]));
    updates.push((vec![0xff; 1000], noise(1_500_000, 3), [8; 8], [1; 8]));
    let part = assert_roundtrips(&updates, &EncodeOptions::default());
    // The upper bound of a long all-0xFF key is unbounded; the lower is short.
    assert_eq!(part.stats.key_upper, None);
    assert!(part.stats.key_lower.len() <= MAX_STATS_KEY_BYTES);
}

/// The `persist.crc32` a part recorded.
fn crc_of(part: &EncodedPart) -> Option<String> {
    let reader = SerializedFileReader::new(part.bytes.clone()).unwrap();
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .clone();
    kv.into_iter()
        .find(|e| e.key == "persist.crc32")
        .unwrap()
        .value
}

#[test]
fn version_1_parts_checksum_rows_and_still_decode() {
    let updates = small_updates(300);
    let opts = EncodeOptions {
        format_version: "1".into(),
        max_page_rows: Some(64),
        ..EncodeOptions::default()
    };
    let part = assert_roundtrips(&updates, &opts);
    // Version 1 hashes the updates row by row.
    let mut stream = Vec::new();
    for (k, v, t, d) in &updates {
        stream.extend((k.len() as u64).to_le_bytes());
        stream.extend(k);
        stream.extend((v.len() as u64).to_le_bytes());
        stream.extend(v);
        stream.extend(t);
        stream.extend(d);
    }
    assert_eq!(
        crc_of(&part),
        Some(format!("{:08x}", crc32fast::hash(&stream)))
    );
    // A changed value is caught by that checksum too.
    let last_val = &updates.last().unwrap().1;
    let at = part
        .bytes
        .windows(last_val.len())
        .position(|w| w == last_val.as_slice())
        .unwrap();
    let mut bytes = part.bytes.to_vec();
    bytes[at] ^= 1;
    assert_corrupt(Bytes::from(bytes), "checksum mismatch");
}

#[test]
fn uncompressed_parts_roundtrip_and_checksum_alike() {
    let mut updates = small_updates(5000);
    updates.push((noise(100_000, 4), noise(200_000, 5), [3; 8], [4; 8]));
    let build = |compress: bool| {
        let mut builder = PartBuilder::with_capacity(codecs(), updates.len(), 1 << 20, 1 << 20)
            .with_compression(compress);
        for (k, v, t, d) in &updates {
            builder.push(k, v, *t, *d);
        }
        builder.finish().unwrap()
    };
    let (snappy, plain) = (build(true), build(false));
    for part in [&snappy, &plain] {
        let decoded = decode_part(part.bytes.clone()).unwrap();
        assert!(
            decoded
                .iter()
                .eq(updates.iter().map(|(k, v, t, d)| (&k[..], &v[..], *t, *d)))
        );
    }
    // The checksum covers the values, not their compression.
    assert_eq!(crc_of(&snappy), crc_of(&plain));
    // ... and is the CRC-32 of the stream the module docs define: each
    // column's `PLAIN` values in turn (one row group here).
    let mut stream = Vec::new();
    for (k, ..) in &updates {
        stream.extend((k.len() as u32).to_le_bytes());
        stream.extend(k);
    }
    for (_, v, ..) in &updates {
        stream.extend((v.len() as u32).to_le_bytes());
        stream.extend(v);
    }
    stream.extend(updates.iter().flat_map(|u| u.2));
    stream.extend(updates.iter().flat_map(|u| u.3));
    assert_eq!(
        crc_of(&plain),
        Some(format!("{:08x}", crc32fast::hash(&stream)))
    );
    assert!(plain.bytes.len() > snappy.bytes.len());
}

#[test]
fn several_row_groups_roundtrip() {
    let updates = small_updates(100);
    let opts = EncodeOptions {
        max_row_group_rows: Some(7),
        ..EncodeOptions::default()
    };
    let part = assert_roundtrips(&updates, &opts);
    let reader = SerializedFileReader::new(part.bytes.clone()).unwrap();
    assert_eq!(reader.metadata().num_row_groups(), 15);
}

#[test]
fn metadata_holds_version_and_codecs() {
    let part = encode(&small_updates(3), &EncodeOptions::default());
    let reader = SerializedFileReader::new(part.bytes).unwrap();
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap();
    let get = |key: &str| {
        kv.iter()
            .find(|e| e.key == key)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(get("persist.format").as_deref(), Some("2"));
    assert_eq!(get("persist.key_codec").as_deref(), Some("Vec<u8>"));
    assert_eq!(get("persist.val_codec").as_deref(), Some("String"));
    assert_eq!(get("persist.ts_codec").as_deref(), Some("u64"));
    assert_eq!(get("persist.diff_codec").as_deref(), Some("i64"));
}

#[test]
fn part_is_readable_by_the_generic_parquet_reader() {
    let updates = small_updates(3);
    let part = encode(&updates, &EncodeOptions::default());
    let reader = SerializedFileReader::new(part.bytes).unwrap();
    let rows: Vec<_> = reader
        .get_row_iter(None)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    for (row, (k, v, t, d)) in rows.iter().zip(&updates) {
        let cols: Vec<(&str, &RecordField)> = row
            .get_column_iter()
            .map(|(name, field)| (name.as_str(), field))
            .collect();
        let names: Vec<&str> = cols.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["k", "v", "t", "d"]);
        match (cols[0].1, cols[1].1, cols[2].1, cols[3].1) {
            (
                RecordField::Bytes(rk),
                RecordField::Bytes(rv),
                RecordField::Long(rt),
                RecordField::Long(rd),
            ) => {
                assert_eq!(rk.data(), k.as_slice());
                assert_eq!(rv.data(), v.as_slice());
                assert_eq!(*rt, i64::from_le_bytes(*t));
                assert_eq!(*rd, i64::from_le_bytes(*d));
            }
            other => panic!("unexpected field types {other:?}"),
        }
    }
}

#[test]
fn empty_input_is_rejected() {
    let err = decode_part(Bytes::new()).unwrap_err();
    assert!(matches!(err, PartError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("too short"), "{err}");
}

#[test]
fn every_truncation_is_rejected() {
    let part = encode(&small_updates(5), &EncodeOptions::default());
    for end in 0..part.bytes.len() {
        let result = decode_unguarded(part.bytes.slice(..end));
        assert!(result.is_err(), "prefix of {end} bytes decoded");
    }
    // Dropping bytes from the front is rejected too.
    for start in 1..part.bytes.len() {
        assert!(decode_unguarded(part.bytes.slice(start..)).is_err());
    }
    // So is cutting the data short while keeping a valid footer.
    let footer_len =
        u32::from_le_bytes(part.bytes[part.bytes.len() - 8..][..4].try_into().unwrap());
    let footer_start = part.bytes.len() - 8 - footer_len as usize;
    for cut in 0..footer_start {
        let mut bytes = part.bytes[..cut].to_vec();
        bytes.extend_from_slice(&part.bytes[footer_start..]);
        assert!(
            decode_unguarded(Bytes::from(bytes)).is_err(),
            "data cut at {cut} decoded"
        );
    }
}

/// Flips bytes at `positions` and decodes without the panic guard: each must
/// be an error or a part whose every update can be read and equals the
/// original's (the checksum refuses changed data).
fn assert_flips_never_panic(bytes: &Bytes, positions: impl Iterator<Item = usize>) -> usize {
    let original: Vec<_> = decode_unguarded(bytes.clone())
        .unwrap()
        .iter()
        .map(|(k, v, t, d)| (k.to_vec(), v.to_vec(), t, d))
        .collect();
    let mut decoded = 0;
    for pos in positions {
        for mask in [0x01u8, 0x10, 0x80, 0xff] {
            let mut corrupt = bytes.to_vec();
            corrupt[pos] ^= mask;
            if let Ok(part) = decode_unguarded(Bytes::from(corrupt)) {
                decoded += 1;
                let total: usize = part.iter().map(|(k, v, ..)| k.len() + v.len()).sum();
                let updates: Vec<_> = part
                    .iter()
                    .map(|(k, v, t, d)| (k.to_vec(), v.to_vec(), t, d))
                    .collect();
                assert_eq!(
                    updates, original,
                    "flip at {pos} changed the data undetected"
                );
                assert!(
                    total <= bytes.len() * 64,
                    "flip at {pos} inflated to {total}"
                );
            }
        }
    }
    decoded
}

#[test]
fn byte_flips_in_a_small_part_never_panic() {
    let part = encode(&small_updates(5), &EncodeOptions::default());
    let decoded = assert_flips_never_panic(&part.bytes, 0..part.bytes.len());
    // Flips that still decode hit bytes that carry no updates (the writer's
    // name, column statistics); the rest are refused.
    assert!(decoded < part.bytes.len() * 4);
}

#[test]
fn changed_values_are_caught_by_the_checksum() {
    let part = encode(&small_updates(5), &EncodeOptions::default());
    // Flips inside the compressed values decode cleanly as Parquet; only the
    // checksum notices that the updates are not the ones written.
    let caught = (4..part.bytes.len())
        .filter(|&pos| {
            let mut corrupt = part.bytes.to_vec();
            corrupt[pos] ^= 0x01;
            matches!(decode_part(Bytes::from(corrupt)), Err(PartError::Corrupt { reason }) if reason.contains("checksum mismatch"))
        })
        .count();
    assert!(caught > 0, "no flip reached the checksum");
}

#[test]
fn parts_without_a_checksum_are_refused() {
    let mut metadata = persist_metadata("1");
    metadata.retain(|kv| kv.key != "persist.crc32");
    let err = decode_part(foreign_part(plain_props(metadata))).unwrap_err();
    assert!(err.to_string().contains("missing persist.crc32"), "{err}");
    let mut metadata = persist_metadata("1");
    metadata.retain(|kv| kv.key != "persist.crc32");
    metadata.push(KeyValue::new(
        "persist.crc32".into(),
        "00000000".to_string(),
    ));
    let err = decode_part(foreign_part(plain_props(metadata))).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
}

/// The number of pages in each column chunk of each row group.
fn page_counts(bytes: &Bytes) -> Vec<Vec<usize>> {
    let reader = SerializedFileReader::new(bytes.clone()).unwrap();
    let meta = reader.metadata();
    meta.row_groups()
        .iter()
        .map(|rg| {
            rg.columns()
                .iter()
                .map(|chunk| {
                    let (start, len) = chunk.byte_range();
                    let (mut pos, end) = (start as usize, (start + len) as usize);
                    let mut pages = 0;
                    while pos < end {
                        let (header, header_len) =
                            super::super::thrift::read_page_header(&bytes[pos..end]).unwrap();
                        pos += header_len + header.compressed_size as usize;
                        pages += 1;
                    }
                    pages
                })
                .collect()
        })
        .collect()
}

#[test]
fn byte_flips_in_a_multi_page_part_never_panic() {
    let mut updates = small_updates(1000);
    updates[100].1 = noise(2000, 4);
    let opts = EncodeOptions {
        max_row_group_rows: Some(400),
        max_page_rows: Some(150),
        ..EncodeOptions::default()
    };
    let part = assert_roundtrips(&updates, &opts);
    // 3 row groups (400, 400, 200 rows) of 3, 3 and 2 pages per column.
    let pages = page_counts(&part.bytes);
    assert_eq!(pages, [vec![3; 4], vec![3; 4], vec![2; 4]]);
    let len = part.bytes.len();
    // Every byte of the footer and a spread of positions in the data.
    let footer = len.saturating_sub(1500)..len;
    let data = (0..len).step_by(7);
    assert_flips_never_panic(&part.bytes, footer.chain(data));
}

/// Writes a Parquet file with arrow directly, with the persist metadata.
fn write_parquet(batch: &RecordBatch, props: WriterProperties) -> Bytes {
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(props)).unwrap();
    writer.write(batch).unwrap();
    Bytes::from(writer.into_inner().unwrap())
}

/// The checksum of the rows [`foreign_part`] writes.
fn foreign_crc() -> String {
    let mut hasher = super::super::Checksum::new();
    for _ in 0..2 {
        hasher.update(b"k", b"v", [1; 8], [2; 8]);
    }
    format!("{:08x}", hasher.finalize())
}

fn persist_metadata(version: &str) -> Vec<KeyValue> {
    let crc = foreign_crc();
    [
        ("persist.crc32", crc.as_str()),
        ("persist.format", version),
        ("persist.key_codec", "a"),
        ("persist.val_codec", "b"),
        ("persist.ts_codec", "c"),
        ("persist.diff_codec", "d"),
    ]
    .into_iter()
    .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
    .collect()
}

fn plain_props(metadata: Vec<KeyValue>) -> WriterProperties {
    WriterProperties::builder()
        .set_dictionary_enabled(false)
        .set_key_value_metadata(Some(metadata))
        .build()
}

fn assert_corrupt(bytes: Bytes, expected: &str) {
    match decode_part(bytes) {
        Err(PartError::Corrupt { reason }) => {
            assert!(reason.contains(expected), "{reason:?} lacks {expected:?}")
        }
        other => panic!("expected Corrupt({expected}), got {other:?}"),
    }
}

#[test]
fn wrong_schema_is_rejected() {
    // Right names, wrong types: k is a string, t an i32.
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8, false),
        Field::new("v", DataType::Binary, false),
        Field::new("t", DataType::Int32, false),
        Field::new("d", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec!["a"])),
        Arc::new(BinaryArray::from(vec![b"b".as_slice()])),
        Arc::new(Int32Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
    ];
    let batch = RecordBatch::try_new(schema, columns).unwrap();
    assert_corrupt(
        write_parquet(&batch, plain_props(persist_metadata("1"))),
        "logical type",
    );

    // Nullable columns.
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Binary, true),
        Field::new("v", DataType::Binary, true),
        Field::new("t", DataType::Int64, true),
        Field::new("d", DataType::Int64, true),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(BinaryArray::from(vec![Some(b"a".as_slice())])),
        Arc::new(BinaryArray::from(vec![None::<&[u8]>])),
        Arc::new(Int64Array::from(vec![1])),
        Arc::new(Int64Array::from(vec![1])),
    ];
    let batch = RecordBatch::try_new(schema, columns).unwrap();
    assert_corrupt(
        write_parquet(&batch, plain_props(persist_metadata("1"))),
        "column k is OPTIONAL",
    );

    // Other columns altogether.
    let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).unwrap();
    assert_corrupt(
        write_parquet(&batch, plain_props(persist_metadata("1"))),
        "expected columns",
    );

    // A nested schema.
    let inner = Fields::from(vec![Field::new("x", DataType::Int64, false)]);
    let schema = Arc::new(Schema::new(vec![Field::new(
        "k",
        DataType::Struct(inner.clone()),
        false,
    )]));
    let structs = arrow_array::StructArray::new(
        inner,
        vec![Arc::new(Int64Array::from(vec![1])) as ArrayRef],
        None,
    );
    let batch = RecordBatch::try_new(schema, vec![Arc::new(structs)]).unwrap();
    assert_corrupt(
        write_parquet(&batch, plain_props(persist_metadata("1"))),
        "not a flat list",
    );
}

/// A file with the part schema written by another writer (`ArrowWriter`)
/// with other settings: two updates `(k, v, 1, 2)`, checksummed the way
/// format version 1 does.
fn foreign_part(props: WriterProperties) -> Bytes {
    let schema = Arc::new(part_schema());
    let columns: Vec<ArrayRef> = vec![
        Arc::new(BinaryArray::from_vec(vec![b"k", b"k"])),
        Arc::new(BinaryArray::from_vec(vec![b"v", b"v"])),
        Arc::new(Int64Array::from(vec![i64::from_le_bytes([1; 8]); 2])),
        Arc::new(Int64Array::from(vec![i64::from_le_bytes([2; 8]); 2])),
    ];
    write_parquet(&RecordBatch::try_new(schema, columns).unwrap(), props)
}

#[test]
fn missing_metadata_is_rejected() {
    let props = WriterProperties::builder()
        .set_dictionary_enabled(false)
        .build();
    assert_corrupt(foreign_part(props), "missing persist.format");
    let mut metadata = persist_metadata("1");
    metadata.retain(|kv| kv.key != "persist.ts_codec");
    assert_corrupt(foreign_part(plain_props(metadata)), "persist.ts_codec");
    let mut metadata = persist_metadata("1");
    metadata.push(KeyValue::new("persist.format".into(), "1".to_string()));
    assert_corrupt(foreign_part(plain_props(metadata)), "more than once");
}

#[test]
fn dictionary_pages_are_rejected() {
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(persist_metadata("1")))
        .build();
    assert_corrupt(foreign_part(props), "dictionary page");
}

#[test]
fn uncompressed_parts_decode() {
    // The reader accepts UNCOMPRESSED as well as SNAPPY chunks.
    let part = decode_part(foreign_part(plain_props(persist_metadata("1")))).unwrap();
    assert_eq!(part.len(), 2);
    assert_eq!(part.get(1), (&b"k"[..], &b"v"[..], [1; 8], [2; 8]));
}

#[test]
fn unknown_format_version_is_rejected_by_name() {
    let opts = EncodeOptions {
        format_version: "999".into(),
        ..EncodeOptions::default()
    };
    let part = encode(&small_updates(3), &opts);
    let err = decode_part(part.bytes).unwrap_err();
    assert_eq!(
        err,
        PartError::UnsupportedFormat {
            found: "999".into(),
            supported: 2
        }
    );
    assert!(err.to_string().contains("999"), "{err}");
    // Only the exact decimal a writer writes is a known version.
    for odd in ["0", "02", "+2", " 2", "2.0"] {
        let opts = EncodeOptions {
            format_version: odd.into(),
            ..EncodeOptions::default()
        };
        let err = decode_part(encode(&small_updates(3), &opts).bytes).unwrap_err();
        assert!(
            matches!(err, PartError::UnsupportedFormat { .. }),
            "{odd}: {err}"
        );
    }
}

/// Replaces the zigzag varint at `pos` by the largest value of the same
/// length, so no offsets move.
fn inflate_varint_at(bytes: &mut [u8], pos: usize) {
    let len = bytes[pos..].iter().position(|b| b & 0x80 == 0).unwrap() + 1;
    assert!(len >= 2, "varint too short to inflate");
    bytes[pos] = 0xfe; // even: a positive zigzag value
    for b in &mut bytes[pos + 1..pos + len - 1] {
        *b = 0xff;
    }
    bytes[pos + len - 1] = 0x7f;
}

/// The first page header of column `k` and where it starts.
fn first_page_header(bytes: &Bytes) -> (usize, Vec<u8>) {
    let reader = SerializedFileReader::new(bytes.clone()).unwrap();
    let offset = reader.metadata().row_group(0).column(0).data_page_offset() as usize;
    let (_, len) = super::super::thrift::read_page_header(&bytes[offset..]).unwrap();
    (offset, bytes[offset..offset + len].to_vec())
}

#[test]
fn implausible_page_size_is_rejected_before_allocating() {
    let part = encode(&small_updates(20), &EncodeOptions::default());
    let (offset, header) = first_page_header(&part.bytes);
    // `type = DATA_PAGE`, then the uncompressed size.
    assert_eq!(&header[..3], &[0x15, 0x00, 0x15]);
    let mut bytes = part.bytes.to_vec();
    inflate_varint_at(&mut bytes, offset + 3);
    assert_corrupt(Bytes::from(bytes), "uncompressed from");
}

#[test]
fn implausible_value_count_is_rejected_before_allocating() {
    let part = encode(&small_updates(100), &EncodeOptions::default());
    let (offset, header) = first_page_header(&part.bytes);
    // The data page header (field 5, a struct) starts with num_values (100,
    // zigzag 200: two bytes).
    let at = header
        .windows(3)
        .position(|w| w == [0x2c, 0x15, 0xc8])
        .unwrap();
    let mut bytes = part.bytes.to_vec();
    inflate_varint_at(&mut bytes, offset + at + 2);
    assert_corrupt(Bytes::from(bytes), "values in");
}

#[test]
fn panics_become_corrupt_errors() {
    let err = catch_panics::<()>(|| panic!("boom")).unwrap_err();
    assert_eq!(
        err,
        PartError::Corrupt {
            reason: "the Parquet decoder panicked: boom".into()
        }
    );
}

/// A footer listing the same column chunks in many row groups would make
/// decoding cost a multiple of the input per listing: refused.
#[test]
fn row_groups_sharing_bytes_are_rejected() {
    use parquet::file::metadata::{
        FileMetaData, ParquetMetaDataBuilder, ParquetMetaDataReader, ParquetMetaDataWriter,
    };
    let part = encode(&small_updates(50), &EncodeOptions::default());
    let meta = ParquetMetaDataReader::new()
        .parse_and_finish(&part.bytes)
        .unwrap();
    let file = meta.file_metadata();
    let groups = vec![meta.row_group(0).clone(); 3];
    let forged = FileMetaData::new(
        file.version(),
        file.num_rows() * 3,
        file.created_by().map(str::to_string),
        file.key_value_metadata().cloned(),
        file.schema_descr_ptr(),
        None,
    );
    let forged = ParquetMetaDataBuilder::new(forged)
        .set_row_groups(groups)
        .build();
    let footer_len =
        u32::from_le_bytes(part.bytes[part.bytes.len() - 8..][..4].try_into().unwrap());
    let mut bytes = part.bytes[..part.bytes.len() - 8 - footer_len as usize].to_vec();
    ParquetMetaDataWriter::new(&mut bytes, &forged)
        .finish()
        .unwrap();
    assert_corrupt(Bytes::from(bytes), "overlaps an earlier chunk");
}
