//! A thin HTTP client for sending: posts the bodies [`super::send`] builds to the Cloud API or
//! 360dialog and reads the answers with [`super::parse_send_response`].
//!
//! The only file of `whatsapp` that does I/O. It does not retry, queue or rate-limit: the
//! outbox sender (`crate::outbox`) decides that from [`GraphError::class`] and
//! [`super::retry_after`].
//!
//! One error type for everything: an answer WhatsApp gave is a [`GraphError`] with its code,
//! and a request that got no answer (connection refused, a timeout) is a [`GraphError`] with
//! origin [`super::ErrorOrigin::Transport`], which [`GraphError::class`] calls transient.
//! Credentials go only into headers and never into logs: [`Endpoint`]'s `Debug` hides them.
//!
//! [`Client::list_templates`] reads a WABA's templates for `flowgate templates sync`, page by
//! page (`paging.next`), bounded by [`MAX_TEMPLATE_PAGES`].

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::errors::{ErrorOrigin, GraphError, NO_CODE};
use super::limits::{MESSAGING_LIMIT_FIELD, MessagingLimit, parse_messaging_limit_response};
use super::media::{MediaInfo, download_url, parse_media_info};
use super::media_files::parse_upload_response;
use super::send::{
    SendOk, mark_read_body, parse_mark_read_response, parse_send_response, read_answer, snippet,
};
use super::templates::parse_templates_page;
use crate::config::{ChannelConfig, Provider};
use crate::templates::Template;

