//! Customers' files: the answer of `GET /{media-id}` (where to download a file, valid for
//! a few minutes, and what it should be), and the download URL as a channel may fetch it.
//!
//! The Cloud API answers `{url, mime_type, sha256, file_size, id}` (`file_size` a number or
//! a string of digits) and the file is fetched from `url` with the same bearer token.
//! 360dialog answers the same shape for `GET {api_base}/{media-id}`, but its `url` names
//! Meta's host: the file is fetched through 360dialog instead, the URL's path and query on
//! the channel's `api_base` host, with its `D360-API-KEY` ([`download_url`]).

use serde_json::Value;

use super::errors::GraphError;
use super::send::{read_answer, snippet};

/// WhatsApp's "media download error" (`131052`): it could not get the customer's file (gone
/// from its servers, or not there yet).
pub const MEDIA_DOWNLOAD_ERROR: i64 = 131_052;

/// Where to download one file, and what it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaInfo {
    /// Short-lived: fetch it at once, and ask again for a new one after a failure.
    pub url: String,
    pub mime_type: Option<String>,
    pub sha256: Option<String>,
    /// Bytes, when the answer says.
    pub file_size: Option<u64>,
}

/// Reads the answer of `GET /{media-id}`.
pub fn parse_media_info(status: u16, body: &[u8]) -> Result<MediaInfo, GraphError> {
    let json = read_answer(status, body)?;
    let text = |key: &str| json.get(key).and_then(Value::as_str).map(str::to_string);
    let url = text("url").filter(|u| !u.is_empty()).ok_or_else(|| {
        GraphError::http(
            status,
            format!("the media answer has no `url`: {}", snippet(body)),
        )
    })?;
    let file_size = json
        .get("file_size")
        .and_then(|s| s.as_u64().or_else(|| s.as_str()?.trim().parse().ok()));
    Ok(MediaInfo {
        url,
        mime_type: text("mime_type"),
        sha256: text("sha256"),
        file_size,
    })
}

/// The URL to download `url` from: as it is for the Cloud API; for 360dialog its path and
/// query on the host of `api_base` (scheme, host and port), since 360dialog serves Meta's
/// files itself. `Err` when either is not a URL.
pub fn download_url(url: &str, rewrite_to: Option<&str>) -> Result<reqwest::Url, String> {
    let mut parsed =
        reqwest::Url::parse(url).map_err(|e| format!("the media URL is not a URL: {e}"))?;
    let Some(base) = rewrite_to else {
        return Ok(parsed);
    };
    let base = reqwest::Url::parse(base).map_err(|e| format!("`api_base` is not a URL: {e}"))?;
    parsed
        .set_scheme(base.scheme())
        .map_err(|()| "the media URL's scheme cannot change".to_string())?;
    parsed
        .set_host(base.host_str())
        .map_err(|e| format!("the media URL's host cannot change: {e}"))?;
    parsed
        .set_port(base.port())
        .map_err(|()| "the media URL's port cannot change".to_string())?;
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cloud_api_answer() {
        let body = br#"{"messaging_product":"whatsapp","url":"https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=1&ext=2","mime_type":"image/jpeg","sha256":"abc=","file_size":"303833","id":"1"}"#;
        let info = parse_media_info(200, body).unwrap();
        assert_eq!(info.file_size, Some(303_833));
        assert_eq!(info.mime_type.as_deref(), Some("image/jpeg"));
        let numeric = br#"{"url":"https://x/y","file_size":12}"#;
        assert_eq!(parse_media_info(200, numeric).unwrap().file_size, Some(12));
    }

    #[test]
    fn an_error_answer_is_the_graph_error() {
        let body = br#"{"error":{"message":"(#131052) Media download error","code":131052}}"#;
        let e = parse_media_info(400, body).unwrap_err();
        assert_eq!(e.code, 131052);
        let e = parse_media_info(200, br#"{"id":"1"}"#).unwrap_err();
        assert!(e.message.contains("no `url`"), "{e}");
    }

    #[test]
    fn dialog360_fetches_through_its_own_host() {
        let url = "https://lookaside.fbsbx.com/whatsapp_business/attachments/?mid=9&ext=1";
        assert_eq!(download_url(url, None).unwrap().as_str(), url);
        assert_eq!(
            download_url(url, Some("https://waba-v2.360dialog.io"))
                .unwrap()
                .as_str(),
            "https://waba-v2.360dialog.io/whatsapp_business/attachments/?mid=9&ext=1"
        );
        assert_eq!(
            download_url(url, Some("http://127.0.0.1:9000/"))
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9000/whatsapp_business/attachments/?mid=9&ext=1"
        );
        assert!(download_url("not a url", None).is_err());
    }
}
