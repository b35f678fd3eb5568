//! Campaigns: definitions and `next_run_at`, runs claimed once, missed runs, the ledger
//! (snapshots, outcomes) and a run's report counts.

use super::{CH, bare_turn, contact_with_timers, inbound, said, t, with_pool};
use crate::domain::{Contact, Decision, Origin, Outbound, OutboundContent};
use crate::store::{
    CampaignOrigin, CampaignSend, CampaignSent, Db, NewCampaign, RecipientCount, RecipientDecision,
    RecipientOutcome, RunStatus, RunTrigger, TurnWrite,
};

const SOURCE: &str = "campaign: spring_sale\nchannel: sandbox\nschedule: \"0 10 * * MON\"\n";

fn definition(name: &str, next: Option<i64>) -> NewCampaign<'_> {
    NewCampaign {
        name,
        channel: CH,
        source: SOURCE,
        origin: CampaignOrigin::File,
        next_run_at: next.map(t),
    }
}

async fn count_runs(db: &Db) -> i64 {
    with_pool!(db, |pool| sqlx::query_scalar(
        "SELECT COUNT(*) FROM campaign_runs"
    )
    .fetch_one(pool)
    .await
    .unwrap())
}

/// `n` contacts, seeded in one statement; their ids, in order.
async fn seed_contacts(db: &Db, n: i64) -> Vec<i64> {
    with_pool!(db, |pool| {
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $1) \
             INSERT INTO contacts (channel, wa_id, created_at, updated_at) \
             SELECT 'sandbox', 'seed' || i, 0, 0 FROM n",
        )
        .bind(n)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query_scalar("SELECT id FROM contacts WHERE wa_id LIKE 'seed%' ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap()
    })
}

pub(super) async fn next_run_at_round_trips_and_decides_what_is_due(db: Db) {
    assert!(
        db.save_campaign(&definition("spring_sale", Some(10)), t(0))
            .await
            .unwrap()
    );
    let saved = db.campaign("spring_sale").await.unwrap().unwrap();
    assert_eq!(
        (saved.channel.as_str(), saved.source.as_str(), saved.origin),
        (CH, SOURCE, CampaignOrigin::File)
    );
    assert_eq!((saved.next_run_at, saved.paused), (Some(t(10)), false));
    assert_eq!((saved.created_at, saved.updated_at), (t(0), t(0)));

    assert!(
        db.set_next_run_at("spring_sale", Some(t(20)), t(1))
            .await
            .unwrap()
    );
    let saved = db.campaign("spring_sale").await.unwrap().unwrap();
    assert_eq!((saved.next_run_at, saved.updated_at), (Some(t(20)), t(1)));
    assert!(db.due_campaigns(t(19)).await.unwrap().is_empty());
    let due = db.due_campaigns(t(20)).await.unwrap();
    assert_eq!(
        due.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["spring_sale"]
    );

    // Paused: not due, whatever its time; a second pause keeps the first reason.
    assert!(
        db.pause_campaign("spring_sale", "template paused", t(2))
            .await
            .unwrap()
    );
    assert!(
        db.pause_campaign("spring_sale", "operator", t(2))
            .await
            .unwrap()
    );
    assert!(db.due_campaigns(t(30)).await.unwrap().is_empty());
    // Saving the definition again (a file changed) keeps it paused.
    let mut api = definition("spring_sale", Some(25));
    api.origin = CampaignOrigin::Api;
    assert!(!db.save_campaign(&api, t(3)).await.unwrap());
    let saved = db.campaign("spring_sale").await.unwrap().unwrap();
    assert_eq!(saved.pause_reason.as_deref(), Some("template paused"));
    assert_eq!(
        (saved.origin, saved.next_run_at),
        (CampaignOrigin::Api, Some(t(25)))
    );
    assert_eq!((saved.created_at, saved.updated_at), (t(0), t(3)));
    assert!(db.resume_campaign("spring_sale", t(4)).await.unwrap());
    assert_eq!(db.due_campaigns(t(30)).await.unwrap().len(), 1);

    assert!(db.set_next_run_at("spring_sale", None, t(5)).await.unwrap());
    assert!(db.due_campaigns(t(1_000_000)).await.unwrap().is_empty());
    assert!(!db.set_next_run_at("nope", Some(t(1)), t(5)).await.unwrap());
    assert!(!db.pause_campaign("nope", "x", t(5)).await.unwrap());
}

