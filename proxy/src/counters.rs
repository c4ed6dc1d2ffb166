//! Per-backend active-session counts that more than one data plane updates.
//!
//! Each backend owns one slot in a [`CounterTable`]. Today the table lives on the heap; the
//! kernel fast path will back it with a memory-mapped BPF array so that the XDP program and the
//! proxy add to the very same integers and least-connections sees the whole load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fixed array of atomic counters, one per backend slot.
pub struct CounterTable {
    cells: Box<[AtomicU32]>,
}

impl CounterTable {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            cells: (0..slots).map(|_| AtomicU32::new(0)).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    fn cell(&self, slot: usize) -> &AtomicU32 {
        &self.cells[slot]
    }
}

/// One backend's counter: a slot in a shared table.
#[derive(Clone)]
pub struct ActiveCount {
    table: Arc<CounterTable>,
    slot: usize,
}

impl ActiveCount {
    /// Panics if `slot` is outside the table: slots are assigned by the control plane, never
    /// taken from input.
    pub fn new(table: Arc<CounterTable>, slot: usize) -> Self {
        assert!(slot < table.len(), "counter slot {slot} out of range");
        Self { table, slot }
    }

    pub fn get(&self) -> u32 {
        self.table.cell(self.slot).load(Ordering::Relaxed)
    }

    /// Counts one more session unless that would exceed `max` (0 = unlimited). The returned
    /// guard gives the session back when dropped, so no path can leak a count.
    pub fn try_acquire(&self, max: u32) -> Option<ActiveGuard> {
        let cell = self.table.cell(self.slot);
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            if max != 0 && current >= max {
                return None;
            }
            match cell.compare_exchange_weak(current, current + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(ActiveGuard { count: self.clone() }),
                Err(seen) => current = seen,
            }
        }
    }
}

/// Holds one unit of a backend's active count for as long as a session is assigned to it.
pub struct ActiveGuard {
    count: ActiveCount,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.count.table.cell(self.count.slot).fetch_sub(1, Ordering::AcqRel);
    }
}
