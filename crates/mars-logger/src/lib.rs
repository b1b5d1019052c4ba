//! The transaction logger of one resource on its primary.
//!
//! NBD writes, trims and write-zeroes become records appended to the current
//! logfile by one *writer thread* (it drains every request that is queued and
//! writes them with one `pwritev`: record headers, and the payloads straight from
//! the requests' buffers). A *syncer thread* does the `fdatasync`s of the log (group
//! commit): as soon as a FUA write or a FLUSH waits, when `sync_batch_bytes` are
//! unsynced, or `idle_sync` after data became unsynced; one sync answers every
//! waiter it covers, and the writer keeps writing meanwhile. A FLUSH does not go
//! through the writer at all: it waits for a sync past the end of what is written.
//! A *writeback thread* applies synced records (only those: never a record past the
//! synced position) to the disk in log order, coalescing adjacent ones, and a
//! *persister* persists the written-back ("applied") position after syncing the
//! disk. Reads see the newest data through an in-memory [`index::Index`] of
//! everything logged but not yet written back.
//!
//! Acknowledgment rule (documented in `docs/ARCHITECTURE.md`): a write is
//! acknowledged once its record is in the logfile (the kernel's page cache),
//! so it survives the death of `marsd` at any moment; a write with FUA, and
//! every write acknowledged before a FLUSH is acknowledged, is on stable
//! storage (`fdatasync` of the logfile) before that acknowledgment.

pub mod crashsafe;
pub mod csum;
pub mod disk;
pub mod fetched;
pub mod freeze;
pub mod history;
pub mod index;
mod logger;
mod recovery;
pub mod replay;
mod tail;

pub use logger::{transient, Config, Logger, LoggerError, RepairHook, SpaceHook, Status};
pub use recovery::{
    drop_spares, list_logfiles, list_spares, spare_bytes, LogfileEntry, SPARE_PREFIX,
};
