//! Reading parts, without trusting the bytes.

use std::any::Any;
use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};

use bytes::Bytes;
use parquet::basic::{Compression, ConvertedType, Repetition, Type as PhysicalType};
use parquet::file::metadata::{KeyValue, PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::schema::types::SchemaDescriptor;

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

/// A decoded part: its codecs and its updates. Keys and vals are not
/// copied: they are read in place from the part's bytes (or, for a
/// compressed part, from its decompressed pages), found through one offset
/// per value.
#[derive(Clone)]
pub struct DecodedPart {
    codecs: PartCodecs,
    keys: BinaryColumn,
    vals: BinaryColumn,
    times: FixedColumn,
    diffs: FixedColumn,
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
        self.keys.len()
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
            self.times.value(i),
            self.diffs.value(i),
        )
    }

    /// The updates in order, as [`DecodedPart::get`] returns them.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&[u8], &[u8], [u8; 8], [u8; 8])> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

/// The values of a `BYTE_ARRAY` column.
#[derive(Clone)]
enum BinaryColumn {
    /// `PLAIN` pages (each value a little-endian `u32` length then its
    /// bytes) in `backing`, and where each value's bytes start.
    /// [`binary_column`] checked every start and length against `backing`.
    Indexed { backing: Bytes, starts: Vec<u32> },
    /// `len` values, all empty (as the values of a shard of `()` values
    /// are): nothing to index or to read.
    Empty { len: usize },
}

impl BinaryColumn {
    fn len(&self) -> usize {
        match self {
            BinaryColumn::Indexed { starts, .. } => starts.len(),
            BinaryColumn::Empty { len } => *len,
        }
    }

    fn value(&self, i: usize) -> &[u8] {
        match self {
            BinaryColumn::Indexed { backing, starts } => {
                let start = starts[i] as usize;
                let mut len = [0u8; 4];
                len.copy_from_slice(&backing[start - 4..start]);
                &backing[start..start + u32::from_le_bytes(len) as usize]
            }
            BinaryColumn::Empty { len } => {
                assert!(i < *len, "value {i} of a column of {len}");
                &[]
            }
        }
    }
}

/// The values of an `INT64` column, 8 little-endian bytes each, back to
/// back.
#[derive(Clone)]
struct FixedColumn {
    data: Bytes,
}

impl FixedColumn {
    fn value(&self, i: usize) -> [u8; 8] {
        let mut value = [0u8; 8];
        value.copy_from_slice(&self.data[i * 8..i * 8 + 8]);
        value
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
/// parses the footer; it trusts a schema node's child count (sizing a
/// `Vec` from it), so this function first reads the footer's schema with
/// a strict parser of its own. The pages it reads itself: every header is
/// checked against the input (parts hold only `PLAIN`, uncompressed or
/// Snappy, version-1 data pages, whose sizes bound what decoding them
/// allocates), and every value's length against its page. An uncompressed
/// part's keys and vals are then read in place, without a copy.
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

    let parquet_meta = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Skip)
        .parse_and_finish(&bytes)
        .map_err(|e| PartError::corrupt(format!("bad Parquet footer: {e}")))?;
    let file_meta = parquet_meta.file_metadata();
    // The version first: a newer format may change everything below.
    let (version, codecs) = read_persist_metadata(file_meta.key_value_metadata())?;
    // Checked once the updates are decoded, so that schema errors come first.
    let recorded_crc = read_checksum(file_meta.key_value_metadata());
    check_schema(file_meta.schema_descr())?;
    let (rows, groups) = check_row_groups(&bytes, footer_start, &parquet_meta)?;

    // The pages' values, decompressed where needed, in file order.
    let mut values: Vec<[Vec<(Bytes, usize)>; 4]> = Vec::with_capacity(groups.len());
    for (rg_idx, group) in groups.iter().enumerate() {
        let mut chunks: [Vec<(Bytes, usize)>; 4] = Default::default();
        for ((pages, chunk), (name, ..)) in group.iter().zip(&mut chunks).zip(COLUMNS) {
            for page in pages {
                let data = page_values(&bytes, page).map_err(|e| {
                    PartError::corrupt(format!("row group {rg_idx}, column {name}: {e}"))
                })?;
                chunk.push((data, page.values));
            }
        }
        values.push(chunks);
    }
    let column_pages = |col: usize| values.iter().flat_map(move |group| &group[col]);
    let zero_copy = |col: usize| {
        groups
            .iter()
            .all(|group| group[col].iter().all(|p| !p.compressed))
            && u32::try_from(bytes.len()).is_ok()
    };
    let page_starts = |col: usize| {
        groups
            .iter()
            .flat_map(move |group| group[col].iter().map(|p| p.data.start))
    };
    let binary = |col: usize| {
        let starts = zero_copy(col).then(|| page_starts(col));
        binary_column(&bytes, column_pages(col), starts, rows)
            .map_err(|e| PartError::corrupt(format!("column {}: {e}", COLUMNS[col].0)))
    };
    let fixed = |col: usize| {
        fixed_column(column_pages(col), rows)
            .map_err(|e| PartError::corrupt(format!("column {}: {e}", COLUMNS[col].0)))
    };
    let part = DecodedPart {
        codecs,
        keys: binary(0)?,
        vals: binary(1)?,
        times: fixed(2)?,
        diffs: fixed(3)?,
    };
    let computed = match version {
        1 => row_checksum(&part),
        _ => {
            let mut hasher = crc32fast::Hasher::new();
            for group in &values {
                for (data, _) in group.iter().flatten() {
                    hasher.update(data);
                }
            }
            hasher.finalize()
        }
    };
    let recorded = recorded_crc?;
    if computed != recorded {
        return Err(PartError::corrupt(format!(
            "checksum mismatch: the data hashes to {computed:08x}, the writer recorded \
             {recorded:08x} (the part's data changed since it was written)"
        )));
    }
    Ok(part)
}