/// The Graph API version flowgate speaks (Meta's current examples).
pub const GRAPH_VERSION: &str = "v25.0";
pub const GRAPH_BASE_URL: &str = "https://graph.facebook.com";
pub const DIALOG360_BASE_URL: &str = "https://waba-v2.360dialog.io";
/// How long one request may take, connecting included, before it counts as a transport
/// failure.
pub const TIMEOUT: Duration = crate::config::REQUEST_TIMEOUT;
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The most pages [`Client::list_templates`] reads (100 templates each: far more than a WABA
/// may have), so a `paging.next` that never ends cannot hang a sync.
pub const MAX_TEMPLATE_PAGES: usize = 1_000;
/// Templates per page: a few requests even for a large WABA.
const TEMPLATE_PAGE_SIZE: usize = 100;
/// The fields a sync needs, so Meta does not send quality scores and rejection reasons too.
const TEMPLATE_FIELDS: &str = "name,language,status,category,components";

/// The name [`Client`] goes by in the outbox's docs.
pub type GraphClient = Client;

/// An HTTP client for the Graph API: rustls, pooled keep-alive connections, and the given
/// timeouts. Share one between channels; the timeouts are the only reason to build another.
pub fn http_client(connect_timeout: Duration, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("flowgate/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .expect("an HTTP client with these settings builds")
}

/// Where a channel's messages go, with its credentials.
#[derive(Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST {base_url}/{version}/{phone_number_id}/messages`, `Authorization: Bearer …`.
    CloudApi {
        base_url: String,
        version: String,
        phone_number_id: String,
        access_token: String,
    },
    /// `POST {base_url}/messages`, `D360-API-KEY: …` (the key names the number).
    Dialog360 { base_url: String, api_key: String },
}

impl Endpoint {
    /// Meta's Cloud API at `graph.facebook.com`, current version.
    pub fn cloud_api(phone_number_id: impl Into<String>, access_token: impl Into<String>) -> Self {
        Self::CloudApi {
            base_url: GRAPH_BASE_URL.into(),
            version: GRAPH_VERSION.into(),
            phone_number_id: phone_number_id.into(),
            access_token: access_token.into(),
        }
    }

    /// 360dialog's Cloud API gateway.
    pub fn dialog360(api_key: impl Into<String>) -> Self {
        Self::Dialog360 {
            base_url: DIALOG360_BASE_URL.into(),
            api_key: api_key.into(),
        }
    }

    /// A configured channel's endpoint: `api_base` (for the Cloud API it includes the
    /// version, e.g. `https://graph.facebook.com/v25.0`) or the provider's default, and its
    /// credentials. `Err` says what is missing; sandbox channels have no endpoint.
    pub fn for_channel(channel: &ChannelConfig) -> Result<Self, String> {
        let missing = |key: &str| format!("channel `{}` needs `{key}` to send", channel.name);
        let api_base = channel
            .api_base
            .as_ref()
            .map(|b| b.0.trim().to_string())
            .filter(|b| !b.is_empty());
        match channel.provider {
            Provider::CloudApi => {
                let phone_number_id = channel
                    .phone_number_id
                    .as_ref()
                    .map(|p| p.0.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| missing("phone_number_id"))?;
                let access_token = channel
                    .access_token
                    .as_ref()
                    .map(|t| t.expose().to_string())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| missing("access_token"))?;
                let (base_url, version) = match api_base {
                    Some(base) => (base, String::new()),
                    None => (GRAPH_BASE_URL.to_string(), GRAPH_VERSION.to_string()),
                };
                Ok(Self::CloudApi {
                    base_url,
                    version,
                    phone_number_id,
                    access_token,
                })
            }
            Provider::Dialog360 => {
                let api_key = channel
                    .api_key
                    .as_ref()
                    .map(|k| k.expose().to_string())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| missing("api_key"))?;
                Ok(Self::Dialog360 {
                    base_url: api_base.unwrap_or_else(|| DIALOG360_BASE_URL.to_string()),
                    api_key,
                })
            }
            Provider::Sandbox => Err(format!(
                "channel `{}` is a sandbox: its messages are not sent anywhere",
                channel.name
            )),
        }
    }

    /// The URL messages and mark-as-read are posted to. An empty `version` means `base_url`
    /// already ends with it (a configured `api_base`).
    pub fn messages_url(&self) -> String {
        match self {
            Self::CloudApi {
                base_url,
                version,
                phone_number_id,
                ..
            } if version.is_empty() => format!(
                "{}/{phone_number_id}/messages",
                base_url.trim_end_matches('/')
            ),
            Self::CloudApi {
                base_url,
                version,
                phone_number_id,
                ..
            } => format!(
                "{}/{version}/{phone_number_id}/messages",
                base_url.trim_end_matches('/')
            ),
            Self::Dialog360 { base_url, .. } => {
                format!("{}/messages", base_url.trim_end_matches('/'))
            }
        }
    }

    /// Where media is uploaded: `{base}/{version}/{phone_number_id}/media` (Cloud API),
    /// `{base}/media` (360dialog).
    pub fn upload_url(&self) -> String {
        match self {
            Self::CloudApi {
                phone_number_id, ..
            } => self
                .graph_url(&format!("{phone_number_id}/media"))
                .expect("a Cloud API endpoint has Graph URLs"),
            Self::Dialog360 { base_url, .. } => {
                format!("{}/media", base_url.trim_end_matches('/'))
            }
        }
    }

    /// `{base}/{version}/{waba_id}/message_templates`, the first page of a WABA's templates;
    /// `None` for 360dialog, whose template list flowgate does not read (see
    /// [`Client::list_templates`]).
    pub fn templates_url(&self, waba_id: &str) -> Option<String> {
        self.graph_url(&format!("{waba_id}/message_templates"))
    }

    /// `{base}/{version}/{phone_number_id}`: the number's own node (its messaging limit);
    /// `None` for 360dialog.
    pub fn phone_number_url(&self) -> Option<String> {
        match self {
            Self::CloudApi {
                phone_number_id, ..
            } => self.graph_url(phone_number_id),
            Self::Dialog360 { .. } => None,
        }
    }

    /// `{base}/{version}/{media_id}` (Cloud API) or `{base}/{media_id}` (360dialog): where
    /// a customer's file is described, with its short-lived download URL.
    pub fn media_url(&self, media_id: &str) -> String {
        match self {
            Self::CloudApi { .. } => self.graph_url(media_id).unwrap_or_default(),
            Self::Dialog360 { base_url, .. } => {
                format!("{}/{media_id}", base_url.trim_end_matches('/'))
            }
        }
    }

    /// The host a download URL is fetched through: none for the Cloud API (Meta's URL as
    /// it is), 360dialog's `api_base` for 360dialog.
    fn media_host(&self) -> Option<&str> {
        match self {
            Self::CloudApi { .. } => None,
            Self::Dialog360 { base_url, .. } => Some(base_url),
        }
    }

    /// `{base}/{version}/{path}` on the Graph API (no version when a configured `api_base`
    /// already ends with it); `None` for 360dialog.
    fn graph_url(&self, path: &str) -> Option<String> {
        match self {
            Self::CloudApi {
                base_url, version, ..
            } if version.is_empty() => Some(format!("{}/{path}", base_url.trim_end_matches('/'))),
            Self::CloudApi {
                base_url, version, ..
            } => Some(format!(
                "{}/{version}/{path}",
                base_url.trim_end_matches('/')
            )),
            Self::Dialog360 { .. } => None,
        }
    }
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CloudApi {
                base_url,
                version,
                phone_number_id,
                ..
            } => f
                .debug_struct("CloudApi")
                .field("base_url", base_url)
                .field("version", version)
                .field("phone_number_id", phone_number_id)
                .field("access_token", &"***")
                .finish(),
            Self::Dialog360 { base_url, .. } => f
                .debug_struct("Dialog360")
                .field("base_url", base_url)
                .field("api_key", &"***")
                .finish(),
        }
    }
}

