//! Planted bugs in the runtime's decisions, so that hamok's own whole-peer simulation can show its
//! checks catch them (as `raft::planted_bug_tests` does for the engine).
//!
//! The switches exist only with the crate feature `testing`, which only hamok's test crate turns on;
//! without it [`PlantedBugs`] is an empty type whose every switch is the constant `false`, so the
//! planted branches are compiled out of every build a user makes.

/// Which planted bugs are on (all off by default).
#[cfg(feature = "testing")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlantedBugs {
    /// A linearizable read that cannot get a read index before its deadline answers from the local
    /// state instead of failing (the bug of issue 10).
    pub read_falls_back_to_local: bool,
    /// Every peer that heard no member for a whole discovery window founds a cluster of its own, not
    /// only the lowest id among the peers it heard.
    pub bootstrap_ignores_lowest_id: bool,
    /// Any message of a higher term (a stray candidate's pre-vote, say) counts as contact with the
    /// leader, so a cut-off peer may never notice that it was removed (the other bug of issue 10).
    pub idle_timer_refreshed_by_any_higher_term: bool,
    /// Fenced commands are applied without checking the lock's current token.
    pub fence_not_checked: bool,
    /// A leader's log write synced in the background is reported durable to the engine as soon as
    /// the sync starts, not when it returns.
    pub report_unsynced_writes: bool,
    /// A peer whose store outlives the process and syncs inline counts its own log copy as soon as
    /// it is in memory, not once written: the engine runs without `persist_async` (as it did before
    /// commit on receipt), so a leader's append, sent before its own write, can promise followers a
    /// commit of entries a power cut then takes from the leader.
    pub counts_unwritten_copy: bool,
}

/// Which planted bugs are on: none can be, without the `testing` feature.
#[cfg(not(feature = "testing"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct PlantedBugs;

#[cfg(feature = "testing")]
impl PlantedBugs {
    pub(crate) fn read_falls_back_to_local(&self) -> bool {
        self.read_falls_back_to_local
    }
    pub(crate) fn bootstrap_ignores_lowest_id(&self) -> bool {
        self.bootstrap_ignores_lowest_id
    }
    pub(crate) fn idle_timer_refreshed_by_any_higher_term(&self) -> bool {
        self.idle_timer_refreshed_by_any_higher_term
    }
    pub(crate) fn fence_not_checked(&self) -> bool {
        self.fence_not_checked
    }
    pub(crate) fn report_unsynced_writes(&self) -> bool {
        self.report_unsynced_writes
    }
    pub(crate) fn counts_unwritten_copy(&self) -> bool {
        self.counts_unwritten_copy
    }
}

#[cfg(not(feature = "testing"))]
impl PlantedBugs {
    pub(crate) const fn read_falls_back_to_local(&self) -> bool {
        false
    }
    pub(crate) const fn bootstrap_ignores_lowest_id(&self) -> bool {
        false
    }
    pub(crate) const fn idle_timer_refreshed_by_any_higher_term(&self) -> bool {
        false
    }
    pub(crate) const fn fence_not_checked(&self) -> bool {
        false
    }
    pub(crate) const fn report_unsynced_writes(&self) -> bool {
        false
    }
    pub(crate) const fn counts_unwritten_copy(&self) -> bool {
        false
    }
}
