//! `flowgate.yaml`: where the database, flows, scripts, templates and campaigns are, which
//! channels exist, and the policy settings (every key: `examples/flowgate.yaml`).
//!
//! Without a file every key has a default that runs the repository's example flows on the
//! sandbox channel and a SQLite file, so a newcomer sees flowgate work with one command.
//! Unknown keys are errors with their location; `${VAR}` is read from the environment;
//! secrets never print.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::diagnostic::{Diagnostic, Diagnostics};
use crate::domain::HumanDuration;
use crate::yaml::{self, EnvString, Secret};

pub const DEFAULT_CONFIG_FILE: &str = "flowgate.yaml";

#[derive(Debug, Clone)]
pub struct Config {
    pub database: String,
    pub listen: String,
    /// Directory of `*.yaml` flows, read recursively.
    pub flows: PathBuf,
    pub scripts: PathBuf,
    pub templates: PathBuf,
    /// Directory of `*.yaml` campaigns, read recursively; a missing one means no campaigns.
    pub campaigns: PathBuf,
    pub channels: Vec<ChannelConfig>,
    pub policy: PolicyConfig,
    pub fallback: Option<String>,
    pub admin: AdminConfig,
    pub outbox: OutboxConfig,
    /// Who may use `POST /sandbox/messages`.
    pub sandbox: SandboxAccess,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    /// Files customers send: how large, where they are kept, how flows link to them.
    pub media: MediaConfig,
    /// What a message costs, for the campaigns' reports (none: charged messages counted).
    pub campaign_prices: Option<CampaignPrices>,
    /// `retention:`: how long settled messages are kept (none: for ever); see `retention`.
    pub retention: Option<HumanDuration>,
    /// The config file this came from, if any.
    pub file: Option<PathBuf>,
    /// The project's directory (the config file's): the project files flows send
    /// (`media: {file: …}`) are relative to it.
    pub root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    CloudApi,
    Dialog360,
    Sandbox,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    pub provider: Provider,
    #[serde(default)]
    pub phone_number_id: Option<EnvString>,
    #[serde(default)]
    pub waba_id: Option<EnvString>,
    #[serde(default)]
    pub access_token: Option<Secret>,
    #[serde(default)]
    pub app_secret: Option<Secret>,
    #[serde(default)]
    pub verify_token: Option<Secret>,
    /// 360dialog's API key, sent as `D360-API-KEY`.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// The secret header 360dialog sends with webhooks.
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
    #[serde(default)]
    pub api_base: Option<EnvString>,
    #[serde(default = "default_throughput")]
    pub throughput_mps: u32,
    /// Unique business-initiated recipients (templates) per rolling 24 h, as WhatsApp
    /// limits the number; campaigns defer recipients past it. `None`: unlimited.
    #[serde(default)]
    pub messaging_limit: Option<u32>,
}

fn default_throughput() -> u32 {
    80
}

impl ChannelConfig {
    pub fn sandbox(name: &str) -> Self {
        Self {
            name: name.to_string(),
            provider: Provider::Sandbox,
            phone_number_id: None,
            waba_id: None,
            access_token: None,
            app_secret: None,
            verify_token: None,
            api_key: None,
            webhook_secret: None,
            api_base: None,
            throughput_mps: default_throughput(),
            messaging_limit: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "default_window", deserialize_with = "duration")]
    pub window: HumanDuration,
    #[serde(default = "default_margin", deserialize_with = "duration")]
    pub safety_margin: HumanDuration,
    #[serde(default = "default_queue_ttl", deserialize_with = "duration")]
    pub queue_ttl: HumanDuration,
    #[serde(default = "default_opt_out")]
    pub opt_out_keywords: Vec<String>,
    #[serde(default = "default_opt_in")]
    pub opt_in_keywords: Vec<String>,
    #[serde(default)]
    pub opt_out_reply: Option<String>,
    #[serde(default)]
    pub opt_in_reply: Option<String>,
    /// Templates for free-form messages outside the window whose step names no
    /// `outside_window`; the first matching rule wins.
    #[serde(default)]
    pub outside_window: Vec<FallbackTemplate>,
}

