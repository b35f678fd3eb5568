//! Files a customer gives directly rather than through WhatsApp: a conversation test's
//! `user: {image: …}`, `chat`'s `/image PATH`, the sandbox door's `file`. No Graph API is
//! involved: the bytes are put in the media store as a finished download's would be
//! (refused `too_large` over `media.max_bytes`, as a download is), the row recorded, and
//! the contact's flow told ([`Runtime::media_ready`]), so a flow's `ask … expect: image`
//! goes on exactly as it does after a real download.

use std::path::Path;

use chrono::{DateTime, Utc};

use crate::dispatch::{DispatchError, Runtime, TurnReport};
use crate::domain::{Inbound, InboundContent};
use crate::store::{LocalMedia, StoreError};
use crate::whatsapp::media_files::MEDIA_RULES;

/// A file given directly.
#[derive(Debug, Clone)]
pub struct GivenFile<'a> {
    /// `image`, `document`, `audio`, `video` or `sticker`.
    pub kind: &'a str,
    /// Its file name (the MIME type is read from its extension, and a document keeps it).
    pub name: &'a str,
    pub bytes: Vec<u8>,
    pub caption: Option<&'a str>,
}

/// Why a given file could not reach the flow.
#[derive(Debug, thiserror::Error)]
pub enum GivenFileError {
    #[error("`{0}` is not a kind of file: write image, document, audio, video or sticker")]
    Kind(String),
    #[error("this runtime keeps no customers' files")]
    NoStore,
    #[error(transparent)]
    Files(#[from] super::MediaStoreError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
}

/// The kinds of file a customer can send.
pub fn kinds() -> impl Iterator<Item = &'static str> {
    MEDIA_RULES.iter().map(|r| r.kind)
}

/// The customer `wa_id` (named `name`) sends `file` on `channel` at `now`: the file message's
/// turn, then the turn that tells the flow the file is there.
pub async fn receive(
    runtime: &Runtime,
    channel: &str,
    wa_id: &str,
    name: Option<&str>,
    file: GivenFile<'_>,
    now: DateTime<Utc>,
) -> Result<[TurnReport; 2], GivenFileError> {
    if !kinds().any(|k| k == file.kind) {
        return Err(GivenFileError::Kind(file.kind.to_string()));
    }
    // Refused before the message is stored: a flow told of a file it will never get
    // would wait for it.
    if runtime.media.is_none() {
        return Err(GivenFileError::NoStore);
    }
    let content = InboundContent::Media {
        kind: file.kind.into(),
        caption: file.caption.map(str::to_string),
        file: None,
    };
    let inbound = Inbound::sandbox(content, now, now);
    let wamid = inbound.id.clone();
    let message = runtime.inbound(channel, wa_id, name, inbound).await?;
    let told = deliver(runtime, channel, wa_id, &wamid, file).await?;
    Ok([message, told])
}

/// Stores `file` for the customer's message `wamid` (already stored) and tells its flow.
pub async fn deliver(
    runtime: &Runtime,
    channel: &str,
    wa_id: &str,
    wamid: &str,
    file: GivenFile<'_>,
) -> Result<TurnReport, GivenFileError> {
    let media = runtime.media.clone().ok_or(GivenFileError::NoStore)?;
    let size = file.bytes.len() as i64;
    let too_large = file.bytes.len() as u64 > media.max_bytes;
    let key = super::store::content_key(&super::sha256_hex(&file.bytes));
    if !too_large {
        media.store.put(&key, file.bytes).await?;
    }
    let filename = Path::new(file.name).file_name().and_then(|n| n.to_str());
    let db = &runtime.db;
    let id = db
        .insert_local_media(
            &LocalMedia {
                channel,
                wa_id,
                wamid,
                kind: file.kind,
                mime: mime_of(file.name),
                caption: file.caption,
                filename: (file.kind == "document").then_some(filename).flatten(),
                size,
                store_key: &key,
                error: too_large.then_some("too_large"),
            },
            runtime.clock.now(),
        )
        .await?;
    let row = db
        .media(id)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("media row {id} is gone")))?;
    Ok(runtime.media_ready(&row).await?)
}

/// A given file's MIME type, by its extension: WhatsApp's table
/// ([`MEDIA_RULES`]), then a few images it does not take from businesses.
pub fn mime_of(name: &str) -> &'static str {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let known = MEDIA_RULES
        .iter()
        .flat_map(|r| r.types)
        .find(|t| t.extensions.contains(&ext.as_str()))
        .map(|t| t.mime);
    known.unwrap_or(match ext.as_str() {
        "gif" => "image/gif",
        _ => "application/octet-stream",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_type_is_read_from_its_extension() {
        assert_eq!(mime_of("parcel.PNG"), "image/png");
        assert_eq!(mime_of("a/b/photo.jpeg"), "image/jpeg");
        assert_eq!(mime_of("invoice.pdf"), "application/pdf");
        assert_eq!(mime_of("note.ogg"), "audio/ogg");
        assert_eq!(mime_of("clip.mp4"), "video/mp4");
        assert_eq!(mime_of("smile.webp"), "image/webp");
        assert_eq!(mime_of("cat.gif"), "image/gif");
        assert_eq!(mime_of("README"), "application/octet-stream");
    }
}