/// A page's uncompressed values: a slice of the part, or its decompressed
/// copy (whose size the header declared and [`check_pages`] bounded).
fn page_values(bytes: &Bytes, page: &PageRef) -> Result<Bytes, String> {
    let stored = bytes.slice(page.data.clone());
    if !page.compressed {
        return Ok(stored);
    }
    let len = snap::raw::decompress_len(&stored)
        .map_err(|e| format!("bad Snappy page at byte {}: {e}", page.data.start))?;
    if len != page.uncompressed {
        return Err(format!(
            "page at byte {} decompresses to {len} bytes, its header says {}",
            page.data.start, page.uncompressed
        ));
    }
    let mut out = vec![0; len];
    snap::raw::Decoder::new()
        .decompress(&stored, &mut out)
        .map_err(|e| format!("bad Snappy page at byte {}: {e}", page.data.start))?;
    Ok(Bytes::from(out))
}

/// Indexes the `PLAIN` binary values of `pages` (`(values, count)` each),
/// checking that each page holds exactly its count of values.
///
/// With `file_starts` (the position in `file` of each page, all of them
/// uncompressed slices of it), the values are read in place from `file`;
/// otherwise the pages are copied into one buffer.
fn binary_column<'a>(
    file: &Bytes,
    pages: impl Iterator<Item = &'a (Bytes, usize)> + Clone,
    file_starts: Option<impl Iterator<Item = usize>>,
    rows: usize,
) -> Result<BinaryColumn, String> {
    // Each empty value is its length, four zero bytes.
    let empty = |(data, count): &(Bytes, usize)| {
        data.len() == count.saturating_mul(4) && data.iter().all(|b| *b == 0)
    };
    if pages.clone().all(empty) {
        let len = pages.map(|(_, count)| count).sum();
        return Ok(BinaryColumn::Empty { len });
    }
    let mut starts = Vec::with_capacity(rows);
    let backing = match file_starts {
        Some(page_starts) => {
            for ((data, count), base) in pages.zip(page_starts) {
                index_binary_page(data, *count, base, &mut starts)?;
            }
            file.clone()
        }
        None => {
            let total: usize = pages.clone().map(|(data, _)| data.len()).sum();
            if u32::try_from(total).is_err() {
                return Err(format!("{total} bytes of values is too large to decode"));
            }
            let mut buf = Vec::with_capacity(total);
            for (data, count) in pages {
                index_binary_page(data, *count, buf.len(), &mut starts)?;
                buf.extend_from_slice(data);
            }
            Bytes::from(buf)
        }
    };
    Ok(BinaryColumn::Indexed { backing, starts })
}

/// Appends to `starts` where each of the `count` values of the `PLAIN`
/// binary page `data` starts, offset by `base` (which the caller checked
/// keeps them within `u32`).
fn index_binary_page(
    data: &[u8],
    count: usize,
    base: usize,
    starts: &mut Vec<u32>,
) -> Result<(), String> {
    let mut pos = 0;
    for _ in 0..count {
        let Some(prefix) = data.get(pos..pos + 4) else {
            return Err("a value's length runs past the end of its page".to_string());
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(prefix);
        let len = u32::from_le_bytes(len) as usize;
        let start = pos + 4;
        if len > data.len() - start {
            return Err(format!(
                "a value of {len} bytes runs past the end of its page"
            ));
        }
        let absolute =
            u32::try_from(base + start).map_err(|_| "value offset overflows".to_string())?;
        starts.push(absolute);
        pos = start + len;
    }
    if pos != data.len() {
        return Err(format!(
            "a page of {count} values has {} bytes left over",
            data.len() - pos
        ));
    }
    Ok(())
}

/// The `PLAIN` `INT64` values of `pages`, each holding exactly its count.
/// A single page is used in place; several are copied into one buffer.
fn fixed_column<'a>(
    pages: impl Iterator<Item = &'a (Bytes, usize)> + Clone,
    rows: usize,
) -> Result<FixedColumn, String> {
    for (data, count) in pages.clone() {
        if Some(data.len()) != count.checked_mul(8) {
            return Err(format!(
                "a page of {count} 8-byte values holds {} bytes",
                data.len()
            ));
        }
    }
    let mut iter = pages.clone();
    let data = match (iter.next(), iter.next()) {
        (None, _) => Bytes::new(),
        (Some((data, _)), None) => data.clone(),
        _ => {
            let mut buf = Vec::with_capacity(rows * 8);
            for (data, _) in pages {
                buf.extend_from_slice(data);
            }
            Bytes::from(buf)
        }
    };
    Ok(FixedColumn { data })
}