/// A policy-level rewrite (`policy.outside_window[]`): messages from `flow` and/or of
/// `origin` (`step`, `script`, `agent`, `system`, `error`) become this template outside the
/// window. Parameters may use `{{text}}` (the message's text), `{{contact.name}}`,
/// `{{contact.wa_id}}` and `{{contact.attrs.KEY}}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FallbackTemplate {
    #[serde(default)]
    pub flow: Option<String>,
    #[serde(default)]
    pub origin: Option<String>,
    pub template: String,
    pub language: String,
    #[serde(default)]
    pub params: Vec<String>,
}

fn default_window() -> HumanDuration {
    HumanDuration(chrono::Duration::hours(24))
}
fn default_margin() -> HumanDuration {
    HumanDuration(chrono::Duration::minutes(2))
}
fn default_queue_ttl() -> HumanDuration {
    HumanDuration(chrono::Duration::days(7))
}
fn default_opt_out() -> Vec<String> {
    vec!["STOP".into(), "UNSUBSCRIBE".into()]
}
fn default_opt_in() -> Vec<String> {
    vec!["START".into()]
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            window: default_window(),
            safety_margin: default_margin(),
            queue_ttl: default_queue_ttl(),
            opt_out_keywords: default_opt_out(),
            opt_in_keywords: default_opt_in(),
            opt_out_reply: None,
            opt_in_reply: None,
            outside_window: Vec::new(),
        }
    }
}

/// Deserializes a [`HumanDuration`] from text such as `24h`.
pub fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(serde::de::Error::custom)
}

/// Deserializes an optional [`HumanDuration`] (`retention: 90d`; `~` is none).
fn optional_duration<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<HumanDuration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// How the outbox sender works (defaults suit production).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// How long a sender owns a claimed message. After a crash, a message whose send may or
    /// may not have reached WhatsApp waits this long for the `sent` status webhook (which
    /// settles it) before it is sent again.
    #[serde(default = "default_lease", deserialize_with = "duration")]
    pub lease: HumanDuration,
    /// Pace each recipient ahead of Meta's pair limit (a burst, then one per 6 s). `false`
    /// sends as fast as the channel allows and backs off only when WhatsApp answers `131056`
    /// (load tests against a fake Graph API).
    #[serde(default = "default_true")]
    pub pace_recipients: bool,
    /// How long WhatsApp keeps a project file the sender uploaded (30 days).
    #[serde(default = "default_media_expiry", deserialize_with = "duration")]
    pub media_expiry: HumanDuration,
    /// Upload a project file again this long before its upload expires (1 day).
    #[serde(default = "default_media_renew_before", deserialize_with = "duration")]
    pub media_renew_before: HumanDuration,
}

fn default_media_expiry() -> HumanDuration {
    HumanDuration(chrono::Duration::days(30))
}

fn default_media_renew_before() -> HumanDuration {
    HumanDuration(chrono::Duration::days(1))
}

/// 60 s: a status settles an ambiguous row as soon as it arrives (measured in the crash
/// test: 0.2-0.3 s from acceptance, restarts included, with the fake posting after 0.2 s),
/// so the lease only decides when a row no status settles is sent again. Too short, and a
/// status delayed by WhatsApp's redelivery after our downtime comes too late (a
/// duplicate); too long, and a send that never reached WhatsApp waits (see ARCHITECTURE.md).
fn default_lease() -> HumanDuration {
    HumanDuration(chrono::Duration::seconds(60))
}

fn default_true() -> bool {
    true
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            pace_recipients: true,
            media_expiry: default_media_expiry(),
            media_renew_before: default_media_renew_before(),
        }
    }
}

