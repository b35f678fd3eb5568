//! The inbox: stored webhook updates, their claims and retries, and delivery statuses.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use super::with_pool;
use crate::clock::VirtualClock;
use crate::store::{Db, DeliveryStatus, InboxRow, NewInboxRow, StatusChange, StatusOutcome};

fn t(seconds: i64) -> DateTime<Utc> {
    VirtualClock::test_epoch() + Duration::seconds(seconds)
}

fn row(key: &str, kind: &str, contact: Option<&str>) -> NewInboxRow {
    NewInboxRow {
        channel: "main".into(),
        dedupe_key: key.into(),
        kind: kind.into(),
        contact_key: contact.map(str::to_string),
        payload: json!({ "key": key }).to_string(),
        delivery: None,
    }
}

fn keys(rows: &[InboxRow]) -> Vec<&str> {
    rows.iter().map(|r| r.dedupe_key.as_str()).collect()
}

/// An outbound message with a wamid, as the sender leaves it.
async fn outbound(db: &Db, wamid: Option<&str>, key: Option<&str>, status: &str) -> i64 {
    with_pool!(db, |pool| {
        let contact: i64 = sqlx::query_scalar(
        "INSERT INTO contacts (channel, wa_id, created_at, updated_at) VALUES ('main', $1, 0, 0) \
         ON CONFLICT (channel, wa_id) DO UPDATE SET updated_at = 0 RETURNING id",
    )
    .bind("15550001")
    .fetch_one(pool)
    .await
    .unwrap();
        sqlx::query_scalar(
            "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, status, \
         created_at, idempotency_key) VALUES ($1, 'main', 'out', $2, 'text', '{}', $3, 0, $4) \
         RETURNING id",
        )
        .bind(contact)
        .bind(wamid)
        .bind(status)
        .bind(key)
        .fetch_one(pool)
        .await
        .unwrap()
    })
}

