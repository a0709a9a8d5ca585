//! The link between a shard's codecs and the bytes-level part format of
//! [`persist::part`].

use persist::part::{DecodedPart, PartCodecs};
use persist_types::{Codec, Codec64};

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

#[cfg(test)]
mod tests {
    use persist::part::{PartBuilder, decode_part};

    use super::*;

    #[test]
    fn parts_of_other_codecs_are_refused() {
        let codecs = codecs_of::<String, String, u64, i64>();
        let mut builder = PartBuilder::new(part_codecs(&codecs));
        builder.push(b"a", b"one", 1u64.to_le_bytes(), 1i64.to_le_bytes());
        let decoded = decode_part(builder.finish().unwrap().bytes).unwrap();
        check_codecs(&decoded, &codecs).unwrap();
        let other = codecs_of::<String, String, u64, u64>();
        let err = *check_codecs(&decoded, &other).unwrap_err();
        assert_eq!((err.requested, err.actual), (other, codecs));
    }
}
