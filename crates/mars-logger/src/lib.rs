//! The transaction logger of one resource on its primary.
//!
//! NBD writes, trims and write-zeroes become records appended to the current
//! logfile by one *writer thread* (group commit: it drains every request that
//! is queued, writes them with one `pwrite`, and calls `fdatasync` once when
//! any of them asked for durability). A *writeback thread* applies durable
//! records to the disk in log order, coalescing adjacent ones, and persists
//! the written-back ("applied") position after syncing the disk. Reads see the
//! newest data through an in-memory [`index::Index`] of everything logged but
//! not yet written back.
//!
//! Acknowledgment rule (documented in `docs/ARCHITECTURE.md`): a write is
//! acknowledged once its record is in the logfile (the kernel's page cache),
//! so it survives the death of `marsd` at any moment; a write with FUA, and
//! every write acknowledged before a FLUSH is acknowledged, is on stable
//! storage (`fdatasync` of the logfile) before that acknowledgment.

pub mod crashsafe;
pub mod disk;
pub mod index;
mod logger;
mod recovery;
pub mod replay;

pub use logger::{Config, Logger, LoggerError, Status};
pub use recovery::{list_logfiles, LogfileEntry};
