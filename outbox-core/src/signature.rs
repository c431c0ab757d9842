//! Signing and verifying webhooks: the Standard Webhooks scheme, plus the older `X-Webhook-*`
//! headers with a hex `sha256=` signature over the same bytes.
//!
//! The signed content is `"{webhook-id}.{webhook-timestamp}.{body}"`, the key is the base64-decoded
//! part of a `whsec_…` secret, and the signature is HMAC-SHA256.
//!
//! Verifying in your own Rust receiver:
//!
//! ```
//! use outbox_core::signature::{sign_headers, Secret, Verifier};
//! use std::time::Duration;
//!
//! let secret = Secret::generate();
//! let body = br#"{"id":"evt_1","event":"message.created"}"#;
//! let now = chrono::Utc::now().timestamp();
//!
//! // What the sender puts on the request:
//! let mut headers = axum::http::HeaderMap::new();
//! for (name, value) in sign_headers(&[&secret], "evt_1", now, body) {
//!     headers.insert(name, value.parse().unwrap());
//! }
//!
//! // What the receiver does with it:
//! let verifier = Verifier::new(vec![secret], Duration::from_secs(300));
//! let verified = verifier.verify(&headers, body, now).expect("valid webhook");
//! assert_eq!(verified.id, "evt_1");
//! assert!(verifier.verify(&headers, b"tampered", now).is_err());
//! ```

use std::time::Duration;

