//! Reading parts, without trusting the bytes.

use std::any::Any;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use arrow_array::{Array, BinaryArray, Int64Array, RecordBatch};
use arrow_schema::Schema;
use bytes::Bytes;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::basic::{Compression, ConvertedType, Repetition, Type as PhysicalType};
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaData};
use parquet::schema::types::SchemaDescriptor;

use super::builder::part_schema;
use super::thrift::{self, ENCODING_PLAIN, PAGE_TYPE_DATA_PAGE};
use super::{
    COL_DIFF, COL_KEY, COL_TIME, COL_VAL, Checksum, FORMAT_VERSION, META_CRC32, META_DIFF_CODEC,
    META_FORMAT, META_KEY_CODEC, META_TS_CODEC, META_VAL_CODEC, PartCodecs, PartError,
};

/// The magic bytes at both ends of an unencrypted Parquet file.
const MAGIC: &[u8; 4] = b"PAR1";

/// The most a Snappy block can expand: a 3-byte copy element yields at most
/// 64 bytes (about 21x); 32 leaves room. A page header claiming more than
/// this many times its stored size is corrupt, and refusing it keeps the
/// decompression buffer (sized from the header) bounded by the input.
const MAX_SNAPPY_EXPANSION: usize = 32;

/// The part's columns: name, Parquet physical type, and the fewest bytes one
/// `PLAIN`-encoded value takes (a 4-byte length for binaries).
const COLUMNS: [(&str, PhysicalType, usize); 4] = [
    (COL_KEY, PhysicalType::BYTE_ARRAY, 4),
    (COL_VAL, PhysicalType::BYTE_ARRAY, 4),
    (COL_TIME, PhysicalType::INT64, 8),
    (COL_DIFF, PhysicalType::INT64, 8),
];

/// A decoded part: its codecs and its updates, held as the Arrow arrays the
/// Parquet reader produced (one allocation per column, none per update).
#[derive(Clone)]
pub struct DecodedPart {
    codecs: PartCodecs,
    keys: BinaryArray,
    vals: BinaryArray,
    times: Int64Array,
    diffs: Int64Array,
}

