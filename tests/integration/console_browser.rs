//! The console in a real browser: Debian's headless Chromium driven through chromedriver
//! (`fantoccini`) against the real server on port 0. Signs in (a wrong token first), sees a
//! conversation started by a signed webhook with its live countdown, replies outside the
//! window and sees "queued" before and after sending, chats in the sandbox, creates a
//! campaign in the form, runs it against the fake Graph API and reads the sends in its
//! report; writes each page's screenshot at desktop and phone width to `docs/screenshots/`.
//!
//! Without `chromedriver` and Chromium the tests print why and pass as skipped, unless
//! `FLOWGATE_REQUIRE_BROWSER=1` (set by `.ci/run`), which makes a missing browser a failure.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

use super::console::{Fixture, TOKEN};
use crate::support;

/// One browser test at a time: two Chromiums on a small machine only slow each other.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long any one wait in the browser may take.
const WAIT: Duration = Duration::from_secs(30);

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver and the Chromium binary, or why the tests cannot run.
fn browser() -> Result<(PathBuf, PathBuf), String> {
    let driver = on_path(&["chromedriver"]).ok_or("chromedriver is not on PATH")?;
    let chromium = on_path(&["chromium", "chromium-browser", "google-chrome"])
        .ok_or("chromium is not on PATH")?;
    Ok((driver, chromium))
}

