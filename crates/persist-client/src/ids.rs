//! The identities of the handles on a shard.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why a string is not an id of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: expected {prefix:?} followed by a UUID")]
pub struct IdParseError {
    /// The kind of id that was expected.
    pub kind: &'static str,
    /// The letter every id of that kind starts with.
    pub prefix: char,
    /// The rejected input.
    pub input: String,
}

/// Defines a random, UUID-based id type displayed as a one-letter prefix and
/// the UUID, e.g. `w0c6f4b30-...`.
macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub(crate) [u8; 16]);

        impl $name {
            /// Returns a new, random id.
            pub fn new() -> Self {
                $name(*Uuid::new_v4().as_bytes())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}{}", $prefix, Uuid::from_bytes(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let error = || IdParseError { kind: $kind, prefix: $prefix, input: s.to_owned() };
                let uuid = s.strip_prefix($prefix).ok_or_else(error)?;
                let uuid = Uuid::parse_str(uuid).map_err(|_| error())?;
                let id = $name(*uuid.as_bytes());
                // One spelling per id: the canonical lowercase hyphenated one.
                if id.to_string() != s {
                    return Err(error());
                }
                Ok(id)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

uuid_id!(
    /// The identity of a [`WriteHandle`](crate::write::WriteHandle).
    WriterId, 'w', "writer id"
);
uuid_id!(
    /// The identity of a leased [`ReadHandle`](crate::read::ReadHandle).
    LeasedReaderId, 'r', "leased reader id"
);
uuid_id!(
    /// The identity of a critical reader: a since hold that never expires.
    CriticalReaderId, 'c', "critical reader id"
);
uuid_id!(
    /// The token a writer attaches to one logical append, so that a retry of
    /// an append whose outcome was unknown is recognised and not applied
    /// twice.
    IdempotencyToken, 'i', "idempotency token"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_ids() {
        let zero = [0u8; 16];
        assert_eq!(
            WriterId(zero).to_string(),
            "w00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            LeasedReaderId(zero).to_string(),
            "r00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            CriticalReaderId(zero).to_string(),
            "c00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            IdempotencyToken(zero).to_string(),
            "i00000000-0000-0000-0000-000000000000"
        );
        assert_eq!(
            format!("{:?}", WriterId(zero)),
            "WriterId(w00000000-0000-0000-0000-000000000000)"
        );
    }

    #[test]
    fn ids_roundtrip_and_reject_other_kinds() {
        let id = LeasedReaderId::new();
        assert_eq!(id.to_string().parse::<LeasedReaderId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<LeasedReaderId>(&json).unwrap(), id);
        let writer = WriterId::new().to_string();
        let err = writer.parse::<LeasedReaderId>().unwrap_err();
        assert_eq!(err.prefix, 'r');
        assert!(err.to_string().contains("leased reader id"), "{err}");
        assert!(
            format!("w{}", "0".repeat(32)).parse::<WriterId>().is_err(),
            "non-canonical"
        );
        assert_ne!(WriterId::new(), WriterId::new());
    }
}
