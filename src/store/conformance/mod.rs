//! The store's conformance suite: its behaviour, as every backend must show it, in one set
//! of `async fn`s that each take a fresh, migrated [`Db`] (`turns`, `contacts`, `import`,
//! `inbox`, `history`, `campaigns`, `campaign_api`, `media`, `media_uploads`).
//!
//! [`suite!`] instantiates every test of the suite for one backend, as a module of
//! `#[tokio::test]`s named after it: SQLite in memory, SQLite in a file, and PostgreSQL.
//! Tests of a
//! backend's internals (SQLite's writer thread, query plans, WAL, the migrations list) stay
//! beside their code; so do tests that hold a backend's writer still or rely on how SQLite
//! reuses ids.
//!
//! The suite reads and seeds the database directly only through `with_pool!`, so its SQL
//! runs on any backend's pool.
//!
//! **PostgreSQL** runs on the database `FLOWGATE_TEST_POSTGRES_URL` names (e.g.
//! `postgres://postgres@127.0.0.1:5432/flowgate_test`), each test in a fresh schema of its
//! own (dropped when it passes). Without the variable each PostgreSQL test prints that it
//! skipped and passes, unless `FLOWGATE_REQUIRE_POSTGRES=1` (CI) makes it fail.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use super::db::with_pool;
use super::{Db, NewTimer, OutboundRecord, SessionRow, TurnWrite};
use crate::clock::VirtualClock;
use crate::domain::{
    Contact, Decision, Inbound, InboundContent, Origin, Outbound, OutboundContent,
};

mod campaign_api;
mod campaigns;
mod contacts;
mod history;
mod import;
mod inbox;
mod leases;
mod media;
mod media_uploads;
mod turns;

/// A fresh database for one test, with what must outlive it.
struct Fixture {
    db: Db,
    /// The directory of a file database, removed when the test ends.
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL schema of the test, dropped when it passes.
    schema: Option<String>,
}

impl Fixture {
    /// Drops the test's PostgreSQL schema (a failed test keeps it, to look at).
    async fn clean_up(self) {
        if let Some(schema) = &self.schema {
            drop_schema(&self.db, schema).await;
        }
        self.db.close().await;
    }
}

/// A private in-memory SQLite database.
async fn open_sqlite_memory() -> Fixture {
    Fixture {
        db: memory_db().await,
        _dir: None,
        schema: None,
    }
}

/// A migrated PostgreSQL database in a new schema of the database
/// `FLOWGATE_TEST_POSTGRES_URL` names; `None` (after saying so) when the variable is unset,
/// unless `FLOWGATE_REQUIRE_POSTGRES` is set, which fails the test instead.
async fn open_postgres() -> Option<Fixture> {
    let (db, schema) = postgres_db().await?;
    Some(Fixture {
        db,
        _dir: None,
        schema: Some(schema),
    })
}

/// A migrated [`Db`] on a fresh schema of the test server, and the schema's name; `None`
/// when no server is configured (see [`open_postgres`]).
pub(crate) async fn postgres_db() -> Option<(Db, String)> {
    let Ok(url) = std::env::var("FLOWGATE_TEST_POSTGRES_URL") else {
        assert!(
            std::env::var_os("FLOWGATE_REQUIRE_POSTGRES").is_none(),
            "FLOWGATE_REQUIRE_POSTGRES is set but FLOWGATE_TEST_POSTGRES_URL is not"
        );
        eprintln!("skipped: set FLOWGATE_TEST_POSTGRES_URL to run the PostgreSQL half");
        return None;
    };
    let schema = super::db::create_test_schema(&url, "fg_test")
        .await
        .expect("FLOWGATE_TEST_POSTGRES_URL names a server that answers");
    let db = postgres_db_on(&schema).await;
    db.migrate().await.unwrap();
    Some((db, schema))
}

/// Another [`Db`] (another pool, as another instance would have) on the schema of a
/// [`postgres_db`]; not migrated.
pub(crate) async fn postgres_db_on(schema: &str) -> Db {
    let url = std::env::var("FLOWGATE_TEST_POSTGRES_URL").unwrap();
    let (options, _) = super::db::postgres_options(&url).unwrap();
    let options = options.options([("search_path", schema)]);
    Db::connect_postgres(options, 4).await.unwrap()
}

