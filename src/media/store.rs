//! Where customers' files are kept: the [`MediaStore`] trait, a local directory
//! ([`LocalDir`], the default) and memory ([`Memory`], for conversation tests).
//!
//! The trait is the seam for other stores. An S3-compatible store implements it with a
//! bucket and a prefix: `put` is a `PutObject` of the key (the bytes are whole and their
//! SHA-256 known, so a `Content-MD5`/checksum header can go with it), `get` a `GetObject`
//! (`None` on `NoSuchKey`), `delete` a `DeleteObject` (which succeeds for a missing key).
//! Keys are content addresses chosen by flowgate (`[0-9a-f]` and `/` only), so they are
//! valid object names and file names alike, and writing the same file twice is harmless.
//! Files are at most `media.max_bytes`, so they move as one buffer.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;

/// A media store's failure (a full disk, permissions, the network to a bucket).
#[derive(Debug, thiserror::Error)]
#[error("media store: {0}")]
pub struct MediaStoreError(pub String);

/// What a store's operations return.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, MediaStoreError>> + Send + 'a>>;

/// Keeps files by key. Implementations are shared between tasks.
pub trait MediaStore: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, replacing what was there; done when it returns `Ok`.
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()>;
    /// The bytes under `key`; `None` when there are none.
    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>>;
    /// Removes `key`; a missing key is not an error.
    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()>;
}

/// The key of a file: its SHA-256 in hex, under a directory of its first two digits (so no
/// directory grows past a few thousand files).
pub fn content_key(sha256_hex: &str) -> String {
    format!("{}/{sha256_hex}", &sha256_hex[..2.min(sha256_hex.len())])
}

/// The SHA-256 a file's key is made of, in every form a webhook may give it and
/// [`super::sha256_matches`] accepts (base64 of the raw digest, standard and URL-safe; hex,
/// lower and upper case): what a pending download of the same file was announced with.
pub fn sha256_forms(key: &str) -> [String; 4] {
    use base64::Engine as _;
    let hex = key.rsplit('/').next().unwrap_or_default().to_string();
    let raw = hex::decode(&hex).unwrap_or_default();
    let (standard, url_safe) = if raw.is_empty() {
        (String::new(), String::new())
    } else {
        (
            base64::engine::general_purpose::STANDARD.encode(&raw),
            base64::engine::general_purpose::URL_SAFE.encode(&raw),
        )
    };
    let upper = hex.to_ascii_uppercase();
    [standard, url_safe, hex, upper]
}

/// Whether `key` is one flowgate makes: what keeps a key from leaving the store's directory.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase() || b == b'/')
        && !key.starts_with('/')
        && !key.contains("//")
}

fn check_key(key: &str) -> Result<(), MediaStoreError> {
    if valid_key(key) {
        Ok(())
    } else {
        Err(MediaStoreError(format!("`{key}` is not a media key")))
    }
}

/// Files in a directory (`media.dir`), written to a temporary file and renamed into place,
/// so a reader never sees half a file.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

impl LocalDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf, MediaStoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

impl MediaStore for LocalDir {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let path = self.path(key)?;
            let fail = |what: &str, e: std::io::Error| {
                MediaStoreError(format!("{what} {}: {e}", path.display()))
            };
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| fail("cannot create the directory of", e))?;
            }
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let temp = path.with_extension(format!("tmp.{}.{seq}", std::process::id()));
            tokio::fs::write(&temp, &bytes)
                .await
                .map_err(|e| fail("cannot write", e))?;
            if let Err(e) = tokio::fs::rename(&temp, &path).await {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(fail("cannot move a file into", e));
            }
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::read(&path).await {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(MediaStoreError(format!(
                    "cannot read {}: {e}",
                    path.display()
                ))),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(MediaStoreError(format!(
                    "cannot delete {}: {e}",
                    path.display()
                ))),
            }
        })
    }
}

/// Files in memory, gone with the process: conversation tests, which run on an in-memory
/// database too.
#[derive(Debug, Default)]
pub struct Memory {
    files: Mutex<HashMap<String, Vec<u8>>>,
}

impl MediaStore for Memory {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            check_key(key)?;
            self.files
                .lock()
                .expect("media lock")
                .insert(key.to_string(), bytes);
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> StoreFuture<'a, Option<Vec<u8>>> {
        Box::pin(async move { Ok(self.files.lock().expect("media lock").get(key).cloned()) })
    }

    fn delete<'a>(&'a self, key: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.files.lock().expect("media lock").remove(key);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_files_sha256_is_one_a_download_accepts() {
        // Bytes whose digest has `+`/`/` in base64, so the URL-safe form differs.
        let bytes = (0..64u8).find_map(|n| {
            let b = vec![n; 100];
            let forms = sha256_forms(&content_key(&super::super::sha256_hex(&b)));
            (forms[0] != forms[1]).then_some((b, forms))
        });
        let (bytes, forms) = bytes.expect("some digest has + or / in base64");
        for form in &forms {
            assert!(super::super::sha256_matches(&bytes, Some(form)), "{form}");
        }
        assert_eq!(forms[3], forms[2].to_ascii_uppercase());
        // A key that is not hex has no base64 forms.
        assert_eq!(sha256_forms("zz/nothex")[..2], ["", ""]);
    }

    async fn round_trip(store: &dyn MediaStore) {
        let key = content_key("ab12cd");
        assert_eq!(key, "ab/ab12cd");
        assert_eq!(store.get(&key).await.unwrap(), None);
        store.put(&key, b"one".to_vec()).await.unwrap();
        store.put(&key, b"two".to_vec()).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap().as_deref(), Some(&b"two"[..]));
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), None);
        for bad in ["../etc/passwd", "/abs", "AB/cd", "a//b", ""] {
            assert!(store.put(bad, vec![1]).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_local_directory_keeps_files_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDir::new(dir.path().join("media"));
        round_trip(&store).await;
        store.put("cd/cdef", b"x".to_vec()).await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("media/cd/cdef")).unwrap(),
            b"x"
        );
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(dir.path().join("media/cd"))
                .unwrap()
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn memory_keeps_files_by_key() {
        round_trip(&Memory::default()).await;
    }
}
