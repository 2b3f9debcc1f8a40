//! Checks a batch before anything of it is written, shared by every store so
//! that they refuse the same writes.
//!
//! raft-engine panics (after the data is already on disk) on an append that
//! leaves a gap or rewrites compacted entries, and would then panic again on
//! every recovery. So such writes are refused here, with a typed error,
//! before they reach it.

use std::collections::HashMap;

use crate::{GroupWrite, LogError, MAX_BATCH_BYTES, MAX_ENTRY_BYTES};

/// The entries a group holds, `(first, last)`, or `None` when it holds none.
pub(crate) type Span = Option<(u64, u64)>;

/// Accounting allowance for an entry's index, term and framing.
const ENTRY_OVERHEAD: usize = 32;
/// Accounting allowance for one stored value or command.
const VALUE_OVERHEAD: usize = 64;

/// How one [`GroupWrite`] becomes storage operations, in this order:
/// `clear_below`, entries, values, `compact_to`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GroupPlan {
    /// Drop every stored entry before appending: the new entries start past
    /// the log's end and the write compacts up to them (snapshot install).
    pub clear_below: Option<u64>,
    pub compact_to: Option<u64>,
}

/// Bytes a batch counts against [`MAX_BATCH_BYTES`]; refuses oversized
/// entries and batches.
pub(crate) fn batch_bytes(batch: &[GroupWrite]) -> Result<usize, LogError> {
    let mut total = 0usize;
    for w in batch {
        for e in &w.entries {
            let bytes = e.data.len() + e.context.len();
            if bytes > MAX_ENTRY_BYTES {
                return Err(LogError::EntryTooLarge {
                    group: w.group,
                    index: e.index,
                    bytes,
                    max: MAX_ENTRY_BYTES,
                });
            }
            total = total.saturating_add(bytes + ENTRY_OVERHEAD);
        }
        let values = usize::from(w.hard_state.is_some())
            + usize::from(w.conf_state.is_some())
            + usize::from(w.destaged_index.is_some())
            + usize::from(w.compact_to.is_some());
        total = total.saturating_add(values * VALUE_OVERHEAD);
        if let Some(cs) = &w.conf_state {
            let ids = cs.voters.len() + cs.learners.len() + cs.voters_outgoing.len() + cs.learners_next.len();
            total = total.saturating_add(ids * 8);
        }
    }
    if total > MAX_BATCH_BYTES {
        return Err(LogError::BatchTooLarge {
            bytes: total,
            max: MAX_BATCH_BYTES,
        });
    }
    Ok(total)
}

/// Plans one group's write against the span it holds; returns the plan and
/// the span after it.
pub(crate) fn plan_group(w: &GroupWrite, span: Span) -> Result<(GroupPlan, Span), LogError> {
    let group = w.group;
    let mut plan = GroupPlan::default();
    let mut span = span;
    if let Some(first_new) = w.entries.first().map(|e| e.index) {
        if first_new == 0 {
            return Err(LogError::NotContiguous {
                group,
                index: 0,
                expected: 1,
            });
        }
        for (i, e) in w.entries.iter().enumerate() {
            let expected = first_new + i as u64;
            if e.index != expected {
                return Err(LogError::NotContiguous {
                    group,
                    index: e.index,
                    expected,
                });
            }
        }
        let last_new = first_new + w.entries.len() as u64 - 1;
        span = match span {
            None => Some((first_new, last_new)),
            Some((first, _)) if first_new < first => {
                return Err(LogError::BelowCompacted {
                    group,
                    index: first_new,
                    first_index: first,
                });
            }
            Some((_, last)) if first_new > last + 1 => {
                if w.compact_to.is_some_and(|c| c >= first_new) {
                    plan.clear_below = Some(first_new);
                    Some((first_new, last_new))
                } else {
                    return Err(LogError::Gap {
                        group,
                        index: first_new,
                        last_index: last,
                    });
                }
            }
            Some((first, _)) => Some((first, last_new)),
        };
    }
    if let Some(c) = w.compact_to {
        plan.compact_to = Some(c);
        span = compact_span(span, c);
    }
    Ok((plan, span))
}

/// What compacting to `index` leaves, with raft-engine's rules: compacting
/// past the end empties the group, compacting an empty group does nothing.
pub(crate) fn compact_span(span: Span, index: u64) -> Span {
    match span {
        Some((first, last)) if index > first => (index <= last).then_some((index, last)),
        s => s,
    }
}

/// Plans a whole batch, all or nothing: `spans` (the writer's view of groups
/// changed by writes not yet on disk) is updated only if every write passes.
pub(crate) fn plan_batch(
    batch: &[GroupWrite],
    spans: &mut HashMap<u64, Span>,
    stored: impl Fn(u64) -> Span,
) -> Result<Vec<GroupPlan>, LogError> {
    batch_bytes(batch)?;
    let mut changed: HashMap<u64, Span> = HashMap::new();
    let mut plans = Vec::with_capacity(batch.len());
    for w in batch {
        let current = match changed.get(&w.group).or_else(|| spans.get(&w.group)) {
            Some(s) => *s,
            None => stored(w.group),
        };
        let (plan, after) = plan_group(w, current)?;
        changed.insert(w.group, after);
        plans.push(plan);
    }
    spans.extend(changed);
    Ok(plans)
}
