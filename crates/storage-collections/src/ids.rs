//! Collection identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The identity of a collection: `u<n>` for user collections, `s<n>` for
/// system collections, `t<n>` for transient ones (which are never recorded
/// durably).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GlobalId {
    /// A collection a user created.
    User(u64),
    /// A collection the system created.
    System(u64),
    /// A collection that lives only as long as the process that made it.
    Transient(u64),
}

impl GlobalId {
    /// Whether the id is transient (never recorded durably).
    pub fn is_transient(&self) -> bool {
        matches!(self, GlobalId::Transient(_))
    }
}

impl fmt::Display for GlobalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GlobalId::User(n) => write!(f, "u{n}"),
            GlobalId::System(n) => write!(f, "s{n}"),
            GlobalId::Transient(n) => write!(f, "t{n}"),
        }
    }
}

/// A string that is not a [`GlobalId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid collection id {0:?}: expected u<n>, s<n> or t<n>")]
pub struct GlobalIdParseError(pub String);

impl FromStr for GlobalId {
    type Err = GlobalIdParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || GlobalIdParseError(s.to_owned());
        let (kind, n) = s.split_at_checked(1).ok_or_else(err)?;
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = n.parse().map_err(|_| err())?;
        match kind {
            "u" => Ok(GlobalId::User(n)),
            "s" => Ok(GlobalId::System(n)),
            "t" => Ok(GlobalId::Transient(n)),
            _ => Err(err()),
        }
    }
}

impl Serialize for GlobalId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GlobalId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip_through_strings_and_serde() {
        for id in [
            GlobalId::User(0),
            GlobalId::System(42),
            GlobalId::Transient(u64::MAX),
        ] {
            assert_eq!(id.to_string().parse::<GlobalId>(), Ok(id));
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<GlobalId>(&json).unwrap(), id);
        }
        for bad in ["", "u", "x1", "u-1", "u1a", "U1", "u99999999999999999999"] {
            assert!(bad.parse::<GlobalId>().is_err(), "{bad}");
        }
    }
}