pub(super) async fn campaigns_are_listed_paused_by_channel_and_deleted(db: Db) {
    for (name, next) in [("b_sale", 20), ("a_sale", 10)] {
        db.save_campaign(&definition(name, Some(next)), t(0))
            .await
            .unwrap();
    }
    let mut other = definition("c_other", Some(5));
    other.channel = "main";
    db.save_campaign(&other, t(0)).await.unwrap();
    let names =
        |rows: Vec<crate::store::CampaignRow>| rows.into_iter().map(|c| c.name).collect::<Vec<_>>();
    assert_eq!(
        names(db.campaigns().await.unwrap()),
        ["a_sale", "b_sale", "c_other"]
    );
    // The earliest due first.
    assert_eq!(
        names(db.due_campaigns(t(30)).await.unwrap()),
        ["c_other", "a_sale", "b_sale"]
    );

    // An account error on `sandbox` pauses its campaigns only.
    assert_eq!(
        db.pause_channel_campaigns(CH, "131048: spam rate limit", t(1))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        db.pause_channel_campaigns(CH, "again", t(1)).await.unwrap(),
        0
    );
    assert_eq!(names(db.due_campaigns(t(30)).await.unwrap()), ["c_other"]);
    let a = db.campaign("a_sale").await.unwrap().unwrap();
    assert_eq!(a.pause_reason.as_deref(), Some("131048: spam rate limit"));

    // Deleting the definition keeps its runs: a re-created campaign never claims one twice.
    let first = db
        .claim_run("a_sale", t(10), RunTrigger::Schedule, t(10))
        .await
        .unwrap();
    assert!(db.delete_campaign("a_sale").await.unwrap());
    assert!(!db.delete_campaign("a_sale").await.unwrap());
    assert!(db.campaign("a_sale").await.unwrap().is_none());
    db.save_campaign(&definition("a_sale", Some(10)), t(20))
        .await
        .unwrap();
    let again = db
        .claim_run("a_sale", t(10), RunTrigger::Schedule, t(20))
        .await
        .unwrap();
    assert_eq!((again.run_id, again.created), (first.run_id, false));
}

pub(super) async fn a_run_claimed_twice_is_one_row(db: Db) {
    db.save_campaign(&definition("spring_sale", Some(10)), t(0))
        .await
        .unwrap();
    let first = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(10))
        .await
        .unwrap();
    assert!(first.created);
    let second = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(11))
        .await
        .unwrap();
    assert_eq!((second.run_id, second.created), (first.run_id, false));
    assert_eq!(count_runs(&db).await, 1);

    // Claims racing for the next time: exactly one creates it.
    let claims = futures_join(&db, t(20)).await;
    assert_eq!(claims.iter().filter(|c| c.created).count(), 1);
    assert!(claims.iter().all(|c| c.run_id == claims[0].run_id));
    assert_ne!(claims[0].run_id, first.run_id);
    assert_eq!(count_runs(&db).await, 2);

    let run = db.run(first.run_id).await.unwrap().unwrap();
    assert_eq!(run.campaign, "spring_sale");
    assert_eq!((run.scheduled_for, run.created_at), (t(10), t(10)));
    assert_eq!(
        (run.trigger, run.status),
        (RunTrigger::Schedule, RunStatus::Planned)
    );
    assert_eq!(
        (run.started_at, run.finished_at, run.report),
        (None, None, None)
    );
    let runs = db.campaign_runs("spring_sale", 10).await.unwrap();
    assert_eq!(
        runs.iter().map(|r| r.scheduled_for).collect::<Vec<_>>(),
        [t(20), t(10)]
    );
    assert_eq!(db.campaign_runs("spring_sale", 1).await.unwrap().len(), 1);
    assert!(db.run(first.run_id + 1000).await.unwrap().is_none());
}

