//! Writing parts.
//!
//! Parts are written by hand rather than through `ArrowWriter`. Their
//! layout is fixed (four required columns of `PLAIN` version-1 data pages,
//! no dictionaries, statistics or page index), and a `PLAIN` page is just
//! its values back to back. So [`encode_part`] gathers each column's values
//! straight from the caller's updates into the file, one copy, where the
//! Arrow path copied everything four times through freshly allocated
//! buffers. The footer is built with the `parquet` crate's metadata types
//! and written by its `ParquetMetaDataWriter`, and the tests read parts back
//! with the crate's generic readers.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{Compression, Encoding, Repetition, Type as PhysicalType};
use parquet::file::metadata::{
    ColumnChunkMetaData, FileMetaData, KeyValue, ParquetMetaDataBuilder, ParquetMetaDataWriter,
    RowGroupMetaData,
};
use parquet::schema::types::{SchemaDescPtr, SchemaDescriptor, Type};

use super::stats::KeyBounds;
use super::thrift::write_data_page_header;
use super::{
    COL_DIFF, COL_KEY, COL_TIME, COL_VAL, Checksum, FORMAT_VERSION, META_CRC32, META_DIFF_CODEC,
    META_FORMAT, META_KEY_CODEC, META_TS_CODEC, META_VAL_CODEC, PartCodecs, PartError, PartStats,
};

/// The most bytes one column's `PLAIN` values (each binary with its 4-byte
/// length) may take: Parquet page sizes and Arrow `Binary` offsets are
/// `i32`.
const MAX_COLUMN_BYTES: usize = i32::MAX as usize;

/// A data page is cut once its values reach this many bytes (the `parquet`
/// crate's default page size).
const PAGE_BYTES: usize = 1 << 20;

/// What the `created_by` field of parts says.
const CREATED_BY: &str = concat!("persist ", env!("CARGO_PKG_VERSION"));

/// The Parquet schema of a part: `k`, `v` required `BYTE_ARRAY`; `t`, `d`
/// required `INT64` (what Arrow maps to non-null `Binary` and `Int64`).
fn parquet_schema() -> Result<SchemaDescPtr, PartError> {
    let columns = [
        (COL_KEY, PhysicalType::BYTE_ARRAY),
        (COL_VAL, PhysicalType::BYTE_ARRAY),
        (COL_TIME, PhysicalType::INT64),
        (COL_DIFF, PhysicalType::INT64),
    ];
    let mut fields = Vec::with_capacity(columns.len());
    for (name, ty) in columns {
        let field = Type::primitive_type_builder(name, ty)
            .with_repetition(Repetition::REQUIRED)
            .build()
            .map_err(encode_err)?;
        fields.push(Arc::new(field));
    }
    let root = Type::group_type_builder("arrow_schema")
        .with_fields(fields)
        .build()
        .map_err(encode_err)?;
    Ok(Arc::new(SchemaDescriptor::new(Arc::new(root))))
}

/// One update as a part stores it: the encoded key and val, and the time and
/// diff `Codec64` bytes.
pub type PartUpdate<'a> = (&'a [u8], &'a [u8], [u8; 8], [u8; 8]);

/// Encodes `updates`, in the order given, as one part of the newest format
/// version ([`super::FORMAT_VERSION`]), Snappy-compressed if `compress`, and
/// returns it with its stats.
///
/// The iterator is walked a few times (once for stats and sizes, then once
/// per column), so it must yield the same updates every time it is cloned;
/// iterating a slice is the intended use. Each value is copied once, straight
/// into the file. Fails with [`PartError::Encode`] if the keys or the vals
/// exceed 2 GiB (the format's limit).
pub fn encode_part<'a, I>(
    codecs: &PartCodecs,
    compress: bool,
    updates: I,
) -> Result<EncodedPart, PartError>
where
    I: Iterator<Item = PartUpdate<'a>> + Clone,
{
    encode_with(
        Vec::new(),
        codecs,
        compress,
        updates,
        &EncodeOptions::default(),
    )
}

