//! A small, strict reader of the Thrift compact protocol, used to vet the
//! parts of a Parquet file that the `parquet` crate would otherwise trust.
//!
//! The `parquet` crate parses page headers and the footer's schema itself,
//! but sizes some allocations from values in them (a page's uncompressed size,
//! a schema node's child count) and recurses on schema nesting. Before handing
//! untrusted bytes to it, [`super::decode`] reads those structures with this
//! reader and checks them against the input's size.
//!
//! The reader is stricter than the library's: it bounds every length by the
//! remaining input, rejects integers outside their declared width instead of
//! wrapping them, limits varints to 10 bytes and nesting to [`MAX_DEPTH`].
//! Where it accepts input, it reads it the way the library does (same field
//! ids, same "last value of a repeated field wins"), so the values it checks
//! are the values the library then uses.

/// How deep structs and containers may nest. Parquet metadata nests at most
/// about eight levels; the library's own limit is 64.
const MAX_DEPTH: usize = 32;

// Compact protocol type ids (the low nibble of a field header).
const TYPE_BOOL_TRUE: u8 = 1;
const TYPE_BOOL_FALSE: u8 = 2;
const TYPE_BYTE: u8 = 3;
const TYPE_I16: u8 = 4;
const TYPE_I32: u8 = 5;
const TYPE_I64: u8 = 6;
const TYPE_DOUBLE: u8 = 7;
const TYPE_BINARY: u8 = 8;
const TYPE_LIST: u8 = 9;
const TYPE_SET: u8 = 10;
const TYPE_MAP: u8 = 11;
const TYPE_STRUCT: u8 = 12;
const TYPE_UUID: u8 = 13;

/// `PageType::DATA_PAGE` in the Parquet format.
pub(super) const PAGE_TYPE_DATA_PAGE: i32 = 0;
/// `Encoding::PLAIN` in the Parquet format.
pub(super) const ENCODING_PLAIN: i32 = 0;

/// A cursor over compact-protocol bytes. Every read is bounds-checked and
/// returns a description of the problem instead of panicking.
#[derive(Debug)]
pub(super) struct CompactReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// One field header of a struct: its id and wire type.
#[derive(Debug, Clone, Copy)]
struct Field {
    id: i16,
    ty: u8,
}