/// `media:`: files customers send, downloaded in the background.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MediaConfig {
    /// The largest file downloaded (bytes): a larger one is refused (`too_large`) by its
    /// announced size, or as soon as its bytes pass this.
    #[serde(default = "default_media_max_bytes")]
    pub max_bytes: u64,
    /// Where the local media store keeps files (relative to the config file).
    #[serde(default = "default_media_dir")]
    pub dir: PathBuf,
    /// The base of the links flows get (`photo.url`), e.g. `https://bot.example.com`; by
    /// default the server's own listener (reachable from this machine only).
    #[serde(default)]
    pub public_url: Option<EnvString>,
    /// How long a link works.
    #[serde(default = "default_media_url_ttl", deserialize_with = "duration")]
    pub url_ttl: HumanDuration,
    /// The key that signs links; without one, a key generated once and kept in the
    /// database (shared by every instance on it).
    #[serde(default)]
    pub url_secret: Option<Secret>,
    /// How long uploading a project file a message sends (`media: {file: …}`) may take:
    /// a file of many megabytes needs more than a message's 15 s. It runs while the sender
    /// holds the message's claim, so it must fit in `outbox.lease` with the send after it.
    /// Unset: [`MediaConfig::upload_timeout`] derives it from the lease.
    #[serde(default, deserialize_with = "optional_duration")]
    pub upload_timeout: Option<HumanDuration>,
}

impl MediaConfig {
    /// The upload timeout in force: the configured one, else 30 s or what `lease` leaves
    /// after the send ([`SEND_AFTER_UPLOAD`]) when that is less (at least 1 s: a config
    /// with a lease that short sends no large files).
    pub fn upload_timeout(&self, lease: chrono::Duration) -> chrono::Duration {
        match &self.upload_timeout {
            Some(set) => set.0,
            None => (lease - SEND_AFTER_UPLOAD)
                .clamp(chrono::Duration::seconds(1), DEFAULT_UPLOAD_TIMEOUT.0),
        }
    }
}

/// 16 MiB: WhatsApp's largest image, audio and video files, and most documents.
fn default_media_max_bytes() -> u64 {
    16 * 1024 * 1024
}

fn default_media_dir() -> PathBuf {
    PathBuf::from("data/media")
}

fn default_media_url_ttl() -> HumanDuration {
    HumanDuration(chrono::Duration::hours(1))
}

/// 30 s: a 16 MiB video at about 5 Mbit/s, and room in the default 60 s `outbox.lease` for
/// the send after it ([`SEND_AFTER_UPLOAD`]).
const DEFAULT_UPLOAD_TIMEOUT: HumanDuration = HumanDuration(chrono::Duration::seconds(30));

/// How long one Graph API request may take, connecting included (`whatsapp::client::TIMEOUT`,
/// a send's by default). Defined here, where the config's checks need it: the client and
/// the outbox import the config, not the other way.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// How long mark-as-read may hold back a reply, by default
/// (`outbox::SenderOptions::mark_read_timeout`).
pub const MARK_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// What a send needs of its message's lease: its `request` and `mark_read` timeouts, and
/// 5 s to record the outcome. The sender keeps it as its lease margin
/// (`outbox::Sender::lease_margin`, with its options' timeouts); an upload must leave it
/// ([`SEND_AFTER_UPLOAD`]).
pub const fn send_margin(
    request: std::time::Duration,
    mark_read: std::time::Duration,
) -> std::time::Duration {
    request
        .saturating_add(mark_read)
        .saturating_add(std::time::Duration::from_secs(5))
}

/// What a message's lease must still hold after its file's upload: the send's margin with
/// the default timeouts ([`send_margin`], 23 s).
pub const SEND_AFTER_UPLOAD: chrono::Duration =
    match chrono::Duration::from_std(send_margin(REQUEST_TIMEOUT, MARK_READ_TIMEOUT)) {
        Ok(margin) => margin,
        Err(_) => panic!("the send margin fits a chrono::Duration"),
    };

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_media_max_bytes(),
            dir: default_media_dir(),
            public_url: None,
            url_ttl: default_media_url_ttl(),
            url_secret: None,
            upload_timeout: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub token: Option<Secret>,
}