/// [`encode_part`] into `buf` (cleared first), whose allocation becomes
/// the part's bytes: a caller that gets its buffer back once the part is
/// stored (see [`bytes::Bytes::try_into_mut`]) can encode the next part
/// without allocating and touching fresh memory.
pub fn encode_part_into<'a, I>(
    buf: Vec<u8>,
    codecs: &PartCodecs,
    compress: bool,
    updates: I,
) -> Result<EncodedPart, PartError>
where
    I: Iterator<Item = PartUpdate<'a>> + Clone,
{
    encode_with(buf, codecs, compress, updates, &EncodeOptions::default())
}

/// Accumulates updates in memory and encodes them as one part.
///
/// The builder does not sort or consolidate: it writes updates in the order
/// they are pushed, and a part's promise of being a sorted run holds only if
/// the caller pushes sorted updates. It does compute [`PartStats`] (which
/// are correct in any order). A caller that already holds its updates in
/// memory saves a copy with [`encode_part`].
pub struct PartBuilder {
    codecs: PartCodecs,
    /// The pushed keys and vals, back to back.
    arena: Vec<u8>,
    /// Per update: where its key ends (and val starts) and where its val
    /// ends in `arena`, its time and its diff.
    index: Vec<(usize, usize, [u8; 8], [u8; 8])>,
    key_bytes: usize,
    val_bytes: usize,
    /// Set once a push would exceed [`MAX_COLUMN_BYTES`]; `finish` then fails.
    too_large: bool,
    /// Whether to Snappy-compress the pages.
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
        let bytes = key_bytes.saturating_add(val_bytes);
        PartBuilder {
            codecs,
            arena: Vec::with_capacity(bytes.min(2 * MAX_COLUMN_BYTES)),
            index: Vec::with_capacity(rows),
            key_bytes: 0,
            val_bytes: 0,
            too_large: false,
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
        if self.too_large || !fits(self.key_bytes, key.len()) || !fits(self.val_bytes, val.len()) {
            self.too_large = true;
            return;
        }
        self.key_bytes += 4 + key.len();
        self.val_bytes += 4 + val.len();
        self.arena.extend_from_slice(key);
        let key_end = self.arena.len();
        self.arena.extend_from_slice(val);
        self.index.push((key_end, self.arena.len(), time, diff));
    }

    /// The number of updates pushed so far.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no update was pushed.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Encodes the pushed updates, in push order, as a part of the newest
    /// format version ([`super::FORMAT_VERSION`]) and returns it with its
    /// stats. A builder with no updates makes a valid empty part.
    ///
    /// Fails with [`PartError::Encode`] if the part is too large (see
    /// [`PartBuilder::push`]) or the Parquet footer cannot be written.
    pub fn finish(self) -> Result<EncodedPart, PartError> {
        self.encode(&EncodeOptions::default())
    }

    pub(super) fn encode(self, opts: &EncodeOptions) -> Result<EncodedPart, PartError> {
        if self.too_large {
            return Err(too_large());
        }
        let arena = &self.arena;
        let mut start = 0;
        let updates = self.index.iter().map(move |&(key_end, val_end, t, d)| {
            let update = (&arena[start..key_end], &arena[key_end..val_end], t, d);
            start = val_end;
            update
        });
        encode_with(Vec::new(), &self.codecs, self.compress, updates, opts)
    }
}

fn too_large() -> PartError {
    PartError::Encode {
        reason: format!("part too large: keys or vals exceed {MAX_COLUMN_BYTES} bytes"),
    }
}

/// Whether a binary value of `value_len` bytes (plus its 4-byte length) fits
/// after `column_len` bytes of a column.
fn fits(column_len: usize, value_len: usize) -> bool {
    column_len.saturating_add(4).saturating_add(value_len) <= MAX_COLUMN_BYTES
}

/// The columns of a part, in schema order.
#[derive(Debug, Clone, Copy)]
enum Column {
    Key,
    Val,
    Time,
    Diff,
}

impl Column {
    const ALL: [Column; 4] = [Column::Key, Column::Val, Column::Time, Column::Diff];

    /// The size of every value of this column, if it is fixed.
    fn fixed_size(self) -> Option<usize> {
        match self {
            Column::Key | Column::Val => None,
            Column::Time | Column::Diff => Some(8),
        }
    }