impl fmt::Debug for DecodedPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedPart")
            .field("codecs", &self.codecs)
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl DecodedPart {
    /// The codec names the part was written with.
    pub fn codecs(&self) -> &PartCodecs {
        &self.codecs
    }

    /// The number of updates.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether the part holds no updates.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`th update as `(key, val, time, diff)`, exactly as it was pushed
    /// to the [`super::PartBuilder`].
    ///
    /// # Panics
    ///
    /// If `i >= self.len()` (a caller bug, like indexing a slice).
    pub fn get(&self, i: usize) -> (&[u8], &[u8], [u8; 8], [u8; 8]) {
        (
            self.keys.value(i),
            self.vals.value(i),
            self.times.value(i).to_le_bytes(),
            self.diffs.value(i).to_le_bytes(),
        )
    }

    /// The updates in order, as [`DecodedPart::get`] returns them.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8], [u8; 8], [u8; 8])> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// Decodes a part written by [`super::PartBuilder`] (any row-group split).
///
/// Returns [`PartError::UnsupportedFormat`] if the part declares a format
/// version this code does not know, and [`PartError::Corrupt`] naming the
/// problem for anything else that is not a well-formed part: not Parquet,
/// truncated, a bad footer or page, a schema other than the part schema,
/// missing persist metadata, or data that does not decode.
///
/// Never panics, whatever the bytes, and allocates at most a small multiple
/// (about `MAX_SNAPPY_EXPANSION`) of `bytes.len()`. The `parquet` crate
/// trusts some sizes in the file (a page header's uncompressed size sizes a
/// zero-filled buffer; a schema node's child count sizes a `Vec`), so before
/// handing it the bytes this function reads the footer's schema and every
/// page header itself with a strict parser and checks each size against the
/// input: parts hold only flat schemas and `PLAIN`, uncompressed or Snappy,
/// version-1 data pages, whose sizes bound what decoding them allocates.
///
/// Third-party decoders have historically panicked on malformed input in
/// ways such validation cannot foresee, so the whole decode also runs under
/// [`std::panic::catch_unwind`] and a panic becomes [`PartError::Corrupt`].
/// That last line of defense needs `panic = "unwind"` (the default; a
/// process built with `panic = "abort"` would abort instead), and the panic
/// hook still reports the panic before it is caught.
pub fn decode_part(bytes: Bytes) -> Result<DecodedPart, PartError> {
    catch_panics(|| decode_unguarded(bytes))
}

/// Runs `f`, turning a panic into [`PartError::Corrupt`].
fn catch_panics<T>(f: impl FnOnce() -> Result<T, PartError>) -> Result<T, PartError> {
    // AssertUnwindSafe: on a panic, everything `f` touched (the input and the
    // decoder's state) is dropped; nothing outlives the unwind.
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(PartError::corrupt(format!(
            "the Parquet decoder panicked: {}",
            panic_message(payload.as_ref())
        )))
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

/// [`decode_part`] without the panic guard, so tests can assert that
/// validation alone keeps the decoder from panicking.
pub(super) fn decode_unguarded(bytes: Bytes) -> Result<DecodedPart, PartError> {
    let footer_start = check_envelope(&bytes)?;
    check_schema_shape(&bytes[footer_start..bytes.len() - 8])?;

    let options = ArrowReaderOptions::new()
        .with_skip_arrow_metadata(true)
        .with_page_index_policy(PageIndexPolicy::Skip);
    let meta = ArrowReaderMetadata::load(&bytes, options)
        .map_err(|e| PartError::corrupt(format!("bad Parquet footer: {e}")))?;
    let parquet_meta = meta.metadata();
    let file_meta = parquet_meta.file_metadata();
    // The version first: a newer format may change everything below.
    let codecs = read_persist_metadata(file_meta.key_value_metadata())?;
    // Checked once the updates are decoded, so that schema errors come first.
    let recorded_crc = read_checksum(file_meta.key_value_metadata());
    check_schema(file_meta.schema_descr(), meta.schema())?;
    let num_rows = check_row_groups(&bytes, footer_start, parquet_meta)?;

    let batch = if num_rows == 0 {
        RecordBatch::new_empty(Arc::new(part_schema()))
    } else {
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(bytes, meta)
            .with_batch_size(num_rows)
            .build()
            .map_err(|e| PartError::corrupt(format!("cannot read part: {e}")))?;
        let mut batches = Vec::new();
        for batch in reader {
            batches.push(batch.map_err(|e| PartError::corrupt(format!("bad part data: {e}")))?);
        }
        match batches.len() {
            1 => batches.swap_remove(0),
            _ => arrow_select::concat::concat_batches(&Arc::new(part_schema()), &batches)
                .map_err(|e| PartError::corrupt(format!("bad part data: {e}")))?,
        }
    };
    if batch.num_rows() != num_rows {
        return Err(PartError::corrupt(format!(
            "footer declares {num_rows} rows but the data holds {}",
            batch.num_rows()
        )));
    }
    let part = DecodedPart {
        codecs,
        keys: column::<BinaryArray>(&batch, 0)?,
        vals: column::<BinaryArray>(&batch, 1)?,
        times: column::<Int64Array>(&batch, 2)?,
        diffs: column::<Int64Array>(&batch, 3)?,
    };
    check_checksum(&part, recorded_crc?)?;
    Ok(part)
}

/// The checksum the writer recorded (see the module docs).
fn read_checksum(kv: Option<&Vec<KeyValue>>) -> Result<u32, PartError> {
    let recorded = kv
        .into_iter()
        .flatten()
        .find(|e| e.key == META_CRC32)
        .and_then(|e| e.value.as_deref())
        .ok_or_else(|| PartError::corrupt(format!("missing {META_CRC32} metadata")))?;
    u32::from_str_radix(recorded, 16)
        .map_err(|_| PartError::corrupt(format!("invalid {META_CRC32} metadata {recorded:?}")))
}

/// Recomputes the checksum of the decoded updates and compares it with the
/// one the writer recorded.
fn check_checksum(part: &DecodedPart, recorded: u32) -> Result<(), PartError> {
    let mut hasher = Checksum::new();
    for (k, v, t, d) in part.iter() {
        hasher.update(k, v, t, d);
    }
    let computed = hasher.finalize();
    if computed != recorded {
        return Err(PartError::corrupt(format!(
            "checksum mismatch: the updates hash to {computed:08x}, the writer recorded \
             {recorded:08x} (the part's data changed since it was written)"
        )));
    }
    Ok(())
}

/// Checks the magic bytes and the footer length; returns where the footer
/// starts.
fn check_envelope(bytes: &[u8]) -> Result<usize, PartError> {
    let len = bytes.len();
    if len < 12 {
        return Err(PartError::corrupt(format!(
            "{len} bytes is too short to be a Parquet file"
        )));
    }
    if &bytes[..4] != MAGIC {
        return Err(PartError::corrupt("missing Parquet magic at the start"));
    }
    if &bytes[len - 4..] != MAGIC {
        return Err(PartError::corrupt(
            "missing Parquet magic at the end (truncated or encrypted)",
        ));
    }
    let mut footer_len = [0u8; 4];
    footer_len.copy_from_slice(&bytes[len - 8..len - 4]);
    let footer_len = u32::from_le_bytes(footer_len) as usize;
    (len - 8)
        .checked_sub(footer_len)
        .filter(|&start| start >= MAGIC.len())
        .ok_or_else(|| {
            PartError::corrupt(format!(
                "footer length {footer_len} does not fit in the {len}-byte file"
            ))
        })
}

/// Checks that the footer's schema is one root with only primitive children,
/// before the library builds a tree from it (it sizes allocations from child
/// counts and recurses on nesting).
fn check_schema_shape(footer: &[u8]) -> Result<(), PartError> {
    let counts = thrift::read_schema_child_counts(footer)
        .map_err(|e| PartError::corrupt(format!("bad Parquet footer: {e}")))?;
    let flat = match counts.split_first() {
        Some((root, leaves)) => {
            *root == i32::try_from(leaves.len()).ok()
                && leaves.iter().all(|c| matches!(c, None | Some(0)))
        }
        None => false,
    };
    if !flat {
        return Err(PartError::corrupt(
            "schema is not a flat list of columns (parts have columns k, v, t, d)",
        ));
    }
    Ok(())
}

/// Reads the format version and codec names from the key-value metadata.
fn read_persist_metadata(kv: Option<&Vec<KeyValue>>) -> Result<PartCodecs, PartError> {
    let entries = kv.map(Vec::as_slice).unwrap_or_default();
    let get = |key: &str| -> Result<Option<&str>, PartError> {
        let mut found = entries.iter().filter(|e| e.key == key);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some(e), None) => Ok(e.value.as_deref()),
            (Some(_), Some(_)) => Err(PartError::corrupt(format!(
                "metadata key {key} appears more than once"
            ))),
        }
    };
    match get(META_FORMAT)? {
        None => {
            return Err(PartError::corrupt(format!(
                "missing {META_FORMAT} metadata: not a persist part"
            )));
        }
        Some(v) if v == FORMAT_VERSION.to_string() => {}
        Some(v) => {
            return Err(PartError::UnsupportedFormat {
                found: v.to_string(),
                supported: FORMAT_VERSION,
            });
        }
    }
    let codec = |key: &str| -> Result<String, PartError> {
        get(key)?
            .map(str::to_string)
            .ok_or_else(|| PartError::corrupt(format!("missing {key} metadata")))
    };
    Ok(PartCodecs {
        key: codec(META_KEY_CODEC)?,
        val: codec(META_VAL_CODEC)?,
        ts: codec(META_TS_CODEC)?,
        diff: codec(META_DIFF_CODEC)?,
    })
}

