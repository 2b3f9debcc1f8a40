//! The log in memory, for unit tests and the simulator.
//!
//! It keeps what a disk would have after fdatasync (`durable`) apart from
//! what a reader sees (`current`: durable plus writes not yet synced), so a
//! test can crash it and keep only what was synced, or a prefix of the rest
//! (what raft-engine's recovery yields after a torn tail).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use raft::eraftpb::{ConfState, Entry, HardState};

use crate::plan::{GroupPlan, Span, plan_batch};
use crate::{GroupState, GroupWrite, LogError, RaftLogStore};

#[derive(Debug, Clone, Default)]
struct GroupMem {
    hard_state: Option<HardState>,
    conf_state: Option<ConfState>,
    destaged_index: Option<u64>,
    /// Index of `entries[0]`.
    first: u64,
    entries: VecDeque<Entry>,
}

impl GroupMem {
    fn span(&self) -> Span {
        (!self.entries.is_empty()).then(|| (self.first, self.first + self.entries.len() as u64 - 1))
    }

    fn apply(&mut self, w: &GroupWrite, plan: GroupPlan) {
        if plan.clear_below.is_some() {
            self.entries.clear();
        }
        if let Some(first_new) = w.entries.first().map(|e| e.index) {
            if self.entries.is_empty() {
                self.first = first_new;
            } else {
                // The plan guarantees first <= first_new <= last + 1.
                let keep = first_new.saturating_sub(self.first) as usize;
                self.entries.truncate(keep);
            }
            self.entries.extend(w.entries.iter().cloned());
        }
        if let Some(hs) = &w.hard_state {
            self.hard_state = Some(hs.clone());
        }
        if let Some(cs) = &w.conf_state {
            self.conf_state = Some(cs.clone());
        }
        if let Some(d) = w.destaged_index {
            self.destaged_index = Some(d);
        }
        if let Some(c) = plan.compact_to
            && !self.entries.is_empty()
            && c > self.first
        {
            let n = ((c - self.first) as usize).min(self.entries.len());
            self.entries.drain(..n);
            self.first = c;
        }
    }

    fn state(&self) -> GroupState {
        GroupState {
            hard_state: self.hard_state.clone().unwrap_or_default(),
            conf_state: self.conf_state.clone().unwrap_or_default(),
            destaged_index: self.destaged_index.unwrap_or(0),
            entries: self.entries.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct MemState {
    groups: BTreeMap<u64, GroupMem>,
}

impl MemState {
    fn span(&self, group: u64) -> Span {
        self.groups.get(&group).and_then(GroupMem::span)
    }

    fn apply(&mut self, op: &MemOp) {
        match op {
            MemOp::Write(batch, plans) => {
                for (w, plan) in batch.iter().zip(plans) {
                    if !w.is_empty() {
                        self.groups.entry(w.group).or_default().apply(w, *plan);
                    }
                }
            }
            MemOp::Remove(group) => {
                self.groups.remove(group);
            }
        }
    }
}

#[derive(Debug)]
enum MemOp {
    Write(Vec<GroupWrite>, Vec<GroupPlan>),
    Remove(u64),
}

#[derive(Debug, Default)]
struct Inner {
    current: MemState,
    durable: MemState,
    unsynced: Vec<MemOp>,
    syncs: u64,
}

/// An in-memory [`RaftLogStore`] that can be crashed.
#[derive(Debug, Default)]
pub struct MemLog {
    inner: Mutex<Inner>,
}

impl MemLog {
    pub fn new() -> MemLog {
        MemLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent state:
        // every mutation below is applied whole or not at all.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the batch without syncing it: it is visible to `load`, but a
    /// `crash` loses it. For simulating a crash between write and fdatasync.
    pub fn write_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        let mut inner = self.lock();
        let mut spans = HashMap::new();
        let plans = plan_batch(&batch, &mut spans, |g| inner.current.span(g))?;
        if batch.iter().all(GroupWrite::is_empty) {
            return Ok(());
        }
        let op = MemOp::Write(batch, plans);
        inner.current.apply(&op);
        inner.unsynced.push(op);
        Ok(())
    }

    /// Makes every write so far durable (one fdatasync).
    pub fn sync(&self) {
        let mut inner = self.lock();
        let Inner { durable, unsynced, .. } = &mut *inner;
        for op in unsynced.drain(..) {
            durable.apply(&op);
        }
        inner.syncs += 1;
    }

    /// Writes not yet synced.
    pub fn unsynced_writes(&self) -> usize {
        self.lock().unsynced.len()
    }

    /// Power loss: everything not synced is gone.
    pub fn crash(&self) {
        self.crash_keeping(0);
    }

    /// Power loss after the first `n` unsynced writes happened to reach the
    /// disk: they survive, later ones do not (a torn tail is dropped whole).
    pub fn crash_keeping(&self, n: usize) {
        let mut inner = self.lock();
        let Inner { durable, unsynced, .. } = &mut *inner;
        for op in unsynced.drain(..).take(n) {
            durable.apply(&op);
        }
        inner.current = inner.durable.clone();
    }
}

impl RaftLogStore for MemLog {
    fn write_batch(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        let empty = batch.iter().all(GroupWrite::is_empty);
        self.write_unsynced(batch)?;
        // Like the engine: nothing written, nothing to sync.
        if !empty {
            self.sync();
        }
        Ok(())
    }

    fn write_batch_unsynced(&self, batch: Vec<GroupWrite>) -> Result<(), LogError> {
        self.write_unsynced(batch)
    }

    fn sync(&self) -> Result<(), LogError> {
        // Like the engine: one fdatasync even with nothing new, so that a
        // sync can be counted.
        MemLog::sync(self);
        Ok(())
    }

    fn load(&self, group: u64) -> Result<Option<GroupState>, LogError> {
        Ok(self.lock().current.groups.get(&group).map(GroupMem::state))
    }

    fn groups(&self) -> Result<Vec<u64>, LogError> {
        Ok(self.lock().current.groups.keys().copied().collect())
    }

    fn remove_group(&self, group: u64) -> Result<(), LogError> {
        {
            let mut inner = self.lock();
            let op = MemOp::Remove(group);
            inner.current.apply(&op);
            inner.unsynced.push(op);
        }
        self.sync();
        Ok(())
    }

    fn sync_count(&self) -> u64 {
        self.lock().syncs
    }
}
