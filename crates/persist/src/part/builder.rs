//! Writing parts.

use std::fmt;
use std::sync::Arc;

use arrow_array::builder::BinaryBuilder;
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};

use super::stats::KeyBounds;
use super::{
    COL_DIFF, COL_KEY, COL_TIME, COL_VAL, Checksum, FORMAT_VERSION, META_CRC32, META_DIFF_CODEC,
    META_FORMAT, META_KEY_CODEC, META_TS_CODEC, META_VAL_CODEC, PartCodecs, PartError, PartStats,
};

/// The most bytes of keys (and, separately, of vals) one part can hold:
/// Arrow `Binary` offsets are `i32`.
const MAX_COLUMN_BYTES: usize = i32::MAX as usize;

/// The Arrow schema of a part: `k`, `v` non-null `Binary`; `t`, `d` non-null
/// `Int64`.
pub(super) fn part_schema() -> Schema {
    Schema::new(vec![
        Field::new(COL_KEY, DataType::Binary, false),
        Field::new(COL_VAL, DataType::Binary, false),
        Field::new(COL_TIME, DataType::Int64, false),
        Field::new(COL_DIFF, DataType::Int64, false),
    ])
}

/// Accumulates updates in memory and encodes them as one part.
///
/// The builder does not sort or consolidate: it writes updates in the order
/// they are pushed, and a part's promise of being a sorted run holds only if
/// the caller pushes sorted updates. It does compute [`PartStats`] (which
/// are correct in any order).
pub struct PartBuilder {
    codecs: PartCodecs,
    keys: BinaryBuilder,
    vals: BinaryBuilder,
    times: Vec<i64>,
    diffs: Vec<i64>,
    key_bytes: usize,
    val_bytes: usize,
    /// Set once a push would exceed [`MAX_COLUMN_BYTES`]; `finish` then fails.
    too_large: bool,
    bounds: KeyBounds,
    /// The checksum of the pushed updates.
    crc: Checksum,
    /// Whether to Snappy-compress the columns.
    compress: bool,
}

impl fmt::Debug for PartBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartBuilder")
            .field("codecs", &self.codecs)
            .field("len", &self.len())
            .field("key_bytes", &self.key_bytes)
            .field("val_bytes", &self.val_bytes)
            .finish_non_exhaustive()
    }
}

impl PartBuilder {
    /// Returns an empty builder for a part whose updates were encoded with
    /// `codecs`.
    pub fn new(codecs: PartCodecs) -> Self {
        PartBuilder::with_capacity(codecs, 0, 0, 0)
    }

    /// An empty builder with room for `rows` updates whose keys and vals
    /// total `key_bytes` and `val_bytes` (a builder that knows its part's
    /// size up front saves regrowing its buffers).
    pub fn with_capacity(
        codecs: PartCodecs,
        rows: usize,
        key_bytes: usize,
        val_bytes: usize,
    ) -> Self {
        PartBuilder {
            codecs,
            keys: BinaryBuilder::with_capacity(rows, key_bytes.min(MAX_COLUMN_BYTES)),
            vals: BinaryBuilder::with_capacity(rows, val_bytes.min(MAX_COLUMN_BYTES)),
            times: Vec::with_capacity(rows),
            diffs: Vec::with_capacity(rows),
            key_bytes: 0,
            val_bytes: 0,
            too_large: false,
            bounds: KeyBounds::default(),
            crc: Checksum::new(),
            compress: true,
        }
    }

    /// Whether to Snappy-compress the part (the default). Compression
    /// costs CPU on both ends and saves blob bytes when keys and vals
    /// repeat; readers accept either.
    pub fn with_compression(mut self, compress: bool) -> Self {
        self.compress = compress;
        self
    }

    /// Appends one update. Updates are stored in push order (see
    /// [`PartBuilder`]). Never panics: if the keys or vals of the part would
    /// exceed 2 GiB, the update is dropped and [`PartBuilder::finish`]
    /// returns [`PartError::Encode`].
    pub fn push(&mut self, key: &[u8], val: &[u8], time: [u8; 8], diff: [u8; 8]) {
        let key_bytes = self.key_bytes.saturating_add(key.len());
        let val_bytes = self.val_bytes.saturating_add(val.len());
        if self.too_large || key_bytes > MAX_COLUMN_BYTES || val_bytes > MAX_COLUMN_BYTES {
            self.too_large = true;
            return;
        }
        self.key_bytes = key_bytes;
        self.val_bytes = val_bytes;
        self.bounds.observe(key);
        self.crc.update(key, val, time, diff);
        self.keys.append_value(key);
        self.vals.append_value(val);
        self.times.push(i64::from_le_bytes(time));
        self.diffs.push(i64::from_le_bytes(diff));
    }

    /// The number of updates pushed so far.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether no update was pushed.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// Encodes the pushed updates, in push order, as a part of the newest
    /// format version ([`super::FORMAT_VERSION`]) and returns it with its
    /// stats. A builder with no updates makes a valid empty part.
    ///
    /// Fails with [`PartError::Encode`] if the part is too large (see
    /// [`PartBuilder::push`]) or the Parquet writer fails.
    pub fn finish(self) -> Result<EncodedPart, PartError> {
        self.encode(&EncodeOptions::default())
    }