/// Eight claims of the same scheduled time, made at once.
async fn futures_join(db: &Db, at: chrono::DateTime<chrono::Utc>) -> Vec<crate::store::Claim> {
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                db.claim_run("spring_sale", at, RunTrigger::Schedule, at)
                    .await
            })
        })
        .collect();
    let mut claims = Vec::new();
    for task in tasks {
        claims.push(task.await.unwrap().unwrap());
    }
    claims
}

pub(super) async fn missed_runs_are_recorded_once_and_never_over_a_claim(db: Db) {
    let missed = db
        .record_missed_run("spring_sale", t(10), "past its ttl", t(200))
        .await
        .unwrap();
    assert!(missed.created);
    let run = db.run(missed.run_id).await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.reason.as_deref()),
        (RunStatus::Missed, Some("past its ttl"))
    );
    assert_eq!((run.started_at, run.finished_at), (None, Some(t(200))));
    // Recorded again after another restart, or claimed: still the one missed row.
    let again = db
        .record_missed_run("spring_sale", t(10), "again", t(300))
        .await
        .unwrap();
    assert_eq!((again.run_id, again.created), (missed.run_id, false));
    let claim = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(300))
        .await
        .unwrap();
    assert!(!claim.created);
    assert_eq!(
        db.run(missed.run_id).await.unwrap().unwrap().status,
        RunStatus::Missed
    );
    // A missed run is final.
    assert!(
        !db.set_run_status(missed.run_id, RunStatus::Running, None, t(300))
            .await
            .unwrap()
    );

    // A run already claimed is not turned into a missed one.
    let claimed = db
        .claim_run("spring_sale", t(20), RunTrigger::Schedule, t(20))
        .await
        .unwrap();
    let late = db
        .record_missed_run("spring_sale", t(20), "late", t(400))
        .await
        .unwrap();
    assert_eq!((late.run_id, late.created), (claimed.run_id, false));
    assert_eq!(
        db.run(claimed.run_id).await.unwrap().unwrap().status,
        RunStatus::Planned
    );
    let active = db.active_runs().await.unwrap();
    assert_eq!(
        active.iter().map(|r| r.id).collect::<Vec<_>>(),
        [claimed.run_id]
    );
}

pub(super) async fn a_run_moves_until_it_is_final(db: Db) {
    let run_id = db
        .claim_run("spring_sale", t(10), RunTrigger::Manual, t(10))
        .await
        .unwrap()
        .run_id;
    assert!(
        db.set_run_status(run_id, RunStatus::Running, None, t(11))
            .await
            .unwrap()
    );
    assert!(
        db.set_run_status(
            run_id,
            RunStatus::Paused,
            Some("template spring_sale paused"),
            t(12)
        )
        .await
        .unwrap()
    );
    let paused = db.run(run_id).await.unwrap().unwrap();
    assert_eq!(
        paused.reason.as_deref(),
        Some("template spring_sale paused")
    );
    assert!(
        db.set_run_status(run_id, RunStatus::Running, None, t(13))
            .await
            .unwrap()
    );
    let running = db.run(run_id).await.unwrap().unwrap();
    assert_eq!((running.status, running.reason), (RunStatus::Running, None));
    assert_eq!(
        (running.started_at, running.finished_at),
        (Some(t(11)), None)
    );
    assert_eq!(running.trigger, RunTrigger::Manual);

    let report = serde_json::json!({ "cost_estimate": { "marketing": 12.5 } });
    assert!(db.set_run_report(run_id, &report, t(14)).await.unwrap());
    assert!(
        db.set_run_status(run_id, RunStatus::Done, None, t(15))
            .await
            .unwrap()
    );
    let done = db.run(run_id).await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.finished_at),
        (RunStatus::Done, Some(t(15)))
    );
    assert_eq!(done.report, Some(report));
    assert!(
        !db.set_run_status(run_id, RunStatus::Running, None, t(16))
            .await
            .unwrap()
    );
    assert!(!db.cancel_run(run_id, "too late", t(16)).await.unwrap());
    assert!(db.active_runs().await.unwrap().is_empty());
}