/// Drops a [`postgres_db`]'s schema, once its test passed.
pub(crate) async fn drop_schema(db: &Db, schema: &str) {
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(db.postgres_pool().unwrap())
        .await
        .unwrap();
}

/// A SQLite database in a file of a new temporary directory (WAL, the file's own locking).
async fn open_sqlite_file() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::connect(&format!(
        "sqlite://{}",
        dir.path().join("flowgate.db").display()
    ))
    .await
    .unwrap();
    db.migrate().await.unwrap();
    Fixture {
        db,
        _dir: Some(dir),
        schema: None,
    }
}

/// Instantiates the whole suite for one backend: `suite!(name = opener)` makes a module
/// `name` with one `#[tokio::test]` per suite function, each on a fresh database from
/// `opener` (an async fn giving a [`Fixture`]). A new suite function is added to the list
/// here, once, and so runs on every backend.
macro_rules! suite {
    ($backend:ident = $open:expr) => {
        mod $backend {
            suite!(@tests $open;
                turns::unknown_contact_is_new,
                turns::commit_turn_round_trip,
                turns::second_turn_updates_the_contact,
                turns::turns_refuse_identifiers_that_changed_since_they_were_resolved,
                turns::last_customer_message_at_round_trips,
                turns::session_is_replaced_then_deleted,
                turns::replace_timers_none_keeps_some_replaces,
                turns::fired_timer_is_deleted,
                turns::due_timers_are_ordered_and_limited,
                turns::next_timer_at_is_the_earliest,
                turns::flow_versions_are_immutable,
                turns::reset_forgets_session_and_timers_only,
                turns::failing_turn_writes_nothing,
                contacts::a_new_customer_with_both_identifiers_is_found_by_either,
                contacts::new_customers_with_one_identifier_are_left_to_their_turn,
                contacts::a_phone_contact_learns_its_bsuid,
                contacts::a_bsuid_contact_that_shares_its_phone_is_keyed_by_it,
                contacts::two_contacts_of_one_customer_are_not_merged,
                contacts::a_changed_number_becomes_the_key_and_the_old_one_is_forgotten,
                contacts::a_number_change_without_the_new_number_keys_the_contact_by_its_new_bsuid,
                contacts::a_late_webhook_with_the_old_identifiers_changes_nothing,
                contacts::a_number_that_changed_hands_unannounced_gets_a_contact_of_its_own,
                contacts::a_new_number_announced_without_its_bsuid_learns_it_from_the_next_message,
                contacts::a_link_that_would_create_a_taken_identifier_writes_nothing,
                contacts::identity_changes_that_cannot_apply_change_nothing,
                import::an_import_creates_contacts_and_again_changes_nothing,
                import::an_import_merges_into_the_contact_an_identifier_names,
                import::a_row_with_both_identifiers_pairs_them,
                import::a_row_naming_two_contacts_is_reported_not_merged,
                import::a_pairing_the_process_remembered_otherwise_is_seen_at_once,
                import::a_large_import_is_written_in_chunks_in_file_order,
                history::old_settled_messages_are_pruned_and_the_rest_kept,
                history::the_boundary_is_found_in_any_history,
                inbox::duplicates_are_counted_not_stored,
                inbox::large_batches_are_one_transaction,
                inbox::claims_keep_each_contacts_order_across_retries,
                inbox::statuses_only_move_forward,
                inbox::failed_is_final_and_keeps_its_error,
                inbox::callback_data_finds_a_send_whose_wamid_was_lost,
                inbox::a_status_ends_a_dead_senders_lease,
                inbox::inbound_seen_reads_the_message_log,
                inbox::delivery_statuses_apply_as_their_webhook_is_stored,
                leases::a_contacts_lease_is_one_owners_until_released_or_expired,
                leases::leases_follow_what_a_claim_could_take,
                leases::a_fired_timer_is_no_longer_pending,
                campaign_api::run_now_is_one_run_at_a_time_and_idempotent_by_key,
                campaign_api::replies_and_charges_are_read_from_the_log,
                campaigns::next_run_at_round_trips_and_decides_what_is_due,
                campaigns::campaigns_are_listed_paused_by_channel_and_deleted,
                campaigns::a_run_claimed_twice_is_one_row,
                campaigns::missed_runs_are_recorded_once_and_never_over_a_claim,
                campaigns::a_run_moves_until_it_is_final,
                campaigns::a_ledger_snapshot_taken_twice_adds_nothing,
                campaigns::outcomes_are_recorded_once_and_counted,
                campaigns::cancelling_a_run_cancels_its_pending_recipients,
                campaigns::an_audience_page_selects_by_channel_every_tag_and_creation_time,
                campaigns::a_campaign_message_and_its_ledger_row_are_one_write_once,
                campaigns::a_split_runs_ledger_counts_and_replies_by_variant,
                campaigns::the_outbox_claims_conversational_messages_before_campaign_ones,
                media_uploads::an_upload_is_claimed_once_recorded_and_claimed_again_when_stale,
                media_uploads::a_refused_id_is_dropped_unless_a_newer_one_replaced_it,
                media::a_file_message_is_one_pending_download,
                media::downloads_are_claimed_with_a_lease_retried_and_finished,
                media::failures_and_local_files_keep_their_outcome,
                media::a_server_secret_is_generated_once,
                media::pruned_messages_take_their_files_and_pending_downloads_stay,
            );
        }
    };
    (@tests $open:expr; $($module:ident::$test:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $test() {
                let Some(fixture) = $open.await else { return };
                super::$module::$test(fixture.db.clone()).await;
                fixture.clean_up().await;
            }
        )*
    };
}

