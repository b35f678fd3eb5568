//! Customers' files end to end: the real server on port 0, a `cloud_api` (or `dialog360`)
//! channel at the fake Graph API, which serves the files (`GET /{media-id}`, then the
//! download URL, both needing the channel's credentials), signed webhooks in, and an HTTP
//! target for the flow's `http` step that fetches the link it is given. Loopback only;
//! every wait polls with a deadline.

use crate::support;

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::State;
use flowgate::app;
use flowgate::clock::SystemClock;
use serde_json::{Value, json};
use support::channel::MainChannel;
use support::fake_graph::{FakeGraph, FakeMedia, Serving};
use support::{Backend, Running, TestDb, eventually};

const MEDIA_SECRET: &str = "test-media-secret";
/// `media.max_bytes` in these tests.
const MAX_BYTES: usize = 4096;

/// Asks for a photo, passes it on to the claims service, or says why it could not.
const FLOW: &str = r#"
flow: parcel
triggers:
  - keywords: [damaged]
steps:
  photo:
    ask: "Please send a photo of the damaged parcel."
    expect: image
    save: photo
    retry: "That was not a photo. Please send a photo of the parcel."
    next:
      - if: 'photo.status == "ok"'
        goto: report
      - goto: failed
  report:
    http:
      method: POST
      url: "${MEDIA_TEST_TARGET}/claims"
      body:
        photo: "{{photo.url}}"
        mime: "{{photo.mime}}"
        size: "{{photo.size}}"
        caption: "{{photo.caption}}"
      save: claim
    next: thanks
  thanks:
    say: "Thanks, claim {{claim.body.id}} has your photo."
  failed:
    say: "We could not read that file ({{photo.error}})."
"#;

/// What the claims service was sent, and the bytes it fetched from the link.
#[derive(Debug, Clone, Default)]
struct Claims {
    received: Vec<(Value, u16, Vec<u8>)>,
}

/// The flow's HTTP target: records each claim, fetches its `photo` link and answers an id.
async fn claims_service() -> (String, Arc<Mutex<Claims>>, tokio::task::JoinHandle<()>) {
    let claims = Arc::new(Mutex::new(Claims::default()));
    async fn claim(
        State(claims): State<Arc<Mutex<Claims>>>,
        Json(body): Json<Value>,
    ) -> Json<Value> {
        let url = body["photo"].as_str().unwrap_or_default().to_string();
        let response = reqwest::get(&url).await.expect("the photo link answers");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.unwrap().to_vec();
        let mut claims = claims.lock().unwrap();
        claims.received.push((body, status, bytes));
        Json(json!({"id": claims.received.len()}))
    }
    let app = axum::Router::new()
        .route("/claims", axum::routing::post(claim))
        .with_state(claims.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, claims, task)
}

struct Setup {
    dir: tempfile::TempDir,
    fake: FakeGraph,
    server: Running,
    database: TestDb,
    claims: Arc<Mutex<Claims>>,
    _target: tokio::task::JoinHandle<()>,
    channel: MainChannel,
}