impl<'a> CompactReader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        CompactReader { buf, pos: 0 }
    }

    /// How many bytes have been consumed.
    pub(super) fn position(&self) -> usize {
        self.pos
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn byte(&mut self) -> Result<u8, String> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| "thrift: unexpected end of input".to_string())?;
        self.pos += 1;
        Ok(b)
    }

    fn skip_bytes(&mut self, n: usize) -> Result<(), String> {
        if n > self.remaining() {
            return Err(format!(
                "thrift: {n} bytes declared but only {} remain",
                self.remaining()
            ));
        }
        self.pos += n;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return Err("thrift: varint overflows 64 bits".to_string());
            }
            value |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("thrift: varint longer than 10 bytes".to_string())
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        // Zigzag decoding: the low bit is the sign.
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    fn i32(&mut self) -> Result<i32, String> {
        let v = self.zigzag()?;
        i32::try_from(v).map_err(|_| format!("thrift: i32 value {v} out of range"))
    }

    fn i16(&mut self) -> Result<i16, String> {
        let v = self.zigzag()?;
        i16::try_from(v).map_err(|_| format!("thrift: i16 value {v} out of range"))
    }

    /// Reads a field header; `None` is the struct's stop marker.
    fn field(&mut self, last_id: i16) -> Result<Option<Field>, String> {
        let b = self.byte()?;
        let ty = b & 0x0f;
        if ty == 0 {
            // The library treats any header with type 0 as the stop marker.
            return Ok(None);
        }
        if ty > TYPE_UUID {
            return Err(format!("thrift: unknown field type {ty}"));
        }
        let delta = b >> 4;
        let id = if delta == 0 {
            self.i16()?
        } else {
            last_id
                .checked_add(i16::from(delta))
                .ok_or_else(|| "thrift: field id overflows".to_string())?
        };
        Ok(Some(Field { id, ty }))
    }

    /// Reads a list or set header: element type and size. The size is
    /// bounded by the remaining input (every element takes at least one
    /// byte, except booleans in field position, which cannot be elements).
    fn list_header(&mut self) -> Result<(u8, usize), String> {
        let b = self.byte()?;
        let elem = b & 0x0f;
        let short = usize::from(b >> 4);
        let size = if short == 15 {
            let n = self.varint()?;
            usize::try_from(n).map_err(|_| format!("thrift: list size {n} too large"))?
        } else {
            short
        };
        if size > self.remaining() {
            return Err(format!(
                "thrift: list of {size} elements but only {} bytes remain",
                self.remaining()
            ));
        }
        Ok((elem, size))
    }

    /// Skips a value of wire type `ty`. `in_field` is true for a struct
    /// field (whose boolean value lives in the header) and false for a
    /// container element (whose boolean value is one byte).
    fn skip(&mut self, ty: u8, in_field: bool, depth: usize) -> Result<(), String> {
        if depth >= MAX_DEPTH {
            return Err(format!("thrift: nesting deeper than {MAX_DEPTH}"));
        }
        match ty {
            TYPE_BOOL_TRUE | TYPE_BOOL_FALSE => {
                if !in_field {
                    self.byte()?;
                }
                Ok(())
            }
            TYPE_BYTE => self.byte().map(|_| ()),
            TYPE_I16 | TYPE_I32 | TYPE_I64 => self.varint().map(|_| ()),
            TYPE_DOUBLE => self.skip_bytes(8),
            TYPE_UUID => self.skip_bytes(16),
            TYPE_BINARY => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| format!("thrift: length {n} too large"))?;
                self.skip_bytes(n)
            }
            TYPE_LIST | TYPE_SET => {
                let (elem, size) = self.list_header()?;
                if size > 0 && (elem == 0 || elem > TYPE_UUID) {
                    return Err(format!("thrift: unknown list element type {elem}"));
                }
                for _ in 0..size {
                    self.skip(elem, false, depth + 1)?;
                }
                Ok(())
            }
            TYPE_MAP => {
                let n = self.varint()?;
                let size = usize::try_from(n).map_err(|_| format!("thrift: map size {n}"))?;
                if size == 0 {
                    return Ok(());
                }
                if size > self.remaining() {
                    return Err(format!("thrift: map of {size} entries exceeds input"));
                }
                let kv = self.byte()?;
                let (kt, vt) = (kv >> 4, kv & 0x0f);
                for t in [kt, vt] {
                    if t == 0 || t > TYPE_UUID {
                        return Err(format!("thrift: unknown map element type {t}"));
                    }
                }
                for _ in 0..size {
                    self.skip(kt, false, depth + 1)?;
                    self.skip(vt, false, depth + 1)?;
                }
                Ok(())
            }
            TYPE_STRUCT => {
                let mut last = 0;
                while let Some(f) = self.field(last)? {
                    self.skip(f.ty, true, depth + 1)?;
                    last = f.id;
                }
                Ok(())
            }
            _ => Err(format!("thrift: cannot skip type {ty}")),
        }
    }

    /// Reads an i32 field value, checking that the wire type is i32.
    fn i32_field(&mut self, f: Field, name: &str) -> Result<i32, String> {
        if f.ty != TYPE_I32 {
            return Err(format!("thrift: field {name} has wire type {}", f.ty));
        }
        self.i32()
    }
}

/// The parts of a Parquet `PageHeader` that decoding relies on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PageHeader {
    /// `PageType` (0 = data page v1).
    pub page_type: i32,
    /// Size of the page's data after decompression.
    pub uncompressed_size: i32,
    /// Size of the page's data as stored, after the header.
    pub compressed_size: i32,
    /// For a v1 data page: `(num_values, encoding)`.
    pub data_page: Option<(i32, i32)>,
}

