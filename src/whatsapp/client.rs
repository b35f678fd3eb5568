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

use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::errors::GraphError;
use super::send::{SendOk, mark_read_body, parse_mark_read_response, parse_send_response};
use crate::config::{ChannelConfig, Provider};

/// The Graph API version flowgate speaks (Meta's current examples).
pub const GRAPH_VERSION: &str = "v25.0";
pub const GRAPH_BASE_URL: &str = "https://graph.facebook.com";
pub const DIALOG360_BASE_URL: &str = "https://waba-v2.360dialog.io";
/// How long one request may take, connecting included, before it counts as a transport
/// failure.
pub const TIMEOUT: Duration = Duration::from_secs(15);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    pub async fn send(&self, body: &Value) -> Result<SendOk, GraphError> {
        let (status, bytes) = self.post(body).await?;
        parse_send_response(status, &bytes)
    }

    /// Marks `wamid` read, with the typing indicator if `typing`.
    pub async fn mark_read(&self, wamid: &str, typing: bool) -> Result<(), GraphError> {
        let (status, bytes) = self.post(&mark_read_body(wamid, typing)).await?;
        parse_mark_read_response(status, &bytes)
    }

    async fn post(&self, body: &Value) -> Result<(u16, Vec<u8>), GraphError> {
        let request = self.http.post(self.endpoint.messages_url()).json(body);
        let request = match &self.endpoint {
            Endpoint::CloudApi { access_token, .. } => request.bearer_auth(access_token),
            Endpoint::Dialog360 { api_key, .. } => request.header("D360-API-KEY", api_key),
        };
        let response = request
            .send()
            .await
            .map_err(|e| GraphError::transport(transport_message(&e)))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| GraphError::transport(transport_message(&e)))?;
        Ok((status, bytes.to_vec()))
    }
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