suite!(sqlite_memory = async { Some(super::open_sqlite_memory().await) });
suite!(sqlite_file = async { Some(super::open_sqlite_file().await) });
suite!(postgres = super::open_postgres());

// Helpers for the suite and for the backend-specific tests beside the code.

pub(in crate::store) const CH: &str = "sandbox";

pub(in crate::store) fn t(minutes: i64) -> DateTime<Utc> {
    VirtualClock::test_epoch() + Duration::minutes(minutes)
}

pub(in crate::store) async fn memory_db() -> Db {
    let db = Db::connect("sqlite::memory:").await.unwrap();
    db.migrate().await.unwrap();
    db
}

pub(in crate::store) fn inbound(id: &str, body: &str, at: DateTime<Utc>) -> Inbound {
    Inbound {
        id: id.into(),
        timestamp: at,
        content: InboundContent::text(body),
        from_ad: false,
    }
}

pub(in crate::store) fn said(content: OutboundContent, decision: Decision) -> OutboundRecord {
    OutboundRecord {
        message: Outbound::new(
            content,
            Origin::Step {
                flow: "welcome".into(),
                step: "start".into(),
            },
        ),
        decision,
        in_reply_to: None,
        status: "sent".into(),
        expires_at: None,
    }
}

pub(in crate::store) fn session(step: &str, at: DateTime<Utc>) -> SessionRow {
    SessionRow {
        flow_id: "welcome".into(),
        flow_version: "v1".into(),
        step: step.into(),
        state: json!({ "name": "Ada", "tries": 1 }),
        updated_at: at,
    }
}

pub(in crate::store) fn timer(at: DateTime<Utc>, tag: &str) -> NewTimer {
    NewTimer {
        due_at: at,
        payload: json!({ "timer": tag }),
    }
}

/// A turn that only touches the contact (and whatever the caller sets on top).
pub(in crate::store) fn bare_turn<'a>(
    contact_id: Option<i64>,
    contact: &'a Contact,
    now: DateTime<Utc>,
) -> TurnWrite<'a> {
    TurnWrite::new(CH, contact_id, contact, now)
}

/// Commits a turn that creates `wa_id` with the given timers; returns its id.
pub(in crate::store) async fn contact_with_timers(
    db: &Db,
    wa_id: &str,
    timers: &[NewTimer],
) -> i64 {
    let contact = Contact::new(wa_id);
    let turn = TurnWrite {
        replace_timers: Some(timers),
        ..bare_turn(None, &contact, t(0))
    };
    db.commit_turn(&turn).await.unwrap().contact_id
}

pub(in crate::store) async fn timer_tags(db: &Db) -> Vec<String> {
    db.due_timers(t(1_000_000), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.payload["timer"].as_str().unwrap().to_string())
        .collect()
}

pub(in crate::store) async fn count_contacts(db: &Db) -> i64 {
    with_pool!(db, |pool| sqlx::query_scalar(
        "SELECT COUNT(*) FROM contacts"
    )
    .fetch_one(pool)
    .await
    .unwrap())
}
