//! Turns, conversations, timers and flow versions: [`Db::commit_turn`] and what reads back
//! what it wrote.

use chrono::Duration;
use serde_json::json;

use super::*;
use crate::domain::{Contact, Decision, Inbound, InboundContent, Outbound, OutboundContent};
use crate::store::{Identifiers, StoreError, TimerRow, TurnWrite};

pub(super) async fn unknown_contact_is_new(db: Db) {
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact_id, None);
    assert_eq!(conv.contact, Contact::new("1555"));
    assert_eq!(conv.session, None);
    assert!(db.messages(CH, "1555", 10).await.unwrap().is_empty());
}

pub(super) async fn commit_turn_round_trip(db: Db) {
    let mut contact = Contact::new("1555");
    contact.name = Some("Ada".into());
    contact.tags.extend(["vip".to_string(), "beta".to_string()]);
    contact.attrs.insert("plan".into(), json!("pro"));
    contact.timezone = Some("Europe/Berlin".into());
    let msg = Inbound {
        id: "wamid.1".into(),
        timestamp: t(0),
        content: InboundContent::ButtonReply {
            id: "yes".into(),
            title: "Yes".into(),
        },
        from_ad: false,
    };
    contact.saw_customer_message(msg.timestamp);
    let sess = session("ask_name", t(1));
    let out = [
        said(
            OutboundContent::text("Hi Ada"),
            Decision::Send {
                reason: "window open".into(),
            },
        ),
        said(
            OutboundContent::Template {
                name: "hello".into(),
                language: "en".into(),
                params: vec![],
            },
            Decision::Skipped {
                reason: "quiet hours".into(),
            },
        ),
    ];
    let timers = [timer(t(60), "late"), timer(t(30), "early")];
    let turn = TurnWrite {
        session: Some(&sess),
        inbound: Some(&msg),
        outbound: &out,
        replace_timers: Some(&timers),
        ..bare_turn(None, &contact, t(1))
    };
    let committed = db.commit_turn(&turn).await.unwrap();
    assert_eq!(committed.outbound_ids.len(), 2);
    assert!(committed.outbound_ids[0] < committed.outbound_ids[1]);

    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact_id, Some(committed.contact_id));
    assert_eq!(conv.contact, contact);
    assert_eq!(conv.session, Some(sess));
    // Same number, other channel: a different contact.
    assert_eq!(
        db.load_conversation("other", "1555")
            .await
            .unwrap()
            .contact_id,
        None
    );

    let log = db.messages(CH, "1555", 10).await.unwrap();
    assert_eq!(log.len(), 3);
    let (inb, hi, tpl) = (&log[0], &log[1], &log[2]);
    assert_eq!(
        (
            inb.direction.as_str(),
            inb.kind.as_str(),
            inb.status.as_str()
        ),
        ("in", "button_reply", "received")
    );
    assert_eq!(inb.wamid.as_deref(), Some("wamid.1"));
    assert_eq!(
        (inb.decision.as_deref(), inb.reason.as_deref()),
        (None, None)
    );
    assert_eq!(
        serde_json::from_value::<Inbound>(inb.body.clone()).unwrap(),
        msg
    );
    assert_eq!(inb.created_at, t(1));

    assert_eq!(hi.id, committed.outbound_ids[0]);
    assert_eq!((hi.direction.as_str(), hi.kind.as_str()), ("out", "text"));
    assert_eq!(
        (hi.decision.as_deref(), hi.reason.as_deref()),
        (Some("send"), Some("window open"))
    );
    assert_eq!((hi.wamid.as_deref(), hi.status.as_str()), (None, "sent"));
    assert_eq!(
        serde_json::from_value::<Outbound>(hi.body.clone()).unwrap(),
        out[0].message
    );
    assert_eq!(tpl.id, committed.outbound_ids[1]);
    assert_eq!(tpl.kind, "template");
    assert_eq!(
        (tpl.decision.as_deref(), tpl.reason.as_deref()),
        (Some("skipped"), Some("quiet hours"))
    );

    let due = db.due_timers(t(60), 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(
        due[0],
        TimerRow {
            id: due[0].id,
            channel: CH.into(),
            wa_id: "1555".into(),
            contact_id: committed.contact_id,
            due_at: t(30),
            payload: json!({ "timer": "early" }),
        }
    );
    assert_eq!(due[1].due_at, t(60));

    // The last `limit` messages, still oldest first.
    let last_two = db.messages(CH, "1555", 2).await.unwrap();
    assert_eq!(last_two, log[1..].to_vec());
}

