//! Logfile and version file names: `log-<seq:09>-<node>`, `version-<seq:09>-<node>`.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogfileName {
    pub seq: u64,
    pub node: String,
}

pub fn logfile_name(seq: u64, node: &str) -> String {
    format!("log-{seq:09}-{node}")
}

pub fn version_file_name(seq: u64, node: &str) -> String {
    format!("version-{seq:09}-{node}")
}

/// Node and resource names: 1..=64 of `[A-Za-z0-9_.-]`, not starting with
/// `.` or `-` (so never a path of more than one component, `.` or `..`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

/// Parse `log-<digits>-<node>` (at most 20 digits, a valid node name);
/// `None` for anything else: a name that parses is safe to join to a path.
pub fn parse_logfile_name(name: &str) -> Option<LogfileName> {
    let rest = name.strip_prefix("log-")?;
    let (digits, node) = rest.split_once('-')?;
    if digits.is_empty()
        || digits.len() > 20
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || !valid_name(node)
    {
        return None;
    }
    Some(LogfileName {
        seq: digits.parse().ok()?,
        node: node.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names_round_trip() {
        let n = logfile_name(42, "alpha-1");
        assert_eq!(n, "log-000000042-alpha-1");
        assert_eq!(
            parse_logfile_name(&n),
            Some(LogfileName {
                seq: 42,
                node: "alpha-1".into()
            })
        );
        assert_eq!(parse_logfile_name("log--x"), None);
        assert_eq!(parse_logfile_name("log-12a-x"), None);
        assert_eq!(parse_logfile_name("version-000000001-x"), None);
        assert_eq!(parse_logfile_name("log-000000001-"), None);
        for bad in [
            "log-1-../x",
            "log-1-a/b",
            "log-1-..",
            "log-1-.x",
            "log-1--x",
            "log-1-a\0",
        ] {
            assert_eq!(parse_logfile_name(bad), None, "{bad}");
        }
        assert_eq!(parse_logfile_name("log-1-a.b_c-d").map(|n| n.seq), Some(1));
    }
}
