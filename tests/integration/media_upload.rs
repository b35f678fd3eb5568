//! Project files sent by media id: the real server (webhook in, outbox sender out) on a
//! virtual clock, against the fake Graph API's `POST …/media`. A file is uploaded once per
//! channel and its id reused (two sends at once upload it once), uploaded again after its
//! expiry, when WhatsApp no longer knows the id (`131053`, once) and when the file changed.

use crate::support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use flowgate::clock::{Clock, VirtualClock};
use serde_json::{Value, json};
use support::channel::{MainChannel, PHONE_NUMBER_ID};
use support::fake_graph::{FakeGraph, Recorded, Reply, Script};
use support::{Backend, Running, TestDb};

const FLOW: &str = r#"
flow: menu
triggers:
  - keywords: [menu]
steps:
  show:
    say: "Today's menu"
    media: { type: image, file: media/menu.jpg }
"#;

const DOC_FLOW: &str = r#"
flow: terms
triggers:
  - keywords: [terms]
steps:
  send:
    say: "Our terms"
    media: { type: document, file: media/terms.pdf, filename: "Terms 2026.pdf" }
"#;

/// A JPEG's first bytes, then `n` bytes of filler (the fake does not decode images).
fn jpeg(n: usize, fill: u8) -> Vec<u8> {
    let mut bytes = vec![
        0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0,
    ];
    bytes.resize(bytes.len() + n, fill);
    bytes
}

struct Project {
    dir: tempfile::TempDir,
    fake: FakeGraph,
    clock: Arc<VirtualClock>,
    database: TestDb,
    server: Running,
    channel: MainChannel,
}

static MESSAGE: AtomicU64 = AtomicU64::new(0);

impl Project {
    async fn start(backend: Backend, dialog360: bool) -> Option<Project> {
        Self::start_with(backend, dialog360, "").await
    }

    /// [`Project::start`] with `extra` config.
    async fn start_with(backend: Backend, dialog360: bool, extra: &str) -> Option<Project> {
        let channel = MainChannel { dialog360 };
        let fake = channel.fake().await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("flows")).unwrap();
        std::fs::create_dir_all(root.join("media")).unwrap();
        std::fs::write(root.join("flows/menu.yaml"), FLOW).unwrap();
        std::fs::write(root.join("flows/terms.yaml"), DOC_FLOW).unwrap();
        std::fs::write(root.join("media/menu.jpg"), jpeg(2000, 7)).unwrap();
        std::fs::write(root.join("media/terms.pdf"), b"%PDF-1.7\n% terms\n").unwrap();
        std::fs::write(root.join("templates.yaml"), "templates: []\n").unwrap();
        let config = format!(
            "flows: flows\ntemplates: templates.yaml\noutbox:\n  media_expiry: 30d\n  \
             media_renew_before: 1d\nchannels:\n{}{extra}",
            channel.config(&fake)
        );
        std::fs::write(root.join("flowgate.yaml"), config).unwrap();
        let loaded = flowgate::app::load(Some(&root.join("flowgate.yaml"))).expect("it loads");
        let database = TestDb::new(root, backend).await?;
        let clock = Arc::new(VirtualClock::new(Utc::now()));
        let server = Running::start(&loaded, &database.url, clock.clone()).await;
        Some(Project {
            dir,
            fake,
            clock,
            database,
            server,
            channel,
        })
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `wa_id` writes `text` (a signed webhook, timed by the virtual clock).
    async fn customer(&self, wa_id: &str, text: &str) {
        let n = MESSAGE.fetch_add(1, Ordering::Relaxed);
        let message = json!({
            "from": wa_id,
            "id": format!("wamid.media.{wa_id}.{n}"),
            "timestamp": self.clock.now().timestamp().to_string(),
            "type": "text",
            "text": {"body": text},
        });
        self.channel.post_message(&self.server, message).await;
    }

