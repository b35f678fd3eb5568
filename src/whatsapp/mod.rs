//! The only module that knows the WhatsApp Graph API's JSON (Cloud API, and 360dialog, which
//! forwards the same bodies).
//!
//! | file | owns | does I/O? |
//! | --- | --- | --- |
//! | [`webhook`] | webhook POST bodies -> [`Update`]s (messages, system messages, statuses, errors, template status, marketing preferences, anything else as `Unknown`), dedupe keys | no |
//! | [`signature`] | `X-Hub-Signature-256` HMAC check and 360dialog's shared-secret header, both constant-time | no |
//! | [`send`] | request bodies for `POST …/messages` (messages, with the outbox's idempotency key or without, reactions, mark-as-read) and reading the responses | no |
//! | [`templates`] | one page of `GET /{waba_id}/message_templates` -> registry [`crate::templates::Template`]s (status mapping, media headers, skipped templates named) | no |
//! | [`media_files`] | the media WhatsApp takes (one table of kinds, types and sizes), what a file is (extension and first bytes), the answer to a media upload | no |
//! | [`limits`] | a number's messaging limit (`whatsapp_business_manager_messaging_limit` tiers) | no |
//! | [`media`] | the answer of `GET /{media-id}` (a customer's file: its short-lived URL, type, SHA-256, size) and the download URL per provider (360dialog: rewritten onto its host) | no |
//! | [`errors`] | [`GraphError`], what each error code means for the sender ([`ErrorClass`]) and the retry schedule | no |
//! | [`client`] | a thin HTTP client that posts those bodies to the Cloud API or 360dialog, uploads media, reads every page of a WABA's templates and a number's messaging limit, and downloads customers' files (size-limited, streamed) | **yes** |
//!
//! Everything except `client` is pure: it takes bytes and values and returns values, so the
//! webhook receiver, the outbox sender and the tests share one translation.

pub mod client;
pub mod errors;
pub mod limits;
pub mod media;
pub mod media_files;
pub mod send;
pub mod signature;
pub mod templates;
pub mod webhook;

pub use client::{Client, DownloadError, Endpoint, MAX_TEMPLATE_PAGES, TemplateList};
pub use errors::{ErrorClass, ErrorOrigin, GraphError, classify, retry_after};
pub use limits::{MessagingLimit, parse_tier};
pub use media::{MediaInfo, parse_media_info};
pub use send::{
    Recipient, SendOk, mark_read_body, message_body, message_body_with_key,
    parse_mark_read_response, parse_send_response, reaction_body,
};
pub use signature::{SignatureError, verify_shared_secret, verify_signature};
pub use templates::{TemplatePage, parse_templates_page};
pub use webhook::{Preference, Referral, StatusKind, Update, WebhookError, parse_webhook};