pub(super) async fn second_turn_updates_the_contact(db: Db) {
    let mut contact = Contact::new("1555");
    let id = db
        .commit_turn(&bare_turn(None, &contact, t(0)))
        .await
        .unwrap()
        .contact_id;
    contact.name = Some("Grace".into());
    contact.tags.insert("new".into());
    let again = db
        .commit_turn(&bare_turn(Some(id), &contact, t(1)))
        .await
        .unwrap();
    assert_eq!(again.contact_id, id);
    assert_eq!(
        db.load_conversation(CH, "1555").await.unwrap().contact,
        contact
    );

    // A second "first" turn (a race with another worker) lands on the same row.
    let racing = db
        .commit_turn(&bare_turn(None, &contact, t(2)))
        .await
        .unwrap();
    assert_eq!(racing.contact_id, id);
}

pub(super) async fn turns_refuse_identifiers_that_changed_since_they_were_resolved(db: Db) {
    let (phone, bsuid, new_phone) = ("1555", "US.1", "1666");
    let resolved = db
        .resolve_contact(CH, Identifiers::new(Some(phone), Some(bsuid)), t(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resolved.key, phone);
    let loaded = db.load_conversation(CH, phone).await.unwrap();
    let id = loaded.contact_id.expect("created with both identifiers");
    db.change_identity(
        CH,
        Identifiers::new(Some(phone), None),
        Identifiers::new(Some(new_phone), None),
        t(1),
    )
    .await
    .unwrap();
    // A turn on the contact as loaded before the change: its key no longer matches.
    let msg = inbound("wamid.before", "hi", t(2));
    let err = db
        .commit_turn(&TurnWrite {
            inbound: Some(&msg),
            ..bare_turn(Some(id), &loaded.contact, t(2))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::UnknownContact { id: e } if e == id),
        "{err}"
    );
    // A turn that would create a contact under what is now an alias (the BSUID,
    // resolved to itself before the contact learned it): refused, not a second contact.
    let err = db
        .commit_turn(&bare_turn(None, &Contact::new(bsuid), t(2)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::IdentifierTaken { identifier } if identifier == bsuid),
        "{err}"
    );
    assert_eq!(count_contacts(&db).await, 1);
}

pub(super) async fn last_customer_message_at_round_trips(db: Db) {
    let mut contact = Contact::new("1555");
    let id = db
        .commit_turn(&bare_turn(None, &contact, t(0)))
        .await
        .unwrap()
        .contact_id;
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact.last_customer_message_at, None);

    // Millisecond precision survives.
    let at = t(5) + Duration::milliseconds(123);
    contact.saw_customer_message(at);
    db.commit_turn(&bare_turn(Some(id), &contact, t(6)))
        .await
        .unwrap();
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact.last_customer_message_at, Some(at));
}

pub(super) async fn session_is_replaced_then_deleted(db: Db) {
    let contact = Contact::new("1555");
    let first = session("ask_name", t(0));
    let id = db
        .commit_turn(&TurnWrite {
            session: Some(&first),
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap()
        .contact_id;

    let mut second = session("ask_email", t(1));
    second.flow_version = "v2".into();
    second.state = json!({ "email": null });
    db.commit_turn(&TurnWrite {
        session: Some(&second),
        ..bare_turn(Some(id), &contact, t(1))
    })
    .await
    .unwrap();
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.session, Some(second));

    db.commit_turn(&bare_turn(Some(id), &contact, t(2)))
        .await
        .unwrap();
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact_id, Some(id));
    assert_eq!(conv.session, None);
}

