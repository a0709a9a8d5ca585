//! Encoding of keys, values, times and diffs.

use std::fmt::Debug;
use std::marker::PhantomData;

use bytes::BufMut;

/// Why bytes could not be decoded into a value.
///
/// Decoding never panics and never trusts its input: truncated, oversized or
/// otherwise invalid bytes produce one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The input had a different length than the encoding requires.
    #[error("{codec}: expected {expected} bytes, found {found}")]
    WrongLength {
        /// The codec that rejected the input.
        codec: String,
        /// The length the encoding requires.
        expected: usize,
        /// The length of the input.
        found: usize,
    },
    /// The input had the right shape but is not a valid value.
    #[error("{codec}: invalid encoding: {reason}")]
    Invalid {
        /// The codec that rejected the input.
        codec: String,
        /// What is wrong with the input.
        reason: String,
    },
}

/// The description of the shape of a [`Codec`] type's values.
///
/// A shard records the schemas it was created with; future versions use them
/// to decode old data with new code. Today a schema only needs to be nameable
/// and shareable.
pub trait Schema<T>: Debug + Send + Sync + 'static {}

/// The schema of a type whose encoding has a single, fixed shape.
pub struct SimpleSchema<T>(PhantomData<fn() -> T>);

impl<T> SimpleSchema<T> {
    /// Returns the schema.
    pub const fn new() -> Self {
        SimpleSchema(PhantomData)
    }
}

impl<T> Default for SimpleSchema<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for SimpleSchema<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SimpleSchema<T> {}

impl<T> PartialEq for SimpleSchema<T> {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl<T> Eq for SimpleSchema<T> {}

impl<T> Debug for SimpleSchema<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimpleSchema<{}>", std::any::type_name::<T>())
    }
}

impl<T: 'static> Schema<T> for SimpleSchema<T> {}

/// A type that persist stores as keys or values of a shard.
///
/// The encoding must be deterministic (equal values encode to equal bytes)
/// and [`Codec::decode`] must accept everything [`Codec::encode`] produces.
/// Values must be `Send`: large reads decode on several threads at once and
/// hand the values back to the caller's.
pub trait Codec: Debug + Send + Sized + 'static {
    /// The shape of this type's values (see [`Schema`]).
    type Schema: Schema<Self>;

    /// A name for this encoding, recorded in every shard that stores the type.
    ///
    /// Opening a shard with a codec whose name differs from the recorded one
    /// is refused with a codec mismatch, so the name must change whenever the
    /// encoding does.
    fn codec_name() -> String;

    /// Appends the encoding of `self` to `buf`.
    fn encode<B: BufMut>(&self, buf: &mut B);

    /// Decodes a value from exactly the bytes in `buf`.
    ///
    /// Returns an error, and never panics, on input that is not a valid
    /// encoding (including truncated input).
    fn decode(buf: &[u8], schema: &Self::Schema) -> Result<Self, CodecError>;

    /// Encodes `self` into a new vector.
    fn encode_to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        self.encode(&mut buf);
        buf
    }
}

/// A type that encodes into exactly eight bytes: persist's times and diffs.
///
/// Every eight-byte pattern must decode to some value (decoding cannot fail),
/// and `decode(encode(x)) == x`. Like [`Codec`] values, times and diffs are
/// shared between the threads of a large read.
pub trait Codec64: Sized + Clone + Debug + Send + Sync + 'static {
    /// A name for this encoding, recorded in every shard that stores the type.
    fn codec_name() -> String;

    /// Encodes `self`.
    fn encode(&self) -> [u8; 8];

    /// Decodes a value.
    fn decode(buf: [u8; 8]) -> Self;
}

/// The fencing token of a critical reader (for example a controller epoch).
///
/// Downgrades of a critical reader's since are compare-and-set on its opaque
/// value, so a process holding a stale token cannot move the since.
pub trait Opaque: PartialEq + Clone + Debug + Send + Sync + Sized + 'static {
    /// The value a critical reader starts with before anyone has set it.
    fn initial() -> Self;
}

fn wrong_length<T>(expected: usize, found: usize) -> CodecError {
    CodecError::WrongLength {
        codec: std::any::type_name::<T>().to_owned(),
        expected,
        found,
    }
}

fn fixed8<T>(buf: &[u8]) -> Result<[u8; 8], CodecError> {
    buf.try_into().map_err(|_| wrong_length::<T>(8, buf.len()))
}

impl Codec for () {
    type Schema = SimpleSchema<()>;

    fn codec_name() -> String {
        "()".to_owned()
    }

    fn encode<B: BufMut>(&self, _buf: &mut B) {}

    fn decode(buf: &[u8], _schema: &Self::Schema) -> Result<Self, CodecError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(wrong_length::<()>(0, buf.len()))
        }
    }
}

impl Codec for String {
    type Schema = SimpleSchema<String>;

    fn codec_name() -> String {
        "String".to_owned()
    }

    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(self.as_bytes());
    }

    fn decode(buf: &[u8], _schema: &Self::Schema) -> Result<Self, CodecError> {
        String::from_utf8(buf.to_vec()).map_err(|err| CodecError::Invalid {
            codec: Self::codec_name(),
            reason: err.to_string(),
        })
    }
}

impl Codec for Vec<u8> {
    type Schema = SimpleSchema<Vec<u8>>;

    fn codec_name() -> String {
        "Vec<u8>".to_owned()
    }

    fn encode<B: BufMut>(&self, buf: &mut B) {
        buf.put_slice(self);
    }

