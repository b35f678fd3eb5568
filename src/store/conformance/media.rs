//! Customers' files: the row a turn writes with the message, the worker's claims with a
//! lease, retries, outcomes, and the server's generated secrets.

use chrono::Duration;

use super::{bare_turn, t};
use crate::domain::{Contact, Inbound, InboundContent, MediaRef};
use crate::store::{Db, LocalMedia, MediaFinish};

fn photo(id: &str, media_id: &str) -> Inbound {
    photo_with_sha256(id, media_id, "abc=", t(0))
}

fn photo_with_sha256(
    id: &str,
    media_id: &str,
    sha256: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Inbound {
    Inbound {
        id: id.into(),
        timestamp: at,
        content: InboundContent::Media {
            kind: "image".into(),
            caption: Some("Damaged box".into()),
            file: Some(MediaRef {
                id: media_id.into(),
                mime_type: Some("image/jpeg".into()),
                sha256: Some(sha256.into()),
                filename: None,
            }),
        },
        from_ad: false,
    }
}

/// A turn with a customer's file writes one pending row (a new contact's and a known
/// one's); a redelivered message adds none.
pub async fn a_file_message_is_one_pending_download(db: Db) {
    let contact = Contact::new("15550001");
    let first = photo("wamid.p1", "m1");
    let turn = bare_turn(None, &contact, t(0));
    let id = db
        .commit_turn(&crate::store::TurnWrite {
            inbound: Some(&first),
            ..turn
        })
        .await
        .unwrap()
        .contact_id;
    let second = photo("wamid.p2", "m2");
    db.commit_turn(&crate::store::TurnWrite {
        inbound: Some(&second),
        ..bare_turn(Some(id), &contact, t(1))
    })
    .await
    .unwrap();
    let again = db
        .commit_turn(&crate::store::TurnWrite {
            inbound: Some(&second),
            ..bare_turn(Some(id), &contact, t(2))
        })
        .await;
    assert!(again.unwrap_err().is_duplicate());
    let rows = db.contact_media(id).await.unwrap();
    let seen: Vec<(&str, &str, Option<&str>, &str)> = rows
        .iter()
        .map(|r| {
            (
                r.wamid.as_str(),
                r.status.as_str(),
                r.provider_id.as_deref(),
                r.wa_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("wamid.p1", "pending", Some("m1"), "15550001"),
            ("wamid.p2", "pending", Some("m2"), "15550001")
        ]
    );
    assert_eq!(rows[0].caption.as_deref(), Some("Damaged box"));
    assert_eq!(rows[0].sha256.as_deref(), Some("abc="));
}

/// A claimed row is the claimer's until its lease runs out; a retry is due at its time;
/// a finished row is claimed again (to tell the flow) only after its lease, and a notified
/// one never.
pub async fn downloads_are_claimed_with_a_lease_retried_and_finished(db: Db) {
    let contact = Contact::new("15550002");
    let message = photo("wamid.q1", "m9");
    db.commit_turn(&crate::store::TurnWrite {
        inbound: Some(&message),
        ..bare_turn(None, &contact, t(0))
    })
    .await
    .unwrap();
    let lease = Duration::minutes(5);
    let claimed = db.claim_media(t(0), t(0) + lease, 8).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let id = claimed[0].id;
    assert!(
        db.claim_media(t(1), t(1) + lease, 8)
            .await
            .unwrap()
            .is_empty()
    );
    // The worker died: after its lease the row is claimed again.
    assert_eq!(
        db.claim_media(t(6), t(6) + lease, 8).await.unwrap().len(),
        1
    );
    db.media_retry(id, "131052", t(7), t(6)).await.unwrap();
    assert!(
        db.claim_media(t(6), t(6) + lease, 8)
            .await
            .unwrap()
            .is_empty()
    );
    let again = db.claim_media(t(7), t(7) + lease, 8).await.unwrap();
    assert_eq!(
        (again[0].attempts, again[0].error.as_deref()),
        (1, Some("131052"))
    );
    let finish = MediaFinish::Ok {
        size: 42,
        mime: Some("image/png".into()),
        store_key: "ab/abcd".into(),
    };
    db.media_finished(id, &finish, t(7)).await.unwrap();
    let row = db.media(id).await.unwrap().unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.size,
            row.mime.as_deref(),
            row.attempts
        ),
        ("ok", Some(42), Some("image/png"), 2)
    );
    assert_eq!(row.store_key.as_deref(), Some("ab/abcd"));
    // Still under the lease of the worker that will tell the flow.
    assert!(
        db.claim_media(t(8), t(8) + lease, 8)
            .await
            .unwrap()
            .is_empty()
    );
    let told = db.claim_media(t(13), t(13) + lease, 8).await.unwrap();
    assert_eq!(told[0].status, "ok");
    db.media_notified(id, t(13)).await.unwrap();
    assert!(
        db.claim_media(t(60), t(60) + lease, 8)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A failed download keeps its reason; a file given directly is recorded `ok` or refused.
pub async fn failures_and_local_files_keep_their_outcome(db: Db) {
    let contact = Contact::new("15550003");
    let message = photo("wamid.r1", "m5");
    db.commit_turn(&crate::store::TurnWrite {
        inbound: Some(&message),
        ..bare_turn(None, &contact, t(0))
    })
    .await
    .unwrap();
    let id = db.claim_media(t(0), t(5), 8).await.unwrap()[0].id;
    let failed = MediaFinish::Failed {
        error: "sha256_mismatch".into(),
    };
    db.media_finished(id, &failed, t(1)).await.unwrap();
    let row = db.media(id).await.unwrap().unwrap();
    assert_eq!(
        (row.status.as_str(), row.error.as_deref(), row.store_key),
        ("failed", Some("sha256_mismatch"), None)
    );
    let local = |wamid: &'static str, error: Option<&'static str>| LocalMedia {
        channel: super::CH,
        wa_id: "15550003",
        wamid,
        kind: "document",
        mime: "application/pdf",
        caption: None,
        filename: Some("invoice.pdf"),
        size: 10,
        store_key: "cd/cdef",
        error,
    };
    let ok = db
        .insert_local_media(&local("wamid.r2", None), t(2))
        .await
        .unwrap();
    let big = db
        .insert_local_media(&local("wamid.r3", Some("too_large")), t(2))
        .await
        .unwrap();
    let ok = db.media(ok).await.unwrap().unwrap();
    assert_eq!(
        (
            ok.status.as_str(),
            ok.store_key.as_deref(),
            ok.filename.as_deref()
        ),
        ("ok", Some("cd/cdef"), Some("invoice.pdf"))
    );
    let big = db.media(big).await.unwrap().unwrap();
    assert_eq!(
        (big.status.as_str(), big.error.as_deref(), big.store_key),
        ("failed", Some("too_large"), None)
    );
    // Files given directly are told by their caller, never claimed; the failed download
    // is, once its lease ran out, to tell its flow.
    let claimed: Vec<i64> = db
        .claim_media(t(9), t(10), 8)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(claimed, [id]);
}

/// The first candidate for a secret is kept; later ones read it.
pub async fn a_server_secret_is_generated_once(db: Db) {
    let first = db
        .server_secret("media_url_key", "one", t(0))
        .await
        .unwrap();
    let second = db
        .server_secret("media_url_key", "two", t(1))
        .await
        .unwrap();
    assert_eq!((first.as_str(), second.as_str()), ("one", "one"));
}

/// The retention takes the rows and files of pruned messages: a file two rows named goes
/// once, a file a newer row names stays, a pending download stays with its row and keeps
/// the file its webhook announced (it may be storing it now) until it is over.
pub async fn pruned_messages_take_their_files_and_pending_downloads_stay(db: Db) {
    use crate::media::store::{content_key, sha256_forms};
    use crate::media::{MediaStore, Memory, sha256_hex};
    let files = Memory::default();
    let key = |bytes: &[u8]| content_key(&sha256_hex(bytes));
    let (shared, coming, kept) = (key(b"twice"), key(b"coming"), key(b"kept"));
    for k in [&shared, &coming, &kept] {
        files.put(k, b"bytes".to_vec()).await.unwrap();
    }
    let coming_sha = sha256_forms(&coming)[0].clone();
    const DAY: i64 = 24 * 60;
    // (wamid, at, how the download ended: a file, a failure, or still pending)
    let plan: [(&str, i64, Option<Option<&String>>); 7] = [
        ("wamid.a1", 0, Some(Some(&shared))),
        ("wamid.a2", 1, Some(Some(&shared))),
        ("wamid.b1", 2, Some(None)),
        ("wamid.c0", 3, Some(Some(&coming))),
        ("wamid.c1", 4, None),
        ("wamid.k0", 5, Some(Some(&kept))),
        ("wamid.k1", 100 * DAY, Some(Some(&kept))),
    ];
    for (i, (wamid, at, _)) in plan.iter().enumerate() {
        let contact = Contact::new(format!("1555002{i}"));
        // Only the pending download was announced with the file that is kept for it.
        let sha256 = if *wamid == "wamid.c1" {
            &coming_sha
        } else {
            "abc="
        };
        let message = photo_with_sha256(wamid, &format!("m{i}"), sha256, t(*at));
        db.commit_turn(&crate::store::TurnWrite {
            inbound: Some(&message),
            ..bare_turn(None, &contact, t(*at))
        })
        .await
        .unwrap();
    }
    let now = t(100 * DAY);
    let claimed = db
        .claim_media(now, now + Duration::minutes(5), 8)
        .await
        .unwrap();
    assert_eq!(claimed.len(), plan.len());
    for row in &claimed {
        let (_, _, outcome) = plan.iter().find(|p| p.0 == row.wamid).unwrap();
        let finish = match outcome {
            None => continue,
            Some(Some(key)) => MediaFinish::Ok {
                size: 5,
                mime: None,
                store_key: (*key).clone(),
            },
            Some(None) => MediaFinish::Failed {
                error: "too_large".into(),
            },
        };
        db.media_finished(row.id, &finish, now).await.unwrap();
        db.media_notified(row.id, now).await.unwrap();
    }

    let cutoff = t(10 * DAY);
    let pause = std::time::Duration::ZERO;
    let pruned = crate::retention::prune(&db, Some(&files), cutoff, pause)
        .await
        .unwrap();
    assert_eq!(
        (pruned.messages, pruned.media, pruned.media_files),
        (6, 5, 1)
    );
    assert_eq!(files.get(&shared).await.unwrap(), None);
    assert!(
        files.get(&coming).await.unwrap().is_some(),
        "a pending download's"
    );
    assert!(files.get(&kept).await.unwrap().is_some(), "a newer row's");
    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    let left = |db: Db| {
        let ids = ids.clone();
        async move {
            let mut wamids = Vec::new();
            for id in ids {
                if let Some(row) = db.media(id).await.unwrap() {
                    wamids.push(row.wamid);
                }
            }
            wamids
        }
    };
    assert_eq!(left(db.clone()).await, ["wamid.c1", "wamid.k1"]);
    let again = crate::retention::prune(&db, Some(&files), cutoff, pause)
        .await
        .unwrap();
    assert_eq!(
        (again.media, again.media_files),
        (0, 0),
        "nothing is left to prune"
    );

    // The pending download ends with the announced file: its row and the file go next.
    let c1 = claimed.iter().find(|r| r.wamid == "wamid.c1").unwrap().id;
    let stored = MediaFinish::Ok {
        size: 5,
        mime: None,
        store_key: coming.clone(),
    };
    db.media_finished(c1, &stored, now).await.unwrap();
    db.media_notified(c1, now).await.unwrap();
    let last = crate::retention::prune(&db, Some(&files), cutoff, pause)
        .await
        .unwrap();
    assert_eq!((last.media, last.media_files), (1, 1));
    assert_eq!(files.get(&coming).await.unwrap(), None);
    assert_eq!(left(db.clone()).await, ["wamid.k1"]);
}