/// A headless Chromium session through a chromedriver of its own (on a free loopback
/// port), closed and killed on drop.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// The browser, or `None` (with the reason printed) when it is not installed and not
    /// required.
    async fn start() -> Option<Self> {
        let (driver_bin, chromium) = match browser() {
            Ok(found) => found,
            Err(why) => {
                if std::env::var("FLOWGATE_REQUIRE_BROWSER").as_deref() == Ok("1") {
                    panic!(
                        "FLOWGATE_REQUIRE_BROWSER=1 but {why}: apt-get install chromium chromium-driver"
                    );
                }
                eprintln!(
                    "SKIPPED browser test: {why} (apt-get install chromium chromium-driver to run it)"
                );
                return None;
            }
        };
        let port = support::free_port();
        let driver = tokio::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && r.status().is_success()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver answers on {url} within 20 s");
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,900",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": args, "binary": chromium }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a Chromium session starts");
        Some(Self {
            client,
            driver,
            _profile: profile,
        })
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.wait_for(css).await;
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        self.wait_for(css).await.click().await.unwrap();
    }

    async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} appears: {e}"))
    }

    /// Waits until the element `css` shows `needle`; returns its text.
    async fn wait_for_text(&self, css: &str, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = match self.client.find(Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.contains(needle) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} shows {needle:?} within {WAIT:?}; it shows {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The page as it is, at desktop (1280×900) and phone (390×844) width, into
    /// `docs/screenshots/NAME-desktop.png` and `NAME-phone.png`.
    async fn screenshots(&self, name: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        for (width, height, suffix) in [(1280, 900, "desktop"), (390, 844, "phone")] {
            self.client.set_window_size(width, height).await.unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
            let png = self.client.screenshot().await.unwrap();
            assert!(png.starts_with(b"\x89PNG"), "a PNG");
            std::fs::write(dir.join(format!("{name}-{suffix}.png")), png).unwrap();
        }
        self.client.set_window_size(1280, 900).await.unwrap();
    }
}

#[tokio::test]
async fn an_agent_signs_in_and_works_conversations_and_the_sandbox_in_a_browser() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fixture = Fixture::start().await;
    fixture.customer_writes("15550007001", "Ada", "hi", 0).await;
    fixture
        .customer_writes("15550007002", "Ben", "hi", 48)
        .await;
    fixture.import_contacts().await;
    let url = |path: &str| fixture.url(path);

    // A wrong token cannot sign in.
    browser.goto(&url("/conversations")).await;
    browser.wait_for("#token").await;
    browser.screenshots("sign-in").await;
    browser.fill("#token", "wrong-token").await;
    browser.click("button[type=submit]").await;
    browser
        .wait_for_text("#signin-error", "That token is wrong")
        .await;
    browser.goto(&url("/conversations")).await;
    browser.wait_for("#token").await;

    // The right one does.
    browser.fill("#token", TOKEN).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_text("h1", "Conversations").await;

    // Ada wrote just now: her window is open and counts down, second by second.
    let first = browser.wait_for_text("#conversations", "Ada").await;
    assert!(first.contains("open · closes in 23h"), "{first}");
    let countdown = "#conversations [data-closes]";
    let before = browser.wait_for(countdown).await.text().await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = browser.wait_for(countdown).await.text().await.unwrap();
        if now != before {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the countdown moves"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A new conversation arrives without a reload (server-sent events).
    fixture
        .customer_writes("15550007003", "Cleo", "hi", 0)
        .await;
    browser.wait_for_text("#conversations", "Cleo").await;
    browser.screenshots("conversations").await;

    // Ben wrote two days ago: an agent's reply is queued, and the box says so first.
    browser.goto(&url("/conversations/15550007002")).await;
    browser.wait_for_text("dl.facts", "closed").await;
    browser
        .fill("#reply-text", "Are you still interested?")
        .await;
    let preview = browser.wait_for_text("#preview", "queued").await;
    assert!(preview.contains("If you send it now"), "{preview}");
    browser.screenshots("conversation").await;
    browser.click("button[value=send]").await;
    let sent = browser.wait_for_text("#sent-result", "queued").await;
    assert!(sent.contains("no template fallback"), "{sent}");
    browser
        .wait_for_text("#messages", "Are you still interested?")
        .await;
    browser.goto(&url("/queue")).await;
    browser
        .wait_for_text("main", "Are you still interested?")
        .await;
    browser.screenshots("queue").await;
    // Ben writes again: his message shows up on his open page (server-sent events).
    browser
        .goto(&url("/conversations/15550007002?channel=main"))
        .await;
    browser
        .wait_for_text("#messages", "Are you still interested?")
        .await;
    fixture
        .customer_writes("15550007002", "Ben", "Yes, still here", 0)
        .await;
    browser.wait_for_text("#messages", "Yes, still here").await;

    // The sandbox chat answers with the flows, decisions shown.
    browser.goto(&url("/sandbox")).await;
    browser.fill("#sandbox-text", "hi").await;
    browser.click("#sandbox-text ~ button[type=submit]").await;
    let chat = browser.wait_for_text("#chat-log", "How can we help").await;
    assert!(chat.contains("send"), "{chat}");
    browser.screenshots("sandbox").await;

    for (path, name, needle) in [
        ("/contacts", "contacts", "Ada"),
        ("/templates", "templates", "spring_sale"),
        ("/flows", "flows", "main_menu"),
    ] {
        browser.goto(&url(path)).await;
        browser.wait_for_text("main", needle).await;
        browser.screenshots(name).await;
    }

    browser.close().await;
    fixture.server.shutdown().await;
}

#[tokio::test]
async fn a_campaign_created_in_the_form_runs_and_its_report_shows_the_sends() {
    let _one = ONE_BROWSER.lock().await;
    let Some(browser) = Browser::start().await else {
        return;
    };
    let fixture = Fixture::start().await;
    fixture.import_contacts().await;
    let url = |path: &str| fixture.url(path);
    browser.goto(&url("/sign-in")).await;
    browser.fill("#token", TOKEN).await;
    browser.click("button[type=submit]").await;
    browser.wait_for_text("h1", "Conversations").await;

    browser.goto(&url("/campaigns/new")).await;
    browser.fill("#c-name", "browser_sale").await;
    browser
        .wait_for("#c-template option[value='spring_sale|en_US']")
        .await
        .click()
        .await
        .unwrap();
    browser.fill("#c-param1", "{{contact.name}}").await;
    browser.fill("#c-tags", "vip").await;
    browser.fill("#c-timezone", "Europe/Berlin").await;
    // The audience's count and the next five runs, live from the form's fields.
    browser
        .wait_for_text("#campaign-preview", "3 contacts in the audience")
        .await;
    let runs = browser.wait_for_text("#next-runs", "Mon").await;
    assert_eq!(runs.lines().count(), 5, "{runs}");
    browser
        .client
        .execute(
            "document.getElementById('c-tags').scrollIntoView({block: 'start'})",
            vec![],
        )
        .await
        .unwrap();
    browser.screenshots("campaign-form").await;
    browser.click(".campaign-form button[type=submit]").await;
    browser.wait_for_text("h1", "Campaign browser_sale").await;

    browser.click("#run-now").await;
    browser.wait_for_text("#run-status", "").await;
    fixture
        .fake
        .wait_for_sends(3, Duration::from_secs(60))
        .await;
    // The report updates live: three sends.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let bar = browser
            .client
            .find(Locator::Css("svg.chart g.sent"))
            .await
            .ok();
        let value = match bar {
            Some(bar) => bar.attr("data-value").await.unwrap_or_default(),
            None => None,
        };
        if value.as_deref() == Some("3") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the report shows 3 sent; it shows {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    browser.screenshots("campaign-report").await;
    browser.goto(&url("/campaigns")).await;
    browser.wait_for_text("main", "browser_sale").await;
    browser.screenshots("campaigns").await;

    browser.close().await;
    fixture.server.shutdown().await;
}