/// The checksum of format version 1: over the updates, row by row (see the
/// module docs).
fn row_checksum(part: &DecodedPart) -> u32 {
    let mut hasher = Checksum::new();
    for (k, v, t, d) in part.iter() {
        hasher.update(k, v, t, d);
    }
    hasher.finalize()
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
/// Returns the version (1 through [`FORMAT_VERSION`]) and the codecs.
fn read_persist_metadata(kv: Option<&Vec<KeyValue>>) -> Result<(u32, PartCodecs), PartError> {
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
    let version = match get(META_FORMAT)? {
        None => {
            return Err(PartError::corrupt(format!(
                "missing {META_FORMAT} metadata: not a persist part"
            )));
        }
        // Exactly the decimal a writer writes: no sign, no leading zeros.
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=FORMAT_VERSION).contains(&n) && n.to_string() == v => n,
            _ => {
                return Err(PartError::UnsupportedFormat {
                    found: v.to_string(),
                    supported: FORMAT_VERSION,
                });
            }
        },
    };
    let codec = |key: &str| -> Result<String, PartError> {
        get(key)?
            .map(str::to_string)
            .ok_or_else(|| PartError::corrupt(format!("missing {key} metadata")))
    };
    let codecs = PartCodecs {
        key: codec(META_KEY_CODEC)?,
        val: codec(META_VAL_CODEC)?,
        ts: codec(META_TS_CODEC)?,
        diff: codec(META_DIFF_CODEC)?,
    };
    Ok((version, codecs))
}

/// Checks the Parquet schema: names, physical types, required, no logical
/// type.
fn check_schema(descr: &SchemaDescriptor) -> Result<(), PartError> {
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
    Ok(())
}

/// The pages of one row group, per column.
type GroupPages = [Vec<PageRef>; 4];

/// Checks every row group's column chunks and their page headers against
/// the input, and returns the total number of rows and where each row
/// group's pages are.
fn check_row_groups(
    bytes: &[u8],
    footer_start: usize,
    meta: &ParquetMetaData,
) -> Result<(usize, Vec<GroupPages>), PartError> {
    let mut total = 0usize;
    let mut groups = Vec::with_capacity(meta.row_groups().len());
    // Chunks must follow one another in the file, in row-group and column
    // order, without overlapping: a footer listing the same bytes many
    // times would otherwise make decoding cost far more than the input.
    let mut free_from = MAGIC.len();
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
        let mut group = GroupPages::default();
        for ((chunk, pages), (name, _, min_value_size)) in
            rg.columns().iter().zip(&mut group).zip(COLUMNS)
        {
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
                    .filter(|&end| start >= free_from && end <= footer_start)
                    .map(|end| start..end),
                _ => None,
            };
            let Some(range) = range else {
                return Err(PartError::corrupt(at(format!(
                    "column chunk at offset {} of {} bytes lies outside the data \
                     or overlaps an earlier chunk",
                    chunk.data_page_offset(),
                    chunk.compressed_size()
                ))));
            };
            free_from = range.end;
            *pages = check_pages(bytes, range, compressed, min_value_size)
                .map_err(|e| PartError::corrupt(at(e)))?;
            let values: usize = pages.iter().map(|p| p.values).sum();
            if values != rows {
                return Err(PartError::corrupt(at(format!(
                    "pages hold {values} values in a row group of {rows} rows"
                ))));
            }
        }
        total = total
            .checked_add(rows)
            .ok_or_else(|| PartError::corrupt("row count overflows"))?;
        groups.push(group);
    }
    if i64::try_from(total).ok() != Some(meta.file_metadata().num_rows()) {
        return Err(PartError::corrupt(format!(
            "file declares {} rows but its row groups hold {total}",
            meta.file_metadata().num_rows()
        )));
    }
    Ok((total, groups))
}

/// Where a data page's stored values are in the part, and what its header
/// (checked against the input) says of them.
#[derive(Debug, Clone)]
struct PageRef {
    data: Range<usize>,
    compressed: bool,
    uncompressed: usize,
    values: usize,
}

/// Walks the pages of one column chunk, checking each header; returns
/// where the pages are.
fn check_pages(
    bytes: &[u8],
    range: Range<usize>,
    compressed: bool,
    min_value_size: usize,
) -> Result<Vec<PageRef>, String> {
    let end = range.end;
    let mut pos = range.start;
    let mut values = 0usize;
    let mut pages = Vec::new();
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
        pages.push(PageRef {
            data: pos..pos + stored,
            compressed,
            uncompressed,
            values: num_values,
        });
        pos += stored;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests;