/// Checks the Parquet schema (names, physical types, required, no logical
/// type) and the Arrow schema derived from it.
fn check_schema(descr: &SchemaDescriptor, arrow: &Schema) -> Result<(), PartError> {
    let fields = descr.root_schema().get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    if fields.len() != COLUMNS.len() {
        return Err(PartError::corrupt(format!(
            "expected columns [\"k\", \"v\", \"t\", \"d\"], found {names:?}"
        )));
    }
    for (field, (name, ty, _)) in fields.iter().zip(COLUMNS) {
        if !field.is_primitive() || field.name() != name || field.get_physical_type() != ty {
            return Err(PartError::corrupt(format!(
                "expected column {name} of type {ty}, found {} of type {}",
                field.name(),
                if field.is_primitive() {
                    field.get_physical_type().to_string()
                } else {
                    "group".to_string()
                },
            )));
        }
        let info = field.get_basic_info();
        if !info.has_repetition() || info.repetition() != Repetition::REQUIRED {
            let found = match info.has_repetition() {
                true => info.repetition().to_string(),
                false => "without repetition".to_string(),
            };
            return Err(PartError::corrupt(format!(
                "column {name} is {found}, parts require it non-null (REQUIRED)"
            )));
        }
        if info.logical_type_ref().is_some() || info.converted_type() != ConvertedType::NONE {
            return Err(PartError::corrupt(format!(
                "column {name} has a logical type, parts store plain {ty}"
            )));
        }
    }
    let expected = part_schema();
    let matches = arrow.fields().len() == expected.fields().len()
        && arrow.fields().iter().zip(expected.fields()).all(|(a, e)| {
            a.name() == e.name()
                && a.data_type() == e.data_type()
                && a.is_nullable() == e.is_nullable()
        });
    if !matches {
        return Err(PartError::corrupt(format!(
            "Arrow schema {arrow:?} differs from the part schema"
        )));
    }
    Ok(())
}

