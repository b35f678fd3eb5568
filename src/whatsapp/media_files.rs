//! The media WhatsApp accepts, in one table ([`MEDIA_RULES`]: kind, types, extensions, the
//! most bytes), what a file is (its extension and its first bytes), and the answer to an
//! upload (`POST /{phone-number-id}/media`, 360dialog `POST /media`). Pure: `check` and the
//! outbox sender both judge a project file here, so they cannot disagree.

use serde_json::Value;

use super::errors::GraphError;
use super::send::{read_answer, snippet};

/// WhatsApp's "media upload error" (`131053`): it cannot fetch or use the media a message
/// names; for an uploaded id, the id is expired or unknown.
pub const MEDIA_UPLOAD_ERROR: i64 = 131_053;

const KB: u64 = 1024;
const MB: u64 = 1024 * 1024;

/// What a file's first bytes say it is. `Text` has no signature: any UTF-8 start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    Pdf,
    /// A ZIP container: the Office Open XML formats (docx, xlsx, pptx).
    Zip,
    /// An OLE compound file: the old Office formats (doc, xls, ppt).
    Ole,
    Text,
    Aac,
    Amr,
    Mp3,
    /// ISO base media (`ftyp`): MP4 video, M4A audio, 3GPP.
    IsoMedia,
    Ogg,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::Webp => "WebP",
            Self::Pdf => "PDF",
            Self::Zip => "an Office (ZIP) file",
            Self::Ole => "an old Office file",
            Self::Text => "text",
            Self::Aac => "AAC",
            Self::Amr => "AMR",
            Self::Mp3 => "MP3",
            Self::IsoMedia => "MP4/3GPP",
            Self::Ogg => "Ogg",
        }
    }
}

/// One type a media kind accepts: its MIME type, the extensions that name it, the format
/// its bytes must have.
#[derive(Debug)]
pub struct MediaType {
    pub mime: &'static str,
    pub extensions: &'static [&'static str],
    pub format: Format,
}

/// A media kind as WhatsApp limits it.
#[derive(Debug)]
pub struct MediaRule {
    pub kind: &'static str,
    pub max_bytes: u64,
    pub types: &'static [MediaType],
}

const fn t(mime: &'static str, extensions: &'static [&'static str], format: Format) -> MediaType {
    MediaType {
        mime,
        extensions,
        format,
    }
}

/// WhatsApp's limits for media a business sends: the one table. Stickers: static WebP up to
/// 100 KB (an animated one may have 500 KB, [`ANIMATED_STICKER_MAX_BYTES`]).
pub const MEDIA_RULES: &[MediaRule] = &[
    MediaRule {
        kind: "image",
        max_bytes: 5 * MB,
        types: &[
            t("image/jpeg", &["jpg", "jpeg"], Format::Jpeg),
            t("image/png", &["png"], Format::Png),
        ],
    },
    MediaRule {
        kind: "document",
        max_bytes: 100 * MB,
        types: &[
            t("application/pdf", &["pdf"], Format::Pdf),
            t("text/plain", &["txt"], Format::Text),
            t("application/msword", &["doc"], Format::Ole),
            t(
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                &["docx"],
                Format::Zip,
            ),
            t("application/vnd.ms-excel", &["xls"], Format::Ole),
            t(
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
                &["xlsx"],
                Format::Zip,
            ),
            t("application/vnd.ms-powerpoint", &["ppt"], Format::Ole),
            t(
                "application/vnd.openxmlformats-officedocument.presentationml.presentation",
                &["pptx"],
                Format::Zip,
            ),
        ],
    },
    MediaRule {
        kind: "audio",
        max_bytes: 16 * MB,
        types: &[
            t("audio/aac", &["aac"], Format::Aac),
            t("audio/amr", &["amr"], Format::Amr),
            t("audio/mpeg", &["mp3"], Format::Mp3),
            t("audio/mp4", &["m4a"], Format::IsoMedia),
            t("audio/ogg", &["ogg", "opus"], Format::Ogg),
        ],
    },
    MediaRule {
        kind: "video",
        max_bytes: 16 * MB,
        types: &[
            t("video/mp4", &["mp4"], Format::IsoMedia),
            t("video/3gpp", &["3gp"], Format::IsoMedia),
        ],
    },
    MediaRule {
        kind: "sticker",
        max_bytes: 100 * KB,
        types: &[t("image/webp", &["webp"], Format::Webp)],
    },
];

/// An animated sticker's limit (a static one: the table's 100 KB).
pub const ANIMATED_STICKER_MAX_BYTES: u64 = 500 * KB;

/// How many first bytes [`check_file`] needs to tell a format.
pub const SNIFF_BYTES: usize = 64;

/// The rule of a media kind (`image`, `document`, …).
pub fn rule(kind: &str) -> Option<&'static MediaRule> {
    MEDIA_RULES.iter().find(|r| r.kind == kind)
}