    pub(super) fn encode(mut self, opts: &EncodeOptions) -> Result<EncodedPart, PartError> {
        if self.too_large {
            return Err(PartError::Encode {
                reason: format!("part too large: keys or vals exceed {MAX_COLUMN_BYTES} bytes"),
            });
        }
        let len = self.len();
        let schema = Arc::new(part_schema());
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.keys.finish()),
            Arc::new(self.vals.finish()),
            Arc::new(Int64Array::from(std::mem::take(&mut self.times))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.diffs))),
        ];
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(encode_err)?;

        let codecs = &self.codecs;
        let crc = format!("{:08x}", self.crc.clone().finalize());
        let compression = if self.compress {
            Compression::SNAPPY
        } else {
            Compression::UNCOMPRESSED
        };
        let metadata = [
            (META_FORMAT, opts.format_version.as_str()),
            (META_KEY_CODEC, codecs.key.as_str()),
            (META_VAL_CODEC, codecs.val.as_str()),
            (META_TS_CODEC, codecs.ts.as_str()),
            (META_DIFF_CODEC, codecs.diff.as_str()),
            (META_CRC32, crc.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
        .collect();
        let mut props = WriterProperties::builder();
        if let Some(rows) = opts.max_page_rows {
            props = props
                .set_data_page_row_count_limit(rows)
                .set_write_batch_size(rows);
        }
        let props = props
            .set_writer_version(WriterVersion::PARQUET_1_0)
            .set_compression(compression)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .set_offset_index_disabled(true)
            .set_max_row_group_row_count(opts.max_row_group_rows)
            .set_max_row_group_bytes(None)
            .set_key_value_metadata(Some(metadata))
            .build();
        // The Arrow schema is fully implied by the Parquet one; not embedding
        // it keeps parts smaller and readers away from the IPC decoder.
        let options = ArrowWriterOptions::new()
            .with_properties(props)
            .with_skip_arrow_metadata(true);
        // Sized for the uncompressed data (each value with its 4-byte
        // length, 16 bytes of time and diff) so the output does not regrow.
        let capacity = (self.key_bytes + self.val_bytes)
            .saturating_add(len.saturating_mul(24))
            .saturating_add(4096);
        let mut writer =
            ArrowWriter::try_new_with_options(Vec::with_capacity(capacity), schema, options)
                .map_err(encode_err)?;
        writer.write(&batch).map_err(encode_err)?;
        let buf = writer.into_inner().map_err(encode_err)?;

        let stats = PartStats {
            len: len as u64,
            encoded_size_bytes: buf.len() as u64,
            key_lower: self.bounds.lower(),
            key_upper: self.bounds.upper(),
        };
        Ok(EncodedPart {
            bytes: Bytes::from(buf),
            stats,
        })
    }
}

/// Knobs of [`PartBuilder::encode`] that only tests change.
#[derive(Debug)]
pub(super) struct EncodeOptions {
    /// The `persist.format` value to write.
    pub format_version: String,
    /// Rows per row group; `None` for one row group.
    pub max_row_group_rows: Option<usize>,
    /// Rows per data page; `None` for the writer's default.
    pub max_page_rows: Option<usize>,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            format_version: FORMAT_VERSION.to_string(),
            max_row_group_rows: None,
            max_page_rows: None,
        }
    }
}

fn encode_err(err: impl fmt::Display) -> PartError {
    PartError::Encode {
        reason: err.to_string(),
    }
}

/// An encoded part: the bytes to store in Blob and the stats to keep in
/// shard state.
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedPart {
    /// The Parquet file; [`super::decode_part`] reads it back.
    pub bytes: Bytes,
    /// Statistics of the part's updates; `encoded_size_bytes` is
    /// `bytes.len()`.
    pub stats: PartStats,
}

impl fmt::Debug for EncodedPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The bytes themselves would drown the output.
        f.debug_struct("EncodedPart")
            .field("bytes.len()", &self.bytes.len())
            .field("stats", &self.stats)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codecs() -> PartCodecs {
        PartCodecs {
            key: "k".into(),
            val: "v".into(),
            ts: "t".into(),
            diff: "d".into(),
        }
    }

    #[test]
    fn oversized_parts_fail_to_encode_without_panicking() {
        let mut builder = PartBuilder::new(codecs());
        builder.push(b"a", b"b", [0; 8], [0; 8]);
        // Pretend 2 GiB of keys were pushed: the next push must not overflow
        // the Arrow offsets (which would panic) but fail at `finish`.
        builder.key_bytes = MAX_COLUMN_BYTES;
        builder.push(b"c", b"d", [0; 8], [0; 8]);
        assert_eq!(builder.len(), 1);
        let err = builder.finish().unwrap_err();
        assert!(matches!(err, PartError::Encode { .. }), "{err}");
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn stats_track_len_size_and_key_bounds() {
        let mut builder = PartBuilder::new(codecs());
        for key in [&b"m"[..], b"c", b"x", b""] {
            builder.push(key, b"", [0; 8], [0; 8]);
        }
        let part = builder.finish().unwrap();
        assert_eq!(part.stats.len, 4);
        assert_eq!(part.stats.encoded_size_bytes, part.bytes.len() as u64);
        assert_eq!(part.stats.key_lower, b"");
        assert_eq!(part.stats.key_upper.as_deref(), Some(&b"x"[..]));
    }
}
