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
        // Asked at every acknowledgement the leader gets: the match indices of a cluster of up to
        // `INLINE_VOTERS` voters are sorted on the stack, not in a fresh `Vec`.
        const INLINE_VOTERS: usize = 16;
        let mut inline = [0; INLINE_VOTERS];
        let mut heap = Vec::new();
        let matched: &mut [LogIndex] = if self.voters.len() <= INLINE_VOTERS {
            &mut inline[..self.voters.len()]
        } else {
            heap.resize(self.voters.len(), 0);
            &mut heap
        };
        for (slot, id) in matched.iter_mut().zip(&self.voters) {
            *slot = match_of(id);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// For clusters of 1 to 20 voters (on the stack up to 16, in a `Vec` beyond): the quorum index
    /// is the largest index at least a majority of voters has reached.
    #[test]
    fn the_quorum_index_is_what_a_majority_reached() {
        for n in 1..=20u64 {
            let ids: Vec<PeerId> = (0..n).map(|i| PeerId::from(format!("p{i:02}"))).collect();
            let m = Membership::with_voters(ids.clone());
            // Voter i reached 10 * ((i * 7) % n): distinct orders for every size.
            let reached = |id: &PeerId| {
                let i = ids.iter().position(|x| x == id).unwrap() as u64;
                10 * ((i * 7) % n)
            };
            let got = m.quorum_index(reached);
            let at_least = |v: LogIndex| ids.iter().filter(|id| reached(id) >= v).count();
            assert!(at_least(got) >= m.quorum(), "{n} voters: {got}");
            assert!(
                at_least(got + 1) < m.quorum(),
                "{n} voters: {got} is not the largest"
            );
        }
        assert_eq!(Membership::default().quorum_index(|_| 5), 0);
    }
}
