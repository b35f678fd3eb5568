//! Run-now's claims ([`Db::claim_manual_run`]) and what a report adds to the ledger's
//! counts: who replied ([`Db::run_replied`]) and which sends are charged
//! ([`Db::run_charges`]); the campaign gauges' reads.

use chrono::Duration;

use super::campaigns::decided_run;
use super::{bare_turn, inbound, said, t};
use crate::domain::{Contact, Decision, OutboundContent};
use crate::store::{
    ChargeCount, Db, ManualRun, RecipientDecision, RecipientOutcome, RunStatus, TurnWrite,
};

pub(super) async fn run_now_is_one_run_at_a_time_and_idempotent_by_key(db: Db) {
    let first = db.claim_manual_run("sale", Some("k1"), t(0)).await.unwrap();
    let ManualRun::Started(run) = first else {
        panic!("{first:?}");
    };
    let row = db.run(run).await.unwrap().unwrap();
    assert_eq!((row.status, row.scheduled_for), (RunStatus::Planned, t(0)));
    // The same key answers its run, whatever else happened since.
    assert_eq!(
        db.claim_manual_run("sale", Some("k1"), t(1)).await.unwrap(),
        ManualRun::Replayed(run)
    );
    // Another request while the run is not over starts nothing.
    assert_eq!(
        db.claim_manual_run("sale", Some("k2"), t(1)).await.unwrap(),
        ManualRun::Busy(run)
    );
    assert_eq!(
        db.claim_manual_run("sale", None, t(1)).await.unwrap(),
        ManualRun::Busy(run)
    );
    // Keys are per campaign, and another campaign runs on its own.
    let other = db
        .claim_manual_run("other", Some("k1"), t(1))
        .await
        .unwrap();
    assert!(
        matches!(other, ManualRun::Started(id) if id != run),
        "{other:?}"
    );

    assert!(db.cancel_run(run, "operator", t(2)).await.unwrap());
    let next = db.claim_manual_run("sale", Some("k2"), t(3)).await.unwrap();
    assert!(
        matches!(next, ManualRun::Started(id) if id != run),
        "{next:?}"
    );
    assert_eq!(
        db.claim_manual_run("sale", Some("k1"), t(4)).await.unwrap(),
        ManualRun::Replayed(run),
        "a key keeps naming its run after the run is over"
    );
}

pub(super) async fn replies_and_charges_are_read_from_the_log(db: Db) {
    let (run_id, contacts, _) = decided_run(&db).await;
    // One sent text, no customer message before or after it: not free by the window,
    // nobody replied.
    let window = Duration::hours(24);
    let charges = db.run_charges(run_id, window).await.unwrap();
    let charge = |template, window_open, count| ChargeCount {
        template,
        window_open,
        count,
    };
    assert_eq!(charges, [charge(false, false, 1)]);
    assert_eq!(db.run_replied(run_id).await.unwrap(), []);

    // The first recipient writes back: replied.
    let contact = Contact::new("15550001");
    let reply = inbound("wamid.reply", "thanks", t(20));
    db.commit_turn(&TurnWrite {
        inbound: Some(&reply),
        ..bare_turn(Some(contacts[0]), &contact, t(20))
    })
    .await
    .unwrap();
    assert_eq!(db.run_replied(run_id).await.unwrap(), [(None, 1)]);

    // A template written ten minutes after a customer's message is inside a window of
    // 24 hours, not inside one of a minute.
    let writer = Contact::new("15550009");
    let message = inbound("wamid.in", "hi", t(30));
    let template = said(
        OutboundContent::Template {
            name: "spring_sale".into(),
            language: "en_US".into(),
            params: vec![],
        },
        Decision::Send {
            reason: "campaign".into(),
        },
    );
    let wrote = db
        .commit_turn(&TurnWrite {
            inbound: Some(&message),
            ..bare_turn(None, &writer, t(30))
        })
        .await
        .unwrap();
    let committed = db
        .commit_turn(&TurnWrite {
            outbound: std::slice::from_ref(&template),
            ..bare_turn(Some(wrote.contact_id), &writer, t(40))
        })
        .await
        .unwrap();
    let other_run = db.claim_manual_run("other", None, t(41)).await.unwrap();
    let ManualRun::Started(other_run) = other_run else {
        panic!("{other_run:?}");
    };
    db.snapshot_audience(other_run, None, &[committed.contact_id], t(41), t(41))
        .await
        .unwrap();
    let sent = RecipientOutcome {
        decision: RecipientDecision::Sent,
        variant: None,
        reason: None,
        message_id: Some(committed.outbound_ids[0]),
        not_before: None,
    };
    assert!(
        db.record_recipient(other_run, committed.contact_id, &sent, t(41))
            .await
            .unwrap()
    );
    assert_eq!(
        db.run_charges(other_run, window).await.unwrap(),
        [charge(true, true, 1)]
    );
    assert_eq!(
        db.run_charges(other_run, Duration::minutes(1))
            .await
            .unwrap(),
        [charge(true, false, 1)]
    );
    assert_eq!(db.run_replied(other_run).await.unwrap(), []);

    // The gauges: both runs are not over.
    assert_eq!(
        db.runs_by_status().await.unwrap(),
        [("planned".to_string(), 2)]
    );
    let active = db.active_recipients().await.unwrap();
    let sent_in_spring: i64 = active
        .iter()
        .filter(|r| r.campaign == "spring_sale" && r.decision == "sent")
        .map(|r| r.count)
        .sum();
    assert_eq!(sent_in_spring, 2);
}
