//! Tallies of an election or pre-election.

use std::collections::BTreeMap;

use super::membership::Membership;
use super::types::PeerId;

/// Where an election stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteResult {
    /// A majority of voters granted.
    Won,
    /// A majority can no longer be reached.
    Lost,
    /// Still waiting.
    Pending,
}

/// The answers received in one (pre-)election.
#[derive(Debug, Default)]
pub struct VoteTally {
    answers: BTreeMap<PeerId, bool>,
}

impl VoteTally {
    /// Records `from`'s answer; the first answer of a peer counts, duplicates are ignored.
    pub fn record(&mut self, from: PeerId, granted: bool) {
        self.answers.entry(from).or_insert(granted);
    }

    /// The outcome over the voters of `membership`.
    pub fn result(&self, membership: &Membership) -> VoteResult {
        let granted = self
            .answers
            .iter()
            .filter(|(id, &yes)| yes && membership.is_voter(id))
            .count();
        let rejected = self
            .answers
            .iter()
            .filter(|(id, &yes)| !yes && membership.is_voter(id))
            .count();
        let quorum = membership.quorum();
        if membership.voters.is_empty() {
            VoteResult::Lost
        } else if granted >= quorum {
            VoteResult::Won
        } else if membership.voters.len() - rejected < quorum {
            VoteResult::Lost
        } else {
            VoteResult::Pending
        }
    }
}