pub(super) async fn a_ledger_snapshot_taken_twice_adds_nothing(db: Db) {
    // More than one statement's and one transaction's worth of rows.
    let ids = seed_contacts(&db, 25_001).await;
    let run_id = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(10))
        .await
        .unwrap()
        .run_id;
    let mut audience = ids.clone();
    audience.push(ids.last().unwrap() + 1_000); // gone since it was selected
    assert_eq!(
        db.snapshot_audience(run_id, None, &audience, t(10), t(10))
            .await
            .unwrap(),
        25_001
    );
    assert_eq!(
        db.snapshot_audience(run_id, None, &audience, t(10), t(11))
            .await
            .unwrap(),
        0
    );
    // A snapshot interrupted half-way and taken again adds only what is missing.
    let other = db
        .claim_run("spring_sale", t(20), RunTrigger::Schedule, t(20))
        .await
        .unwrap()
        .run_id;
    assert_eq!(
        db.snapshot_audience(other, None, &ids[..12_345], t(20), t(20))
            .await
            .unwrap(),
        12_345
    );
    assert_eq!(
        db.snapshot_audience(other, None, &ids, t(20), t(21))
            .await
            .unwrap(),
        25_001 - 12_345
    );

    let batch = db.pending_recipients(run_id, t(10), 3).await.unwrap();
    assert_eq!(
        batch.iter().map(|r| r.contact_id).collect::<Vec<_>>(),
        ids[..3]
    );
    assert!(
        batch
            .iter()
            .all(|r| r.decision == RecipientDecision::Planned && r.not_before == t(10))
    );
    assert!(
        db.pending_recipients(run_id, t(9), 3)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        db.run_counts(run_id).await.unwrap(),
        [RecipientCount {
            variant: None,
            decision: RecipientDecision::Planned,
            reason: None,
            message_status: None,
            error_code: None,
            count: 25_001
        }]
    );
}

