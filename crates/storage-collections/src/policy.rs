//! Read policies: how far behind its write frontier a collection's since is
//! kept.

use serde::Serialize;
use timely::progress::Antichain;

use crate::Timestamp;

/// How a collection's implied read capability follows its write frontier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ReadPolicy {
    /// Hold the since at this frontier, whatever the write frontier does.
    /// `ValidFrom([])` lets the since go (used when dropping).
    ValidFrom(Antichain<Timestamp>),
    /// Keep the since `lag` behind the last complete time (`upper - 1`),
    /// rounded down to a multiple of `granularity` so the since moves in
    /// steps rather than on every write.
    LagWriteFrontier {
        /// How far behind, in time units (milliseconds).
        lag: Timestamp,
        /// The rounding step; 0 or 1 means none.
        granularity: Timestamp,
    },
    /// The most conservative (the meet) of several policies.
    Multiple(Vec<ReadPolicy>),
}

impl ReadPolicy {
    /// The policy used when none is set: hold everything (since 0).
    pub fn hold_all() -> Self {
        ReadPolicy::ValidFrom(Antichain::from_elem(0))
    }

    /// The capability this policy implies for a collection whose upper is
    /// `write_frontier`. For an empty write frontier (a closed collection)
    /// lagging policies release everything.
    pub fn frontier(&self, write_frontier: &Antichain<Timestamp>) -> Antichain<Timestamp> {
        match self {
            ReadPolicy::ValidFrom(frontier) => frontier.clone(),
            ReadPolicy::LagWriteFrontier { lag, granularity } => {
                let Some(upper) = write_frontier.as_option() else {
                    return Antichain::new();
                };
                let complete = upper.saturating_sub(1);
                let mut t = complete.saturating_sub(*lag);
                if *granularity > 1 {
                    t -= t % granularity;
                }
                Antichain::from_elem(t)
            }
            ReadPolicy::Multiple(policies) => policies
                .iter()
                .map(|p| p.frontier(write_frontier))
                .fold(Antichain::new(), |acc: Antichain<Timestamp>, f| {
                    let mut meet = acc;
                    for t in f.elements() {
                        meet.insert(*t);
                    }
                    meet
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(t: Timestamp) -> Antichain<Timestamp> {
        Antichain::from_elem(t)
    }

    #[test]
    fn lagging_policies_round_down_and_release_closed_collections() {
        let lag = ReadPolicy::LagWriteFrontier {
            lag: 10,
            granularity: 5,
        };
        assert_eq!(lag.frontier(&f(100)), f(85));
        assert_eq!(lag.frontier(&f(5)), f(0));
        assert_eq!(lag.frontier(&Antichain::new()), Antichain::new());
        let no_rounding = ReadPolicy::LagWriteFrontier {
            lag: 10,
            granularity: 0,
        };
        assert_eq!(no_rounding.frontier(&f(100)), f(89));
        let multiple = ReadPolicy::Multiple(vec![lag, ReadPolicy::ValidFrom(f(50))]);
        assert_eq!(multiple.frontier(&f(100)), f(50));
        assert_eq!(
            ReadPolicy::ValidFrom(Antichain::new()).frontier(&f(9)),
            Antichain::new()
        );
    }
}