    fn decode(buf: &[u8], _schema: &Self::Schema) -> Result<Self, CodecError> {
        Ok(buf.to_vec())
    }
}

/// Implements [`Codec`] and [`Codec64`] for an eight-byte integer, encoded
/// little-endian.
macro_rules! int_codecs {
    ($t:ty, $name:literal) => {
        impl Codec for $t {
            type Schema = SimpleSchema<$t>;

            fn codec_name() -> String {
                $name.to_owned()
            }

            fn encode<B: BufMut>(&self, buf: &mut B) {
                buf.put_slice(&self.to_le_bytes());
            }

            fn decode(buf: &[u8], _schema: &Self::Schema) -> Result<Self, CodecError> {
                fixed8::<$t>(buf).map(<$t>::from_le_bytes)
            }
        }

        impl Codec64 for $t {
            fn codec_name() -> String {
                $name.to_owned()
            }

            fn encode(&self) -> [u8; 8] {
                self.to_le_bytes()
            }

            fn decode(buf: [u8; 8]) -> Self {
                <$t>::from_le_bytes(buf)
            }
        }

        impl Opaque for $t {
            fn initial() -> Self {
                <$t>::MIN
            }
        }
    };
}

int_codecs!(u64, "u64");
int_codecs!(i64, "i64");

/// The schema of [`String`] keys or values.
pub type StringSchema = SimpleSchema<String>;
/// The schema of [`Vec<u8>`] keys or values.
pub type VecU8Schema = SimpleSchema<Vec<u8>>;
/// The schema of `()` keys or values.
pub type UnitSchema = SimpleSchema<()>;
/// The schema of [`u64`] keys or values.
pub type U64Schema = SimpleSchema<u64>;
/// The schema of [`i64`] keys or values.
pub type I64Schema = SimpleSchema<i64>;

/// Two-dimensional times (an outer and an inner round, as in nested
/// iterative scopes): partially ordered, encoded as the outer `u32` in the
/// high half of a little-endian `u64` and the inner in the low half.
impl Codec64 for timely::order::Product<u32, u32> {
    fn codec_name() -> String {
        "Product<u32,u32>".to_owned()
    }

    fn encode(&self) -> [u8; 8] {
        ((u64::from(self.outer) << 32) | u64::from(self.inner)).to_le_bytes()
    }

    fn decode(buf: [u8; 8]) -> Self {
        let packed = u64::from_le_bytes(buf);
        // Truncation is the point: each half is one coordinate.
        #[allow(clippy::cast_possible_truncation)]
        timely::order::Product::new((packed >> 32) as u32, packed as u32)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn product_times_roundtrip(outer: u32, inner: u32) {
            let t = timely::order::Product::new(outer, inner);
            prop_assert_eq!(<timely::order::Product<u32, u32> as Codec64>::decode(t.encode()), t);
        }
    }

    fn roundtrip<T: Codec + PartialEq>(value: T)
    where
        T::Schema: Default,
    {
        let bytes = value.encode_to_vec();
        let decoded = T::decode(&bytes, &T::Schema::default()).expect("valid encoding");
        assert_eq!(decoded, value);
    }

    proptest! {
        #[test]
        fn codecs_roundtrip(s in ".*", v in proptest::collection::vec(any::<u8>(), 0..64), u in any::<u64>(), i in any::<i64>()) {
            roundtrip(s);
            roundtrip(v);
            roundtrip(u);
            roundtrip(i);
            roundtrip(());
            prop_assert_eq!(<u64 as Codec64>::decode(Codec64::encode(&u)), u);
            prop_assert_eq!(<i64 as Codec64>::decode(Codec64::encode(&i)), i);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = <u64 as Codec>::decode(&bytes, &SimpleSchema::new());
            let _ = <i64 as Codec>::decode(&bytes, &SimpleSchema::new());
            let _ = <String as Codec>::decode(&bytes, &SimpleSchema::new());
            let _ = <() as Codec>::decode(&bytes, &SimpleSchema::new());
        }
    }

    #[test]
    fn truncated_integers_are_rejected_with_their_lengths() {
        let bytes = 7u64.encode_to_vec();
        let err = <u64 as Codec>::decode(&bytes[..3], &SimpleSchema::new()).unwrap_err();
        assert_eq!(
            err,
            CodecError::WrongLength {
                codec: "u64".into(),
                expected: 8,
                found: 3
            }
        );
        assert_eq!(err.to_string(), "u64: expected 8 bytes, found 3");
        let mut long = bytes.clone();
        long.push(0);
        assert!(<i64 as Codec>::decode(&long, &SimpleSchema::new()).is_err());
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        let err = <String as Codec>::decode(&[0x66, 0xff], &SimpleSchema::new()).unwrap_err();
        assert!(
            matches!(err, CodecError::Invalid { ref codec, .. } if codec == "String"),
            "{err}"
        );
    }

    #[test]
    fn unit_rejects_trailing_bytes() {
        assert!(<() as Codec>::decode(&[1], &SimpleSchema::new()).is_err());
    }

    #[test]
    fn codec_names_are_distinct() {
        let names = [
            <() as Codec>::codec_name(),
            <String as Codec>::codec_name(),
            <Vec<u8> as Codec>::codec_name(),
            <u64 as Codec>::codec_name(),
            <i64 as Codec>::codec_name(),
        ];
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
    }

    #[test]
    fn integer_opaques_start_at_their_minimum() {
        assert_eq!(<u64 as Opaque>::initial(), 0);
        assert_eq!(<i64 as Opaque>::initial(), i64::MIN);
    }
}
