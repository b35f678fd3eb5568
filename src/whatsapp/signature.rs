//! Webhook authentication, before a byte of the body is trusted.
//!
//! Owns the `X-Hub-Signature-256` check for webhooks straight from Meta (HMAC-SHA256 of the
//! raw body, keyed with the app secret, as `sha256=<hex>`) and the shared-secret header
//! 360dialog sends (it owns the Meta app, so there is no Meta signature: the secret is the header
//! registered with the webhook URL at 360dialog).
//! Both compare in constant time. Pure.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::yaml::secrets_match;

/// Why a webhook was not authenticated. Answer 401/403 and do not process the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no secret is configured to check the webhook with")]
    NoSecret,
    #[error("the webhook has no signature header")]
    Missing,
    #[error("the webhook signature header is malformed: {0}")]
    Malformed(String),
    #[error("the webhook signature does not match its body")]
    Mismatch,
}

/// The header Meta signs webhooks with.
pub const SIGNATURE_HEADER: &str = "X-Hub-Signature-256";

/// Checks `X-Hub-Signature-256: sha256=<64 hex digits>` against an HMAC-SHA256 of the raw
/// request bytes (before any JSON parsing: re-encoded JSON would not match).
pub fn verify_signature(
    app_secret: &[u8],
    raw_body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    if app_secret.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let hex_digest = header.strip_prefix("sha256=").ok_or_else(|| {
        SignatureError::Malformed(format!(
            "expected `sha256=<hex>`, got `{}`",
            preview(header)
        ))
    })?;
    if hex_digest.len() != 64 {
        return Err(SignatureError::Malformed(format!(
            "expected 64 hex digits after `sha256=`, got {}",
            hex_digest.len()
        )));
    }
    let expected = hex::decode(hex_digest).map_err(|e| {
        SignatureError::Malformed(format!("the digest after `sha256=` is not hex: {e}"))
    })?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(app_secret).expect("HMAC accepts keys of any length");
    mac.update(raw_body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

/// Checks the secret header registered with 360dialog's webhook URL ([`secrets_match`]: in
/// constant time, not revealing the secret's length).
pub fn verify_shared_secret(expected: &str, provided: Option<&str>) -> Result<(), SignatureError> {
    if expected.is_empty() {
        return Err(SignatureError::NoSecret);
    }
    let provided = provided.ok_or(SignatureError::Missing)?;
    if secrets_match(expected, provided) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// The start of an untrusted header, for an error message.
fn preview(s: &str) -> String {
    let mut p: String = s.chars().take(16).collect();
    if s.chars().count() > 16 {
        p.push('…');
    }
    p
}
