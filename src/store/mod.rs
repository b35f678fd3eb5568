//! Persistence: contacts, sessions, the message log, the inbox and outbox, the queue,
//! durable timers, flow versions, template statuses, and campaigns with their runs and ledgers.
//!
//! All of flowgate's SQL lives here; no other module writes a query. Everything else speaks
//! [`Conversation`], [`TurnWrite`] and the row types of the aggregates below, so the engine
//! stays testable without a database schema in its head and the schema can change in one
//! place. Times are stored at millisecond precision; anything finer is dropped.
//!
//! # Module map
//!
//! Each aggregate is a module with its queries (an `impl Db` block) and the row types they
//! return; the caller sees one [`Db`] with every operation.
//!
//! | module | tables | operations |
//! |---|---|---|
//! | `campaigns` | `campaigns`, `campaign_runs`, `campaign_recipients` | definitions ([`Db::save_campaign`], [`Db::due_campaigns`], pause, `next_run_at`); runs claimed once ([`Db::claim_run`], [`Db::record_missed_run`]); the ledger ([`Db::snapshot_audience`], [`Db::pending_recipients`], [`Db::record_recipient`], [`Db::run_counts`]; a split campaign's variant on each row) |
//! | `campaign_reports` | reads `campaign_runs`, `campaign_recipients`, `messages` | what a run's report adds to its counts: [`Db::run_replied`], [`Db::run_charges`]; for `/metrics`: [`Db::runs_by_status`], [`Db::active_recipients`] |
//! | `run_requests` | `campaign_run_requests`, `campaign_runs` | run-now: [`Db::claim_manual_run`] (one run at a time per campaign; a request's `Idempotency-Key` answers the run it started) |
//! | `api_requests` | `api_requests` | the admin API's idempotency keys: [`Db::api_request`], [`Db::remember_api_request`] |
//! | `contacts` | `contacts`, `contact_aliases` | who a customer is: [`Db::resolve_contact`], [`Db::change_identity`]; their policy state: [`Db::save_contact_policy`], [`Db::contacts_for_policy`] |
//! | `import` | `contacts`, `contact_aliases` | contacts in bulk: [`Db::import_contacts`] (a CSV file's rows, in chunks of [`IMPORT_CHUNK`], by the identity rules of `contacts`) |
//! | `conversations` | reads `contacts`, `sessions`, `messages`; `flow_versions` | [`Db::load_conversation`], [`Db::messages`], [`Db::message`], [`Db::reset_conversation`], [`Db::save_flow_version`], [`Db::flow_version`] |
//! | `turn` | `contacts`, `sessions`, `messages`, `timers` | [`Db::commit_turn`]: everything one turn changes, in one transaction ([`TurnWrite`]) |
//! | `inbox` | `inbox`; statuses on `messages` | webhook updates: [`Db::insert_updates`], claims, retries, pruning; delivery statuses: [`Db::apply_status`] |
//! | `media` | `media`, `server_secrets` | customers' files: the download worker's claims with a lease ([`Db::claim_media`]), retries and outcomes, the flow told ([`Db::media_notified`]); rows for history and `GET /media/{id}`; generated secrets ([`Db::server_secret`]) |
//! | `leases` | `contact_leases` | which instance runs a contact's turns when several share PostgreSQL: [`Db::take_inbox_leases`], [`Db::take_contact_lease`], [`Db::renew_contact_leases`], [`Db::release_contact_leases`] (with [`Db::claim_owned_inbox`] in `inbox`) |
//! | `outbox` | outbound `messages`, `channel_state` | the sender's claims and outcomes ([`Db::claim_outbox`], `record_*`), the channel stop switch |
//! | `queue` | `messages` in status `queued` | [`Db::queued_messages`], expiries, [`Db::redecide_claimed`] |
//! | `retention` | deletes from `messages`, `api_requests` | the `retention` setting's pruning: [`Db::history_boundary`] (binary search over ids), [`Db::prune_messages`] (settled messages only), [`Db::prune_api_requests`] |
//! | `splits` | `split_assignments` (written by `turn`) | the per-branch report of A/B splits: [`Db::split_counts`] |
//! | `template_statuses` | `template_statuses` | [`Db::save_template_status`], [`Db::template_statuses`] |
//! | `timers` | reads `timers` | [`Db::due_timers`], [`Db::next_timer_at`], [`Db::timer_pending`] |
//! | `channel_lease` | (PostgreSQL advisory locks) | which instance sends for a channel: [`Db::channel_lease`], [`ChannelLease`] |
//!
//! Beside them: `db` ([`Db`], its `Backend`, connect, migrate, close, and the two macros
//! that open the backend for portable SQL), `error` ([`StoreError`]), `migrate` (the
//! embedded migrations of both backends), `identities` (the identity rules' statements per
//! backend), `sql` (the helpers every aggregate shares), `writer` (SQLite's writer thread), `readers`
//! (SQLite's hot reads, on the caller's thread) and `resolved_cache`
//! (identities this process resolved), `wake` (on PostgreSQL, `LISTEN` for the other
//! instances' notifications: [`Db::wake_ups`]). Modules import downwards only: aggregates import
//! `db`, `error`, `sql` and each other's row types; `db` imports none of them.
//!
//! # The backend seam
//!
//! [`Db`] is a struct over a private `Backend` enum, with one variant per database: `Sqlite`
//! (its reading pool, its hot readers, its writer thread, its identity cache) and `Postgres`
//! (one pool).
//! Every operation reaches the backend in one of two ways:
//!
//! * portable SQL (`$n` placeholders, `ON CONFLICT`, `RETURNING`, times as unix
//!   milliseconds, JSON as text, integers as BIGINT) runs through `db::with_pool!` (reads)
//!   and `db::with_writer!` (writes), whose arms run the same body on either backend's
//!   pool (a PostgreSQL write body in a transaction of its own);
//! * the hot writes (turns, webhook updates, claims, recorded sends, campaign sends) match
//!   on the backend: SQLite's version is a raw writer job (cached statements, group
//!   commit), PostgreSQL's one statement (data-modifying `WITH` parts, `UNNEST` arrays,
//!   `FOR UPDATE SKIP LOCKED`). The identity rules are written once over
//!   `identities::IdentityConn`, which each backend implements.
//!
//! A few read queries differ in their SQL (JSON paths, a JSON array's elements): they ask
//! `Db::json_text` or `Db::is_postgres`. Callers do not change with the backend; the
//! conformance suite (`conformance`) runs on every backend.