use axum::http::HeaderMap;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of every webhook secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A webhook signing secret: `whsec_<base64 of 24–64 random bytes>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(whsec_…)")
    }
}

/// Why a secret was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("a webhook secret starts with 'whsec_'")]
    Prefix,
    #[error("a webhook secret is 'whsec_' followed by base64")]
    Base64,
    #[error("a webhook secret holds 24 to 64 bytes, this one {0}")]
    Length(usize),
}

impl Secret {
    /// A new random secret of 32 bytes.
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Secret {
            text: format!("{SECRET_PREFIX}{}", BASE64.encode(&key)),
            key,
        }
    }

    /// Parses a `whsec_…` secret.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let text = text.trim();
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Secret {
            text: text.to_owned(),
            key,
        })
    }

    /// Parses one or more comma-separated secrets (as `WEBHOOK_SECRET` holds them).
    pub fn parse_list(text: &str) -> Result<Vec<Self>, SecretError> {
        text.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Secret::parse)
            .collect()
    }

    /// The `whsec_…` text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The HMAC-SHA256 of `"{id}.{timestamp}.{body}"` under this secret.
    pub fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
        self.mac_of_text(id, &timestamp.to_string(), body)
    }

    /// The MAC over the timestamp exactly as written in the header: a receiver verifies what the
    /// sender sent, not a re-formatting of the number it parsed.
    pub fn mac_of_text(&self, id: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// The headers of a signed webhook request (contract), one signature per secret: during a rotation
/// both the new and the previous secret sign, space-separated.
pub fn sign_headers(
    secrets: &[&Secret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let macs: Vec<[u8; 32]> = secrets.iter().map(|s| s.mac(id, timestamp, body)).collect();
    let v1 = macs
        .iter()
        .map(|m| format!("v1,{}", BASE64.encode(m)))
        .collect::<Vec<_>>()
        .join(" ");
    let hex = macs
        .iter()
        .map(|m| format!("sha256={}", hex::encode(m)))
        .collect::<Vec<_>>()
        .join(" ");
    let ts = timestamp.to_string();
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.clone()),
        ("webhook-signature", v1),
        ("x-webhook-id", id.to_owned()),
        ("x-webhook-timestamp", ts),
        ("x-webhook-signature", hex),
    ]
}

/// Why a webhook was refused. Every case means "answer 401 and store nothing".
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VerifyError {
    #[error("missing webhook-id/webhook-timestamp/webhook-signature (or X-Webhook-*) headers")]
    MissingHeaders,
    #[error("the webhook timestamp is not a Unix time in seconds (plain ASCII digits)")]
    BadTimestamp,
    #[error("the webhook timestamp is {seconds} s in the past, more than the tolerance of {tolerance} s")]
    TooOld { seconds: u64, tolerance: u64 },
    #[error("the webhook timestamp is {seconds} s in the future, more than the tolerance of {tolerance} s")]
    TooNew { seconds: u64, tolerance: u64 },
    #[error("no signature matches")]
    BadSignature,
}

/// A webhook whose signature matched.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// The webhook id: the receiver's idempotency key.
    pub id: String,
    pub timestamp: i64,
}

/// Verifies webhooks signed by any of its secrets, within a timestamp tolerance.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    tolerance: Duration,
}

impl Verifier {
    pub fn new(secrets: Vec<Secret>, tolerance: Duration) -> Self {
        Verifier { secrets, tolerance }
    }

    /// Checks either header convention (Standard Webhooks first) against `now` (Unix seconds).
    /// Any one of several space-separated signatures may match any one of the secrets.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: i64,
    ) -> Result<Verified, VerifyError> {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let (id, ts, signatures, standard) = match (
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
        ) {
            (Some(id), Some(ts), Some(sig)) => (id, ts, sig, true),
            _ => match (
                get("x-webhook-id"),
                get("x-webhook-timestamp"),
                get("x-webhook-signature"),
            ) {
                (Some(id), Some(ts), Some(sig)) => (id, ts, sig, false),
                _ => return Err(VerifyError::MissingHeaders),
            },
        };
        let timestamp = parse_timestamp(ts)?;
        let tolerance = self.tolerance.as_secs();
        // Positive: the timestamp is in the past.
        let age = now.saturating_sub(timestamp);
        if age.unsigned_abs() > tolerance {
            let seconds = age.unsigned_abs();
            return Err(if age > 0 {
                VerifyError::TooOld { seconds, tolerance }
            } else {
                VerifyError::TooNew { seconds, tolerance }
            });
        }
        let offered: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|s| {
                if standard {
                    s.strip_prefix("v1,").and_then(|b| BASE64.decode(b).ok())
                } else {
                    s.strip_prefix("sha256=").and_then(|h| hex::decode(h).ok())
                }
            })
            .collect();
        let matched = self.secrets.iter().any(|secret| {
            let expected = secret.mac_of_text(id, ts, body);
            offered.iter().any(|sig| constant_time_eq(sig, &expected))
        });
        if matched {
            Ok(Verified {
                id: id.to_owned(),
                timestamp,
            })
        } else {
            Err(VerifyError::BadSignature)
        }
    }
}

/// A timestamp header in the one form a sender writes it: ASCII digits, no sign, no spaces, no
/// leading zero (except `0` itself). The reference libraries parse more leniently (Python's
/// `float()` takes `" +01.7e9 "`, Rust's `i64::from_str` takes `+01700`) and then MAC a
/// re-formatting of the number; accepting only the canonical form keeps our MAC over the exact
/// header text equal to theirs for every timestamp we accept.
fn parse_timestamp(text: &str) -> Result<i64, VerifyError> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !canonical {
        return Err(VerifyError::BadTimestamp);
    }
    text.parse().map_err(|_| VerifyError::BadTimestamp)
}

/// Equality of two byte strings in time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_of(pairs: Vec<(&'static str, String)>, keep: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            if keep.iter().any(|k| k.eq_ignore_ascii_case(name)) {
                map.insert(name, value.parse().unwrap());
            }
        }
        map
    }

    const STANDARD: &[&str] = &["webhook-id", "webhook-timestamp", "webhook-signature"];
    const OLDER: &[&str] = &["x-webhook-id", "x-webhook-timestamp", "x-webhook-signature"];

    #[test]
    fn standard_webhooks_test_vector() {
        // From the Standard Webhooks reference implementations' test suite.
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let headers = sign_headers(&[&secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            headers[2].1,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    /// A body signed as `evt_1` at 1000 with a fresh secret, the headers of both conventions,
    /// and a verifier of that secret with a 300 s tolerance.
    fn signed_evt_1() -> (&'static [u8], Vec<(&'static str, String)>, Verifier) {
        let secret = Secret::generate();
        let body = b"{\"a\":1}";
        let signed = sign_headers(&[&secret], "evt_1", 1_000, body);
        (
            body,
            signed,
            Verifier::new(vec![secret], Duration::from_secs(300)),
        )
    }

    #[test]
    fn both_conventions_verify() {
        let (body, signed, verifier) = signed_evt_1();
        for names in [STANDARD, OLDER] {
            let h = headers_of(signed.clone(), names);
            assert_eq!(verifier.verify(&h, body, 1_010).unwrap().id, "evt_1");
        }
    }

    #[test]
    fn tampering_staleness_and_missing_headers_are_refused() {
        let (body, signed, verifier) = signed_evt_1();
        let h = headers_of(signed.clone(), STANDARD);
        assert_eq!(
            verifier.verify(&h, b"{\"a\":2}", 1_000),
            Err(VerifyError::BadSignature)
        );
        let old = verifier.verify(&h, body, 1_301).unwrap_err();
        assert_eq!(
            old,
            VerifyError::TooOld {
                seconds: 301,
                tolerance: 300
            }
        );
        assert_eq!(
            old.to_string(),
            "the webhook timestamp is 301 s in the past, more than the tolerance of 300 s"
        );
        let future = verifier.verify(&h, body, 699).unwrap_err();
        assert_eq!(
            future,
            VerifyError::TooNew {
                seconds: 301,
                tolerance: 300
            }
        );
        assert_eq!(
            future.to_string(),
            "the webhook timestamp is 301 s in the future, more than the tolerance of 300 s"
        );
        assert_eq!(
            verifier.verify(&HeaderMap::new(), body, 1_000),
            Err(VerifyError::MissingHeaders)
        );
        let other = Verifier::new(vec![Secret::generate()], Duration::from_secs(300));
        assert_eq!(
            other.verify(&h, body, 1_000),
            Err(VerifyError::BadSignature)
        );
    }

    /// Headers of both conventions carrying `timestamp` as written, each signature over exactly that
    /// text (as a sender writing a non-canonical timestamp would sign it).
    fn signed_over_text(secret: &Secret, id: &str, timestamp: &str, body: &[u8]) -> HeaderMap {
        let mac = secret.mac_of_text(id, timestamp, body);
        let mut map = HeaderMap::new();
        for (name, value) in [
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", timestamp.to_owned()),
            ("webhook-signature", format!("v1,{}", BASE64.encode(mac))),
            ("x-webhook-id", id.to_owned()),
            ("x-webhook-timestamp", timestamp.to_owned()),
            (
                "x-webhook-signature",
                format!("sha256={}", hex::encode(mac)),
            ),
        ] {
            map.insert(name, value.parse().unwrap());
        }
        map
    }

    fn only(all: &HeaderMap, names: &[&'static str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for name in names {
            if let Some(value) = all.get(*name) {
                map.insert(*name, value.clone());
            }
        }
        map
    }

    #[test]
    fn only_plain_digit_timestamps_verify_in_either_convention() {
        let secret = Secret::generate();
        let body = b"{}";
        let verifier = Verifier::new(vec![secret.clone()], Duration::from_secs(300));
        let refused = [
            "+1000", "01000", "001000", " 1000", "1000 ", "\t1000", "1000.0", "1e3", "-0", "00", "",
        ];
        for written in refused {
            let all = signed_over_text(&secret, "evt_1", written, body);
            for names in [STANDARD, OLDER] {
                assert_eq!(
                    verifier.verify(&only(&all, names), body, 1_000),
                    Err(VerifyError::BadTimestamp),
                    "{written:?} in {names:?}"
                );
            }
        }
        for written in ["1000", "0"] {
            let all = signed_over_text(&secret, "evt_1", written, body);
            let now = written.parse().unwrap();
            for names in [STANDARD, OLDER] {
                let verified = verifier.verify(&only(&all, names), body, now);
                assert_eq!(verified.map(|v| v.timestamp), Ok(now), "{written:?}");
            }
        }
    }

    #[test]
    fn the_mac_covers_the_timestamp_text_as_sent() {
        // A MAC over "1000" does not vouch for a header saying anything else.
        let secret = Secret::generate();
        let body = b"{}";
        let verifier = Verifier::new(vec![secret.clone()], Duration::from_secs(300));
        let mut h = signed_over_text(&secret, "evt_1", "1000", body);
        assert!(verifier.verify(&h, body, 1_000).is_ok());
        h.insert("webhook-timestamp", "1001".parse().unwrap());
        assert_eq!(
            verifier.verify(&h, body, 1_000),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn rotation_signs_with_both_secrets() {
        let old = Secret::generate();
        let new = Secret::generate();
        let body = b"x";
        let signed = sign_headers(&[&new, &old], "evt_2", 50, body);
        for names in [STANDARD, OLDER] {
            let h = headers_of(signed.clone(), names);
            for secret in [&old, &new] {
                let v = Verifier::new(vec![secret.clone()], Duration::from_secs(300));
                assert!(v.verify(&h, body, 50).is_ok());
            }
        }
    }

    #[test]
    fn secrets_are_checked() {
        assert_eq!(Secret::parse("abc"), Err(SecretError::Prefix));
        assert_eq!(Secret::parse("whsec_!!"), Err(SecretError::Base64));
        assert_eq!(Secret::parse("whsec_AAAA"), Err(SecretError::Length(3)));
        let s = Secret::generate();
        assert_eq!(Secret::parse(s.as_str()).unwrap(), s);
        assert_eq!(
            Secret::parse_list(&format!("{},{}", s.as_str(), s.as_str()))
                .unwrap()
                .len(),
            2
        );
    }
}