/// Checks every row group's column chunks and their page headers against
/// the input, and returns the total number of rows.
fn check_row_groups(
    bytes: &[u8],
    footer_start: usize,
    meta: &ParquetMetaData,
) -> Result<usize, PartError> {
    let mut total = 0usize;
    for (rg_idx, rg) in meta.row_groups().iter().enumerate() {
        let rows = usize::try_from(rg.num_rows()).map_err(|_| {
            PartError::corrupt(format!("row group {rg_idx} has {} rows", rg.num_rows()))
        })?;
        if rg.columns().len() != COLUMNS.len() {
            return Err(PartError::corrupt(format!(
                "row group {rg_idx} has {} column chunks",
                rg.columns().len()
            )));
        }
        for (chunk, (name, _, min_value_size)) in rg.columns().iter().zip(COLUMNS) {
            let at = |what: String| format!("row group {rg_idx}, column {name}: {what}");
            let compressed = match chunk.compression() {
                Compression::UNCOMPRESSED => false,
                Compression::SNAPPY => true,
                other => {
                    return Err(PartError::corrupt(at(format!(
                        "unsupported compression {other}"
                    ))));
                }
            };
            if chunk.dictionary_page_offset().is_some() {
                return Err(PartError::corrupt(at("has a dictionary page".into())));
            }
            if chunk.num_values() != rg.num_rows() {
                return Err(PartError::corrupt(at(format!(
                    "{} values in a row group of {rows} rows",
                    chunk.num_values()
                ))));
            }
            let start = usize::try_from(chunk.data_page_offset()).ok();
            let len = usize::try_from(chunk.compressed_size()).ok();
            let range = match (start, len) {
                (Some(start), Some(len)) => start
                    .checked_add(len)
                    .filter(|&end| start >= MAGIC.len() && end <= footer_start)
                    .map(|end| start..end),
                _ => None,
            };
            let Some(range) = range else {
                return Err(PartError::corrupt(at(format!(
                    "column chunk at offset {} of {} bytes lies outside the data",
                    chunk.data_page_offset(),
                    chunk.compressed_size()
                ))));
            };
            let values = check_pages(bytes, range, compressed, min_value_size)
                .map_err(|e| PartError::corrupt(at(e)))?;
            if values != rows {
                return Err(PartError::corrupt(at(format!(
                    "pages hold {values} values in a row group of {rows} rows"
                ))));
            }
        }
        total = total
            .checked_add(rows)
            .ok_or_else(|| PartError::corrupt("row count overflows"))?;
    }
    if i64::try_from(total).ok() != Some(meta.file_metadata().num_rows()) {
        return Err(PartError::corrupt(format!(
            "file declares {} rows but its row groups hold {total}",
            meta.file_metadata().num_rows()
        )));
    }
    Ok(total)
}