/// Reads a `PageHeader` from the front of `buf`, returning it and the number
/// of bytes it occupies.
pub(super) fn read_page_header(buf: &[u8]) -> Result<(PageHeader, usize), String> {
    let mut r = CompactReader::new(buf);
    let mut page_type = None;
    let mut uncompressed_size = None;
    let mut compressed_size = None;
    let mut data_page = None;
    let mut last = 0;
    while let Some(f) = r.field(last)? {
        match f.id {
            1 => page_type = Some(r.i32_field(f, "type")?),
            2 => uncompressed_size = Some(r.i32_field(f, "uncompressed_page_size")?),
            3 => compressed_size = Some(r.i32_field(f, "compressed_page_size")?),
            5 => {
                if f.ty != TYPE_STRUCT {
                    return Err(format!("thrift: data_page_header has wire type {}", f.ty));
                }
                data_page = Some(read_data_page_header(&mut r)?);
            }
            _ => r.skip(f.ty, true, 1)?,
        }
        last = f.id;
    }
    let header = PageHeader {
        page_type: page_type.ok_or("page header without type")?,
        uncompressed_size: uncompressed_size.ok_or("page header without uncompressed size")?,
        compressed_size: compressed_size.ok_or("page header without compressed size")?,
        data_page,
    };
    Ok((header, r.position()))
}

/// `Encoding::RLE`, which a data page header names for its (here absent)
/// definition and repetition levels.
const ENCODING_RLE: i32 = 3;

/// Appends the compact-protocol `PageHeader` of a version-1 `PLAIN` data page
/// holding `num_values` values in `uncompressed_size` bytes, stored in
/// `compressed_size` bytes. What [`read_page_header`] reads back.
pub(super) fn write_data_page_header(
    out: &mut Vec<u8>,
    uncompressed_size: i32,
    compressed_size: i32,
    num_values: i32,
) {
    // Field headers pack the id delta (always 1 or 2 here) over the type.
    let field = |out: &mut Vec<u8>, delta: u8, ty: u8| out.push((delta << 4) | ty);
    field(out, 1, TYPE_I32);
    write_zigzag(out, PAGE_TYPE_DATA_PAGE);
    field(out, 1, TYPE_I32);
    write_zigzag(out, uncompressed_size);
    field(out, 1, TYPE_I32);
    write_zigzag(out, compressed_size);
    // Field 5, `data_page_header` (field 4, a CRC, is absent).
    field(out, 2, TYPE_STRUCT);
    field(out, 1, TYPE_I32);
    write_zigzag(out, num_values);
    field(out, 1, TYPE_I32);
    write_zigzag(out, ENCODING_PLAIN);
    field(out, 1, TYPE_I32);
    write_zigzag(out, ENCODING_RLE);
    field(out, 1, TYPE_I32);
    write_zigzag(out, ENCODING_RLE);
    out.push(0); // end of DataPageHeader
    out.push(0); // end of PageHeader
}

