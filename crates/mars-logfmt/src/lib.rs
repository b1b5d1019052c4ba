//! The on-disk transaction log format of mars (see `docs/FORMAT.md`).
//!
//! A resource's *log stream* is the concatenation of all its records since the
//! resource was created; a record's `pos` is its byte position in that stream.
//! The stream is cut into *logfiles* `log-<seq>-<node>`, each starting with a
//! 64-byte [`FileHeader`] followed by records packed back to back. Every
//! record carries a crc32c over its header and payload, its own stream
//! position and its sequence number, so a record that is torn, flipped or
//! stale (left over at the wrong place) never verifies.
//!
//! This crate is pure: encoding, decoding and scanning of byte buffers, with
//! no file handling beyond `std::io::Read`. Decoders never panic on any input
//! (fuzzed in `fuzz/`).

mod arrival;
mod names;
mod record;
mod scan;
mod version;

pub use arrival::{ArrivalCheck, ArrivalError};
pub use names::{logfile_name, parse_logfile_name, valid_name, version_file_name, LogfileName};
pub use record::{
    next_link, parent_link, DecodeError, FileHeader, Kind, RecordHeader, FILE_FORMAT_VERSION,
    FILE_HEADER_LEN, FILE_MAGIC, FORMAT_VERSION, MAX_PAYLOAD, RECORD_HEADER_LEN, RECORD_MAGIC,
};
pub use scan::{scan_logfile, Damage, DamageKind, ScanReport, ScannedRecord};
pub use version::{Version, VersionBuilder};
