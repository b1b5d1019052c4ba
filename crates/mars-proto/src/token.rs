//! Invitation tokens as `marsadm invite` prints them and `join-cluster
//! --token` / `merge-cluster --token` take them: `mars1.<id>.<secret>.<pin>`,
//! 16, 32 and 64 hex digits: the invitation's id, its one-time secret, and
//! blake3 of the DER of the cluster CA's certificate (the joiner trusts only
//! a server whose chain holds that CA).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadToken;

impl fmt::Display for BadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "not a mars token (expected mars1.<id>.<secret>.<pin>, as `marsadm invite` prints)",
        )
    }
}

impl std::error::Error for BadToken {}

/// A parsed token: `mars1.<id>.<secret>.<pin>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub id: String,
    pub secret: String,
    pub pin: String,
}

impl Token {
    pub fn parse(s: &str) -> Result<Token, BadToken> {
        let bad = || BadToken;
        let mut it = s.trim().split('.');
        if it.next() != Some("mars1") {
            return Err(bad());
        }
        let mut part = |len: usize| {
            it.next()
                .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_ascii_lowercase)
                .ok_or_else(bad)
        };
        let t = Token {
            id: part(16)?,
            secret: part(32)?,
            pin: part(64)?,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(t)
    }

    pub fn text(&self) -> String {
        format!("mars1.{}.{}.{}", self.id, self.secret, self.pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_refusals() {
        let t = Token {
            id: "0123456789abcdef".into(),
            secret: "00112233445566778899aabbccddeeff".into(),
            pin: "a".repeat(64),
        };
        assert_eq!(Token::parse(&t.text()).unwrap(), t);
        for bad in [
            "",
            "mars1",
            "mars2.0123456789abcdef.00112233445566778899aabbccddeeff.aaaa",
            &format!("{}.x", t.text()),
            &t.text().replace("0123", "zz23"),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad}");
        }
    }
}
