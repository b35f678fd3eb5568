//! [`ResolvedCache`]: the contacts' identities this process has resolved without a write
//! (see [`super::Db::resolve_contact`]), so a known customer's next webhook costs no query.
//! Correct only while this process is the one that writes identities (SQLite has one server
//! process); every identity write forgets everything remembered.

use std::collections::HashMap;
use std::sync::Mutex;

/// Resolutions that needed no write: `(channel, phone, bsuid)` to the contact's key.
#[derive(Debug, Default)]
pub(super) struct ResolvedCache(Mutex<Remembered>);

/// The resolutions, and how many identity writes have forgotten them: a lookup that began
/// before a write is not remembered after it.
#[derive(Debug, Default)]
struct Remembered {
    keys: HashMap<ResolvedBy, String>,
    generation: u64,
}

pub(super) type ResolvedBy = (String, Option<String>, Option<String>);

/// Resolutions remembered at most; the cache starts again when full.
const RESOLVED_CACHE: usize = 100_000;

impl ResolvedCache {
    /// What a lookup is remembered by: the channel and the identifiers it was given.
    pub(super) fn by(channel: &str, phone: Option<&str>, bsuid: Option<&str>) -> ResolvedBy {
        (
            channel.to_string(),
            phone.map(str::to_string),
            bsuid.map(str::to_string),
        )
    }

    /// The key remembered, else the generation to remember a lookup made now under.
    pub(super) fn get(&self, by: &ResolvedBy) -> Result<String, u64> {
        let remembered = self.lock();
        remembered
            .keys
            .get(by)
            .cloned()
            .ok_or(remembered.generation)
    }

    /// Remembers what a lookup begun in `generation` found, unless an identity write has
    /// been made since.
    pub(super) fn remember(&self, generation: u64, by: ResolvedBy, key: &str) {
        let mut remembered = self.lock();
        if remembered.generation != generation {
            return;
        }
        if remembered.keys.len() >= RESOLVED_CACHE {
            remembered.keys.clear();
        }
        remembered.keys.insert(by, key.to_string());
    }

    pub(super) fn forget_all(&self) {
        let mut remembered = self.lock();
        remembered.keys.clear();
        remembered.generation += 1;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        // A panic while holding it leaves a map that is still whole.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CH: &str = "main";
    const PHONE: &str = "15555550123";
    const BSUID: &str = "US.20000000000000000123";

    #[test]
    fn a_lookup_begun_before_an_identity_write_is_not_remembered() {
        let cache = ResolvedCache::default();
        let by = ResolvedCache::by(CH, None, Some(BSUID));
        let generation = cache.get(&by).unwrap_err();
        cache.forget_all();
        cache.remember(generation, by.clone(), BSUID);
        let generation = cache.get(&by).expect_err("stale: not remembered");
        cache.remember(generation, by.clone(), PHONE);
        assert_eq!(cache.get(&by), Ok(PHONE.to_string()));
    }
}