    /// The accepted sends (answered with a wamid), once there are `n`.
    async fn accepted_sends(&self, n: usize) -> Vec<Recorded> {
        let mut sends = Vec::new();
        support::eventually(&format!("{n} sends accepted"), || {
            sends = self
                .fake
                .sends()
                .into_iter()
                .filter(|s| s.wamid.is_some())
                .collect();
            std::future::ready(sends.len() >= n)
        })
        .await;
        sends
    }

    async fn clean_up(self) {
        self.server.shutdown().await;
        self.database.clean_up().await;
    }
}

fn image_id(send: &Recorded) -> &str {
    send.body["image"]["id"].as_str().expect("sent by media id")
}

/// Two customers at once, then a third: one upload (with WhatsApp's fields and the file's
/// bytes), three sends by its id, and one row in the store.
async fn one_upload_serves_every_send(backend: Backend) {
    let Some(p) = Project::start(backend, false).await else {
        return;
    };
    // A slow upload, so the second send arrives while the first is uploading.
    p.fake.delay_uploads(Duration::from_millis(400));
    tokio::join!(
        p.customer("15550001001", "menu"),
        p.customer("15550001002", "menu")
    );
    p.accepted_sends(2).await;
    p.customer("15550001003", "menu").await;
    let sends = p.accepted_sends(3).await;

    let uploads = p.fake.uploads();
    assert_eq!(uploads.len(), 1, "one upload for three sends");
    let upload = &uploads[0];
    assert_eq!(upload.path, format!("/v25.0/{PHONE_NUMBER_ID}/media"));
    assert_eq!(upload.messaging_product, "whatsapp");
    assert_eq!(upload.mime, "image/jpeg");
    assert_eq!(upload.file_name, "menu.jpg");
    assert_eq!(
        upload.bytes,
        std::fs::read(p.path("media/menu.jpg")).unwrap()
    );
    for send in &sends {
        assert_eq!(image_id(send), upload.id);
        assert_eq!(send.body["image"]["caption"], "Today's menu");
        assert!(send.body["image"].get("link").is_none(), "{}", send.body);
    }
    assert_eq!(p.server.db.media_upload_count("main").await.unwrap(), 1);
    p.clean_up().await;
}