/// A file that fits its kind: the MIME type it is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fits {
    pub mime: &'static str,
}

/// Why a file does not fit its kind, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misfit {
    pub message: String,
    pub help: String,
}

/// Whether the file `name` (its extension), starting with `head` (at least its first
/// [`SNIFF_BYTES`], or all of it), `size` bytes long, can be sent as a `kind`.
pub fn check_file(kind: &str, name: &str, head: &[u8], size: u64) -> Result<Fits, Misfit> {
    let Some(rule) = rule(kind) else {
        return Err(Misfit {
            message: format!("`{kind}` is not a media type"),
            help: "use image, video, audio, document or sticker".into(),
        });
    };
    let accepted = || {
        rule.types
            .iter()
            .flat_map(|t| t.extensions.iter().map(|e| format!(".{e}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let Some(ty) = rule
        .types
        .iter()
        .find(|t| t.extensions.contains(&extension.as_str()))
    else {
        return Err(Misfit {
            message: format!("WhatsApp does not take `{name}` as {}", article(kind)),
            help: format!("{} files are {}", rule.kind, accepted()),
        });
    };
    let format = sniff(head);
    if format != Some(ty.format) {
        let is = match format {
            Some(f) => format!("its content is {}", f.name()),
            None => "its content is none of the types WhatsApp takes".into(),
        };
        return Err(Misfit {
            message: format!("`{name}` is named as {} but {is}", ty.format.name()),
            help: format!(
                "convert the file, or name it after what it is ({})",
                accepted()
            ),
        });
    }
    let max = if kind == "sticker" && animated_webp(head) {
        ANIMATED_STICKER_MAX_BYTES
    } else {
        rule.max_bytes
    };
    if size > max {
        return Err(Misfit {
            message: format!(
                "`{name}` has {}; WhatsApp takes {} up to {}",
                bytes(size),
                plural(kind),
                bytes(max)
            ),
            help: "make the file smaller, or send it as a link".into(),
        });
    }
    Ok(Fits { mime: ty.mime })
}

/// The format `head` starts with, if it is one WhatsApp takes.
pub fn sniff(head: &[u8]) -> Option<Format> {
    let starts = |magic: &[u8]| head.starts_with(magic);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if starts(b"RIFF") && head.get(8..12) == Some(b"WEBP") {
        Some(Format::Webp)
    } else if starts(b"%PDF-") {
        Some(Format::Pdf)
    } else if starts(b"PK\x03\x04") {
        Some(Format::Zip)
    } else if starts(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1]) {
        Some(Format::Ole)
    } else if starts(b"#!AMR") {
        Some(Format::Amr)
    } else if starts(b"OggS") {
        Some(Format::Ogg)
    } else if head.get(4..8) == Some(b"ftyp") {
        Some(Format::IsoMedia)
    } else if starts(b"ID3") {
        Some(Format::Mp3)
    } else if head.len() >= 2 && head[0] == 0xFF && head[1] & 0xF6 == 0xF0 {
        // ADTS: 12 sync bits, then layer 00.
        Some(Format::Aac)
    } else if head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0 {
        // An MPEG audio frame's 11 sync bits (layer not 00).
        Some(Format::Mp3)
    } else if !head.is_empty() && is_text(head) {
        Some(Format::Text)
    } else {
        None
    }
}

/// A WebP with an animation: the extended header's animation flag.
fn animated_webp(head: &[u8]) -> bool {
    head.get(12..16) == Some(b"VP8X") && head.get(20).is_some_and(|flags| flags & 0x02 != 0)
}

/// UTF-8 without control characters other than whitespace; a character cut at the end of
/// `head` still counts.
fn is_text(head: &[u8]) -> bool {
    let valid = match std::str::from_utf8(head) {
        Ok(s) => s,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&head[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return false,
    };
    valid.chars().all(|c| !c.is_control() || c.is_whitespace())
}

fn article(kind: &str) -> String {
    match kind {
        "image" | "audio" => format!("an {kind}"),
        _ => format!("a {kind}"),
    }
}

fn plural(kind: &str) -> String {
    match kind {
        "audio" => "audio files".into(),
        _ => format!("{kind}s"),
    }
}

/// A size for people: whole bytes, KB or MB with one decimal.
fn bytes(n: u64) -> String {
    if n >= MB {
        format!("{:.1} MB", n as f64 / MB as f64)
    } else if n >= KB {
        format!("{:.1} KB", n as f64 / KB as f64)
    } else {
        format!("{n} bytes")
    }
}

/// Reads the answer to an upload: the media id (`{"id": "…"}`), or WhatsApp's error.
pub fn parse_upload_response(status: u16, body: &[u8]) -> Result<String, GraphError> {
    let json = read_answer(status, body)?;
    json.get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            GraphError::http(
                status,
                format!("the upload's answer has no `id`: {}", snippet(body)),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JPEG: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10, b'J', b'F', b'I', b'F'];
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn every_kind_has_types_and_a_limit() {
        for kind in ["image", "document", "audio", "video", "sticker"] {
            let r = rule(kind).unwrap();
            assert!(r.max_bytes > 0 && !r.types.is_empty(), "{kind}");
        }
        assert_eq!(rule("image").unwrap().max_bytes, 5 * 1024 * 1024);
        assert_eq!(rule("sticker").unwrap().max_bytes, 100 * 1024);
    }

    #[test]
    fn a_file_fits_by_extension_content_and_size() {
        assert_eq!(
            check_file("image", "menu.JPG", JPEG, 1000),
            Ok(Fits { mime: "image/jpeg" })
        );
        assert_eq!(
            check_file("image", "a.png", PNG, 10).unwrap().mime,
            "image/png"
        );
        assert_eq!(
            check_file("document", "terms.txt", b"Terms\nand conditions", 20)
                .unwrap()
                .mime,
            "text/plain"
        );
        assert_eq!(
            check_file("video", "clip.mp4", b"\0\0\0\x18ftypmp42", 20)
                .unwrap()
                .mime,
            "video/mp4"
        );
        assert_eq!(
            check_file("audio", "note.ogg", b"OggS\0\x02", 20)
                .unwrap()
                .mime,
            "audio/ogg"
        );
    }

    #[test]
    fn misfits_say_why_and_what_to_do() {
        let e = check_file("image", "menu.gif", b"GIF89a", 10).unwrap_err();
        assert!(
            e.message.contains("does not take `menu.gif` as an image"),
            "{e:?}"
        );
        assert!(e.help.contains(".jpg, .jpeg, .png"), "{e:?}");
        let e = check_file("image", "menu.jpg", PNG, 10).unwrap_err();
        assert!(
            e.message.contains("named as JPEG but its content is PNG"),
            "{e:?}"
        );
        let e = check_file("image", "big.jpg", JPEG, 6 * 1024 * 1024).unwrap_err();
        assert!(
            e.message.contains("6.0 MB") && e.message.contains("5.0 MB"),
            "{e:?}"
        );
        let e = check_file("document", "x.pdf", &[0, 1, 2, 3], 4).unwrap_err();
        assert!(e.message.contains("none of the types"), "{e:?}");
    }

    #[test]
    fn stickers_are_static_webp_up_to_100_kb_animated_500() {
        let mut webp = b"RIFF\0\0\0\0WEBPVP8 ".to_vec();
        webp.resize(SNIFF_BYTES, 0);
        assert!(check_file("sticker", "s.webp", &webp, 100 * 1024).is_ok());
        assert!(check_file("sticker", "s.webp", &webp, 100 * 1024 + 1).is_err());
        let mut animated = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\x02".to_vec();
        animated.resize(SNIFF_BYTES, 0);
        assert!(check_file("sticker", "a.webp", &animated, 400 * 1024).is_ok());
    }

    #[test]
    fn an_upload_answers_an_id_or_an_error() {
        assert_eq!(
            parse_upload_response(200, br#"{"id":"123"}"#).unwrap(),
            "123"
        );
        assert!(parse_upload_response(200, br#"{}"#).is_err());
        let e = parse_upload_response(
            400,
            br#"{"error":{"message":"bad","type":"OAuthException","code":131053}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, MEDIA_UPLOAD_ERROR);
    }
}