/// A contact with two outbound messages (a sent one and a failed one); their ids.
async fn contact_with_messages(db: &Db) -> (i64, Vec<i64>) {
    let contact = Contact::new("15550001");
    let sent = |text: &str| {
        said(
            OutboundContent::text(text),
            Decision::Send {
                reason: "campaign".into(),
            },
        )
    };
    let out = [sent("one"), sent("two")];
    let committed = db
        .commit_turn(&TurnWrite {
            outbound: &out,
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap();
    let failed = committed.outbound_ids[1];
    with_pool!(db, |pool| sqlx::query(
        "UPDATE messages SET status = 'failed', error_code = 131049 WHERE id = $1"
    )
    .bind(failed)
    .execute(pool)
    .await
    .unwrap()
    .rows_affected());
    (committed.contact_id, committed.outbound_ids)
}

/// The outcome `decided[i]` of the contacts of a run of five: two sent (one of whose
/// messages failed with 131049), two opted out, one deferred to `t(100)`.
fn decided(messages: &[i64]) -> [RecipientOutcome<'static>; 5] {
    let outcome = |decision, reason, message_id, not_before| RecipientOutcome {
        decision,
        variant: None,
        reason,
        message_id,
        not_before,
    };
    use RecipientDecision::{Deferred, Sent, Skipped};
    [
        outcome(Sent, None, Some(messages[0]), None),
        outcome(Sent, None, Some(messages[1]), None),
        outcome(Skipped, Some("opted out"), None, None),
        outcome(Skipped, Some("opted out"), None, None),
        outcome(Deferred, Some("quiet hours"), None, Some(t(100))),
    ]
}

/// A run of five contacts with [`decided`]'s outcomes recorded at `t(11)`: the run, its
/// contacts and the two messages.
pub(super) async fn decided_run(db: &Db) -> (i64, Vec<i64>, Vec<i64>) {
    let (first, messages) = contact_with_messages(db).await;
    let mut contacts = vec![first];
    for wa_id in ["15550002", "15550003", "15550004", "15550005"] {
        contacts.push(contact_with_timers(db, wa_id, &[]).await);
    }
    let run_id = run_of(db, &contacts).await;
    for (contact, outcome) in contacts.iter().zip(&decided(&messages)) {
        assert!(
            db.record_recipient(run_id, *contact, outcome, t(11))
                .await
                .unwrap()
        );
    }
    (run_id, contacts, messages)
}

pub(super) async fn outcomes_are_recorded_once_and_counted(db: Db) {
    let (run_id, contacts, messages) = decided_run(&db).await;
    let decided = decided(&messages);
    use RecipientDecision::{Deferred, Sent, Skipped};
    // Decided recipients are never taken or decided again (a restart re-sending one).
    assert!(
        !db.record_recipient(run_id, contacts[0], &decided[0], t(12))
            .await
            .unwrap()
    );
    assert!(
        !db.record_recipient(run_id, 999_999, &decided[0], t(12))
            .await
            .unwrap()
    );
    let row = db.ledger_row(run_id, contacts[0]).await.unwrap().unwrap();
    assert_eq!(
        (row.decision, row.message_id, row.decided_at),
        (Sent, Some(messages[0]), Some(t(11)))
    );

    // The deferred one comes back when its time comes, and only then.
    assert!(
        db.pending_recipients(run_id, t(99), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(db.next_pending_at(run_id).await.unwrap(), Some(t(100)));
    let back = db.pending_recipients(run_id, t(100), 10).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(
        (back[0].contact_id, back[0].decision),
        (contacts[4], Deferred)
    );
    assert_eq!(back[0].reason.as_deref(), Some("quiet hours"));

    let count =
        |decision, reason: Option<&str>, status: Option<&str>, code, count| RecipientCount {
            variant: None,
            decision,
            reason: reason.map(str::to_string),
            message_status: status.map(str::to_string),
            error_code: code,
            count,
        };
    assert_eq!(
        db.run_counts(run_id).await.unwrap(),
        [
            count(Deferred, Some("quiet hours"), None, None, 1),
            count(Sent, None, Some("failed"), Some(131049), 1),
            count(Sent, None, Some("sent"), None, 1),
            count(Skipped, Some("opted out"), None, None, 2),
        ]
    );
}

pub(super) async fn cancelling_a_run_cancels_its_pending_recipients(db: Db) {
    let (run_id, contacts, _) = decided_run(&db).await;
    use RecipientDecision::Sent;
    // Cancelling the run cancels the recipient still pending, nothing else.
    assert!(db.cancel_run(run_id, "operator", t(50)).await.unwrap());
    assert_eq!(db.next_pending_at(run_id).await.unwrap(), None);
    let cancelled = db.ledger_row(run_id, contacts[4]).await.unwrap().unwrap();
    assert_eq!(cancelled.decision, RecipientDecision::Cancelled);
    assert_eq!(
        db.ledger_row(run_id, contacts[0])
            .await
            .unwrap()
            .unwrap()
            .decision,
        Sent
    );
    let run = db.run(run_id).await.unwrap().unwrap();
    assert_eq!(
        (run.status, run.reason.as_deref()),
        (RunStatus::Cancelled, Some("operator"))
    );
}

pub(super) async fn a_split_runs_ledger_counts_and_replies_by_variant(db: Db) {
    use RecipientDecision::{Planned, Sent, Skipped};
    let contacts = seed_contacts(&db, 4).await;
    let run_id = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(10))
        .await
        .unwrap()
        .run_id;
    for (variant, ids) in [("short", &contacts[..2]), ("long", &contacts[2..])] {
        let added = db
            .snapshot_audience(run_id, Some(variant), ids, t(10), t(10))
            .await
            .unwrap();
        assert_eq!(added, 2);
    }
    let pending = db.pending_recipients(run_id, t(10), 10).await.unwrap();
    let variants: Vec<_> = pending.iter().map(|r| r.variant.as_deref()).collect();
    assert_eq!(
        variants,
        [Some("short"), Some("short"), Some("long"), Some("long")]
    );
    // The send records the variant it was (here another than planned: the campaign changed).
    variant_send(&db, (run_id, contacts[0]), Some("short"), "sent").await;
    variant_send(&db, (run_id, contacts[1]), Some("long"), "sent").await;
    // A skip names its variant, or keeps the planned one.
    let skip = |variant| RecipientOutcome {
        decision: Skipped,
        variant,
        reason: Some("opted out"),
        message_id: None,
        not_before: None,
    };
    db.record_recipient(run_id, contacts[2], &skip(Some("long")), t(21))
        .await
        .unwrap();
    let row = db.ledger_row(run_id, contacts[1]).await.unwrap().unwrap();
    assert_eq!((row.decision, row.variant.as_deref()), (Sent, Some("long")));
    // The first recipient writes back after its message.
    let reply = inbound("wamid.split-reply", "yes", t(30));
    db.commit_turn(&TurnWrite {
        inbound: Some(&reply),
        ..bare_turn(Some(contacts[0]), &Contact::new("seed1"), t(30))
    })
    .await
    .unwrap();
    let count =
        |variant: &str, decision, reason: Option<&str>, status: Option<&str>, n| RecipientCount {
            variant: Some(variant.to_string()),
            decision,
            reason: reason.map(str::to_string),
            message_status: status.map(str::to_string),
            error_code: None,
            count: n,
        };
    assert_eq!(
        db.run_counts(run_id).await.unwrap(),
        [
            count("long", Planned, None, None, 1),
            count("long", Sent, Some("window open"), Some("sent"), 1),
            count("long", Skipped, Some("opted out"), None, 1),
            count("short", Sent, Some("window open"), Some("sent"), 1),
        ]
    );
    assert_eq!(
        db.run_replied(run_id).await.unwrap(),
        [(Some("short".to_string()), 1)]
    );
}

/// Seeds one contact on `channel` with `tags`, created at `t(created)`; its id.
async fn seed_tagged(db: &Db, channel: &str, wa_id: &str, tags: &str, created: i64) -> i64 {
    let created = t(created).timestamp_millis();
    with_pool!(db, |pool| sqlx::query_scalar(
        "INSERT INTO contacts (channel, wa_id, name, tags, attrs, timezone, created_at, \
         updated_at) VALUES ($1, $2, $2, $3, '{\"city\":\"Berlin\"}', 'Europe/Berlin', $4, $4) \
         RETURNING id"
    )
    .bind(channel)
    .bind(wa_id)
    .bind(tags)
    .bind(created)
    .fetch_one(pool)
    .await
    .unwrap())
}

pub(super) async fn an_audience_page_selects_by_channel_every_tag_and_creation_time(db: Db) {
    let ana = seed_tagged(&db, CH, "ana", r#"["customers","vip"]"#, 0).await;
    let _ben = seed_tagged(&db, CH, "ben", r#"["customers"]"#, 0).await;
    let cem = seed_tagged(&db, CH, "cem", r#"["customers","press","vip"]"#, 0).await;
    let _other = seed_tagged(&db, "other", "dan", r#"["customers","vip"]"#, 0).await;
    let _late = seed_tagged(&db, CH, "eve", r#"["customers","vip"]"#, 5).await;
    let tags = vec![
        "vip".to_string(),
        "customers".to_string(),
        "vip".to_string(),
    ];
    let page = db.audience_page(CH, &tags, t(1), 0, 10).await.unwrap();
    let ids: Vec<i64> = page.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![ana, cem]);
    let (_, first) = &page[0];
    assert_eq!(first.wa_id, "ana");
    assert_eq!(first.attrs["city"], "Berlin");
    assert_eq!(first.timezone.as_deref(), Some("Europe/Berlin"));
    assert!(first.tags.contains("vip"));
    // Paged by id.
    let first_page = db.audience_page(CH, &tags, t(1), 0, 1).await.unwrap();
    assert_eq!(first_page.len(), 1);
    let next = db.audience_page(CH, &tags, t(1), ana, 1).await.unwrap();
    assert_eq!(next[0].0, cem);
    // No tags: every contact of the channel created by then.
    let all = db.audience_page(CH, &[], t(1), 0, 10).await.unwrap();
    assert_eq!(all.len(), 3);
}

/// A run of `n` seeded contacts, its audience snapshotted: its id and the contacts.
async fn started_run(db: &Db, n: i64) -> (i64, Vec<i64>) {
    let contacts = seed_contacts(db, n).await;
    (run_of(db, &contacts).await, contacts)
}

/// A run claimed for `t(10)` with `contacts` snapshotted: its id.
async fn run_of(db: &Db, contacts: &[i64]) -> i64 {
    let run_id = db
        .claim_run("spring_sale", t(10), RunTrigger::Schedule, t(10))
        .await
        .unwrap()
        .run_id;
    db.snapshot_audience(run_id, None, contacts, t(10), t(10))
        .await
        .unwrap();
    run_id
}

/// One campaign message written as the dispatcher writes it (pending, for a real channel).
async fn campaign_send(db: &Db, run_id: i64, contact_id: i64, status: &str) -> CampaignSent {
    variant_send(db, (run_id, contact_id), None, status).await
}

/// [`campaign_send`] of a split campaign's `variant`.
async fn variant_send(
    db: &Db,
    (run_id, contact_id): (i64, i64),
    variant: Option<&str>,
    status: &str,
) -> CampaignSent {
    let message = Outbound::new(
        OutboundContent::text("offer"),
        Origin::Campaign {
            campaign: "spring_sale".into(),
            run: run_id,
            category: "marketing".into(),
            on_reply: None,
        },
    );
    let decision = Decision::Send {
        reason: "window open".into(),
    };
    let send = CampaignSend {
        run_id,
        contact_id,
        variant,
        channel: CH,
        message: &message,
        decision: &decision,
        status,
        policy: &Default::default(),
    };
    db.send_campaign_message(&send, t(20)).await.unwrap()
}

pub(super) async fn a_campaign_message_and_its_ledger_row_are_one_write_once(db: Db) {
    let (run_id, contacts) = started_run(&db, 2).await;
    let first = campaign_send(&db, run_id, contacts[0], "sent").await;
    assert!(first.created);
    let row = db.ledger_row(run_id, contacts[0]).await.unwrap().unwrap();
    assert_eq!(
        (row.decision, row.message_id, row.reason.as_deref()),
        (
            RecipientDecision::Sent,
            Some(first.message_id),
            Some("window open")
        )
    );
    // Written again (a dispatcher that lost its answer): the key finds the first message.
    let again = campaign_send(&db, run_id, contacts[0], "sent").await;
    assert_eq!((again.message_id, again.created), (first.message_id, false));
    let messages: i64 = with_pool!(&db, |pool| sqlx::query_scalar(
        "SELECT COUNT(*) FROM messages WHERE direction = 'out'"
    )
    .fetch_one(pool)
    .await
    .unwrap());
    assert_eq!(messages, 1);
    // The frequency cap counts it by its category, the messaging limit as no template.
    let sends = db
        .category_sends(contacts[0], "marketing", &[], t(0))
        .await
        .unwrap();
    assert_eq!(sends, 1);
    assert_eq!(
        db.category_sends(contacts[0], "utility", &[], t(0))
            .await
            .unwrap(),
        0
    );
    assert_eq!(db.template_recipients(CH, t(0)).await.unwrap().contacts, 0);
    assert!(
        db.last_campaign_message(contacts[0])
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        db.last_campaign_message(contacts[1])
            .await
            .unwrap()
            .is_none()
    );
}

pub(super) async fn the_outbox_claims_conversational_messages_before_campaign_ones(db: Db) {
    let (run_id, contacts) = started_run(&db, 3).await;
    campaign_send(&db, run_id, contacts[0], "pending").await;
    campaign_send(&db, run_id, contacts[1], "pending").await;
    assert_eq!(db.campaign_backlog(CH).await.unwrap(), 2);
    // A reply to a customer written after the campaign's messages.
    let customer = Contact::new("seed3");
    let mut reply = said(
        OutboundContent::text("your order shipped"),
        Decision::Send {
            reason: "window open".into(),
        },
    );
    reply.status = "pending".into();
    let records = [reply];
    let reply_id = db
        .commit_turn(&TurnWrite {
            outbound: &records,
            ..bare_turn(Some(contacts[2]), &customer, t(21))
        })
        .await
        .unwrap()
        .outbound_ids[0];
    let lease = std::time::Duration::from_secs(60);
    let first = db.claim_outbox(CH, t(22), 1, "s", lease).await.unwrap();
    assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), [reply_id]);
    let rest = db.claim_outbox(CH, t(22), 10, "s", lease).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|r| r.idempotency_key.starts_with("fg-c")));
}