#[tokio::test]
async fn a_project_file_is_uploaded_once_and_its_id_reused() {
    one_upload_serves_every_send(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_project_file_is_uploaded_once_and_its_id_reused_on_postgres() {
    one_upload_serves_every_send(Backend::Postgres).await;
}

/// `media.upload_timeout` bounds an upload: one slower than it is given up (counted
/// `failed` on `/metrics`) and the message retried, which goes out once an upload fits.
#[tokio::test]
async fn an_upload_slower_than_its_timeout_is_given_up_and_retried() {
    let extra = "media:\n  upload_timeout: 1s\n";
    let p = Project::start_with(Backend::Sqlite, false, extra)
        .await
        .unwrap();
    let failed = r#"flowgate_media_uploads_total{outcome="failed"}"#;
    let uploaded = r#"flowgate_media_uploads_total{outcome="uploaded"}"#;
    let (failed_before, uploaded_before) = (
        p.server.metric(failed).await,
        p.server.metric(uploaded).await,
    );
    p.fake.delay_uploads(Duration::from_secs(3));
    let started = std::time::Instant::now();
    p.customer("15550006001", "menu").await;
    support::eventually("the slow upload is given up", || async {
        p.server.metric(failed).await > failed_before
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "given up after its 1 s, not when the fake answered"
    );
    assert!(
        p.fake.sends().is_empty(),
        "nothing was sent without its file"
    );
    // WhatsApp is quick again; the retry's back-off passes on the virtual clock. The sender
    // counts the failure before it reads the clock for the retry's time, so the clock goes
    // on moving (a second per poll, well inside the customer's window) until the retry is
    // sent: under load it may read the clock after the first five minutes were added.
    p.fake.delay_uploads(Duration::ZERO);
    p.clock.advance(chrono::Duration::minutes(5));
    support::eventually("the retry is sent", || {
        p.clock.advance(chrono::Duration::seconds(1));
        std::future::ready(p.fake.sends().iter().any(|s| s.wamid.is_some()))
    })
    .await;
    let sends = p.accepted_sends(1).await;
    assert_eq!(image_id(&sends[0]), p.fake.uploads().last().unwrap().id);
    assert!(p.server.metric(uploaded).await > uploaded_before);
    assert!(p.server.metric("flowgate_media_upload_bytes_total").await >= 2000.0);
    p.clean_up().await;
}

#[tokio::test]
async fn an_upload_is_renewed_before_it_expires() {
    let p = Project::start(Backend::Sqlite, false).await.unwrap();
    p.customer("15550002001", "menu").await;
    let first = image_id(&p.accepted_sends(1).await[0]).to_string();

    // 28 days on: the id has more than a day left, so it is still used.
    p.clock.advance(chrono::Duration::days(28));
    p.customer("15550002001", "menu").await;
    let sends = p.accepted_sends(2).await;
    assert_eq!(image_id(&sends[1]), first);
    assert_eq!(p.fake.uploads().len(), 1);

    // 29 days and a minute after the upload: within a day of its expiry, uploaded again.
    p.clock
        .advance(chrono::Duration::days(1) + chrono::Duration::minutes(1));
    p.customer("15550002001", "menu").await;
    let sends = p.accepted_sends(3).await;
    let uploads = p.fake.uploads();
    assert_eq!(uploads.len(), 2, "uploaded again before the expiry");
    assert_eq!(image_id(&sends[2]), uploads[1].id);
    assert_ne!(uploads[1].id, first);
    p.clean_up().await;
}

#[tokio::test]
async fn an_id_whatsapp_refuses_is_uploaded_again_once_then_the_message_fails() {
    let p = Project::start(Backend::Sqlite, false).await.unwrap();
    p.customer("15550003001", "menu").await;
    let first = image_id(&p.accepted_sends(1).await[0]).to_string();

    // WhatsApp lost the id: the send is refused with 131053, the file uploaded again, and
    // the message goes out by the new id.
    p.fake.forget_media(&first);
    p.customer("15550003001", "menu").await;
    let sends = p.accepted_sends(2).await;
    let uploads = p.fake.uploads();
    assert_eq!(uploads.len(), 2);
    assert_eq!(image_id(&sends[1]), uploads[1].id);
    let refused: Vec<Recorded> = p
        .fake
        .sends()
        .into_iter()
        .filter(|s| s.status == 400)
        .collect();
    assert_eq!(refused.len(), 1, "one refusal");
    assert_eq!(image_id(&refused[0]), first);

    // Refused again after the new upload: one more upload, then the message fails with
    // WhatsApp's reason (no loop).
    p.fake.script(Script::always(Reply::graph_error(131053)));
    p.fake.forget_media(&uploads[1].id);
    p.customer("15550003001", "menu").await;
    let mut failed = None;
    for _ in 0..600 {
        let entries = p.server.db.outbox_entries("main", 100).await.unwrap();
        failed = entries.into_iter().find(|e| e.status == "failed");
        if failed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = failed.expect("the message fails within 30 s");
    assert_eq!(failed.error_code, Some(131053), "{failed:?}");
    assert_eq!(p.fake.uploads().len(), 3, "one upload again, not more");
    p.clean_up().await;
}

#[tokio::test]
async fn a_changed_file_is_uploaded_again_and_documents_keep_their_name() {
    let p = Project::start(Backend::Sqlite, false).await.unwrap();
    p.customer("15550004001", "menu").await;
    p.accepted_sends(1).await;
    std::fs::write(p.path("media/menu.jpg"), jpeg(3000, 9)).unwrap();
    p.customer("15550004001", "menu").await;
    let sends = p.accepted_sends(2).await;
    let uploads = p.fake.uploads();
    assert_eq!(uploads.len(), 2, "new content, new upload");
    assert_eq!(uploads[1].bytes, jpeg(3000, 9));
    assert_eq!(image_id(&sends[1]), uploads[1].id);

    p.customer("15550004001", "terms").await;
    let sends = p.accepted_sends(3).await;
    let document: &Value = &sends[2].body["document"];
    let uploads = p.fake.uploads();
    assert_eq!(uploads[2].mime, "application/pdf");
    assert_eq!(document["id"], uploads[2].id.as_str());
    assert_eq!(document["filename"], "Terms 2026.pdf");
    assert_eq!(document["caption"], "Our terms");
    p.clean_up().await;
}

#[tokio::test]
async fn dialog360_uploads_to_its_media_endpoint_with_its_key() {
    let p = Project::start(Backend::Sqlite, true).await.unwrap();
    p.customer("15550005001", "menu").await;
    let sends = p.accepted_sends(1).await;
    let uploads = p.fake.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].path, "/media");
    assert_eq!(image_id(&sends[0]), uploads[0].id);
    p.clean_up().await;
}

/// `flowgate check` on a project whose flow sends `file` (written as `media/menu.jpg`).
async fn check(files: &[(&str, &[u8])], flow_file: &str, kind: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let root: &Path = dir.path();
    std::fs::create_dir_all(root.join("flows")).unwrap();
    std::fs::create_dir_all(root.join("media")).unwrap();
    for (name, bytes) in files {
        std::fs::write(root.join(name), bytes).unwrap();
    }
    let flow = format!(
        "flow: menu\ntriggers:\n  - keywords: [menu]\nsteps:\n  show:\n    say: \"Menu\"\n    \
         media: {{ type: {kind}, file: {flow_file} }}\n"
    );
    std::fs::write(root.join("flows/menu.yaml"), flow).unwrap();
    std::fs::write(root.join("templates.yaml"), "templates: []\n").unwrap();
    std::fs::write(
        root.join("flowgate.yaml"),
        "flows: flows\ntemplates: templates.yaml\n",
    )
    .unwrap();
    let out = support::run_flowgate(&root.join("flowgate.yaml"), &["check"]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn check_refuses_a_missing_file_with_its_location_and_the_nearest_name() {
    let jpg = jpeg(10, 0);
    let (ok, text) = check(&[("media/menu.jpeg", &jpg)], "media/menu.jpg", "image").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("the project file `media/menu.jpg` does not exist"),
        "{text}"
    );
    assert!(
        text.contains("menu.yaml:7"),
        "the location of `file:`: {text}"
    );
    assert!(text.contains("did you mean `media/menu.jpeg`?"), "{text}");

    let (ok, text) = check(&[("media/menu.jpg", &jpg)], "media/menu.jpg", "image").await;
    assert!(ok, "the file is there: {text}");
}

#[tokio::test]
async fn check_refuses_an_oversized_or_mistyped_file_with_its_location() {
    let big = jpeg(5 * 1024 * 1024, 0);
    let (ok, text) = check(&[("media/menu.jpg", &big)], "media/menu.jpg", "image").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("WhatsApp takes images up to 5.0 MB"),
        "{text}"
    );
    assert!(text.contains("menu.yaml:7"), "{text}");

    let gif = b"GIF89a\x01\x00\x01\x00".to_vec();
    let (ok, text) = check(&[("media/menu.gif", &gif)], "media/menu.gif", "image").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("does not take `menu.gif` as an image"),
        "{text}"
    );

    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    let (ok, text) = check(&[("media/menu.jpg", &png)], "media/menu.jpg", "image").await;
    assert!(!ok, "{text}");
    assert!(
        text.contains("named as JPEG but its content is PNG"),
        "{text}"
    );

    let (ok, text) = check(&[("media/clip.mp4", &png)], "media/clip.mp4", "sticker").await;
    assert!(!ok, "{text}");
    assert!(text.contains("as a sticker"), "{text}");
}