impl Setup {
    async fn start(backend: Backend, dialog360: bool) -> Option<Setup> {
        let channel = MainChannel { dialog360 };
        let fake = channel.fake().await;
        let (target, claims, task) = claims_service().await;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("flows")).unwrap();
        std::fs::write(
            root.join("flows/parcel.yaml"),
            FLOW.replace("${MEDIA_TEST_TARGET}", &target),
        )
        .unwrap();
        let config = format!(
            "flows: flows\nchannels:\n{}outbox:\n  pace_recipients: false\n\
             media:\n  dir: media\n  max_bytes: {MAX_BYTES}\n  url_secret: {MEDIA_SECRET}\n",
            channel.config(&fake)
        );
        std::fs::write(root.join("flowgate.yaml"), config).unwrap();
        let loaded = app::load(Some(&root.join("flowgate.yaml"))).expect("the project loads");
        let database = TestDb::new(root, backend).await?;
        let server = Running::start(&loaded, &database.url, Arc::new(SystemClock)).await;
        Some(Setup {
            dir,
            fake,
            server,
            database,
            claims,
            _target: task,
            channel,
        })
    }

    async fn stop(self) {
        self.server.shutdown().await;
        self.database.clean_up().await;
    }

    /// Posts a signed webhook carrying `message` from `from`.
    async fn webhook(&self, from: &str, mut message: Value) {
        message["from"] = json!(from);
        message["timestamp"] = json!(support::now_timestamp());
        self.channel.post_message(&self.server, message).await;
    }

    /// The customer `from` writes `text`.
    async fn text(&self, from: &str, wamid: &str, text: &str) {
        self.webhook(
            from,
            json!({"id": wamid, "type": "text", "text": {"body": text}}),
        )
        .await;
    }

    /// The customer `from` sends the photo `media_id` with its SHA-256 and a caption.
    async fn photo(&self, from: &str, wamid: &str, media_id: &str, sha256: &str) {
        self.webhook(
            from,
            json!({"id": wamid, "type": "image", "image": {
                "caption": "Damaged box", "mime_type": "image/jpeg",
                "sha256": sha256, "id": media_id,
            }}),
        )
        .await;
    }

    /// Waits until `to` was sent a text containing `part`; returns that text.
    async fn reply_to(&self, to: &str, part: &str) -> String {
        let mut found = String::new();
        eventually(&format!("a reply to {to} containing {part:?}"), || {
            let hit = self.fake.sends().into_iter().find_map(|s| {
                let text = s.text()?.to_string();
                (s.to().as_deref() == Some(to) && text.contains(part)).then_some(text)
            });
            if let Some(text) = &hit {
                found = text.clone();
            }
            async move { hit.is_some() }
        })
        .await;
        found
    }

    /// The `media` row of the message `wamid`: status, error, attempts.
    async fn media_row(&self, wamid: &str) -> (String, String, i64) {
        let db = &self.server.db;
        let status = support::text(
            db,
            &format!("SELECT status FROM media WHERE wamid = '{wamid}'"),
        )
        .await;
        let error = support::text(
            db,
            &format!("SELECT COALESCE(error, '') FROM media WHERE wamid = '{wamid}'"),
        )
        .await;
        let attempts = support::count(
            db,
            &format!("SELECT attempts FROM media WHERE wamid = '{wamid}'"),
        )
        .await;
        (status, error, attempts)
    }
}

/// How many files the media directory holds.
fn files_stored(setup: &Setup) -> usize {
    let Ok(dirs) = std::fs::read_dir(setup.dir.path().join("media")) else {
        return 0;
    };
    dirs.flatten()
        .map(|d| std::fs::read_dir(d.path()).map_or(0, |f| f.count()))
        .sum()
}

