//! `marsadm dump-log FILE`: every record of a logfile and where it is damaged.

use mars_logfmt::{scan_logfile, DamageKind, RecordHeader};
use std::fmt::Write;
use std::path::Path;

/// Returns the text to print and whether the file is damaged.
pub fn dump(path: &Path, with_data: bool) -> anyhow::Result<(String, bool)> {
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
    let report = scan_logfile(&bytes);
    let mut out = String::new();
    match &report.header {
        Ok(h) => writeln!(
            out,
            "logfile {}: format 1, file seq {}, start pos {}, first record seq {}, resource id {:016x}, {} bytes",
            path.display(),
            h.file_seq,
            h.start_pos,
            h.start_record_seq,
            h.resource_id,
            bytes.len()
        )?,
        Err(e) => writeln!(out, "logfile {}: bad file header: {e}", path.display())?,
    }
    writeln!(
        out,
        "{:>10} {:>14} {:>10} {:>14} {:>10} {:>20} {:>12} {:>14}",
        "seq", "pos", "file-off", "disk-off", "length", "stamp-ns", "kind", "durable-to"
    )?;
    for r in &report.records {
        let h: &RecordHeader = &r.header;
        write!(
            out,
            "{:>10} {:>14} {:>10} {:>14} {:>10} {:>20} {:>12} {:>14}",
            h.seq,
            h.pos,
            r.file_offset,
            h.offset,
            h.length,
            h.stamp_ns,
            h.kind.name(),
            h.durable_point()
        )?;
        if with_data && h.length > 0 {
            let at = r.file_offset as usize + mars_logfmt::RECORD_HEADER_LEN;
            let n = (h.payload_len() as usize).min(16);
            let hex: Vec<String> = bytes[at..at + n]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            write!(out, "  {}", hex.join(" "))?;
        }
        writeln!(out)?;
    }
    let end = report
        .end_pos()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "?".into());
    writeln!(
        out,
        "{} good records, valid up to file offset {} (log position {end})",
        report.records.len(),
        report.valid_end
    )?;
    let damaged = match &report.damage {
        None => {
            writeln!(out, "clean")?;
            false
        }
        Some(d) => {
            let what = match d.kind {
                DamageKind::TornTail => {
                    "TORN TAIL (nothing valid after it that was written once it was durable: writes cut short by a crash, or, in the current logfile of a running primary, the part not yet written, which in a recycled logfile holds old records; recovery cuts it off)"
                }
                DamageKind::Corrupt => {
                    "CORRUPT (a valid record after it was written when the log was durable beyond it; recovery refuses this logfile)"
                }
            };
            writeln!(
                out,
                "{what} at file offset {} (log position {}): {}",
                d.file_offset, d.pos, d.reason
            )?;
            true
        }
    };
    Ok((out, damaged))
}