/// Appends `v` as a zigzag varint.
fn write_zigzag(out: &mut Vec<u8>, v: i32) {
    let mut z = ((v << 1) ^ (v >> 31)) as u32;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// Reads the body of a `DataPageHeader` struct: `(num_values, encoding)`.
fn read_data_page_header(r: &mut CompactReader<'_>) -> Result<(i32, i32), String> {
    let mut num_values = None;
    let mut encoding = None;
    let mut last = 0;
    while let Some(f) = r.field(last)? {
        match f.id {
            1 => num_values = Some(r.i32_field(f, "num_values")?),
            2 => encoding = Some(r.i32_field(f, "encoding")?),
            _ => r.skip(f.ty, true, 2)?,
        }
        last = f.id;
    }
    Ok((
        num_values.ok_or("data page header without num_values")?,
        encoding.ok_or("data page header without encoding")?,
    ))
}

/// Reads the `num_children` of every element of a `FileMetaData`'s schema
/// list (field 2), skipping everything else. The library allocates and
/// recurses from these counts, so the caller checks them first.
pub(super) fn read_schema_child_counts(footer: &[u8]) -> Result<Vec<Option<i32>>, String> {
    let mut r = CompactReader::new(footer);
    let mut counts = None;
    let mut last = 0;
    while let Some(f) = r.field(last)? {
        if f.id == 2 {
            if f.ty != TYPE_LIST {
                return Err(format!("thrift: schema has wire type {}", f.ty));
            }
            let (elem, size) = r.list_header()?;
            if size > 0 && elem != TYPE_STRUCT {
                return Err(format!("thrift: schema element type {elem}"));
            }
            let mut list = Vec::with_capacity(size);
            for _ in 0..size {
                list.push(read_schema_element_children(&mut r)?);
            }
            counts = Some(list);
        } else {
            r.skip(f.ty, true, 1)?;
        }
        last = f.id;
    }
    counts.ok_or_else(|| "footer has no schema".to_string())
}

/// Reads one `SchemaElement` struct, returning its `num_children` field.
fn read_schema_element_children(r: &mut CompactReader<'_>) -> Result<Option<i32>, String> {
    let mut num_children = None;
    let mut last = 0;
    while let Some(f) = r.field(last)? {
        if f.id == 5 {
            num_children = Some(r.i32_field(f, "num_children")?);
        } else {
            r.skip(f.ty, true, 2)?;
        }
        last = f.id;
    }
    Ok(num_children)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes a page header by hand (short-form field headers).
    fn header(fields: &[(u8, i64)], data_page: Option<(i64, i64)>) -> Vec<u8> {
        fn zz(v: i64, out: &mut Vec<u8>) {
            let mut u = ((v << 1) ^ (v >> 63)) as u64;
            loop {
                let b = (u & 0x7f) as u8;
                u >>= 7;
                if u == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
        }
        let mut out = Vec::new();
        let mut last = 0u8;
        for &(id, v) in fields {
            out.push(((id - last) << 4) | TYPE_I32);
            zz(v, &mut out);
            last = id;
        }
        if let Some((n, e)) = data_page {
            out.push(((5 - last) << 4) | TYPE_STRUCT);
            out.push((1 << 4) | TYPE_I32);
            zz(n, &mut out);
            out.push((1 << 4) | TYPE_I32);
            zz(e, &mut out);
            out.push(0);
        }
        out.push(0);
        out
    }

    #[test]
    fn reads_a_data_page_header() {
        let buf = header(&[(1, 0), (2, 800), (3, 100)], Some((100, 0)));
        let (h, len) = read_page_header(&buf).unwrap();
        assert_eq!(len, buf.len());
        assert_eq!(
            h,
            PageHeader {
                page_type: 0,
                uncompressed_size: 800,
                compressed_size: 100,
                data_page: Some((100, 0)),
            }
        );
    }

    #[test]
    fn written_headers_read_back() {
        for (uncompressed, compressed, values) in [
            (0, 0, 0),
            (800, 100, 100),
            (i32::MAX, i32::MAX, i32::MAX),
            (63, 64, 1),
        ] {
            let mut buf = vec![0xaa];
            write_data_page_header(&mut buf, uncompressed, compressed, values);
            let (h, len) = read_page_header(&buf[1..]).unwrap();
            assert_eq!(len, buf.len() - 1);
            assert_eq!(
                h,
                PageHeader {
                    page_type: PAGE_TYPE_DATA_PAGE,
                    uncompressed_size: uncompressed,
                    compressed_size: compressed,
                    data_page: Some((values, ENCODING_PLAIN)),
                }
            );
        }
    }

    #[test]
    fn rejects_out_of_range_and_truncated_headers() {
        let buf = header(&[(1, 0), (2, i64::from(i32::MAX) + 1), (3, 1)], None);
        assert!(read_page_header(&buf).unwrap_err().contains("out of range"));
        let buf = header(&[(1, 0), (2, 8), (3, 8)], Some((1, 0)));
        for end in 0..buf.len() {
            assert!(read_page_header(&buf[..end]).is_err(), "prefix {end}");
        }
        assert!(read_page_header(&[0xff; 16]).is_err());
    }

    #[test]
    fn rejects_deep_nesting_and_oversized_lists() {
        // Field 9 (unknown) is a struct nested far deeper than MAX_DEPTH.
        let mut buf = vec![(9 << 4) | TYPE_STRUCT];
        buf.extend(std::iter::repeat_n((1 << 4) | TYPE_STRUCT, 1000));
        buf.extend(std::iter::repeat_n(0, 1002));
        assert!(read_page_header(&buf).unwrap_err().contains("nesting"));
        // Field 9 is a list claiming 2^40 i32 elements.
        let mut buf = vec![(9 << 4) | TYPE_LIST, 0xf0 | TYPE_I32];
        buf.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
        assert!(read_page_header(&buf).unwrap_err().contains("list of"));
    }
}