/// `sandbox:`: who may play a customer through `POST /sandbox/messages`, which runs flows
/// (scripts, `http` steps) for whoever calls it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxAccess {
    /// The door is closed (404).
    Off,
    /// Open on a loopback listener; on any other, the admin token, checked like `/api`.
    #[default]
    Token,
    /// Anyone who reaches the listener.
    Public,
}

/// `metrics:`: who may read `/metrics`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// A bearer token for `/metrics` alone (a scraper need not hold the admin token).
    /// Without one, `/metrics` is open on a loopback listener and needs the admin token on
    /// any other.
    #[serde(default)]
    pub token: Option<Secret>,
}

/// `campaign_prices:`: the price of one charged message per template category, for a
/// run's cost estimate (`marketing: 0.0612`, `utility: 0.0243`, `currency: EUR`). WhatsApp
/// charges per delivered template by category and the recipient's country; one price per
/// category is an estimate, which is what a report gives. A category without a price is
/// counted, not priced.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CampaignPrices {
    #[serde(default)]
    pub marketing: Option<f64>,
    #[serde(default)]
    pub utility: Option<f64>,
    #[serde(default)]
    pub authentication: Option<f64>,
    /// The currency of the prices (a label: `EUR`, `USD`).
    pub currency: String,
}

/// `log:`: how the server's log is written on stderr.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
}

/// `log.format`: `text` (default; one line per event, control characters escaped) or
/// `json` (one JSON object per line, for log collectors).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `limits:`: what keeps one customer's turn from hurting the others.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-clock time one script or `if:` expression may run (`250ms`, `1s`), besides
    /// its operation count; a script stopped by it fails like any script error.
    #[serde(
        default = "default_script_timeout",
        deserialize_with = "short_duration"
    )]
    pub script_timeout: std::time::Duration,
    /// Messages one turn may send; the next one is replaced by the apology and the
    /// conversation ends (a `goto` loop that sends).
    #[serde(default = "default_messages_per_turn")]
    pub messages_per_turn: usize,
}

fn default_script_timeout() -> std::time::Duration {
    crate::script::DEFAULT_TIMEOUT
}

fn default_messages_per_turn() -> usize {
    crate::engine::DEFAULT_MESSAGES_PER_TURN
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            script_timeout: default_script_timeout(),
            messages_per_turn: default_messages_per_turn(),
        }
    }
}

/// `250ms`, or a duration like `2s` or `1m`.
fn short_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
    let text = String::deserialize(d)?;
    let wrong = || {
        serde::de::Error::custom(format!(
            "`{text}` is not a duration: write milliseconds like `250ms` or seconds like `2s`"
        ))
    };
    if let Some(ms) = text.trim().strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|_| wrong());
    }
    let parsed: HumanDuration = text.parse().map_err(|_| wrong())?;
    parsed.0.to_std().map_err(|_| wrong())
}

/// The file's shape; every key optional so a partial file keeps the other defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    database: Option<EnvString>,
    listen: Option<EnvString>,
    flows: Option<String>,
    scripts: Option<String>,
    templates: Option<String>,
    campaigns: Option<String>,
    channels: Option<Vec<ChannelConfig>>,
    policy: Option<PolicyConfig>,
    fallback: Option<String>,
    admin: Option<AdminConfig>,
    outbox: Option<OutboxConfig>,
    sandbox: Option<SandboxAccess>,
    metrics: Option<MetricsConfig>,
    log: Option<LogConfig>,
    limits: Option<LimitsConfig>,
    media: Option<MediaConfig>,
    campaign_prices: Option<CampaignPrices>,
    #[serde(default, deserialize_with = "optional_duration")]
    retention: Option<HumanDuration>,
}

