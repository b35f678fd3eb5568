//! Contact leases: one owner per contact until the lease is released or expires, and inbox
//! claims under them (`store::leases`). Two owner ids on one database act as two instances.

use chrono::{DateTime, Duration, Utc};
use serde_json::json;

use crate::clock::VirtualClock;
use crate::store::{Db, InboxRow, LeaseKey, NewInboxRow};

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

fn lease(key: &str) -> LeaseKey {
    LeaseKey::new("main", key)
}

fn sorted(mut leases: Vec<LeaseKey>) -> Vec<LeaseKey> {
    leases.sort();
    leases
}

/// A contact's lease is one owner's until released or expired; each owner claims only the
/// rows of the contacts it holds, in id order; a status or a row about no contact has a
/// lease of its own.
pub async fn a_contacts_lease_is_one_owners_until_released_or_expired(db: Db) {
    db.insert_updates(
        &[
            row("a1", "message", Some("155")),
            row("b1", "message", Some("166")),
            row("a2", "message", Some("155")),
            row("s1", "status", Some("166")),
            row("e1", "error", None),
        ],
        t(0),
    )
    .await
    .unwrap();
    let all = db.claim_inbox(t(1), 10).await.unwrap();
    let (status_row, error_row) = (all[3].id, all[4].id);
    let until = t(12);
    let taken = db.take_inbox_leases("A", t(1), until, 100).await.unwrap();
    assert_eq!(
        sorted(taken),
        sorted(vec![
            lease("155"),
            lease("166"),
            lease(&format!("#{status_row}")),
            lease(&format!("#{error_row}"))
        ]),
        "the first instance takes every waiting contact, and a lease of their own for the \
         status and the error"
    );
    // Taking again keeps them; another owner gets none.
    assert_eq!(
        db.take_inbox_leases("A", t(2), until, 100)
            .await
            .unwrap()
            .len(),
        4
    );
    assert!(
        db.take_inbox_leases("B", t(2), until, 100)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        db.claim_owned_inbox("B", 0, t(2), 100)
            .await
            .unwrap()
            .is_empty()
    );
    let claimed = db.claim_owned_inbox("A", 0, t(2), 100).await.unwrap();
    assert_eq!(keys(&claimed), ["a1", "b1", "a2", "s1", "e1"]);
    assert_eq!(
        db.contact_lease_holder(&lease("155"), t(2))
            .await
            .unwrap()
            .as_deref(),
        Some("A")
    );

    // A releases 155 (another instance's lease of the same key would stay): B takes it and
    // claims its rows, and only those.
    assert_eq!(
        db.release_contact_leases("B", &[lease("155")])
            .await
            .unwrap(),
        0,
        "nobody releases another's lease"
    );
    assert_eq!(
        db.release_contact_leases("A", &[lease("155")])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.take_inbox_leases("B", t(3), t(15), 100).await.unwrap(),
        [lease("155")]
    );
    let claimed = db.claim_owned_inbox("B", 0, t(3), 100).await.unwrap();
    assert_eq!(keys(&claimed), ["a1", "a2"]);
    assert!(
        !db.take_contact_lease("A", &lease("155"), t(3), t(15))
            .await
            .unwrap()
    );

    // A's heartbeat keeps what it holds; B's extends 155 only.
    assert_eq!(db.renew_contact_leases("A", t(20)).await.unwrap().len(), 3);
    assert_eq!(
        db.renew_contact_leases("B", t(18)).await.unwrap(),
        [lease("155")]
    );
    // B dies: at its lease's end (t = 18) nobody holds 155, after it A takes it over.
    assert_eq!(
        db.contact_lease_holder(&lease("155"), t(19)).await.unwrap(),
        None
    );
    assert!(
        !db.take_contact_lease("A", &lease("155"), t(18), t(30))
            .await
            .unwrap()
    );
    assert!(
        db.take_contact_lease("A", &lease("155"), t(19), t(30))
            .await
            .unwrap()
    );
    assert_eq!(
        db.renew_contact_leases("B", t(40)).await.unwrap(),
        [],
        "B's heartbeat finds it lost its lease"
    );
    assert_eq!(
        keys(&db.claim_owned_inbox("A", 0, t(19), 100).await.unwrap()),
        ["a1", "b1", "a2", "s1", "e1"]
    );
}

/// A contact whose earliest update waits for a retry is not leased (nobody could claim its
/// rows), processed rows make no lease, and `limit` takes the oldest contacts first; the
/// high-water mark applies to owned claims too.
pub async fn leases_follow_what_a_claim_could_take(db: Db) {
    db.insert_updates(
        &[
            row("a1", "message", Some("155")),
            row("b1", "message", Some("166")),
            row("c1", "message", Some("177")),
            row("a2", "message", Some("155")),
            row("c2", "message", Some("177")),
        ],
        t(0),
    )
    .await
    .unwrap();
    let rows = db.claim_inbox(t(1), 10).await.unwrap();
    // 155's first message waits for a retry; 166's is done.
    db.retry_inbox(rows[0].id, t(60), "later").await.unwrap();
    db.finish_inbox(&[rows[1].id], t(1)).await.unwrap();
    assert_eq!(
        db.take_inbox_leases("A", t(2), t(14), 1).await.unwrap(),
        [lease("177")]
    );
    assert!(
        db.take_inbox_leases("B", t(2), t(14), 10)
            .await
            .unwrap()
            .is_empty(),
        "nothing claimable is left for B to lease"
    );
    let owned = db.claim_owned_inbox("A", 0, t(2), 10).await.unwrap();
    assert_eq!(keys(&owned), ["c1", "c2"]);
    let above = db
        .claim_owned_inbox("A", owned[0].id, t(2), 10)
        .await
        .unwrap();
    assert_eq!(keys(&above), ["c2"]);
    // Once the retry is due, 155 can be leased, its rows claimed in order; A's lease of
    // 177 ran out meanwhile (no heartbeat), so B takes that too.
    assert_eq!(
        sorted(db.take_inbox_leases("B", t(61), t(73), 10).await.unwrap()),
        [lease("155"), lease("177")]
    );
    assert_eq!(
        keys(&db.claim_owned_inbox("B", 0, t(61), 10).await.unwrap()),
        ["a1", "c1", "a2", "c2"]
    );
}

/// `timer_pending` says whether a timer is still waiting to fire.
pub async fn a_fired_timer_is_no_longer_pending(db: Db) {
    use super::{bare_turn, contact_with_timers, timer};
    use crate::domain::Contact;
    use crate::store::TurnWrite;
    let contact = Contact::new("1555");
    let id = contact_with_timers(&db, "1555", &[timer(super::t(5), "a")]).await;
    let due = db.due_timers(super::t(10), 10).await.unwrap();
    assert!(db.timer_pending(due[0].id).await.unwrap());
    db.commit_turn(&TurnWrite {
        fired_timer: Some(due[0].id),
        ..bare_turn(Some(id), &contact, super::t(10))
    })
    .await
    .unwrap();
    assert!(!db.timer_pending(due[0].id).await.unwrap());
}
