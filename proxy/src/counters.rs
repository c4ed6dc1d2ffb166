//! Per-backend active-session counts that more than one data plane updates.
//!
//! Each backend owns one slot in a [`CounterTable`]. Without the kernel fast path the table
//! lives on the heap; with it, the table is the XDP program's `ACTIVE` BPF array mapped into
//! this process (`BPF_F_MMAPABLE`), so the kernel's flows and the proxy's sessions add to the
//! very same integers and least-connections in either plane sees the whole load. Cells are
//! 64-bit because Rust's BPF target only has atomics on 64-bit words.
//!
//! The table also keeps, on the heap, how much of each shared count is this process's own
//! proxy sessions: the kernel path's reconciliation needs that share to tell a count that
//! drifted (a flow evicted from a full flow table) from one that is right.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed array of atomic counters, one per backend slot.
pub struct CounterTable {
    cells: Cells,
    /// Per slot, the proxy sessions of this process included in the cell (never shared).
    sessions: Box<[AtomicU64]>,
}

enum Cells {
    Heap(Box<[AtomicU64]>),
    /// A shared mapping of a BPF array; unmapped on drop. The map's fd is kept open so the
    /// array outlives a detached program for as long as we count in it.
    Mapped {
        base: NonNull<AtomicU64>,
        slots: usize,
        bytes: usize,
        _map: OwnedFd,
    },
}

// SAFETY: the mapped cells are only ever accessed through `AtomicU64`, and the mapping lives as
// long as the table.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl CounterTable {
    pub fn new(slots: usize) -> Arc<Self> {
        Arc::new(Self {
            cells: Cells::Heap(zeroed(slots)),
            sessions: zeroed(slots),
        })
    }

    /// Maps the first `slots` cells of the BPF array behind `map` (created with
    /// `BPF_F_MMAPABLE`, value size 8, at least `slots` entries) read-write and shared.
    pub fn mapped(map: OwnedFd, slots: usize) -> std::io::Result<Arc<Self>> {
        use nix::sys::mman::{MapFlags, ProtFlags, mmap};
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as usize;
        let bytes = (slots.max(1) * size_of::<u64>()).div_ceil(page) * page;
        let length = std::num::NonZeroUsize::new(bytes).ok_or(std::io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh shared mapping of a BPF array at an address of the kernel's choosing;
        // it aliases no Rust object.
        let base = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &map,
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        Ok(Arc::new(Self {
            cells: Cells::Mapped {
                base: base.cast(),
                slots,
                bytes,
                _map: map,
            },
            sessions: zeroed(slots),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        match &self.cells {
            Cells::Heap(cells) => cells.len(),
            Cells::Mapped { slots, .. } => *slots,
        }
    }

    /// Whether the kernel fast path shares these counts.
    pub fn is_shared_with_kernel(&self) -> bool {
        matches!(self.cells, Cells::Mapped { .. })
    }

    pub(crate) fn cell(&self, slot: usize) -> &AtomicU64 {
        match &self.cells {
            Cells::Heap(cells) => &cells[slot],
            Cells::Mapped { base, slots, .. } => {
                assert!(slot < *slots, "counter slot {slot} out of range");
                // SAFETY: in bounds of the live mapping; every access is atomic.
                unsafe { &*base.as_ptr().add(slot) }
            }
        }
    }

    /// The raw count of `slot` (for reconciliation by the kernel path's control plane).
    pub fn load(&self, slot: usize) -> u64 {
        self.cell(slot).load(Ordering::Acquire)
    }

    /// This process's proxy sessions counted in `slot` (the rest of the count is kernel flows).
    pub fn sessions(&self, slot: usize) -> u64 {
        self.sessions[slot].load(Ordering::Acquire)
    }

    /// Adds `delta` (two's complement for a decrease) to `slot`.
    pub fn add(&self, slot: usize, delta: i64) {
        self.cell(slot).fetch_add(delta as u64, Ordering::AcqRel);
    }
}

fn zeroed(slots: usize) -> Box<[AtomicU64]> {
    (0..slots).map(|_| AtomicU64::new(0)).collect()
}

impl Drop for CounterTable {
    fn drop(&mut self) {
        if let Cells::Mapped { base, bytes, .. } = &self.cells {
            // SAFETY: exactly the region `mapped` created; no reference into it outlives `self`.
            let _ = unsafe { nix::sys::mman::munmap(base.cast(), *bytes) };
        }
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

    /// This backend's slot: its index in the kernel path's per-backend maps too.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// The table the count is in.
    pub fn table(&self) -> &CounterTable {
        &self.table
    }

    pub fn get(&self) -> u32 {
        let raw = self.table.cell(self.slot).load(Ordering::Relaxed);
        // A transiently wrapped value (a decrement seen before its increment) reads as 0.
        if raw > u32::MAX as u64 {
            if raw > u64::MAX / 2 { 0 } else { u32::MAX }
        } else {
            raw as u32
        }
    }

    /// Counts one more session unless that would exceed `max` (0 = unlimited). The returned
    /// guard gives the session back when dropped, so no path can leak a count.
    pub fn try_acquire(&self, max: u32) -> Option<ActiveGuard> {
        let cell = self.table.cell(self.slot);
        let mut current = cell.load(Ordering::Relaxed);
        loop {
            if max != 0 && current >= max as u64 && current <= u64::MAX / 2 {
                return None;
            }
            match cell.compare_exchange_weak(
                current,
                current.wrapping_add(1),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // After the shared cell: a reconciliation between the two sees the count
                    // one high for a moment, never a session missing from it for good.
                    self.table.sessions[self.slot].fetch_add(1, Ordering::AcqRel);
                    return Some(ActiveGuard {
                        count: self.clone(),
                    });
                }
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
        let table = &self.count.table;
        table.sessions[self.count.slot].fetch_sub(1, Ordering::AcqRel);
        table.cell(self.count.slot).fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_count_and_give_back() {
        let table = CounterTable::new(2);
        let count = ActiveCount::new(table.clone(), 1);
        let a = count.try_acquire(2).expect("first");
        let _b = count.try_acquire(2).expect("second");
        assert!(count.try_acquire(2).is_none(), "cap of 2 holds");
        assert_eq!(table.sessions(1), 2);
        drop(a);
        assert_eq!(count.get(), 1);
        assert_eq!(table.sessions(1), 1);
        assert_eq!(table.load(0), 0);
        assert_eq!(table.sessions(0), 0);
    }

    #[test]
    fn kernel_side_changes_are_not_proxy_sessions() {
        let table = CounterTable::new(1);
        let count = ActiveCount::new(table.clone(), 0);
        let _guard = count.try_acquire(0).expect("session");
        // What the kernel path adds for its flows shows in the count, not in the sessions.
        table.add(0, 3);
        assert_eq!(count.get(), 4);
        assert_eq!(table.sessions(0), 1);
    }
}
