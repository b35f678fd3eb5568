//! Project files' uploads: one claim per channel and content, ids recorded with their
//! expiry, a stale or refused id claimed again.

use chrono::{DateTime, Duration, Utc};

use crate::clock::VirtualClock;
use crate::store::{Db, MediaUpload, MediaUploadState};

fn t(minutes: i64) -> DateTime<Utc> {
    VirtualClock::test_epoch() + Duration::minutes(minutes)
}

const SHA: &str = "5f2b0c";

/// A claim at minute `now`: stale when the id expires within an hour, a two-minute lease.
async fn claim(db: &Db, owner: &str, now: i64) -> bool {
    db.claim_media_upload("main", SHA, owner, t(now), t(now + 60), t(now + 2))
        .await
        .unwrap()
}

pub async fn an_upload_is_claimed_once_recorded_and_claimed_again_when_stale(db: Db) {
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Missing
    );
    assert!(claim(&db, "a", 0).await, "the first claim writes the row");
    assert!(!claim(&db, "b", 1).await, "a's lease holds");
    assert!(
        db.claim_media_upload("other", SHA, "b", t(1), t(61), t(3))
            .await
            .unwrap(),
        "another channel uploads its own"
    );
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Uploading {
            owner: "a".into(),
            lease_until: t(2)
        }
    );
    let upload = MediaUpload {
        media_id: "m1".into(),
        expires_at: t(1000),
    };
    assert!(
        !db.record_media_upload("main", SHA, "b", &upload, t(1))
            .await
            .unwrap()
    );
    assert!(
        db.record_media_upload("main", SHA, "a", &upload, t(1))
            .await
            .unwrap()
    );
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Uploaded(upload.clone())
    );
    assert_eq!(db.media_upload_count("main").await.unwrap(), 1);
    assert!(!claim(&db, "b", 10).await, "a fresh id is not claimed");
    assert!(
        claim(&db, "b", 941).await,
        "within an hour of its expiry it is"
    );
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Uploading {
            owner: "b".into(),
            lease_until: t(943)
        }
    );
    // A failed upload gives the claim back at once.
    db.release_media_upload("main", SHA, "b").await.unwrap();
    assert!(claim(&db, "c", 942).await);
}

pub async fn a_refused_id_is_dropped_unless_a_newer_one_replaced_it(db: Db) {
    assert!(claim(&db, "a", 0).await);
    let first = MediaUpload {
        media_id: "m1".into(),
        expires_at: t(1000),
    };
    db.record_media_upload("main", SHA, "a", &first, t(0))
        .await
        .unwrap();
    db.drop_media_id("main", SHA, "m0").await.unwrap();
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Uploaded(first),
        "an older id's refusal drops nothing"
    );
    db.drop_media_id("main", SHA, "m1").await.unwrap();
    assert_eq!(
        db.media_upload("main", SHA).await.unwrap(),
        MediaUploadState::Missing
    );
    assert!(claim(&db, "b", 1).await, "a dropped id is claimed again");
}
