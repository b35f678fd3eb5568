//! Media: files customers send, and project files flowgate sends.
//!
//! Files customers send: downloaded in the background ([`download`]), checked against the
//! webhook's SHA-256 and `media.max_bytes`, kept in a [`store::MediaStore`], and handed to
//! flows as a variable with a signed, expiring link that `GET /media/{id}` serves.
//!
//! | file | owns | does I/O? |
//! | --- | --- | --- |
//! | `mod` | [`Media`]: the store, the link signer ([`Signer`]) and the size limit; the SHA-256 check ([`sha256_matches`]); what a flow's variable holds ([`Media::value`]) | no |
//! | [`store`] | the [`store::MediaStore`] trait, a local directory and memory | yes |
//! | [`download`] | the worker: claims due rows with a lease, fetches, verifies, stores, retries, and tells the contact's flow ([`crate::dispatch::Runtime::media_ready`]) | yes |
//! | [`local`] | files given directly (conversation tests, `chat`, the sandbox door): stored as a download's would be, and the flow told | yes |
//! | [`upload`] | files flowgate sends: project files uploaded to WhatsApp once and sent by id | yes |

pub mod download;
pub mod local;
pub mod store;
pub mod upload;

use std::sync::{Arc, RwLock};

use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::store::MediaRow;
pub use store::{LocalDir, MediaStore, MediaStoreError, Memory};

/// What every part that handles customers' files shares.
#[derive(Debug)]
pub struct Media {
    pub store: Arc<dyn MediaStore>,
    pub signer: Signer,
    /// The largest file downloaded (`media.max_bytes`).
    pub max_bytes: u64,
}

impl Media {
    pub fn new(store: Arc<dyn MediaStore>, signer: Signer, max_bytes: u64) -> Self {
        Self {
            store,
            signer,
            max_bytes,
        }
    }

    /// The variable a flow's `save:` gets for a finished download: `url` (signed, until
    /// `now` + the link's lifetime), `mime`, `size`, `caption`, `filename`, `kind`,
    /// `status` (`ok` or `failed`) and `error`.
    pub fn value(&self, row: &MediaRow, now: DateTime<Utc>) -> serde_json::Value {
        let ok = row.status == "ok";
        let url = ok.then(|| self.signer.url(row.id, now));
        serde_json::json!({
            "id": row.id,
            "kind": row.kind,
            "status": row.status,
            "error": row.error,
            "url": url,
            "mime": row.mime,
            "size": row.size,
            "caption": row.caption,
            "filename": row.filename,
        })
    }
}

/// Signs and checks the links `GET /media/{id}?expires=…&sig=…` serves: an HMAC-SHA256 of
/// the id and the expiry with the server's key, so a link cannot be made for another file
/// or made to last longer.
pub struct Signer {
    key: Vec<u8>,
    /// `http://host:port`, without a trailing slash; set once the listener is bound when
    /// the config names none.
    base: RwLock<String>,
    ttl: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("base", &self.base)
            .field("ttl", &self.ttl)
            .field("key", &"***")
            .finish()
    }
}

/// Why a link is refused (the server answers 403 for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefusal {
    BadSignature,
    Expired,
}

impl Signer {
    pub fn new(key: impl Into<Vec<u8>>, base: &str, ttl: Duration) -> Self {
        Self {
            key: key.into(),
            base: RwLock::new(base.trim_end_matches('/').to_string()),
            ttl,
        }
    }

    /// Sets the links' base (the server's own address, once its listener is bound).
    pub fn set_base(&self, base: &str) {
        *self.base.write().expect("media base lock") = base.trim_end_matches('/').to_string();
    }

    fn mac(&self, id: i64, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("any key length");
        mac.update(format!("{id}.{expires}").as_bytes());
        mac
    }

    /// The path and query of a link to file `id` that works until `expires` (unix seconds).
    pub fn path(&self, id: i64, expires: i64) -> String {
        let sig = hex::encode(self.mac(id, expires).finalize().into_bytes());
        format!("/media/{id}?expires={expires}&sig={sig}")
    }