    /// The bytes `u`'s value of this column takes `PLAIN`-encoded: binaries
    /// take a little-endian `u32` length then the bytes, `INT64`s 8 bytes.
    #[inline]
    fn size(self, u: &PartUpdate<'_>) -> usize {
        match self {
            Column::Key => 4 + u.0.len(),
            Column::Val => 4 + u.1.len(),
            Column::Time | Column::Diff => 8,
        }
    }

    /// Appends this column's value of each of `updates`, `PLAIN`-encoded,
    /// and returns how many there were. (A little-endian `i64` is stored as
    /// its 8 bytes, so the `Codec64` bytes are the value as they are.)
    /// Binary lengths were checked to fit in `u32`. One loop per column, so
    /// the per-value work is a straight copy.
    fn write<'a>(self, updates: impl Iterator<Item = PartUpdate<'a>>, out: &mut Vec<u8>) -> usize {
        fn binary(value: &[u8], out: &mut Vec<u8>) {
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        let mut n = 0;
        match self {
            Column::Key => updates.for_each(|u| {
                binary(u.0, out);
                n += 1;
            }),
            Column::Val => updates.for_each(|u| {
                binary(u.1, out);
                n += 1;
            }),
            Column::Time => updates.for_each(|u| {
                out.extend_from_slice(&u.2);
                n += 1;
            }),
            Column::Diff => updates.for_each(|u| {
                out.extend_from_slice(&u.3);
                n += 1;
            }),
        }
        n
    }
}

/// [`encode_part`] with test knobs.
fn encode_with<'a, I>(
    mut out: Vec<u8>,
    codecs: &PartCodecs,
    compress: bool,
    updates: I,
    opts: &EncodeOptions,
) -> Result<EncodedPart, PartError>
where
    I: Iterator<Item = PartUpdate<'a>> + Clone,
{
    // Stats and sizes first (and the checksum of version 1, which tests
    // still write, over the updates row by row).
    let mut bounds = KeyBounds::default();
    let mut legacy_crc = (opts.format_version == "1").then(Checksum::new);
    let (mut len, mut key_bytes, mut val_bytes) = (0usize, 0usize, 0usize);
    for (key, val, time, diff) in updates.clone() {
        if !fits(key_bytes, key.len()) || !fits(val_bytes, val.len()) {
            return Err(too_large());
        }
        key_bytes += 4 + key.len();
        val_bytes += 4 + val.len();
        len += 1;
        bounds.observe(key);
        if let Some(crc) = &mut legacy_crc {
            crc.update(key, val, time, diff);
        }
    }

    let schema = parquet_schema()?;
    let data_bytes = key_bytes + val_bytes + 16 * len;
    // Page headers take under 32 bytes each; the footer about 600.
    let pages = data_bytes / PAGE_BYTES + 8;
    out.clear();
    out.reserve(data_bytes + pages * 32 * 4 + 4096);
    let mut writer = PageWriter {
        out,
        compress,
        plain: Vec::new(),
        compressed: Vec::new(),
        snappy: snap::raw::Encoder::new(),
        crc: crc32fast::Hasher::new(),
    };
    writer.out.extend_from_slice(b"PAR1");
    let compression = if compress {
        Compression::SNAPPY
    } else {
        Compression::UNCOMPRESSED
    };
    let group_rows = opts.max_row_group_rows.unwrap_or(usize::MAX).max(1);
    let page_rows = opts.max_page_rows.unwrap_or(usize::MAX).max(1);
    let mut row_groups = Vec::new();
    let mut row = 0;
    while row < len {
        let rows = group_rows.min(len - row);
        let mut chunks = Vec::with_capacity(Column::ALL.len());
        let mut group_bytes = 0i64;
        for (i, column) in Column::ALL.into_iter().enumerate() {
            let values = updates.clone().skip(row).take(rows);
            let chunk = writer.column_chunk(column, values, rows, page_rows)?;
            group_bytes += chunk.uncompressed;
            let meta = ColumnChunkMetaData::builder(schema.column(i))
                .set_encodings(vec![Encoding::PLAIN, Encoding::RLE])
                .set_compression(compression)
                .set_num_values(to_i64(rows)?)
                .set_total_compressed_size(chunk.stored)
                .set_total_uncompressed_size(chunk.uncompressed)
                .set_data_page_offset(chunk.offset)
                .build()
                .map_err(encode_err)?;
            chunks.push(meta);
        }
        let first_offset = chunks.first().map_or(0, |c| c.data_page_offset());
        let group = RowGroupMetaData::builder(Arc::clone(&schema))
            .set_num_rows(to_i64(rows)?)
            .set_total_byte_size(group_bytes)
            .set_file_offset(first_offset)
            .set_column_metadata(chunks)
            .build()
            .map_err(encode_err)?;
        row_groups.push(group);
        row += rows;
    }

    let crc = match legacy_crc {
        Some(crc) => crc.finalize(),
        None => writer.crc.clone().finalize(),
    };
    let crc = format!("{crc:08x}");
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
    let file = FileMetaData::new(
        1,
        to_i64(len)?,
        Some(CREATED_BY.to_string()),
        Some(metadata),
        schema,
        None,
    );
    let meta = ParquetMetaDataBuilder::new(file)
        .set_row_groups(row_groups)
        .build();
    let mut out = writer.out;
    // Offsets in the metadata are absolute: the footer goes at the end of
    // `out`, and the metadata writer only appends.
    ParquetMetaDataWriter::new(&mut out, &meta)
        .finish()
        .map_err(encode_err)?;

    let stats = PartStats {
        len: len as u64,
        encoded_size_bytes: out.len() as u64,
        key_lower: bounds.lower(),
        key_upper: bounds.upper(),
    };
    Ok(EncodedPart {
        bytes: Bytes::from(out),
        stats,
    })
}