/// Posts to one channel's endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    endpoint: Endpoint,
}

impl Client {
    /// With its own connection pool and the default timeouts ([`CONNECT_TIMEOUT`],
    /// [`TIMEOUT`]).
    pub fn new(endpoint: Endpoint) -> Self {
        Self::with_http(http_client(CONNECT_TIMEOUT, TIMEOUT), endpoint)
    }

    /// With a shared `reqwest::Client` (one connection pool for every channel).
    pub fn with_http(http: reqwest::Client, endpoint: Endpoint) -> Self {
        Self { http, endpoint }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends a body from [`super::message_body`] or [`super::reaction_body`].
    ///
    /// A transport failure (including a timeout) is a [`GraphError::transport`]: the message
    /// may or may not have been accepted, so a retry can deliver it twice.
    ///
    /// A refusal carries the response's `Retry-After` ([`GraphError::retry_after`]).
    pub async fn send(&self, body: &Value) -> Result<SendOk, GraphError> {
        let (status, bytes, retry_after) = self.post(body).await?;
        parse_send_response(status, &bytes).map_err(|e| e.with_retry_after(retry_after))
    }

    /// Marks `wamid` read, with the typing indicator if `typing`.
    pub async fn mark_read(&self, wamid: &str, typing: bool) -> Result<(), GraphError> {
        let (status, bytes, _) = self.post(&mark_read_body(wamid, typing)).await?;
        parse_mark_read_response(status, &bytes)
    }

    /// Uploads a file for sending by id: multipart `messaging_product=whatsapp`, `type` (its
    /// MIME type) and `file`, to [`Endpoint::upload_url`] with the channel's credentials.
    /// The media id WhatsApp answers, or its refusal (a transport failure is a
    /// [`GraphError::transport`], like a send's). `timeout` replaces the client's request
    /// timeout: a large file takes longer than a message.
    pub async fn upload_media(
        &self,
        bytes: Vec<u8>,
        mime: &str,
        file_name: &str,
        timeout: Duration,
    ) -> Result<String, GraphError> {
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name(file_name.to_string())
            .mime_str(mime)
            .map_err(|e| unsupported(format!("`{mime}` is not a MIME type: {e}")))?;
        let form = reqwest::multipart::Form::new()
            .text("messaging_product", "whatsapp")
            .text("type", mime.to_string())
            .part("file", part);
        let request = self.http.post(self.endpoint.upload_url()).timeout(timeout);
        let request = self.authorize(request.multipart(form));
        let (status, body, retry_after) = answer(request).await?;
        parse_upload_response(status, &body).map_err(|e| e.with_retry_after(retry_after))
    }

    /// Every template of the WhatsApp Business Account `waba_id`: `GET
    /// …/{waba_id}/message_templates?limit=100&fields=…`, then each `paging.next` until there
    /// is none. Templates that cannot be read are skipped and named in
    /// [`TemplateList::skipped`]; an error answer on any page fails the whole list (a partial
    /// list would look like templates Meta deleted).
    ///
    /// Bounded: at most [`MAX_TEMPLATE_PAGES`] pages, a `next` that repeats a page already read
    /// is an error, and so is a `next` on another host than `api_base` (the access token goes
    /// only where the channel's config sends it). An `access_token` in a `next` URL (Graph adds
    /// it when the first request carried one) is removed: the token goes in the header, and
    /// URLs can end up in error messages.
    ///
    /// Cloud API only. 360dialog's list (`GET /v1/configs/templates`) answers in another shape
    /// (`waba_templates`, offset paging, lowercase statuses) known only from client code, not
    /// from 360dialog's documentation, so
    /// a `dialog360` endpoint gets an error rather than a guess.
    pub async fn list_templates(&self, waba_id: &str) -> Result<TemplateList, GraphError> {
        let Some(first) = self.endpoint.templates_url(waba_id) else {
            return Err(unsupported(
                "templates sync supports cloud_api channels only: 360dialog's template list is not read by flowgate",
            ));
        };
        let mut url = reqwest::Url::parse(&first)
            .map_err(|e| unsupported(format!("the channel's api_base does not make a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("limit", &TEMPLATE_PAGE_SIZE.to_string())
            .append_pair("fields", TEMPLATE_FIELDS);
        let origin = url.origin();
        let mut list = TemplateList::default();
        let mut seen = std::collections::HashSet::new();
        loop {
            seen.insert(url.to_string());
            let (status, bytes) = self.get(url.clone()).await?;
            let page = parse_templates_page(status, &bytes)?;
            list.pages += 1;
            list.templates.extend(page.templates);
            list.skipped.extend(page.skipped);
            list.warnings.extend(page.warnings);
            let Some(next) = page.next else {
                return Ok(list);
            };
            let next = reqwest::Url::parse(&next)
                .map(without_access_token)
                .map_err(|e| unsupported(format!("`paging.next` is not a URL: {e}")))?;
            if next.origin() != origin {
                return Err(unsupported(format!(
                    "`paging.next` points at another host ({}): not sending the channel's credentials there",
                    next.host_str().unwrap_or("none")
                )));
            }
            if seen.contains(next.as_str()) {
                return Err(unsupported(format!(
                    "`paging.next` of page {} repeats a page already read: stopping",
                    list.pages
                )));
            }
            if list.pages >= MAX_TEMPLATE_PAGES {
                return Err(unsupported(format!(
                    "more than {MAX_TEMPLATE_PAGES} pages of templates: stopping"
                )));
            }
            url = next;
        }
    }

    /// The number's messaging limit as WhatsApp states it: `GET /{phone_number_id}?fields=
    /// whatsapp_business_manager_messaging_limit`. Cloud API only (360dialog's equivalent is
    /// not read).
    pub async fn messaging_limit(&self) -> Result<MessagingLimit, GraphError> {
        let Some(node) = self.endpoint.phone_number_url() else {
            return Err(unsupported(
                "the messaging limit is read from cloud_api channels only",
            ));
        };
        let mut url = reqwest::Url::parse(&node)
            .map_err(|e| unsupported(format!("the channel's api_base does not make a URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("fields", MESSAGING_LIMIT_FIELD);
        let (status, bytes) = self.get(url).await?;
        parse_messaging_limit_response(status, &bytes)
    }

    /// Where to download a customer's file and what it should be: `GET /{media_id}`.
    pub async fn media_info(&self, media_id: &str) -> Result<MediaInfo, GraphError> {
        let url = reqwest::Url::parse(&self.endpoint.media_url(media_id))
            .map_err(|e| unsupported(format!("the channel's api_base does not make a URL: {e}")))?;
        let (status, bytes) = self.get(url).await?;
        parse_media_info(status, &bytes)
    }

    /// Downloads a file from the `url` [`Client::media_info`] gave, with the channel's
    /// credentials (for 360dialog through its own host, see [`super::media::download_url`]).
    /// Refuses a file over `max_bytes` by its `Content-Length` before reading it, and stops
    /// reading as soon as the bytes pass it (a length can be absent or wrong).
    pub async fn download(&self, url: &str, max_bytes: u64) -> Result<Vec<u8>, DownloadError> {
        let url = download_url(url, self.endpoint.media_host())
            .map_err(|e| DownloadError::Failed(unsupported(e)))?;
        let transport = |e: reqwest::Error| {
            DownloadError::Failed(GraphError::transport(transport_message(&e.without_url())))
        };
        let mut response = self
            .authorize(self.http.get(url))
            .send()
            .await
            .map_err(transport)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let bytes = response.bytes().await.map_err(transport)?;
            return Err(DownloadError::Failed(
                read_answer(status, &bytes)
                    .err()
                    .unwrap_or_else(|| GraphError::http(status, snippet(&bytes))),
            ));
        }
        if let Some(length) = response.content_length()
            && length > max_bytes
        {
            return Err(DownloadError::TooLarge { size: length });
        }
        let mut bytes = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(DownloadError::TooLarge {
                    size: (bytes.len() + chunk.len()) as u64,
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }

    async fn get(&self, url: reqwest::Url) -> Result<(u16, Vec<u8>), GraphError> {
        let request = self.authorize(self.http.get(url));
        // `without_url`: a `next` URL is Meta's to shape, so it stays out of error text.
        let response = request
            .send()
            .await
            .map_err(|e| GraphError::transport(transport_message(&e.without_url())))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| GraphError::transport(transport_message(&e.without_url())))?;
        Ok((status, bytes.to_vec()))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.endpoint {
            Endpoint::CloudApi { access_token, .. } => request.bearer_auth(access_token),
            Endpoint::Dialog360 { api_key, .. } => request.header("D360-API-KEY", api_key),
        }
    }

    /// Posts `body`: the status, the body and the `Retry-After`.
    async fn post(&self, body: &Value) -> Result<(u16, Vec<u8>, Option<Duration>), GraphError> {
        let request = self.authorize(self.http.post(self.endpoint.messages_url()).json(body));
        answer(request).await
    }
}

/// Sends `request` and reads WhatsApp's answer whole: its status, its body and its
/// `Retry-After`; a failure to connect or to read is a transport error.
async fn answer(
    request: reqwest::RequestBuilder,
) -> Result<(u16, Vec<u8>, Option<Duration>), GraphError> {
    let response = request
        .send()
        .await
        .map_err(|e| GraphError::transport(transport_message(&e)))?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let body = response
        .bytes()
        .await
        .map_err(|e| GraphError::transport(transport_message(&e)))?;
    Ok((status, body.to_vec(), retry_after))
}

/// The longest `Retry-After` honoured: a longer one (or a mistake) waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(15 * 60);

/// A `Retry-After` header's delay: whole seconds, at most [`MAX_RETRY_AFTER`]. The HTTP-date
/// form is not read (`None`: the sender's own back-off applies).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// Why [`Client::download`] brought no file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    /// The file is larger than allowed (`size`: as far as it was read, or as announced).
    #[error("the file has more than the allowed bytes ({size} or more)")]
    TooLarge { size: u64 },
    /// No answer, an error answer, or an expired URL: worth another try with a new URL.
    #[error(transparent)]
    Failed(GraphError),
}

/// Every template [`Client::list_templates`] read, over all pages.
#[derive(Debug, Clone, Default)]
pub struct TemplateList {
    pub templates: Vec<Template>,
    /// Templates left out, each named with the reason.
    pub skipped: Vec<String>,
    /// Notes about templates that were read (an unknown status, a component left out).
    pub warnings: Vec<String>,
    /// How many pages were read.
    pub pages: usize,
}

/// A list request flowgate refuses or cannot follow; no WhatsApp answer behind it.
fn unsupported(message: impl Into<String>) -> GraphError {
    GraphError {
        code: NO_CODE,
        title: None,
        message: message.into(),
        details: None,
        fbtrace_id: None,
        http_status: None,
        origin: ErrorOrigin::Http,
        retry_after_secs: None,
    }
}

/// `url` without an `access_token` query parameter.
fn without_access_token(mut url: reqwest::Url) -> reqwest::Url {
    if !url.query_pairs().any(|(k, _)| k == "access_token") {
        return url;
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "access_token")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    url.set_query(None);
    if !kept.is_empty() {
        url.query_pairs_mut().extend_pairs(kept);
    }
    url
}

/// reqwest's error with its causes ("error sending request…: connection refused").
fn transport_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_url_follows_api_base() {
        let mut endpoint = Endpoint::cloud_api("110", "t");
        assert_eq!(
            endpoint.templates_url("100").as_deref(),
            Some("https://graph.facebook.com/v25.0/100/message_templates")
        );
        if let Endpoint::CloudApi {
            base_url, version, ..
        } = &mut endpoint
        {
            *base_url = "http://127.0.0.1:9/v23.0/".into();
            version.clear();
        }
        assert_eq!(
            endpoint.templates_url("100").as_deref(),
            Some("http://127.0.0.1:9/v23.0/100/message_templates")
        );
        assert_eq!(Endpoint::dialog360("k").templates_url("100"), None);
    }

    #[test]
    fn media_url_follows_the_provider() {
        assert_eq!(
            Endpoint::cloud_api("110", "t").upload_url(),
            "https://graph.facebook.com/v25.0/110/media"
        );
        assert_eq!(
            Endpoint::dialog360("k").upload_url(),
            "https://waba-v2.360dialog.io/media"
        );
    }

    #[test]
    fn next_links_lose_their_access_token() {
        let url = reqwest::Url::parse(
            "https://graph.facebook.com/v25.0/100/message_templates?access_token=SECRET&limit=100&after=MjQZD",
        )
        .unwrap();
        let stripped = without_access_token(url);
        assert_eq!(
            stripped.as_str(),
            "https://graph.facebook.com/v25.0/100/message_templates?limit=100&after=MjQZD"
        );
        assert!(!stripped.as_str().contains("SECRET"));
    }

    #[test]
    fn retry_after_is_whole_seconds_capped() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("86400"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("1.5"), None);
    }

    #[tokio::test]
    async fn dialog360_is_refused_without_a_request() {
        let client = Client::new(Endpoint::Dialog360 {
            base_url: "http://127.0.0.1:9".into(),
            api_key: "k".into(),
        });
        let e = client.list_templates("100").await.unwrap_err();
        assert!(e.message.contains("cloud_api channels only"), "{e}");
    }
}