/// Walks the pages of one column chunk as the library will, checking each
/// header; returns the number of values in the chunk.
fn check_pages(
    bytes: &[u8],
    range: std::ops::Range<usize>,
    compressed: bool,
    min_value_size: usize,
) -> Result<usize, String> {
    let end = range.end;
    let mut pos = range.start;
    let mut values = 0usize;
    while pos < end {
        let (header, header_len) = thrift::read_page_header(&bytes[pos..end])
            .map_err(|e| format!("bad page header at byte {pos}: {e}"))?;
        let page_at = pos;
        pos += header_len;
        if header.page_type != PAGE_TYPE_DATA_PAGE {
            return Err(format!(
                "page at byte {page_at} has type {}; parts hold only v1 data pages",
                header.page_type
            ));
        }
        let Some((num_values, encoding)) = header.data_page else {
            return Err(format!(
                "data page at byte {page_at} has no data page header"
            ));
        };
        if encoding != ENCODING_PLAIN {
            return Err(format!(
                "page at byte {page_at} has encoding {encoding}; parts use only PLAIN"
            ));
        }
        let (Ok(stored), Ok(uncompressed), Ok(num_values)) = (
            usize::try_from(header.compressed_size),
            usize::try_from(header.uncompressed_size),
            usize::try_from(num_values),
        ) else {
            return Err(format!(
                "page at byte {page_at} has a negative size or count"
            ));
        };
        if stored > end - pos {
            return Err(format!(
                "page at byte {page_at} of {stored} bytes extends past its column chunk"
            ));
        }
        let plausible = if compressed {
            uncompressed <= stored.saturating_mul(MAX_SNAPPY_EXPANSION)
        } else {
            uncompressed == stored
        };
        if !plausible {
            return Err(format!(
                "page at byte {page_at} claims {uncompressed} bytes uncompressed from {stored} stored"
            ));
        }
        if num_values.saturating_mul(min_value_size) > uncompressed {
            return Err(format!(
                "page at byte {page_at} claims {num_values} values in {uncompressed} bytes"
            ));
        }
        values = values
            .checked_add(num_values)
            .ok_or_else(|| "value count overflows".to_string())?;
        pos += stored;
    }
    Ok(values)
}

/// Column `i` of `batch` as an array of type `A`, checked to have no nulls.
fn column<A: Array + Clone + 'static>(batch: &RecordBatch, i: usize) -> Result<A, PartError> {
    let array = batch
        .columns()
        .get(i)
        .ok_or_else(|| PartError::corrupt(format!("column {i} is missing")))?
        .as_any()
        .downcast_ref::<A>()
        .ok_or_else(|| PartError::corrupt(format!("column {i} decoded to the wrong type")))?;
    if array.null_count() != 0 {
        return Err(PartError::corrupt(format!("column {i} holds nulls")));
    }
    Ok(array.clone())
}

#[cfg(test)]
mod tests;