async fn status_of(db: &Db, id: i64) -> (String, Option<i64>, Option<String>) {
    with_pool!(db, |pool| sqlx::query_as(
        "SELECT status, error_code, error FROM messages WHERE id = $1"
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap())
}

fn change<'a>(wamid: &'a str, status: &'a str) -> StatusChange<'a> {
    StatusChange {
        wamid,
        status,
        error_code: None,
        error: None,
        idempotency_key: None,
    }
}

pub(super) async fn duplicates_are_counted_not_stored(db: Db) {
    let first = [row("a", "message", Some("1")), row("b", "status", None)];
    let s = db.insert_updates(&first, t(0)).await.unwrap();
    assert_eq!((s.stored, s.duplicates), (2, 0));

    // A redelivery with one new update, and one update twice in the same body.
    let again = [
        row("a", "message", Some("1")),
        row("c", "message", Some("1")),
        row("c", "message", Some("1")),
    ];
    let s = db.insert_updates(&again, t(1)).await.unwrap();
    assert_eq!((s.stored, s.duplicates), (1, 2));
    // The same key on another channel is another update.
    let other = NewInboxRow {
        channel: "other".into(),
        ..row("a", "message", Some("1"))
    };
    assert_eq!(db.insert_updates(&[other], t(1)).await.unwrap().stored, 1);

    let claimed = db.claim_inbox(t(1), 100).await.unwrap();
    assert_eq!(keys(&claimed), ["a", "b", "c", "a"]);
    assert_eq!(claimed[0].payload, json!({"key": "a"}).to_string());
    assert_eq!(claimed[0].received_at, t(0));
    assert_eq!(db.inbox_depth().await.unwrap(), 4);
}

pub(super) async fn large_batches_are_one_transaction(db: Db) {
    let rows: Vec<_> = (0..1001)
        .map(|i| row(&format!("k{i}"), "message", Some(&i.to_string())))
        .collect();
    let s = db.insert_updates(&rows, t(0)).await.unwrap();
    assert_eq!((s.stored, s.duplicates), (1001, 0));
    assert_eq!(db.claim_inbox(t(0), 5000).await.unwrap().len(), 1001);
    let ids: Vec<i64> = db
        .claim_inbox(t(0), 5000)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    db.finish_inbox(&ids, t(1)).await.unwrap();
    assert_eq!(db.inbox_depth().await.unwrap(), 0);
}

pub(super) async fn claims_keep_each_contacts_order_across_retries(db: Db) {
    db.insert_updates(
        &[
            row("m1", "message", Some("ana")),
            row("m2", "message", Some("ana")),
            row("s1", "status", Some("ana")),
            row("b1", "message", Some("bob")),
        ],
        t(0),
    )
    .await
    .unwrap();
    let all = db.claim_inbox(t(0), 10).await.unwrap();
    assert_eq!(keys(&all), ["m1", "m2", "s1", "b1"]);

    // m1 fails and waits: ana's m2 waits behind it; her status and bob do not.
    db.retry_inbox(all[0].id, t(10), "database is locked")
        .await
        .unwrap();
    assert_eq!(keys(&db.claim_inbox(t(5), 10).await.unwrap()), ["s1", "b1"]);
    // After the high-water mark only.
    assert_eq!(
        keys(&db.claim_inbox_after(all[2].id, t(5), 10).await.unwrap()),
        ["b1"]
    );

    let due = db.claim_inbox(t(10), 10).await.unwrap();
    assert_eq!(keys(&due), ["m1", "m2", "s1", "b1"]);
    assert_eq!(due[0].attempts, 1);
    assert_eq!(due[0].last_error.as_deref(), Some("database is locked"));

    db.finish_inbox(&[due[0].id, due[2].id], t(11))
        .await
        .unwrap();
    db.abandon_inbox(due[3].id, t(11), "gave up").await.unwrap();
    assert_eq!(keys(&db.claim_inbox(t(11), 10).await.unwrap()), ["m2"]);
    assert_eq!(db.claim_inbox(t(11), 0).await.unwrap().len(), 0);

    // Pruning removes processed rows only.
    assert_eq!(db.prune_inbox(t(12), 100).await.unwrap(), 3);
    assert_eq!(keys(&db.claim_inbox(t(12), 10).await.unwrap()), ["m2"]);
}

pub(super) async fn statuses_only_move_forward(db: Db) {
    let id = outbound(&db, Some("wamid.A"), None, "sent").await;
    let apply = |s| {
        let db = db.clone();
        async move { db.apply_status("main", &change("wamid.A", s), t(1)).await }
    };
    // read before delivered; delivered and sent afterwards change nothing.
    assert_eq!(
        apply("read").await.unwrap(),
        StatusOutcome::Updated { message_id: id }
    );
    for late in ["delivered", "sent", "read", "deleted"] {
        assert_eq!(
            apply(late).await.unwrap(),
            StatusOutcome::Unchanged {
                message_id: id,
                current: "read".into()
            },
            "{late}"
        );
    }
    assert_eq!(status_of(&db, id).await.0, "read");

    // A wamid on another channel, or none at all, is unknown.
    assert_eq!(
        db.apply_status("other", &change("wamid.A", "read"), t(1))
            .await
            .unwrap(),
        StatusOutcome::Unknown
    );
    assert_eq!(
        db.apply_status("main", &change("wamid.nope", "sent"), t(1))
            .await
            .unwrap(),
        StatusOutcome::Unknown
    );
}

pub(super) async fn failed_is_final_and_keeps_its_error(db: Db) {
    let id = outbound(&db, Some("wamid.F"), None, "sent").await;
    let failed = StatusChange {
        error_code: Some(131047),
        error: Some("Re-engagement message"),
        ..change("wamid.F", "failed")
    };
    assert_eq!(
        db.apply_status("main", &failed, t(1)).await.unwrap(),
        StatusOutcome::Updated { message_id: id }
    );
    assert_eq!(
        db.apply_status("main", &change("wamid.F", "delivered"), t(2))
            .await
            .unwrap(),
        StatusOutcome::Unchanged {
            message_id: id,
            current: "failed".into()
        }
    );
    assert_eq!(
        status_of(&db, id).await,
        (
            "failed".into(),
            Some(131047),
            Some("Re-engagement message".into())
        )
    );

    // An error on a non-failed status is not recorded.
    let id = outbound(&db, Some("wamid.G"), None, "pending").await;
    let odd = StatusChange {
        error_code: Some(1),
        error: Some("x"),
        ..change("wamid.G", "delivered")
    };
    db.apply_status("main", &odd, t(1)).await.unwrap();
    assert_eq!(status_of(&db, id).await, ("delivered".into(), None, None));
}

pub(super) async fn callback_data_finds_a_send_whose_wamid_was_lost(db: Db) {
    let id = outbound(&db, None, Some("idem-1"), "sending").await;
    let status = StatusChange {
        idempotency_key: Some("idem-1"),
        ..change("wamid.L", "delivered")
    };
    assert_eq!(
        db.apply_status("main", &status, t(1)).await.unwrap(),
        StatusOutcome::Updated { message_id: id }
    );
    assert_eq!(status_of(&db, id).await.0, "delivered");
    // The wamid is recorded: later statuses find it directly.
    assert_eq!(
        db.apply_status("main", &change("wamid.L", "read"), t(2))
            .await
            .unwrap(),
        StatusOutcome::Updated { message_id: id }
    );
    // An unknown key is still unknown.
    let stray = StatusChange {
        idempotency_key: Some("idem-2"),
        ..change("wamid.M", "sent")
    };
    assert_eq!(
        db.apply_status("main", &stray, t(2)).await.unwrap(),
        StatusOutcome::Unknown
    );
}

/// A delivery status row as the webhook builds it ([`NewInboxRow::delivery`]).
fn delivery(wamid: &str, status: &str, key: Option<&str>) -> NewInboxRow {
    NewInboxRow {
        delivery: Some(DeliveryStatus {
            wamid: wamid.into(),
            status: status.into(),
            idempotency_key: key.map(str::to_owned),
        }),
        ..row(&format!("{wamid}:{status}"), "status", Some("15550001"))
    }
}

pub(super) async fn delivery_statuses_apply_as_their_webhook_is_stored(db: Db) {
    let known = outbound(&db, Some("wamid.K"), None, "sent").await;
    let lost = outbound(&db, None, Some("idem-9"), "sending").await;
    let webhook = [
        delivery("wamid.K", "delivered", None),
        delivery("wamid.K", "read", None),
        // Its send's answer was lost: found by its key, as the worker would.
        delivery("wamid.N", "sent", Some("idem-9")),
        // No message has it yet: left for the worker to retry.
        delivery("wamid.U", "delivered", None),
        row("wamid.in", "message", Some("15550001")),
    ];
    let stored = db.insert_updates(&webhook, t(1)).await.unwrap();
    assert_eq!(
        (stored.stored, stored.duplicates, stored.pending),
        (5, 0, 2)
    );
    assert_eq!(stored.moved, [1, 1, 1]);
    assert_eq!(status_of(&db, known).await.0, "read");
    assert_eq!(status_of(&db, lost).await.0, "sent");
    // The worker sees only what is left to do, in order.
    let claimed = db.claim_inbox(t(1), 100).await.unwrap();
    assert_eq!(keys(&claimed), ["wamid.U:delivered", "wamid.in"]);

    // Delivered again (WhatsApp retries): duplicates, and the message stays where it is.
    let again = db.insert_updates(&webhook[..2], t(2)).await.unwrap();
    assert_eq!(
        (again.stored, again.duplicates, again.moved),
        (0, 2, [0, 0, 0])
    );
    assert_eq!(status_of(&db, known).await.0, "read");
    // A `delivered` for the message found by its key moves it on (its wamid is recorded);
    // a late `sent` after `read` is stored, settled, and moves nothing.
    let late = db
        .insert_updates(&[delivery("wamid.N", "delivered", None)], t(3))
        .await
        .unwrap();
    assert_eq!((late.stored, late.pending, late.moved[1]), (1, 0, 1));
    let later = db
        .insert_updates(&[delivery("wamid.K", "sent", None)], t(3))
        .await
        .unwrap();
    assert_eq!(
        (later.stored, later.pending, later.moved),
        (1, 0, [0, 0, 0])
    );
    assert_eq!(status_of(&db, known).await.0, "read");
}

pub(super) async fn inbound_seen_reads_the_message_log(db: Db) {
    assert!(!db.inbound_seen("main", "wamid.in").await.unwrap());
    outbound(&db, Some("wamid.out"), None, "sent").await;
    with_pool!(db, |pool| sqlx::query(
        "INSERT INTO messages (contact_id, channel, direction, wamid, kind, body, status, \
         created_at) SELECT id, 'main', 'in', 'wamid.in', 'text', '{}', 'received', 0 \
         FROM contacts LIMIT 1",
    )
    .execute(pool)
    .await
    .unwrap()
    .rows_affected());
    assert!(db.inbound_seen("main", "wamid.in").await.unwrap());
    assert!(!db.inbound_seen("other", "wamid.in").await.unwrap());
    assert!(!db.inbound_seen("main", "wamid.out").await.unwrap());
}

/// A process that died after WhatsApp accepted its send leaves the row `sending` under its
/// lease; the status settles the row and ends the lease, so the contact's next message can
/// be claimed at once.
pub(super) async fn a_status_ends_a_dead_senders_lease(db: Db) {
    let id = outbound(&db, None, Some("idem-dead"), "sending").await;
    with_pool!(&db, |pool| sqlx::query(
        "UPDATE messages SET lease_until = $1, lease_owner = 'dead' WHERE id = $2"
    )
    .bind(t(600).timestamp_millis())
    .bind(id)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected());
    let status = StatusChange {
        idempotency_key: Some("idem-dead"),
        ..change("wamid.D", "sent")
    };
    assert_eq!(
        db.apply_status("main", &status, t(1)).await.unwrap(),
        StatusOutcome::Updated { message_id: id }
    );
    let lease: (String, Option<i64>, Option<String>) = with_pool!(&db, |pool| sqlx::query_as(
        "SELECT status, lease_until, lease_owner FROM messages WHERE id = $1"
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap());
    assert_eq!(lease, ("sent".into(), None, None));
}