/// Every key `flowgate.yaml` accepts, as dotted paths (`policy.outside_window.template`;
/// a list's entries add no segment). The names come from the same serde shapes that refuse
/// unknown keys and suggest the nearest one, so this list cannot drift from what loads;
/// only which key holds which section is written here. `examples/flowgate.yaml` must show
/// every one (a test checks).
pub fn keys() -> Vec<String> {
    let sections: [(&str, &[&str]); 10] = [
        ("", fields::<RawConfig>()),
        ("channels", fields::<ChannelConfig>()),
        ("policy", fields::<PolicyConfig>()),
        ("policy.outside_window", fields::<FallbackTemplate>()),
        ("admin", fields::<AdminConfig>()),
        ("outbox", fields::<OutboxConfig>()),
        ("metrics", fields::<MetricsConfig>()),
        ("log", fields::<LogConfig>()),
        ("limits", fields::<LimitsConfig>()),
        ("media", fields::<MediaConfig>()),
    ];
    let mut keys = Vec::new();
    for (section, names) in sections {
        for name in names {
            keys.push(match section {
                "" => name.to_string(),
                _ => format!("{section}.{name}"),
            });
        }
    }
    keys
}

/// The field names serde's derive gives a struct (what `deny_unknown_fields` accepts):
/// asked of the derived `Deserialize` with a deserializer that only listens.
fn fields<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::{Error as _, Visitor};
    struct Listener<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Listener<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0.set(fields);
            Err(Self::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let found = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Listener(&found));
    found.get()
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database: "sqlite://data/flowgate.db".into(),
            listen: "127.0.0.1:8080".into(),
            flows: "flows".into(),
            scripts: "scripts".into(),
            templates: "templates.yaml".into(),
            campaigns: "campaigns".into(),
            channels: vec![ChannelConfig::sandbox("sandbox")],
            policy: PolicyConfig::default(),
            fallback: None,
            admin: AdminConfig::default(),
            outbox: OutboxConfig::default(),
            sandbox: SandboxAccess::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            limits: LimitsConfig::default(),
            media: MediaConfig::default(),
            campaign_prices: None,
            retention: None,
            file: None,
            root: PathBuf::new(),
        }
    }
}

