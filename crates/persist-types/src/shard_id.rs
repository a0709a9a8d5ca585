//! The identity of a shard.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// The unique, permanent name of a shard: the letter `s` followed by a UUID,
/// e.g. `s0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a`.
///
/// Serializes (serde) as that string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardId([u8; 16]);

/// Why a string is not a [`ShardId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardIdParseError {
    /// The string does not start with the `s` prefix.
    #[error("invalid shard id {input:?}: must start with 's' followed by a UUID")]
    MissingPrefix {
        /// The rejected input.
        input: String,
    },
    /// What follows the prefix is not a UUID.
    #[error("invalid shard id {input:?}: {reason}")]
    InvalidUuid {
        /// The rejected input.
        input: String,
        /// Why the UUID part was rejected.
        reason: String,
    },
}

impl ShardId {
    /// Returns a new, random shard id.
    pub fn new() -> Self {
        ShardId(*Uuid::new_v4().as_bytes())
    }

    /// Returns the shard id made of these UUID bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        ShardId(bytes)
    }

    /// Returns the UUID bytes of this shard id.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl Default for ShardId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", Uuid::from_bytes(self.0))
    }
}

impl fmt::Debug for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ShardId({self})")
    }
}

impl FromStr for ShardId {
    type Err = ShardIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let uuid = s
            .strip_prefix('s')
            .ok_or_else(|| ShardIdParseError::MissingPrefix {
                input: s.to_owned(),
            })?;
        let uuid = Uuid::parse_str(uuid).map_err(|err| ShardIdParseError::InvalidUuid {
            input: s.to_owned(),
            reason: err.to_string(),
        })?;
        let id = ShardId(*uuid.as_bytes());
        // One name per shard: only the canonical lowercase hyphenated form.
        if id.to_string() != s {
            return Err(ShardIdParseError::InvalidUuid {
                input: s.to_owned(),
                reason: "not in canonical form (lowercase, hyphenated)".to_owned(),
            });
        }
        Ok(id)
    }
}

impl Serialize for ShardId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ShardId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(any(test, feature = "proptest"))]
impl proptest::arbitrary::Arbitrary for ShardId {
    type Parameters = ();
    type Strategy = proptest::strategy::Map<
        proptest::array::UniformArrayStrategy<proptest::num::u8::Any, [u8; 16]>,
        fn([u8; 16]) -> ShardId,
    >;

    fn arbitrary_with(_: Self::Parameters) -> Self::Strategy {
        use proptest::strategy::Strategy;
        proptest::array::uniform16(proptest::num::u8::ANY).prop_map(ShardId::from_bytes)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn display_parse_roundtrip(id in any::<ShardId>()) {
            let s = id.to_string();
            prop_assert!(s.starts_with('s'));
            prop_assert_eq!(s.parse::<ShardId>().unwrap(), id);
        }

        #[test]
        fn serde_is_the_display_string(id in any::<ShardId>()) {
            let json = serde_json::to_string(&id).unwrap();
            prop_assert_eq!(&json, &format!("\"{id}\""));
            prop_assert_eq!(serde_json::from_str::<ShardId>(&json).unwrap(), id);
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in ".*") {
            let _ = s.parse::<ShardId>();
        }
    }

    #[test]
    fn new_ids_are_distinct() {
        assert_ne!(ShardId::new(), ShardId::new());
    }

    #[test]
    fn parse_errors_name_the_problem() {
        let uuid = "0c6f4b30-5d5a-4f6e-9d9a-5e3f0b1d2c4a";
        assert!(format!("s{uuid}").parse::<ShardId>().is_ok());

        let err = uuid.parse::<ShardId>().unwrap_err();
        assert!(matches!(err, ShardIdParseError::MissingPrefix { .. }));
        assert!(err.to_string().contains("must start with 's'"), "{err}");

        let err = "sNOTAUUID".parse::<ShardId>().unwrap_err();
        assert!(matches!(err, ShardIdParseError::InvalidUuid { .. }));
        assert!(err.to_string().contains("sNOTAUUID"), "{err}");

        assert!("".parse::<ShardId>().is_err());
        assert!("s".parse::<ShardId>().is_err());
        assert!(format!("x{uuid}").parse::<ShardId>().is_err());
        assert!(format!("s{uuid}0").parse::<ShardId>().is_err());
        assert!(
            format!("s{}", uuid.to_uppercase())
                .parse::<ShardId>()
                .is_err()
        );
        assert!(
            format!("s{}", uuid.replace('-', ""))
                .parse::<ShardId>()
                .is_err()
        );
        assert!(format!("s{{{uuid}}}").parse::<ShardId>().is_err());

        let err = serde_json::from_str::<ShardId>("\"nope\"").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn debug_wraps_display() {
        let id: ShardId = "s00000000-0000-0000-0000-000000000000".parse().unwrap();
        assert_eq!(
            format!("{id:?}"),
            "ShardId(s00000000-0000-0000-0000-000000000000)"
        );
    }
}
