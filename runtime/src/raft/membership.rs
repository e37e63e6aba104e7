//! Cluster configuration: voters and learners, and the majority arithmetic over them.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::types::{LogIndex, PeerId};

/// The peers of a cluster: voters elect and commit; learners only receive the log.
/// A peer is never both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Peers that vote and count towards commit.
    pub voters: BTreeSet<PeerId>,
    /// Peers that receive the log but do not vote (they are catching up).
    pub learners: BTreeSet<PeerId>,
}

impl Membership {
    /// A configuration of the given voters and no learners.
    pub fn with_voters<I: IntoIterator<Item = PeerId>>(voters: I) -> Self {
        Membership {
            voters: voters.into_iter().collect(),
            learners: BTreeSet::new(),
        }
    }

    /// Whether `id` votes.
    pub fn is_voter(&self, id: &PeerId) -> bool {
        self.voters.contains(id)
    }

    /// Whether `id` is a learner.
    pub fn is_learner(&self, id: &PeerId) -> bool {
        self.learners.contains(id)
    }

    /// Whether `id` is a voter or a learner.
    pub fn contains(&self, id: &PeerId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = &PeerId> {
        self.voters.iter().chain(self.learners.iter())
    }

    /// How many voters make a majority.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Whether the voters in `yes` make a majority.
    pub fn has_quorum<'a, I: IntoIterator<Item = &'a PeerId>>(&self, yes: I) -> bool {
        let n = yes.into_iter().filter(|id| self.is_voter(id)).count();
        !self.voters.is_empty() && n >= self.quorum()
    }

    /// The largest index that a majority of voters has reached, given each voter's match index.
    /// Returns 0 for an empty configuration.
    pub fn quorum_index<F: Fn(&PeerId) -> LogIndex>(&self, match_of: F) -> LogIndex {
        if self.voters.is_empty() {
            return 0;
        }
        let mut matched: Vec<LogIndex> = self.voters.iter().map(match_of).collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        matched[self.quorum() - 1]
    }

    /// Approximate encoded size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.members().map(|p| p.as_str().len() + 2).sum::<usize>() + 8
    }

    /// Applies one change, checking it is a valid single-server step from `self`.
    pub fn apply_change(&self, change: &MembershipChange) -> Result<Membership, MembershipError> {
        let mut next = self.clone();
        match change {
            MembershipChange::AddLearner(id) => {
                if self.contains(id) {
                    return Err(MembershipError::AlreadyMember(id.clone()));
                }
                next.learners.insert(id.clone());
            }
            MembershipChange::Promote(id) => {
                if !self.is_learner(id) {
                    return Err(MembershipError::NotALearner(id.clone()));
                }
                next.learners.remove(id);
                next.voters.insert(id.clone());
            }
            MembershipChange::Remove(id) => {
                if !self.contains(id) {
                    return Err(MembershipError::NotAMember(id.clone()));
                }
                next.learners.remove(id);
                next.voters.remove(id);
                if next.voters.is_empty() {
                    return Err(MembershipError::LastVoter(id.clone()));
                }
            }
        }
        Ok(next)
    }
}

/// A single-server change of the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MembershipChange {
    /// Adds a non-voting learner that starts receiving the log.
    AddLearner(PeerId),
    /// Turns a learner into a voter (refused until it has caught up).
    Promote(PeerId),
    /// Removes a voter or learner (the leader itself included).
    Remove(PeerId),
}

/// Why a membership change is not a valid step.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// The peer is already a voter or learner.
    #[error("peer {0} is already a member")]
    AlreadyMember(PeerId),
    /// Only learners can be promoted.
    #[error("peer {0} is not a learner")]
    NotALearner(PeerId),
    /// The peer is not in the configuration.
    #[error("peer {0} is not a member")]
    NotAMember(PeerId),
    /// A cluster cannot lose its last voter.
    #[error("removing {0} would leave no voter")]
    LastVoter(PeerId),
}