impl Config {
    /// Loads `path`; when `path` is the default name and no such file exists, the defaults.
    /// A path the user named explicitly must exist.
    pub fn load(path: Option<&Path>) -> Result<Config, Box<Diagnostics>> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(e) => {
                let mut diags = Diagnostics::default();
                diags.push(Diagnostic::error(
                    &file,
                    None,
                    format!("cannot read the config: {e}"),
                ));
                return Err(Box::new(diags));
            }
        };
        Self::from_str(&file, &text, path.parent().unwrap_or(Path::new("")))
    }

    /// Parses config text; relative paths in it are relative to `base` (the file's directory).
    pub fn from_str(file: &str, text: &str, base: &Path) -> Result<Config, Box<Diagnostics>> {
        let mut diags = Diagnostics::default();
        diags.add_source(file, Arc::from(text));
        let raw: RawConfig = if text.trim().is_empty() {
            serde_saphyr::from_str("{}").expect("empty config parses")
        } else {
            match yaml::parse(file, text) {
                Ok(raw) => raw,
                Err(d) => {
                    diags.push(*d);
                    return Err(Box::new(diags));
                }
            }
        };
        let defaults = Config::default();
        let resolve = |p: Option<String>, default: PathBuf| match p {
            Some(p) => base.join(p),
            None if base.as_os_str().is_empty() => default,
            None => base.join(default),
        };
        let config = Config {
            database: raw.database.map(|s| s.0).unwrap_or(defaults.database),
            listen: raw.listen.map(|s| s.0).unwrap_or(defaults.listen),
            flows: resolve(raw.flows, defaults.flows),
            scripts: resolve(raw.scripts, defaults.scripts),
            templates: resolve(raw.templates, defaults.templates),
            campaigns: resolve(raw.campaigns, defaults.campaigns),
            channels: raw.channels.unwrap_or(defaults.channels),
            policy: raw.policy.unwrap_or_default(),
            fallback: raw.fallback,
            admin: raw.admin.unwrap_or_default(),
            outbox: raw.outbox.unwrap_or_default(),
            sandbox: raw.sandbox.unwrap_or_default(),
            metrics: raw.metrics.unwrap_or_default(),
            log: raw.log.unwrap_or_default(),
            limits: raw.limits.unwrap_or_default(),
            media: {
                let mut media = raw.media.unwrap_or_default();
                media.dir = resolve(Some(media.dir.display().to_string()), PathBuf::new());
                media
            },
            campaign_prices: raw.campaign_prices,
            retention: raw.retention,
            file: Some(PathBuf::from(file)),
            root: base.to_path_buf(),
        };
        for problem in config.problems() {
            diags.push(Diagnostic::error(file, None, problem));
        }
        if diags.has_errors() {
            return Err(Box::new(diags));
        }
        Ok(config)
    }

    /// How the outbox senders upload project files: from [`Config::root`], with the
    /// `outbox.media_*` durations.
    pub fn upload_options(&self) -> crate::media::upload::UploadOptions {
        let std = |d: &HumanDuration, default: u64| {
            d.0.to_std()
                .unwrap_or(std::time::Duration::from_secs(default))
        };
        let defaults = crate::media::upload::UploadOptions::default();
        let timeout = std(
            &HumanDuration(self.media.upload_timeout(self.outbox.lease.0)),
            30,
        );
        crate::media::upload::UploadOptions {
            root: self.root.clone(),
            expiry: std(&self.outbox.media_expiry, 30 * 24 * 3600),
            renew_before: std(&self.outbox.media_renew_before, 24 * 3600),
            timeout,
            // A claim outlasts its upload, so no other instance takes it over meanwhile.
            lease: (timeout + std::time::Duration::from_secs(60)).max(defaults.lease),
            ..defaults
        }
    }

    /// Consistency rules serde cannot express.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.limits.messages_per_turn == 0 {
            problems.push("`limits.messages_per_turn` is 0: a turn could send nothing; write 1 or more (default 10)".into());
        }
        if self.limits.script_timeout.is_zero() {
            problems.push(
                "`limits.script_timeout` is 0: every script would stop at once; write e.g. `250ms`"
                    .into(),
            );
        }
        if let Some(retention) = &self.retention
            && retention.0 < crate::retention::MINIMUM
        {
            problems.push(format!(
                "`retention: {retention}` is shorter than {} days: WhatsApp redelivers a webhook for up to 7 days, and a redelivered message is recognised by the history; write e.g. `90d`",
                crate::retention::MINIMUM.num_days()
            ));
        }
        // Only a value written in the config is checked: the default fits the lease.
        let room = self.outbox.lease.0 - SEND_AFTER_UPLOAD;
        if let Some(upload) = &self.media.upload_timeout
            && upload.0 <= chrono::Duration::zero()
        {
            problems.push(format!(
                "`media.upload_timeout: {upload}` leaves no time to upload a file; write e.g. `30s`"
            ));
        } else if let Some(upload) = &self.media.upload_timeout
            && upload.0 > room
        {
            problems.push(format!(
                "`media.upload_timeout: {upload}` does not fit in `outbox.lease: {}`: a file is uploaded while the sender holds the message's lease, and the send after it needs {}s more; write at most {}s, or raise `outbox.lease`",
                self.outbox.lease,
                SEND_AFTER_UPLOAD.num_seconds(),
                room.num_seconds().max(0)
            ));
        }
        if let Some(prices) = &self.campaign_prices {
            for (key, price) in [
                ("marketing", prices.marketing),
                ("utility", prices.utility),
                ("authentication", prices.authentication),
            ] {
                if price.is_some_and(|p| !p.is_finite() || p < 0.0) {
                    problems.push(format!(
                        "`campaign_prices.{key}` must be a price of 0 or more, e.g. `0.0612`"
                    ));
                }
            }
        }
        if self.channels.is_empty() {
            problems
                .push("no channels: add at least one (provider: sandbox needs no account)".into());
        }
        for (i, c) in self.channels.iter().enumerate() {
            if self.channels[..i].iter().any(|o| o.name == c.name) {
                problems.push(format!(
                    "two channels are named `{}`: names must be unique",
                    c.name
                ));
            }
            let missing =
                |what: &str| format!("channel `{}` ({:?}) needs `{what}`", c.name, c.provider);
            match c.provider {
                Provider::CloudApi => {
                    for (key, present) in [
                        ("phone_number_id", c.phone_number_id.is_some()),
                        ("access_token", c.access_token.is_some()),
                        ("app_secret", c.app_secret.is_some()),
                        ("verify_token", c.verify_token.is_some()),
                    ] {
                        if !present {
                            problems.push(missing(key));
                        }
                    }
                }
                Provider::Dialog360 => {
                    if c.api_key.is_none() {
                        problems.push(missing("api_key"));
                    }
                }
                Provider::Sandbox => {}
            }
        }
        problems
    }

    /// The channel conversations use when none is named: the first one.
    pub fn default_channel(&self) -> &ChannelConfig {
        &self.channels[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_defaults() {
        let c = Config::from_str("flowgate.yaml", "", Path::new("")).unwrap();
        assert_eq!(c.database, "sqlite://data/flowgate.db");
        assert_eq!(c.flows, PathBuf::from("flows"));
        assert_eq!(c.campaigns, PathBuf::from("campaigns"));
        assert_eq!(c.default_channel().provider, Provider::Sandbox);
        assert_eq!(c.policy.window.0, chrono::Duration::hours(24));
    }

    #[test]
    fn unknown_keys_are_errors_with_location() {
        let text = "database: \"sqlite::memory:\"\npolicy:\n  window: 24h\n  windoe: 2h\n";
        let err = Config::from_str("flowgate.yaml", text, Path::new("")).unwrap_err();
        let d = &err.items[0];
        assert_eq!(d.position(), "flowgate.yaml:4:3");
        assert!(
            d.message.contains("unknown field `windoe`"),
            "{}",
            d.message
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = Config::from_str("x/flowgate.yaml", "flows: my_flows\n", Path::new("x")).unwrap();
        assert_eq!(c.flows, PathBuf::from("x/my_flows"));
        assert_eq!(c.scripts, PathBuf::from("x/scripts"));
        assert_eq!(c.campaigns, PathBuf::from("x/campaigns"));
    }

    #[test]
    fn cloud_api_channel_needs_its_credentials() {
        let text = "channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: '1'\n";
        let err = Config::from_str("f.yaml", text, Path::new("")).unwrap_err();
        assert!(
            err.items
                .iter()
                .any(|d| d.message.contains("needs `access_token`"))
        );
    }

    #[test]
    fn sandbox_metrics_and_log_keys() {
        let c = Config::from_str("f.yaml", "", Path::new("")).unwrap();
        assert_eq!(c.sandbox, SandboxAccess::Token);
        assert!(c.metrics.token.is_none());
        assert_eq!(c.log.format, LogFormat::Text);
        let text = "sandbox: public\nmetrics:\n  token: scrape\nlog:\n  format: json\n";
        let c = Config::from_str("f.yaml", text, Path::new("")).unwrap();
        assert_eq!(c.sandbox, SandboxAccess::Public);
        assert_eq!(c.metrics.token.unwrap().expose(), "scrape");
        assert_eq!(c.log.format, LogFormat::Json);
        let err = Config::from_str("f.yaml", "sandbox: open\n", Path::new("")).unwrap_err();
        assert!(
            err.items[0].message.contains("off"),
            "{}",
            err.items[0].message
        );
    }

    #[test]
    fn limits_keys() {
        let c = Config::from_str("f.yaml", "", Path::new("")).unwrap();
        assert_eq!(c.limits.script_timeout.as_millis(), 250);
        assert_eq!(c.limits.messages_per_turn, 10);
        let text = "limits:\n  script_timeout: 200ms\n  messages_per_turn: 3\n";
        let c = Config::from_str("f.yaml", text, Path::new("")).unwrap();
        assert_eq!(c.limits.script_timeout.as_millis(), 200);
        assert_eq!(c.limits.messages_per_turn, 3);
        let c = Config::from_str("f.yaml", "limits: {script_timeout: 2s}", Path::new("")).unwrap();
        assert_eq!(c.limits.script_timeout.as_millis(), 2000);
        let err = Config::from_str("f.yaml", "limits:\n  script_timeout: fast\n", Path::new(""))
            .unwrap_err();
        assert!(
            err.items[0].message.contains("250ms"),
            "{}",
            err.items[0].message
        );
        let err = Config::from_str("f.yaml", "limits:\n  messages_per_turn: 0\n", Path::new(""))
            .unwrap_err();
        assert!(err.items[0].message.contains("messages_per_turn"));
    }

    #[test]
    fn retention_is_optional_and_at_least_eight_days() {
        let parse = |text: &str| Config::from_str("f.yaml", text, Path::new(""));
        assert!(parse("").unwrap().retention.is_none());
        assert!(parse("retention: ~\n").unwrap().retention.is_none());
        let kept = parse("retention: 90d\n").unwrap().retention.unwrap();
        assert_eq!(kept.0, chrono::Duration::days(90));
        let err = parse("retention: 3d\n").unwrap_err();
        assert!(
            err.items[0].message.contains("shorter than 8 days"),
            "{:?}",
            err.items
        );
        assert!(parse("retention: soon\n").is_err());
    }

    #[test]
    fn the_upload_timeout_fits_in_the_outbox_lease() {
        let parse = |text: &str| Config::from_str("f.yaml", text, Path::new(""));
        let default = parse("").unwrap();
        assert_eq!(
            default.upload_options().timeout,
            std::time::Duration::from_secs(30)
        );
        // Unset under a short lease, it shrinks to fit (a test's 5 s lease starts).
        let short = parse("outbox:\n  lease: 40s\n").unwrap();
        assert_eq!(
            short.upload_options().timeout,
            std::time::Duration::from_secs(17)
        );
        let tiny = parse("outbox:\n  lease: 5s\n").unwrap();
        assert_eq!(
            tiny.upload_options().timeout,
            std::time::Duration::from_secs(1)
        );
        let long = parse("media:\n  upload_timeout: 5m\noutbox:\n  lease: 10m\n").unwrap();
        let options = long.upload_options();
        assert_eq!(options.timeout, std::time::Duration::from_secs(300));
        assert!(
            options.lease > options.timeout,
            "the claim outlasts the upload"
        );
        let err = parse("media:\n  upload_timeout: 60s\n").unwrap_err();
        assert!(
            err.items[0]
                .message
                .contains("does not fit in `outbox.lease: 1m`")
                && err.items[0]
                    .message
                    .contains("the send after it needs 23s more")
                && err.items[0].message.contains("write at most 37s"),
            "{:?}",
            err.items
        );
        let err = parse("media:\n  upload_timeout: 0s\n").unwrap_err();
        assert!(
            err.items[0].message.contains("leaves no time"),
            "{:?}",
            err.items
        );
    }

    #[test]
    fn keys_are_the_loaders_own() {
        let keys = keys();
        for key in [
            "database",
            "channels.webhook_secret",
            "policy.outside_window.origin",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        assert!(keys.iter().any(|k| k == "limits.messages_per_turn"));
        // Each section's names are exactly what the loader accepts: one more is refused.
        for key in keys.iter().filter(|k| !k.contains('.')) {
            let text = format!("{key}: ~\nextra: 1\n");
            let err = Config::from_str("f.yaml", &text, Path::new("")).unwrap_err();
            assert!(
                err.items.iter().any(|d| d.message.contains(key.as_str())),
                "`{key}` is among the accepted keys the loader names: {:?}",
                err.items
            );
        }
    }

    #[test]
    fn bad_durations_point_at_the_value() {
        let err =
            Config::from_str("f.yaml", "policy:\n  window: soon\n", Path::new("")).unwrap_err();
        assert_eq!(err.items[0].position(), "f.yaml:2:11");
        assert!(err.items[0].message.contains("not a duration"));
    }
}
