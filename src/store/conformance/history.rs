//! Retention: pruning the message history older than a cutoff.

use super::{bare_turn, inbound, said, t, with_pool};
use crate::domain::{Contact, Decision, OutboundContent};
use crate::store::{ApiRequest, Db, OutboundRecord, TurnWrite};

const DAY: i64 = 24 * 60;

/// One turn of `wa_id` at `at` (minutes): the customer's message and a reply per status.
async fn turn(db: &Db, contact_id: Option<i64>, wa_id: &str, at: i64, statuses: &[&str]) -> i64 {
    let contact = Contact::new(wa_id);
    let message = inbound(&format!("wamid.{wa_id}.{at}"), "hi", t(at));
    let out: Vec<OutboundRecord> = statuses
        .iter()
        .map(|status| OutboundRecord {
            status: (*status).into(),
            ..said(
                OutboundContent::text(format!("{status} at {at}")),
                Decision::Send {
                    reason: "window open".into(),
                },
            )
        })
        .collect();
    let turn = TurnWrite {
        inbound: Some(&message),
        outbound: &out,
        ..bare_turn(contact_id, &contact, t(at))
    };
    db.commit_turn(&turn).await.unwrap().contact_id
}

async fn bodies(db: &Db) -> Vec<String> {
    with_pool!(db, |pool| sqlx::query_scalar::<_, String>(
        "SELECT kind || ':' || status || ':' || CAST(created_at AS TEXT) FROM messages ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .unwrap())
}

pub(super) async fn old_settled_messages_are_pruned_and_the_rest_kept(db: Db) {
    // Day 0: settled messages, and two still to deliver (pending, queued); day 100: more.
    let ada = turn(
        &db,
        None,
        "15550001",
        0,
        &["delivered", "pending", "queued"],
    )
    .await;
    let bob = turn(&db, None, "15550002", 10, &["read", "failed"]).await;
    turn(&db, Some(ada), "15550001", 100 * DAY, &["sent"]).await;
    let old_key = ApiRequest {
        subject: "sandbox/15550001".into(),
        message_id: 1,
    };
    db.remember_api_request("agent", "old", &old_key, t(0))
        .await
        .unwrap();
    db.remember_api_request("agent", "new", &old_key, t(100 * DAY))
        .await
        .unwrap();

    let cutoff = t(10 * DAY);
    let boundary = db.history_boundary(cutoff).await.unwrap().unwrap();
    // Batches of 2 until nothing is left: 2 + 2 + 1 of the 5 settled old messages.
    let mut pruned = Vec::new();
    loop {
        let n = db.prune_messages(boundary, cutoff, 2).await.unwrap();
        pruned.push(n);
        if n < 2 {
            break;
        }
    }
    assert_eq!(pruned, [2, 2, 1]);
    assert_eq!(db.prune_api_requests(cutoff).await.unwrap(), 1);

    let day0 = t(0).timestamp_millis();
    let day100 = t(100 * DAY).timestamp_millis();
    assert_eq!(
        bodies(&db).await,
        [
            format!("text:pending:{day0}"),
            format!("text:queued:{day0}"),
            format!("text:received:{day100}"),
            format!("text:sent:{day100}"),
        ],
        "only the unsettled old messages and the new ones stay"
    );
    assert!(db.api_request("agent", "new").await.unwrap().is_some());
    assert!(db.api_request("agent", "old").await.unwrap().is_none());
    // The contacts stay, and a conversation reads what is left.
    let conversation = db.load_conversation("sandbox", "15550002").await.unwrap();
    assert_eq!(conversation.contact_id, Some(bob));
}

pub(super) async fn the_boundary_is_found_in_any_history(db: Db) {
    assert_eq!(db.history_boundary(t(0)).await.unwrap(), None, "empty log");
    let mut last = None;
    for day in 0..40 {
        last = Some(turn(&db, last, "15550001", day * DAY, &["sent"]).await);
    }
    let ids: Vec<(i64, i64)> = with_pool!(db, |pool| sqlx::query_as(
        "SELECT id, created_at FROM messages ORDER BY id"
    )
    .fetch_all(pool)
    .await
    .unwrap());
    for cutoff_day in [0, 1, 17, 39, 40, 400] {
        let cutoff = t(cutoff_day * DAY);
        let expected = ids
            .iter()
            .find(|(_, at)| *at >= cutoff.timestamp_millis())
            .map_or(ids.last().unwrap().0 + 1, |(id, _)| *id);
        assert_eq!(
            db.history_boundary(cutoff).await.unwrap(),
            Some(expected),
            "cutoff day {cutoff_day}"
        );
    }
}