/// Where one column chunk landed in the file, and its sizes (page headers
/// included, as Parquet counts them).
struct ChunkPlacement {
    offset: i64,
    stored: i64,
    uncompressed: i64,
}

/// Appends data pages to the file.
struct PageWriter {
    out: Vec<u8>,
    compress: bool,
    /// With compression: a page's `PLAIN` values, then its compressed form.
    plain: Vec<u8>,
    compressed: Vec<u8>,
    snappy: snap::raw::Encoder,
    /// The checksum of every page's uncompressed values, in file order.
    crc: crc32fast::Hasher,
}

impl PageWriter {
    /// Writes `column` of the `rows` updates `values` yields as one column
    /// chunk of pages, each cut at `page_rows` values or once it reaches
    /// [`PAGE_BYTES`].
    fn column_chunk<'a>(
        &mut self,
        column: Column,
        mut values: impl Iterator<Item = PartUpdate<'a>> + Clone,
        rows: usize,
        page_rows: usize,
    ) -> Result<ChunkPlacement, PartError> {
        let offset = self.out.len();
        let mut uncompressed = 0usize;
        let mut left = rows;
        while left > 0 {
            // Size the page first: its header precedes it.
            let max = left.min(page_rows);
            let (count, bytes) = match column.fixed_size() {
                Some(size) => {
                    let count = max.min(PAGE_BYTES.div_ceil(size));
                    (count, count * size)
                }
                None => {
                    let (mut count, mut bytes) = (0usize, 0usize);
                    for u in values.clone().take(max) {
                        if bytes >= PAGE_BYTES {
                            break;
                        }
                        count += 1;
                        bytes += column.size(&u);
                    }
                    (count, bytes)
                }
            };
            check_written(count, count.max(1))?;
            let header_at = self.out.len();
            let (size, count_i32) = (to_i32(bytes)?, to_i32(count)?);
            if self.compress {
                self.plain.clear();
                let written = column.write(values.by_ref().take(count), &mut self.plain);
                check_written(written, count)?;
                self.crc.update(&self.plain);
                self.compressed
                    .resize(snap::raw::max_compress_len(self.plain.len()), 0);
                let stored = self
                    .snappy
                    .compress(&self.plain, &mut self.compressed)
                    .map_err(encode_err)?;
                write_data_page_header(&mut self.out, size, to_i32(stored)?, count_i32);
                uncompressed += self.out.len() - header_at + bytes;
                self.out.extend_from_slice(&self.compressed[..stored]);
            } else {
                write_data_page_header(&mut self.out, size, size, count_i32);
                uncompressed += self.out.len() - header_at + bytes;
                self.out.reserve(bytes);
                let data_at = self.out.len();
                let written = column.write(values.by_ref().take(count), &mut self.out);
                check_written(written, count)?;
                self.crc.update(&self.out[data_at..]);
            }
            left -= count;
        }
        Ok(ChunkPlacement {
            offset: to_i64(offset)?,
            stored: to_i64(self.out.len() - offset)?,
            uncompressed: to_i64(uncompressed)?,
        })
    }
}