mod api_requests;
mod campaign_reports;
mod campaigns;
mod channel_lease;
mod contacts;
mod conversations;
mod db;
mod error;
mod identities;
mod import;
mod inbox;
mod leases;
mod media;
mod media_uploads;
mod migrate;
mod outbox;
mod queue;
mod readers;
mod resolved_cache;
mod retention;
mod run_requests;
mod splits;
mod sql;
mod template_statuses;
mod timers;
mod turn;
mod wake;
pub mod writer;

#[cfg(test)]
pub(crate) mod conformance;

pub use api_requests::ApiRequest;
pub use campaign_reports::{ActiveRecipients, ChargeCount};
pub use campaigns::{
    CampaignOrigin, CampaignRow, CampaignSend, CampaignSent, Claim, LedgerRow, NewCampaign,
    RecipientCount, RecipientDecision, RecipientOutcome, RunRow, RunStatus, RunTrigger,
    TemplateRecipients, campaign_message_key,
};
pub use channel_lease::ChannelLease;
pub use contacts::{ContactFilter, ContactSummary, Identifiers, IdentityChanged, Resolved};
pub use conversations::{Conversation, MessageDetail, MessageRow, SessionRow};
pub use db::{DEFAULT_POSTGRES_POOL, Db, create_test_schema, redact as redact_url};
pub use error::StoreError;
pub use import::{IMPORT_CHUNK, ImportOutcome};
pub use inbox::{
    DeliveryStatus, INBOX_RETENTION, InboxRow, MOVED_STATUSES, NewInboxRow, ORDERED_KINDS,
    StatusChange, StatusOutcome, Stored, status_rank,
};
pub use leases::LeaseKey;
pub use media::{LocalMedia, MediaFinish, MediaRow};
pub use media_uploads::{MediaUpload, MediaUploadState};
pub use outbox::{ChannelStop, OutboundFilter, OutboxEntry, OutboxRow};
pub use queue::{ExpiringMessage, FLUSH_LIMIT, QueuedMessage};
pub use retention::PrunedMedia;
pub use run_requests::ManualRun;
pub use splits::SplitCount;
pub use template_statuses::TemplateStatusRow;
pub use timers::{NewTimer, TimerRow};
pub use turn::{CommittedTurn, DequeuedRecord, OutboundRecord, Superseded, TurnWrite};
pub use wake::WakeUp;
