//! `retention: 90d` on a virtual clock: the history older than 90 days is pruned by the
//! real pruning task, with the customers' files of the pruned messages (their rows and the
//! files in the media directory), the unsettled messages and the contacts stay, and
//! conversations go on.

use std::sync::Arc;

use chrono::Duration;
use flowgate::app;
use flowgate::campaign_runner::CampaignRunner;
use flowgate::clock::{Clock, VirtualClock};
use flowgate::domain::{Inbound, InboundContent, OutboundContent};
use flowgate::media::local::{GivenFile, receive};
use flowgate::media::sha256_hex;
use flowgate::media::store::content_key;

use crate::support::{self, Backend, TestDb};

const CUSTOMERS: usize = 20;

fn wa_id(i: usize) -> String {
    format!("155500010{i:02}")
}

#[tokio::test]
async fn history_older_than_the_retention_is_pruned_and_conversations_go_on() {
    pruned_on(Backend::Sqlite).await;
}

#[tokio::test]
async fn history_older_than_the_retention_is_pruned_on_postgres() {
    pruned_on(Backend::Postgres).await;
}

async fn pruned_on(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::new(dir.path(), backend).await else {
        return;
    };
    let config = support::shipped_project(dir.path(), "retention: 90d\n");
    let loaded = app::load(Some(&config)).unwrap_or_else(|d| panic!("{d:?}"));
    assert_eq!(loaded.config.retention.unwrap().0, Duration::days(90));
    let clock = Arc::new(VirtualClock::new(VirtualClock::test_epoch()));
    let runtime = Arc::new(loaded.runtime(&db.url, clock.clone()).await.unwrap());
    let runner = Arc::new(CampaignRunner::new(
        runtime.clone(),
        &loaded.project.campaigns,
    ));
    let says = |i: usize| {
        let runtime = runtime.clone();
        let now = clock.now();
        async move {
            let inbound = Inbound::sandbox(InboundContent::text("hi"), now, now);
            runtime
                .inbound("sandbox", &wa_id(i), None, inbound)
                .await
                .unwrap()
        }
    };

    let media_dir = dir.path().join("data/media");
    let sends_photo = |i: usize, bytes: &'static [u8]| {
        let runtime = runtime.clone();
        let now = clock.now();
        let media_dir = media_dir.clone();
        async move {
            let file = GivenFile {
                kind: "image",
                name: "parcel.png",
                bytes: bytes.to_vec(),
                caption: None,
            };
            receive(&runtime, "sandbox", &wa_id(i), None, file, now)
                .await
                .unwrap();
            // Where the media directory keeps it.
            let key = content_key(&sha256_hex(bytes));
            media_dir.join(key)
        }
    };

    // Day 0: every customer talks to the bot, and customer 3 sends a photo. Day 2: an agent
    // writes to customer 0, whose window has closed: the message is queued (unsettled, so
    // never pruned).
    for i in 0..CUSTOMERS {
        assert!(!says(i).await.sent.is_empty(), "the bot answers");
    }
    let old_photo = sends_photo(3, b"an old photo").await;
    assert!(old_photo.exists(), "{} is stored", old_photo.display());
    clock.advance(Duration::days(2));
    runtime
        .agent_message("sandbox", &wa_id(0), OutboundContent::text("Still there?"))
        .await
        .unwrap();
    // Day 93: customer 1 writes again, customer 4 sends a photo; the cutoff is day 3.
    clock.advance(Duration::days(91));
    says(1).await;
    let new_photo = sends_photo(4, b"a new photo").await;
    let media_rows = "SELECT COUNT(*) FROM media";
    assert_eq!(support::count(&runtime.db, media_rows).await, 2);
    let pruned_media =
        || flowgate::metrics::counter_value("flowgate_pruned_rows_total", &[("table", "media")]);
    let pruned_before = pruned_media();
    let cutoff = (clock.now() - Duration::days(90)).timestamp_millis();
    let old = format!("SELECT COUNT(*) FROM messages WHERE created_at < {cutoff}");
    let before = support::count(&runtime.db, &old).await;
    assert!(before > 2 * CUSTOMERS as i64, "{before} old messages");
    let recent = format!("SELECT COUNT(*) FROM messages WHERE created_at >= {cutoff}");
    let recent_before = support::count(&runtime.db, &recent).await;

    let pruning = tokio::spawn(flowgate::retention::run(
        runner.clone(),
        Duration::days(90),
        std::time::Duration::from_millis(20),
    ));
    support::eventually("the old history is pruned", || async {
        support::count(&runtime.db, &old).await == 1
    })
    .await;
    support::eventually("the old photo is pruned", || async {
        support::count(&runtime.db, media_rows).await == 1 && !old_photo.exists()
    })
    .await;
    pruning.abort();
    assert!(!old_photo.exists(), "the old photo's file is deleted");
    assert!(new_photo.exists(), "the new photo's file stays");
    assert!(pruned_media() > pruned_before, "the metric counts it");

    assert_eq!(
        support::text(
            &runtime.db,
            &format!("SELECT status FROM messages WHERE created_at < {cutoff}")
        )
        .await,
        "queued",
        "the queued message stays however old"
    );
    assert_eq!(
        support::count(&runtime.db, &recent).await,
        recent_before,
        "nothing newer than 90 days is touched"
    );
    assert_eq!(
        support::count(&runtime.db, "SELECT COUNT(*) FROM contacts").await,
        CUSTOMERS as i64
    );
    // The conversations go on: customer 1 is answered, and customer 2's window reopens.
    assert!(!says(1).await.sent.is_empty());
    assert!(!says(2).await.sent.is_empty());
    runtime.db.close().await;
    db.clean_up().await;
}
