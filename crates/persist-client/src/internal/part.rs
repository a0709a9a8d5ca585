//! Typed access to parts: updates of `K, V, T, D` to and from the bytes-level
//! format of [`persist::part`].

use differential_dataflow::difference::Semigroup;
use persist::part::{DecodedPart, PartBuilder, PartCodecs};
use persist_types::{Codec, Codec64};
use timely::progress::Timestamp;

use crate::error::{CodecMismatch, Codecs};

/// The bytes-level codec names of a shard.
pub(crate) fn part_codecs(codecs: &Codecs) -> PartCodecs {
    PartCodecs {
        key: codecs.key.clone(),
        val: codecs.val.clone(),
        ts: codecs.ts.clone(),
        diff: codecs.diff.clone(),
    }
}

/// The codecs of `K, V, T, D`.
pub(crate) fn codecs_of<K: Codec, V: Codec, T: Codec64, D: Codec64>() -> Codecs {
    Codecs {
        key: K::codec_name(),
        val: V::codec_name(),
        ts: T::codec_name(),
        diff: D::codec_name(),
    }
}

/// Encodes `updates` into a part builder, in the order given (the caller
/// sorts and consolidates).
pub(crate) fn build_part<'a, K, V, T, D>(
    codecs: &Codecs,
    updates: impl IntoIterator<Item = (&'a K, &'a V, &'a T, &'a D)>,
) -> PartBuilder
where
    K: Codec,
    V: Codec,
    T: Codec64,
    D: Codec64,
{
    let mut builder = PartBuilder::new(part_codecs(codecs));
    let (mut key, mut val) = (Vec::new(), Vec::new());
    for (k, v, t, d) in updates {
        key.clear();
        val.clear();
        k.encode(&mut key);
        v.encode(&mut val);
        builder.push(&key, &val, t.encode(), d.encode());
    }
    builder
}

/// Checks that `part` was written with the shard's `codecs` (a part from
/// another shard, or bytes misfiled under this one, would decode into
/// nonsense otherwise).
pub(crate) fn check_codecs(part: &DecodedPart, codecs: &Codecs) -> Result<(), Box<CodecMismatch>> {
    let found = part.codecs();
    let actual = Codecs {
        key: found.key.clone(),
        val: found.val.clone(),
        ts: found.ts.clone(),
        diff: found.diff.clone(),
    };
    if &actual == codecs {
        Ok(())
    } else {
        Err(Box::new(CodecMismatch {
            requested: codecs.clone(),
            actual,
        }))
    }
}

/// One decoded update: key and value decoding may fail (the bytes came from
/// outside), so each keeps its own result.
pub(crate) type DecodedUpdate<K, V, T, D> = ((Result<K, String>, Result<V, String>), T, D);

/// Decodes every update of `part` with time in `[lower, upper)` of the
/// batch description, passing each through `keep` (which may also advance
/// the time, e.g. to a snapshot's as_of).
pub(crate) fn decode_updates<K, V, T, D>(
    part: &DecodedPart,
    key_schema: &K::Schema,
    val_schema: &V::Schema,
    mut keep: impl FnMut(&mut T) -> bool,
) -> Vec<DecodedUpdate<K, V, T, D>>
where
    K: Codec,
    V: Codec,
    T: Timestamp + Codec64,
    D: Semigroup + Codec64,
{
    let mut out = Vec::with_capacity(part.len());
    for (k, v, t, d) in part.iter() {
        let mut t = T::decode(t);
        if !keep(&mut t) {
            continue;
        }
        let k = K::decode(k, key_schema).map_err(|e| e.to_string());
        let v = V::decode(v, val_schema).map_err(|e| e.to_string());
        out.push(((k, v), t, D::decode(d)));
    }
    out
}

#[cfg(test)]
mod tests {
    use persist::part::decode_part;
    use persist_types::SimpleSchema;

    use super::*;

    #[test]
    fn typed_updates_roundtrip_through_a_part() {
        let codecs = codecs_of::<String, String, u64, i64>();
        let updates = [
            ("a".to_owned(), "one".to_owned(), 1u64, 1i64),
            ("b".to_owned(), "two".to_owned(), 5, -1),
            ("c".to_owned(), "three".to_owned(), 9, 2),
        ];
        let part = build_part::<String, String, u64, i64>(
            &codecs,
            updates.iter().map(|(k, v, t, d)| (k, v, t, d)),
        )
        .finish()
        .unwrap();
        assert_eq!(part.stats.len, 3);
        let decoded = decode_part(part.bytes).unwrap();
        assert_eq!(decoded.codecs(), &part_codecs(&codecs));
        check_codecs(&decoded, &codecs).unwrap();
        let other = codecs_of::<String, String, u64, u64>();
        let err = *check_codecs(&decoded, &other).unwrap_err();
        assert_eq!((err.requested, err.actual), (other, codecs.clone()));
        // Keep times below 6, advancing them to at least 2 (as a read would).
        let read = decode_updates::<String, String, u64, i64>(
            &decoded,
            &SimpleSchema::new(),
            &SimpleSchema::new(),
            |t| {
                *t = (*t).max(2);
                *t < 6
            },
        );
        assert_eq!(
            read,
            vec![
                ((Ok("a".to_owned()), Ok("one".to_owned())), 2, 1),
                ((Ok("b".to_owned()), Ok("two".to_owned())), 5, -1),
            ]
        );
    }

    #[test]
    fn undecodable_keys_are_reported_per_update() {
        let codecs = codecs_of::<Vec<u8>, (), u64, i64>();
        let bad = vec![0xffu8, 0xfe];
        let part = build_part::<Vec<u8>, (), u64, i64>(&codecs, [(&bad, &(), &1u64, &1i64)])
            .finish()
            .unwrap();
        let decoded = decode_part(part.bytes).unwrap();
        // Read the same bytes as `String` keys: the key fails, the rest is kept.
        let read = decode_updates::<String, (), u64, i64>(
            &decoded,
            &SimpleSchema::new(),
            &SimpleSchema::new(),
            |_| true,
        );
        assert_eq!(read.len(), 1);
        let ((key, val), t, d) = &read[0];
        assert!(key.as_ref().is_err_and(|e| e.contains("String")), "{key:?}");
        assert_eq!((val, *t, *d), (&Ok(()), 1, 1));
    }
}
