//! The console's sign-in: a session cookie and the CSRF token of its forms, both signed
//! with a key derived from the admin token, so the cookie never carries the token and a
//! changed token signs everyone out.
//!
//! The cookie is `EXPIRY.NONCE.MAC`: the expiry in unix seconds, a nonce unique to the
//! sign-in, and an HMAC-SHA256 over both. Each form carries the session's CSRF token, an
//! HMAC of the cookie's value under the same key (so it is per session and cannot be
//! computed without the key). Both are compared in constant time
//! ([`crate::yaml::secrets_match`]). A signed-out session's nonce is kept until it would
//! have expired anyway, so a copied cookie stops working at sign-out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::yaml::{Secret, secrets_match};

/// The session cookie's name.
pub const COOKIE: &str = "flowgate_session";

/// How long a sign-in lasts.
pub const LIFETIME_SECONDS: i64 = 12 * 60 * 60;

/// The keys of one server: derived from its admin token.
pub struct Sessions {
    key: Vec<u8>,
    /// Signed-out nonces with their expiry.
    revoked: Mutex<HashMap<String, i64>>,
    counter: AtomicU64,
}

impl Sessions {
    /// `None` when no admin token is configured: the console is then off.
    pub fn new(admin_token: Option<&Secret>) -> Option<Self> {
        let token = admin_token.filter(|t| !t.expose().is_empty())?;
        Some(Self {
            key: mac(
                token.expose().as_bytes(),
                b"flowgate console session key v1",
            ),
            revoked: Mutex::new(HashMap::new()),
            counter: AtomicU64::new(0),
        })
    }

    /// A new session's cookie value, valid until `now + LIFETIME_SECONDS`.
    pub fn issue(&self, now: i64) -> String {
        let count = self.counter.fetch_add(1, Ordering::Relaxed);
        // Unique, not secret: the MAC is what cannot be forged. The process id keeps a
        // restarted server (its counter back at 0) from repeating an earlier nonce.
        let process = std::process::id();
        let nonce =
            hex::encode(&mac(&self.key, format!("{now}/{process}/{count}").as_bytes())[..12]);
        let expiry = now + LIFETIME_SECONDS;
        let signed = format!("{expiry}.{nonce}");
        format!(
            "{signed}.{}",
            hex::encode(mac(&self.key, signed.as_bytes()))
        )
    }

    /// Whether `cookie` is a session this server signed, not expired at `now` nor signed
    /// out.
    pub fn valid(&self, cookie: &str, now: i64) -> bool {
        let Some((signed, given)) = cookie.rsplit_once('.') else {
            return false;
        };
        let expected = hex::encode(mac(&self.key, signed.as_bytes()));
        if !secrets_match(&expected, given) {
            return false;
        }
        let Some((expiry, nonce)) = signed.split_once('.') else {
            return false;
        };
        let Ok(expiry) = expiry.parse::<i64>() else {
            return false;
        };
        expiry > now
            && !self
                .revoked
                .lock()
                .expect("revoked lock")
                .contains_key(nonce)
    }

    /// Signs a session out: its cookie is refused from now on.
    pub fn revoke(&self, cookie: &str, now: i64) {
        let mut parts = cookie.splitn(3, '.');
        let (Some(expiry), Some(nonce)) = (parts.next(), parts.next()) else {
            return;
        };
        let expiry = expiry.parse::<i64>().unwrap_or(now + LIFETIME_SECONDS);
        let mut revoked = self.revoked.lock().expect("revoked lock");
        revoked.retain(|_, until| *until > now);
        revoked.insert(nonce.to_string(), expiry);
    }

    /// The CSRF token of the session `cookie`.
    pub fn csrf(&self, cookie: &str) -> String {
        hex::encode(mac(&self.key, format!("csrf|{cookie}").as_bytes()))
    }

    /// Whether `given` is the CSRF token of the session `cookie` (constant time).
    pub fn csrf_matches(&self, cookie: &str, given: &str) -> bool {
        secrets_match(&self.csrf(cookie), given)
    }
}

fn mac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then_some(value)
    })
}

/// The `Set-Cookie` of a new session.
pub fn set_cookie(value: &str) -> String {
    format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={LIFETIME_SECONDS}")
}

/// The `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(token: &str) -> Sessions {
        Sessions::new(Some(&Secret::new(token))).unwrap()
    }

    #[test]
    fn no_token_no_console() {
        assert!(Sessions::new(None).is_none());
        assert!(Sessions::new(Some(&Secret::new(""))).is_none());
    }

    #[test]
    fn a_cookie_is_valid_until_it_expires_and_never_holds_the_token() {
        let s = sessions("admin-secret");
        let cookie = s.issue(1_000);
        assert!(!cookie.contains("admin-secret"));
        assert!(s.valid(&cookie, 1_000));
        assert!(s.valid(&cookie, 1_000 + LIFETIME_SECONDS - 1));
        assert!(!s.valid(&cookie, 1_000 + LIFETIME_SECONDS));
        assert_ne!(s.issue(1_000), cookie, "each sign-in is its own session");
    }

    #[test]
    fn a_forged_or_foreign_cookie_is_refused() {
        let s = sessions("admin-secret");
        let cookie = s.issue(1_000);
        let (signed, mac) = cookie.rsplit_once('.').unwrap();
        let (expiry, nonce) = signed.split_once('.').unwrap();
        let later = format!("{}.{nonce}", expiry.parse::<i64>().unwrap() + 3600);
        assert!(!s.valid(&format!("{later}.{mac}"), 1_000), "expiry changed");
        assert!(!s.valid(&format!("{signed}.00"), 1_000));
        assert!(!s.valid("", 1_000));
        assert!(!s.valid("garbage", 1_000));
        let other = sessions("another-token");
        assert!(!other.valid(&cookie, 1_000), "a changed token signs out");
    }

    #[test]
    fn sign_out_revokes_the_cookie() {
        let s = sessions("admin-secret");
        let (a, b) = (s.issue(1_000), s.issue(1_000));
        s.revoke(&a, 1_001);
        assert!(!s.valid(&a, 1_002));
        assert!(s.valid(&b, 1_002));
    }

    #[test]
    fn the_csrf_token_belongs_to_its_session() {
        let s = sessions("admin-secret");
        let (a, b) = (s.issue(1_000), s.issue(1_000));
        let token = s.csrf(&a);
        assert!(s.csrf_matches(&a, &token));
        assert!(!s.csrf_matches(&b, &token));
        assert!(!s.csrf_matches(&a, ""));
        assert!(!s.csrf_matches(&a, &token[1..]));
    }

    #[test]
    fn cookies_are_read_from_the_header() {
        let header = "a=1; flowgate_session=x.y.z; b=2";
        assert_eq!(cookie_value(header, COOKIE), Some("x.y.z"));
        assert_eq!(cookie_value(header, "c"), None);
        let set = set_cookie("v");
        for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(part), "{set}");
        }
    }
}
