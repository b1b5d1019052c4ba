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

/// Parse `log-<digits>-<node>`; `None` for anything else.
pub fn parse_logfile_name(name: &str) -> Option<LogfileName> {
    let rest = name.strip_prefix("log-")?;
    let (digits, node) = rest.split_once('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || node.is_empty() {
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
    }
}
