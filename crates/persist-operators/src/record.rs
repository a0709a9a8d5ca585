//! The key type of shards written by [`persist_sink`](crate::sink::persist_sink):
//! a data row or an error, so one shard carries both of a collection's
//! halves.

use std::fmt::Debug;
use std::sync::Arc;

use persist_types::{Codec, CodecError, Schema};
use serde::{Deserialize, Serialize};

/// One row of a sink's shard: `Data(key, val)` of the ok collection or
/// `Error(err)` of the error collection. The shard's value type is `()`.
///
/// Encoding: a tag byte (`0` data, `1` error); for data the key's length as
/// four little-endian bytes, the key, then the value; for an error the
/// error's bytes. Decoding checks every length and never panics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Record<K, V, E> {
    /// A row of the ok collection.
    Data(K, V),
    /// A row of the error collection.
    Error(E),
}

/// The schema of a [`Record`]: its parts' schemas.
pub struct RecordSchema<K: Codec, V: Codec, E: Codec> {
    /// The key schema.
    pub key: Arc<K::Schema>,
    /// The value schema.
    pub val: Arc<V::Schema>,
    /// The error schema.
    pub err: Arc<E::Schema>,
}

impl<K: Codec, V: Codec, E: Codec> Debug for RecordSchema<K, V, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordSchema")
            .field("key", &self.key)
            .field("val", &self.val)
            .field("err", &self.err)
            .finish()
    }
}

impl<K: Codec, V: Codec, E: Codec> Default for RecordSchema<K, V, E>
where
    K::Schema: Default,
    V::Schema: Default,
    E::Schema: Default,
{
    fn default() -> Self {
        RecordSchema {
            key: Arc::new(Default::default()),
            val: Arc::new(Default::default()),
            err: Arc::new(Default::default()),
        }
    }
}

impl<K: Codec, V: Codec, E: Codec> Schema<Record<K, V, E>> for RecordSchema<K, V, E> {}

const DATA: u8 = 0;
const ERROR: u8 = 1;

fn invalid(reason: impl Into<String>) -> CodecError {
    CodecError::Invalid {
        codec: "record".to_owned(),
        reason: reason.into(),
    }
}

impl<K: Codec, V: Codec, E: Codec> Codec for Record<K, V, E> {
    type Schema = RecordSchema<K, V, E>;

    fn codec_name() -> String {
        format!(
            "record[{},{},{}]",
            K::codec_name(),
            V::codec_name(),
            E::codec_name()
        )
    }

    fn encode<B: bytes::BufMut>(&self, buf: &mut B) {
        match self {
            Record::Data(key, val) => {
                buf.put_u8(DATA);
                let key = key.encode_to_vec();
                let len = u32::try_from(key.len()).unwrap_or(u32::MAX);
                buf.put_u32_le(len);
                buf.put_slice(&key);
                val.encode(buf);
            }
            Record::Error(err) => {
                buf.put_u8(ERROR);
                err.encode(buf);
            }
        }
    }

    fn decode(buf: &[u8], schema: &Self::Schema) -> Result<Self, CodecError> {
        let (&tag, rest) = buf.split_first().ok_or_else(|| invalid("empty input"))?;
        match tag {
            DATA => {
                let (len, rest) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| invalid("truncated key length"))?;
                let len = usize::try_from(u32::from_le_bytes(*len))
                    .map_err(|_| invalid("key length overflows"))?;
                if rest.len() < len {
                    return Err(invalid(format!(
                        "key of {len} bytes but only {} left",
                        rest.len()
                    )));
                }
                let (key, val) = rest.split_at(len);
                Ok(Record::Data(
                    K::decode(key, &schema.key)?,
                    V::decode(val, &schema.val)?,
                ))
            }
            ERROR => Ok(Record::Error(E::decode(rest, &schema.err)?)),
            other => Err(invalid(format!("unknown tag {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type R = Record<String, u64, String>;

    #[test]
    fn records_roundtrip() {
        let schema = RecordSchema::default();
        for record in [
            R::Data("k".into(), 7),
            R::Data(String::new(), 0),
            R::Error("boom".into()),
            R::Error(String::new()),
        ] {
            let bytes = record.encode_to_vec();
            assert_eq!(R::decode(&bytes, &schema), Ok(record));
        }
    }

    #[test]
    fn bad_records_are_errors_not_panics() {
        let schema = RecordSchema::default();
        let good = R::Data("key".into(), 1).encode_to_vec();
        for cut in 0..good.len() {
            // Every strict prefix is rejected (the value needs 8 bytes).
            assert!(R::decode(&good[..cut], &schema).is_err(), "prefix {cut}");
        }
        assert!(R::decode(&[9], &schema).is_err());
        assert!(R::decode(&[DATA, 255, 255, 255, 255], &schema).is_err());
        assert!(R::decode(&[ERROR, 0xff], &schema).is_err(), "invalid utf-8");
    }
}