/// Fails unless an iteration over the updates yielded the `expected`
/// number of them (the iterator must yield the same updates every time).
fn check_written(written: usize, expected: usize) -> Result<(), PartError> {
    if written == expected {
        Ok(())
    } else {
        Err(PartError::Encode {
            reason: "the updates changed while being encoded".to_string(),
        })
    }
}

fn to_i32(n: usize) -> Result<i32, PartError> {
    i32::try_from(n).map_err(|_| PartError::Encode {
        reason: format!("{n} does not fit in a Parquet i32 field"),
    })
}

fn to_i64(n: usize) -> Result<i64, PartError> {
    i64::try_from(n).map_err(|_| PartError::Encode {
        reason: format!("{n} does not fit in a Parquet i64 field"),
    })
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
    use parquet::file::reader::{FileReader, SerializedFileReader};

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
        // The limit itself, without allocating 2 GiB.
        assert!(fits(MAX_COLUMN_BYTES - 10, 6));
        assert!(!fits(MAX_COLUMN_BYTES - 10, 7));
        assert!(!fits(usize::MAX, 1));
        // A builder that refused an update fails at `finish`.
        let mut builder = PartBuilder::new(codecs());
        builder.push(b"a", b"b", [0; 8], [0; 8]);
        builder.too_large = true;
        builder.push(b"c", b"d", [0; 8], [0; 8]);
        assert_eq!(builder.len(), 1);
        let err = builder.finish().unwrap_err();
        assert!(matches!(err, PartError::Encode { .. }), "{err}");
        assert!(err.to_string().contains("too large"), "{err}");
    }

    #[test]
    fn encode_part_matches_the_builder_and_cuts_pages_by_size() {
        // Values of 300 KiB: a page is cut after the value that takes it to
        // 1 MiB, so 7 vals make pages of 4 and 3, keys one page.
        type Owned = (Vec<u8>, Vec<u8>, [u8; 8], [u8; 8]);
        let updates: Vec<Owned> = (0u8..7)
            .map(|i| {
                let val = vec![i; 300 << 10];
                (vec![i; 3], val, u64::from(i).to_le_bytes(), [1; 8])
            })
            .collect();
        for compress in [false, true] {
            let mut builder = PartBuilder::new(codecs()).with_compression(compress);
            for (k, v, t, d) in &updates {
                builder.push(k, v, *t, *d);
            }
            let pushed = builder.finish().unwrap();
            let gathered = encode_part(
                &codecs(),
                compress,
                updates.iter().map(|(k, v, t, d)| (&k[..], &v[..], *t, *d)),
            )
            .unwrap();
            assert_eq!(pushed, gathered);
            let decoded = super::super::decode_part(gathered.bytes.clone()).unwrap();
            assert_eq!(decoded.len(), updates.len());
            for (i, (k, v, t, d)) in updates.iter().enumerate() {
                assert_eq!(decoded.get(i), (&k[..], &v[..], *t, *d));
            }
            let reader = SerializedFileReader::new(gathered.bytes).unwrap();
            let rg = reader.get_row_group(0).unwrap();
            let pages = |col| {
                let mut n = 0;
                let mut pages = rg.get_column_page_reader(col).unwrap();
                while let Some(page) = pages.get_next_page().unwrap() {
                    assert_eq!(page.encoding(), Encoding::PLAIN);
                    n += 1;
                }
                n
            };
            assert_eq!([pages(0), pages(1), pages(2), pages(3)], [1, 2, 1, 1]);
        }
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