    /// A link to file `id`, working until `now` + the configured lifetime.
    pub fn url(&self, id: i64, now: DateTime<Utc>) -> String {
        let expires = (now + self.ttl).timestamp();
        let base = self.base.read().expect("media base lock").clone();
        format!("{base}{}", self.path(id, expires))
    }

    /// Whether a link's `expires` and `sig` are right for file `id` at `now`: the signature
    /// is checked first, in constant time, so an expired link tells nothing about a guess.
    pub fn check(
        &self,
        id: i64,
        expires: i64,
        sig: &str,
        now: DateTime<Utc>,
    ) -> Result<(), LinkRefusal> {
        let given = hex::decode(sig).map_err(|_| LinkRefusal::BadSignature)?;
        self.mac(id, expires)
            .verify_slice(&given)
            .map_err(|_| LinkRefusal::BadSignature)?;
        if now.timestamp() >= expires {
            return Err(LinkRefusal::Expired);
        }
        Ok(())
    }
}

/// A new random signing key, 32 bytes in hex.
pub fn random_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system gives random bytes");
    hex::encode(bytes)
}

/// Whether `bytes` have the SHA-256 the webhook gave. WhatsApp gives it as base64 of the
/// raw digest (`2d6YhK…=`); a 64-digit hex digest is accepted too. `None` (no digest given)
/// passes: there is nothing to check against.
pub fn sha256_matches(bytes: &[u8], expected: Option<&str>) -> bool {
    let Some(expected) = expected.map(str::trim).filter(|e| !e.is_empty()) else {
        return true;
    };
    let digest = Sha256::digest(bytes);
    let given = if expected.len() == 64 && expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(expected).ok()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(expected)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(expected))
            .ok()
    };
    given.is_some_and(|g| {
        use subtle::ConstantTimeEq;
        g.len() == digest.len() && bool::from(g.as_slice().ct_eq(digest.as_slice()))
    })
}

/// The hex SHA-256 of `bytes` (a file's store key).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn the_webhooks_base64_digest_and_hex_are_checked() {
        let bytes = b"a damaged parcel";
        let digest = Sha256::digest(bytes);
        let b64 = base64::engine::general_purpose::STANDARD.encode(digest);
        assert!(sha256_matches(bytes, Some(&b64)));
        assert!(sha256_matches(bytes, Some(&hex::encode(digest))));
        assert!(sha256_matches(bytes, None));
        assert!(!sha256_matches(b"other bytes", Some(&b64)));
        assert!(!sha256_matches(bytes, Some("not base64 at all!")));
        // The payload example's digest is a well-formed one, of other bytes.
        assert!(!sha256_matches(
            bytes,
            Some("2d6YhK0Ej1nR0fXo5gW4k7w8T1sZc3e9Qm0aB6cD8eE=")
        ));
    }

    #[test]
    fn links_are_signed_and_expire() {
        let now = Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap();
        let signer = Signer::new(b"key".to_vec(), "http://127.0.0.1:1/", Duration::hours(1));
        let url = signer.url(7, now);
        assert!(
            url.starts_with("http://127.0.0.1:1/media/7?expires="),
            "{url}"
        );
        let expires = (now + Duration::hours(1)).timestamp();
        let sig = url.rsplit_once("sig=").unwrap().1;
        assert_eq!(signer.check(7, expires, sig, now), Ok(()));
        assert_eq!(
            signer.check(8, expires, sig, now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(
            signer.check(7, expires + 3600, sig, now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(
            signer.check(7, expires, "zz", now),
            Err(LinkRefusal::BadSignature)
        );
        assert_eq!(
            signer.check(7, expires, sig, now + Duration::hours(1)),
            Err(LinkRefusal::Expired)
        );
        let other = Signer::new(b"other".to_vec(), "http://x", Duration::hours(1));
        assert_eq!(
            other.check(7, expires, sig, now),
            Err(LinkRefusal::BadSignature)
        );
    }
}
