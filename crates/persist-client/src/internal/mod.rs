//! The machinery behind the handles: state, its encoding, parts, and the
//! loop that applies transitions through consensus.

pub(crate) mod cache;
pub(crate) mod compact;
pub(crate) mod diff;
pub(crate) mod encoding;
pub(crate) mod heartbeat;
pub(crate) mod inspect;
pub(crate) mod machine;
pub(crate) mod maintenance;
pub(crate) mod merge;
pub(crate) mod part;
pub(crate) mod state;