pub(super) async fn replace_timers_none_keeps_some_replaces(db: Db) {
    let contact = Contact::new("1555");
    let id = contact_with_timers(&db, "1555", &[timer(t(10), "a"), timer(t(20), "b")]).await;
    let other = contact_with_timers(&db, "1666", &[timer(t(15), "other")]).await;
    assert_ne!(id, other);

    db.commit_turn(&bare_turn(Some(id), &contact, t(1)))
        .await
        .unwrap();
    assert_eq!(timer_tags(&db).await, ["a", "other", "b"]);

    let new = [timer(t(30), "c")];
    db.commit_turn(&TurnWrite {
        replace_timers: Some(&new),
        ..bare_turn(Some(id), &contact, t(2))
    })
    .await
    .unwrap();
    assert_eq!(timer_tags(&db).await, ["other", "c"]);

    db.commit_turn(&TurnWrite {
        replace_timers: Some(&[]),
        ..bare_turn(Some(id), &contact, t(3))
    })
    .await
    .unwrap();
    assert_eq!(timer_tags(&db).await, ["other"]);
}

pub(super) async fn fired_timer_is_deleted(db: Db) {
    let contact = Contact::new("1555");
    let id = contact_with_timers(&db, "1555", &[timer(t(10), "a"), timer(t(20), "b")]).await;
    let fired = db.due_timers(t(10), 1).await.unwrap().remove(0);
    assert_eq!(fired.payload["timer"], "a");

    db.commit_turn(&TurnWrite {
        fired_timer: Some(fired.id),
        ..bare_turn(Some(id), &contact, t(10))
    })
    .await
    .unwrap();
    assert_eq!(timer_tags(&db).await, ["b"]);

    // Firing and rescheduling in one turn keeps the new timers, even though the table
    // was emptied first (ids are never reused).
    let fired = db.due_timers(t(20), 1).await.unwrap().remove(0);
    let next = [timer(t(40), "c")];
    db.commit_turn(&TurnWrite {
        fired_timer: Some(fired.id),
        replace_timers: Some(&next),
        ..bare_turn(Some(id), &contact, t(20))
    })
    .await
    .unwrap();
    let left = db.due_timers(t(100), 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].payload["timer"], "c");
    assert!(left[0].id > fired.id);
}

pub(super) async fn due_timers_are_ordered_and_limited(db: Db) {
    contact_with_timers(&db, "1", &[timer(t(30), "1@30"), timer(t(10), "1@10")]).await;
    contact_with_timers(&db, "2", &[timer(t(10), "2@10"), timer(t(90), "2@90")]).await;

    assert!(db.due_timers(t(9), 10).await.unwrap().is_empty());
    let due = db.due_timers(t(30), 10).await.unwrap();
    let tags: Vec<_> = due.iter().map(|r| r.payload["timer"].clone()).collect();
    // Ties on due_at go by id, i.e. creation order.
    assert_eq!(tags, [json!("1@10"), json!("2@10"), json!("1@30")]);
    assert!(due[0].id < due[1].id);
    assert_eq!((due[1].wa_id.as_str(), due[1].channel.as_str()), ("2", CH));

    let first_two = db.due_timers(t(30), 2).await.unwrap();
    assert_eq!(first_two, due[..2].to_vec());
    assert!(db.due_timers(t(30), 0).await.unwrap().is_empty());
    assert!(db.due_timers(t(30), -1).await.unwrap().is_empty());
}

pub(super) async fn next_timer_at_is_the_earliest(db: Db) {
    assert_eq!(db.next_timer_at().await.unwrap(), None);
    contact_with_timers(&db, "1", &[timer(t(30), "a")]).await;
    contact_with_timers(&db, "2", &[timer(t(20), "b"), timer(t(50), "c")]).await;
    assert_eq!(db.next_timer_at().await.unwrap(), Some(t(20)));
}

