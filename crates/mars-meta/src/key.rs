//! Key syntax: validation, scopes and kinds.

/// Longest accepted key, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// Prefix of every cluster-wide key, and the scope prefix of the cluster scope.
pub const CLUSTER_PREFIX: &str = "c/";

/// Which part of the key space an entry belongs to, derived from its key.
///
/// Keys `c/...` are cluster-wide (membership, addresses, resource names) and
/// are gossiped to all nodes; keys `r/<res>/...` belong to resource `<res>`
/// and travel only among its members (and to nodes that ask).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope<'a> {
    Cluster,
    Resource(&'a str),
}

/// Desired state (what the operator asked for) or actual state (what nodes
/// report).
///
/// `c/d/...` and `r/<res>/d/...` are desired; `c/a/...` and
/// `r/<res>/a/<node>[/...]` are actual.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Desired,
    Actual,
}

/// Checks that `key` is a well-formed key: 1..=[`MAX_KEY_LEN`] bytes of
/// printable ASCII (0x20..=0x7e), of the form `c/<rest>` or
/// `r/<res>/<rest>` with non-empty `<res>` and `<rest>`. Returns a short
/// reason when it is not.
pub fn validate_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("empty key");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("key longer than 512 bytes");
    }
    if !key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return Err("key is not printable ASCII");
    }
    if split_scope_unchecked(key).is_none() {
        return Err("key has no scope (must be c/<name> or r/<resource>/<name>)");
    }
    Ok(())
}

/// The scope of a well-formed key; `None` for malformed keys (see
/// [`validate_key`]).
pub fn scope_of(key: &str) -> Option<Scope<'_>> {
    split_scope(key).map(|(scope, _, _)| scope)
}

/// The scope prefix of a well-formed key: `"c/"` or `"r/<res>/"`.
pub fn scope_prefix(key: &str) -> Option<&str> {
    split_scope(key).map(|(_, prefix, _)| prefix)
}

/// The kind of a well-formed key; `None` for malformed keys and for keys
/// that are neither desired nor actual state.
pub fn kind_of(key: &str) -> Option<Kind> {
    let (scope, _, rest) = split_scope(key)?;
    let (tag, tail) = rest.split_once('/')?;
    if tail.is_empty() {
        return None;
    }
    match (tag, scope) {
        ("d", _) => Some(Kind::Desired),
        ("a", Scope::Cluster) => Some(Kind::Actual),
        ("a", Scope::Resource(_)) => {
            let node = tail.split('/').next().unwrap_or("");
            (!node.is_empty()).then_some(Kind::Actual)
        }
        _ => None,
    }
}

/// The scope prefix of resource `res`: `"r/<res>/"`.
pub fn resource_prefix(res: &str) -> String {
    format!("r/{res}/")
}

/// True if `prefix` is exactly a scope prefix (`"c/"` or `"r/<res>/"`).
pub(crate) fn is_scope_prefix(prefix: &str) -> bool {
    if prefix == CLUSTER_PREFIX {
        return true;
    }
    match prefix.strip_prefix("r/").and_then(|p| p.strip_suffix('/')) {
        Some(res) => !res.is_empty() && !res.contains('/'),
        None => false,
    }
}

/// (scope, scope prefix, rest) of a well-formed key.
fn split_scope(key: &str) -> Option<(Scope<'_>, &str, &str)> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| (0x20..=0x7e).contains(&b))
    {
        return None;
    }
    split_scope_unchecked(key)
}

fn split_scope_unchecked(key: &str) -> Option<(Scope<'_>, &str, &str)> {
    if let Some(rest) = key.strip_prefix(CLUSTER_PREFIX) {
        return (!rest.is_empty()).then_some((Scope::Cluster, CLUSTER_PREFIX, rest));
    }
    let after = key.strip_prefix("r/")?;
    let slash = after.find('/')?;
    let (res, rest) = (&after[..slash], &after[slash + 1..]);
    if res.is_empty() || rest.is_empty() {
        return None;
    }
    Some((Scope::Resource(res), &key[..2 + slash + 1], rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(scope_of("c/members/a"), Some(Scope::Cluster));
        assert_eq!(scope_of("r/vol1/d/primary"), Some(Scope::Resource("vol1")));
        assert_eq!(scope_prefix("r/vol1/d/primary"), Some("r/vol1/"));
        assert_eq!(scope_prefix("c/x"), Some("c/"));
        for bad in [
            "", "c/", "c", "x/y", "r/", "r/vol", "r/vol/", "r//x", "R/v/x",
        ] {
            assert_eq!(scope_of(bad), None, "{bad:?}");
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        assert_eq!(scope_of("c/\u{e9}"), None);
        assert_eq!(scope_of("c/a\tb"), None);
        let long = format!("c/{}", "x".repeat(MAX_KEY_LEN - 2));
        assert_eq!(scope_of(&long), Some(Scope::Cluster));
        let too_long = format!("{long}x");
        assert_eq!(scope_of(&too_long), None);
    }

    #[test]
    fn kinds() {
        assert_eq!(kind_of("c/d/members/n1"), Some(Kind::Desired));
        assert_eq!(kind_of("c/a/addr/n1"), Some(Kind::Actual));
        assert_eq!(kind_of("r/v/d/primary"), Some(Kind::Desired));
        assert_eq!(kind_of("r/v/a/n1/pos"), Some(Kind::Actual));
        assert_eq!(kind_of("r/v/a/n1"), Some(Kind::Actual));
        for other in [
            "c/x/y",
            "c/d",
            "c/d/",
            "r/v/a/",
            "r/v/a//pos",
            "r/v/x/y",
            "bad",
        ] {
            assert_eq!(kind_of(other), None, "{other:?}");
        }
    }

    #[test]
    fn scope_prefixes() {
        assert!(is_scope_prefix("c/"));
        assert!(is_scope_prefix("r/v/"));
        for p in ["", "c", "r/", "r//", "r/v", "r/v/x/", "c/d/"] {
            assert!(!is_scope_prefix(p), "{p:?}");
        }
        assert_eq!(resource_prefix("v"), "r/v/");
    }
}