/// Bytes that look like nothing in particular, `n` of them.
fn photo_bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A photo arrives, is downloaded with the token, verified, stored, and its link reaches the
/// `http` step; the target fetches the link and gets the very bytes the customer sent.
async fn photo_reaches_the_http_step(backend: Backend, dialog360: bool) {
    let Some(setup) = Setup::start(backend, dialog360).await else {
        return;
    };
    let bytes = photo_bytes(3000, 7);
    let sha = setup.fake.serve_media(
        "1200000000000001",
        FakeMedia::new(bytes.clone(), "image/jpeg"),
    );
    setup
        .text("15555550123", "wamid.in.1", "my parcel is damaged")
        .await;
    setup.reply_to("15555550123", "send a photo").await;
    // Text instead of a photo is a failed answer: the ask asks again.
    setup
        .text("15555550123", "wamid.in.2", "here it comes")
        .await;
    setup.reply_to("15555550123", "That was not a photo").await;
    setup
        .photo("15555550123", "wamid.in.3", "1200000000000001", &sha)
        .await;
    let thanks = setup.reply_to("15555550123", "has your photo").await;
    assert_eq!(thanks, "Thanks, claim 1 has your photo.");

    let claims = setup.claims.lock().unwrap().clone();
    let [(body, status, fetched)] = &claims.received[..] else {
        panic!("one claim: {claims:?}");
    };
    assert_eq!(*status, 200, "the link works: {body}");
    assert_eq!(fetched, &bytes, "the link serves the customer's bytes");
    assert_eq!(body["mime"], "image/jpeg");
    assert_eq!(body["size"], 3000);
    assert_eq!(body["caption"], "Damaged box");
    let link = body["photo"].as_str().unwrap();
    assert!(
        link.starts_with(&format!("{}/media/", setup.server.base)),
        "{link}"
    );
    // Both requests carried the channel's credentials (the fake refuses others), and for
    // 360dialog the download went through its host, not Meta's.
    let requests = setup.fake.media_requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert!(requests.iter().all(|r| r.status == 200), "{requests:#?}");
    assert!(
        requests[1]
            .path
            .starts_with("/whatsapp_business/attachments")
    );
    assert_eq!(
        setup.media_row("wamid.in.3").await,
        ("ok".into(), String::new(), 1)
    );
    // `/metrics` counts the download (other tests in this process download too).
    let stored = r#"flowgate_media_downloads_total{outcome="stored"}"#;
    assert!(setup.server.metric(stored).await >= 1.0);
    assert!(
        setup
            .server
            .metric("flowgate_media_download_bytes_total")
            .await
            >= 3000.0
    );
    let timed = r#"flowgate_media_download_seconds_count{outcome="stored"}"#;
    assert!(setup.server.metric(timed).await >= 1.0);
    // The history shows the file with its status and a link that works.
    let conversation: Value = setup
        .server
        .client
        .get(format!(
            "{}/api/conversations/15555550123",
            setup.server.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let photo = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["wamid"] == "wamid.in.3")
        .expect("the photo message");
    assert_eq!(photo["media"]["status"], "ok", "{photo}");
    assert_eq!(photo["media"]["size"], 3000, "{photo}");
    let link = photo["media"]["url"].as_str().unwrap();
    let served = setup.server.client.get(link).send().await.unwrap();
    assert_eq!(served.status().as_u16(), 200);
    assert_eq!(served.bytes().await.unwrap().to_vec(), bytes);
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_photo_is_downloaded_verified_and_passed_to_an_http_step() {
    photo_reaches_the_http_step(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customers_photo_is_downloaded_verified_and_passed_to_an_http_step_on_postgres() {
    photo_reaches_the_http_step(Backend::Postgres, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_through_360dialog_is_fetched_through_its_host_with_its_key() {
    photo_reaches_the_http_step(Backend::Sqlite, true).await;
}

/// A file whose bytes do not have the webhook's SHA-256, and files over `media.max_bytes`
/// (announced by `file_size`, or only found out while reading), are refused with their
/// reasons, never retried, and the flow takes its failure branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_sha256_and_an_oversized_file_are_refused_and_the_flow_takes_its_failure_branch() {
    let setup = Setup::start(Backend::Sqlite, false).await.unwrap();
    let good = photo_bytes(1000, 1);
    let mut wrong = FakeMedia::new(good.clone(), "image/jpeg");
    wrong.wrong_bytes = Some(photo_bytes(1000, 2));
    let wrong_sha = setup.fake.serve_media("2000000000000001", wrong);
    let big_sha = setup.fake.serve_media(
        "2000000000000002",
        FakeMedia::new(photo_bytes(MAX_BYTES + 1, 3), "image/jpeg"),
    );
    let mut hidden = FakeMedia::new(photo_bytes(MAX_BYTES * 3, 4), "image/jpeg");
    hidden.hide_size = true;
    let hidden_sha = setup.fake.serve_media("2000000000000003", hidden);

    for (who, media, sha) in [
        ("15555550001", "2000000000000001", &wrong_sha),
        ("15555550002", "2000000000000002", &big_sha),
        ("15555550003", "2000000000000003", &hidden_sha),
    ] {
        setup.text(who, &format!("wamid.t.{who}"), "damaged").await;
        setup.reply_to(who, "send a photo").await;
        setup
            .photo(who, &format!("wamid.p.{who}"), media, sha)
            .await;
    }
    assert_eq!(
        setup.reply_to("15555550001", "could not read").await,
        "We could not read that file (sha256_mismatch)."
    );
    assert_eq!(
        setup.reply_to("15555550002", "could not read").await,
        "We could not read that file (too_large)."
    );
    assert_eq!(
        setup.reply_to("15555550003", "could not read").await,
        "We could not read that file (too_large)."
    );
    assert_eq!(
        setup.media_row("wamid.p.15555550001").await,
        ("failed".into(), "sha256_mismatch".into(), 1)
    );
    assert_eq!(
        setup.media_row("wamid.p.15555550002").await,
        ("failed".into(), "too_large".into(), 1)
    );
    assert_eq!(
        setup.media_row("wamid.p.15555550003").await,
        ("failed".into(), "too_large".into(), 1)
    );
    // The announced size was refused before the download; the others were downloaded once.
    let downloads: Vec<String> = setup
        .fake
        .media_requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/whatsapp_business"))
        .map(|r| r.query)
        .collect();
    assert_eq!(downloads.len(), 2, "{downloads:?}");
    assert!(downloads.iter().all(|q| !q.contains("2000000000000002")));
    assert!(setup.claims.lock().unwrap().received.is_empty());
    assert_eq!(
        support::count(
            &setup.server.db,
            "SELECT COUNT(*) FROM media WHERE store_key IS NOT NULL"
        )
        .await,
        0
    );
    setup.stop().await;
}

/// WhatsApp answers 131052 (it could not get the customer's file) once: the download is
/// tried again after its back-off, with a new URL, and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_131052_is_retried_and_the_download_then_works() {
    let setup = Setup::start(Backend::Sqlite, false).await.unwrap();
    let expired = r#"flowgate_media_downloads_total{outcome="expired"}"#;
    let expired_before = setup.server.metric(expired).await;
    let bytes = photo_bytes(2000, 9);
    let mut media = FakeMedia::new(bytes.clone(), "image/png");
    media.errors_131052 = 1;
    let sha = setup.fake.serve_media("3000000000000001", media);
    setup.text("15555550200", "wamid.r.1", "damaged").await;
    setup.reply_to("15555550200", "send a photo").await;
    setup
        .photo("15555550200", "wamid.r.2", "3000000000000001", &sha)
        .await;
    setup.reply_to("15555550200", "has your photo").await;
    let requests = setup.fake.media_requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [400, 200, 200], "{requests:#?}");
    assert!(
        setup.server.metric(expired).await > expired_before,
        "the 131052 is counted"
    );
    assert_eq!(
        setup.media_row("wamid.r.2").await,
        ("ok".into(), String::new(), 2)
    );
    let claims = setup.claims.lock().unwrap().clone();
    assert_eq!(claims.received[0].2, bytes);
    assert_eq!(claims.received[0].0["mime"], "image/png");
    setup.stop().await;
}

/// A link is its own credential: a tampered signature, a signature for another file, an
/// expired link and a link without a signature are refused (403) before the store is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_links_refuse_a_tampered_signature_and_an_expired_one() {
    let setup = Setup::start(Backend::Sqlite, false).await.unwrap();
    let bytes = photo_bytes(500, 5);
    let sha = setup.fake.serve_media(
        "4000000000000001",
        FakeMedia::new(bytes.clone(), "image/jpeg"),
    );
    setup.text("15555550300", "wamid.s.1", "damaged").await;
    setup.reply_to("15555550300", "send a photo").await;
    setup
        .photo("15555550300", "wamid.s.2", "4000000000000001", &sha)
        .await;
    setup.reply_to("15555550300", "has your photo").await;
    let link = setup.claims.lock().unwrap().received[0].0["photo"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |url: String| {
        let client = setup.server.client.clone();
        async move {
            let response = client.get(url).send().await.unwrap();
            let status = response.status().as_u16();
            let body = response.text().await.unwrap();
            (status, body)
        }
    };
    assert_eq!(get(link.clone()).await.0, 200);
    let (base, sig) = link.rsplit_once("sig=").unwrap();
    let mut tampered = sig.to_string();
    let last = if tampered.ends_with('0') { '1' } else { '0' };
    tampered.pop();
    tampered.push(last);
    let (status, body) = get(format!("{base}sig={tampered}")).await;
    assert_eq!(
        (status, body.contains("invalid_link")),
        (403, true),
        "{body}"
    );
    // A good signature for file 1 is not one for file 2.
    let other = link.replacen("/media/1?", "/media/2?", 1);
    assert_eq!(get(other).await.0, 403);
    assert_eq!(get(format!("{}/media/1", setup.server.base)).await.0, 403);
    // The same key signing an expiry in the past: the signature is right, the time is not.
    let signer = flowgate::media::Signer::new(
        MEDIA_SECRET.as_bytes().to_vec(),
        &setup.server.base,
        chrono::Duration::hours(1),
    );
    let past = chrono::Utc::now().timestamp() - 1;
    let (status, body) = get(format!("{}{}", setup.server.base, signer.path(1, past))).await;
    assert_eq!(
        (status, body.contains("expired_link")),
        (403, true),
        "{body}"
    );
    let future = chrono::Utc::now().timestamp() + 60;
    let fresh = get(format!("{}{}", setup.server.base, signer.path(1, future))).await;
    assert_eq!(fresh.0, 200, "the test signs as the server does");
    setup.stop().await;
}

/// The size limit holds while reading, whatever the server says: a download sent chunked
/// without `Content-Length`, whose description states a small `file_size` (a lie), is
/// refused `too_large` once its bytes pass `media.max_bytes`, and the rest of it is never
/// read (the fake produces its chunks only as they are read); a `Content-Length` smaller
/// than the body gets only that many bytes, which fail the webhook's SHA-256. Nothing is
/// stored, and `/metrics` counts both refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_holds_while_streaming_whatever_the_server_says() {
    let setup = Setup::start(Backend::Sqlite, false).await.unwrap();
    let too_large = r#"flowgate_media_downloads_total{outcome="too_large"}"#;
    let mismatch = r#"flowgate_media_downloads_total{outcome="sha256_mismatch"}"#;
    let (too_large_before, mismatch_before) = (
        setup.server.metric(too_large).await,
        setup.server.metric(mismatch).await,
    );
    const HUGE: usize = 32 * 1024 * 1024;
    let mut chunked = FakeMedia::new(photo_bytes(HUGE, 6), "image/jpeg");
    chunked.serving = Serving::Chunked(1024);
    chunked.stated_size = Some(1000);
    let chunked_sha = setup.fake.serve_media("5000000000000001", chunked);
    let mut short = FakeMedia::new(photo_bytes(2000, 8), "image/jpeg");
    short.serving = Serving::ShortLength(1000);
    short.hide_size = true;
    let short_sha = setup.fake.serve_media("5000000000000002", short);

    for (who, media, sha) in [
        ("15555550401", "5000000000000001", &chunked_sha),
        ("15555550402", "5000000000000002", &short_sha),
    ] {
        setup.text(who, &format!("wamid.t.{who}"), "damaged").await;
        setup.reply_to(who, "send a photo").await;
        setup
            .photo(who, &format!("wamid.p.{who}"), media, sha)
            .await;
    }
    assert_eq!(
        setup.reply_to("15555550401", "could not read").await,
        "We could not read that file (too_large)."
    );
    assert_eq!(
        setup.reply_to("15555550402", "could not read").await,
        "We could not read that file (sha256_mismatch)."
    );
    assert_eq!(
        setup.media_row("wamid.p.15555550401").await,
        ("failed".into(), "too_large".into(), 1)
    );
    assert_eq!(
        setup.media_row("wamid.p.15555550402").await,
        ("failed".into(), "sha256_mismatch".into(), 1)
    );
    // The reading stopped at the limit: what the fake produced is the limit, the chunks in
    // flight and the sockets' buffers, far from the 32 MiB body.
    let streamed = setup.fake.bytes_streamed("5000000000000001");
    assert!(
        (MAX_BYTES as u64..HUGE as u64 / 4).contains(&streamed),
        "{streamed} bytes were produced"
    );
    assert_eq!(files_stored(&setup), 0, "nothing is stored");
    assert_eq!(
        support::count(
            &setup.server.db,
            "SELECT COUNT(*) FROM media WHERE store_key IS NOT NULL"
        )
        .await,
        0
    );
    assert!(setup.server.metric(too_large).await > too_large_before);
    assert!(setup.server.metric(mismatch).await > mismatch_before);
    setup.stop().await;
}