pub(super) async fn flow_versions_are_immutable(db: Db) {
    assert_eq!(db.flow_version("welcome", "v1").await.unwrap(), None);
    db.save_flow_version("welcome", "v1", "{\"a\":1}", t(0))
        .await
        .unwrap();
    db.save_flow_version("welcome", "v1", "{\"a\":2}", t(1))
        .await
        .unwrap();
    db.save_flow_version("welcome", "v2", "{\"a\":3}", t(2))
        .await
        .unwrap();
    assert_eq!(
        db.flow_version("welcome", "v1").await.unwrap().as_deref(),
        Some("{\"a\":1}")
    );
    assert_eq!(
        db.flow_version("welcome", "v2").await.unwrap().as_deref(),
        Some("{\"a\":3}")
    );
    assert_eq!(db.flow_version("other", "v1").await.unwrap(), None);
}

pub(super) async fn reset_forgets_session_and_timers_only(db: Db) {
    let contact = Contact::new("1555");
    let sess = session("ask_name", t(0));
    let msg = inbound("wamid.1", "hi", t(0));
    let timers = [timer(t(10), "mine")];
    let id = db
        .commit_turn(&TurnWrite {
            session: Some(&sess),
            inbound: Some(&msg),
            replace_timers: Some(&timers),
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap()
        .contact_id;
    contact_with_timers(&db, "1666", &[timer(t(10), "theirs")]).await;

    db.reset_conversation(CH, "1555").await.unwrap();
    let conv = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(conv.contact_id, Some(id));
    assert_eq!(conv.session, None);
    assert_eq!(timer_tags(&db).await, ["theirs"]);
    assert_eq!(db.messages(CH, "1555", 10).await.unwrap().len(), 1);

    // Resetting someone never seen is a no-op.
    db.reset_conversation(CH, "9999").await.unwrap();
}

pub(super) async fn failing_turn_writes_nothing(db: Db) {
    let mut contact = Contact::new("1555");
    let first = session("ask_name", t(0));
    let msg = inbound("wamid.1", "hi", t(0));
    let timers = [timer(t(10), "kept")];
    let id = db
        .commit_turn(&TurnWrite {
            session: Some(&first),
            inbound: Some(&msg),
            replace_timers: Some(&timers),
            ..bare_turn(None, &contact, t(0))
        })
        .await
        .unwrap()
        .contact_id;
    let before = db.load_conversation(CH, "1555").await.unwrap();

    // The same inbound message again violates the dedupe index, after the contact and the
    // session were already written inside the transaction.
    contact.name = Some("Changed".into());
    let second = session("ask_email", t(1));
    let out = [said(
        OutboundContent::text("again?"),
        Decision::Send {
            reason: "window open".into(),
        },
    )];
    let new_timers = [timer(t(20), "replacement")];
    let err = db
        .commit_turn(&TurnWrite {
            session: Some(&second),
            inbound: Some(&msg),
            outbound: &out,
            replace_timers: Some(&new_timers),
            fired_timer: None,
            ..bare_turn(Some(id), &contact, t(1))
        })
        .await
        .unwrap_err();
    assert!(err.is_duplicate(), "{err}");

    let after = db.load_conversation(CH, "1555").await.unwrap();
    assert_eq!(after.contact, before.contact);
    assert_eq!(after.session, before.session);
    assert_eq!(db.messages(CH, "1555", 10).await.unwrap().len(), 1);
    assert_eq!(timer_tags(&db).await, ["kept"]);

    // A new contact in a failing turn is not created either.
    let stranger = Contact::new("1777");
    let err = db
        .commit_turn(&TurnWrite {
            inbound: Some(&msg),
            ..bare_turn(None, &stranger, t(2))
        })
        .await
        .unwrap_err();
    assert!(err.is_duplicate(), "{err}");
    assert_eq!(
        db.load_conversation(CH, "1777").await.unwrap().contact_id,
        None
    );

    // The pool is still usable after the rollback.
    db.commit_turn(&bare_turn(Some(id), &contact, t(3)))
        .await
        .unwrap();
}
