//! `flowgate templates sync` end to end: the real binary against the fake Graph API on
//! 127.0.0.1, in a temporary project. Pages linked by `paging.next`, the registry written and
//! loaded back, a refused token, a template the sync cannot read.

use crate::support;

use std::path::PathBuf;
use std::process::Output;

use flowgate::diagnostic::Diagnostics;
use flowgate::templates::{Category, Registry};
use serde_json::{Value, json};
use support::fake_graph::{FakeAuth, FakeGraph, VERSION};

const PHONE: &str = "110000000000001";
const WABA: &str = "100000000000001";
const TOKEN: &str = "sync-token-3f9a";

/// A registry someone wrote by hand before the first sync: one entry Meta will replace, one
/// it does not know.
const HAND_WRITTEN: &str = r#"# my templates
templates:
  - name: order_shipped
    language: en_US
    category: utility
    status: pending
    body: "Your order {{1}} shipped."
  - name: welcome_back
    language: en_US
    category: marketing
    status: approved
    body: "Welcome back, {{1}}!"
"#;

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    /// A project whose `main` channel points at `api_base` with `token`.
    fn new(api_base: &str, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = format!(
            "database: \"sqlite::memory:\"\ntemplates: templates.yaml\n\
             channels:\n  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE}\"\n    \
             waba_id: \"{WABA}\"\n    access_token: {token}\n    app_secret: sync-secret\n    \
             verify_token: sync-verify\n    api_base: {api_base}\n"
        );
        std::fs::write(dir.path().join("flowgate.yaml"), config).unwrap();
        std::fs::write(dir.path().join("templates.yaml"), HAND_WRITTEN).unwrap();
        Self { dir }
    }

    fn templates_path(&self) -> PathBuf {
        self.dir.path().join("templates.yaml")
    }

    /// Runs `flowgate templates sync` with `args`, at most 60 s.
    async fn sync(&self, args: &[&str]) -> Output {
        let args: Vec<&str> = ["templates", "sync"].iter().chain(args).copied().collect();
        support::run_flowgate(&self.dir.path().join("flowgate.yaml"), &args).await
    }

    fn load(&self) -> Registry {
        let mut diags = Diagnostics::default();
        let registry = Registry::load(&self.templates_path(), &mut diags);
        assert!(
            diags.items.is_empty(),
            "the synced file loads without diagnostics:\n{}\n{}",
            diags.render(false),
            std::fs::read_to_string(self.templates_path()).unwrap()
        );
        registry
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn body(text: &str) -> Value {
    json!({"type": "BODY", "text": text})
}

fn template(name: &str, language: &str, status: &str, category: &str, components: Value) -> Value {
    json!({"name": name, "language": language, "status": status, "category": category,
           "components": components, "id": format!("9{}", name.len())})
}

/// Three pages as Meta would answer them: positional and named parameters, a template in two
/// languages, a media header, and statuses beyond the five the registry has.
fn three_pages() -> Vec<Vec<Value>> {
    vec![
        vec![
            template(
                "order_shipped",
                "en_US",
                "APPROVED",
                "UTILITY",
                json!([
                    {"type": "HEADER", "format": "TEXT", "text": "Order {{1}}"},
                    body("Your order {{1}} shipped on {{2}}."),
                    {"type": "FOOTER", "text": "Reply STOP to opt out"},
                    {"type": "BUTTONS", "buttons": [{"type": "QUICK_REPLY", "text": "Track it"}]}
                ]),
            ),
            template(
                "order_shipped",
                "es",
                "PAUSED",
                "UTILITY",
                json!([body("Tu pedido {{1}} salió el {{2}}.")]),
            ),
        ],
        vec![
            template(
                "order_ready",
                "en_US",
                "APPROVED",
                "UTILITY",
                json!([body(
                    "Order {{order_id}} is ready for pickup, {{first_name}}."
                )]),
            ),
            template(
                "spring_sale",
                "en_US",
                "IN_APPEAL",
                "MARKETING",
                json!([
                    {"type": "HEADER", "format": "IMAGE", "example": {"header_handle": ["4::aW1n"]}},
                    body("Hi {{1}}, 20% off everything today."),
                    {"type": "BUTTONS", "buttons": [
                        {"type": "QUICK_REPLY", "text": "Stop promotions"},
                        {"type": "URL", "text": "Shop", "url": "https://shop.example/sale"}
                    ]}
                ]),
            ),
        ],
        vec![
            template(
                "login_code",
                "en_US",
                "APPROVED",
                "AUTHENTICATION",
                json!([
                    body("*{{1}}* is your verification code."),
                    {"type": "BUTTONS", "buttons": [{"type": "OTP", "otp_type": "COPY_CODE", "text": "Copy code"}]}
                ]),
            ),
            template(
                "winter_sale",
                "en_US",
                "PENDING_DELETION",
                "MARKETING",
                json!([body("Winter is here.")]),
            ),
        ],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pages_are_synced_into_the_registry() {
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, TOKEN)).await;
    fake.serve_templates(WABA, three_pages());
    let project = Project::new(&fake.cloud_api_base(), TOKEN);

    let out = project.sync(&[]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        stdout.trim(),
        format!(
            "synced 6 templates (3 approved, 1 rejected, 1 paused, 1 disabled) from channel main into {}; 1 kept that Meta does not list",
            project.templates_path().display()
        )
    );
    assert!(
        stderr.contains(
            "warning: Meta does not list template `welcome_back` (en_US) for channel `main`: kept as it was (approved)"
        ),
        "{stderr}"
    );
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "the token never prints"
    );

    // Three requests, following `next`; the token only ever in the header.
    let requests = fake.template_requests();
    assert_eq!(requests.len(), 3, "{requests:#?}");
    let first_path = format!("/{VERSION}/{WABA}/message_templates");
    assert!(
        requests
            .iter()
            .all(|r| r.path == first_path && r.status == 200)
    );
    assert!(
        requests[0]
            .query
            .contains("fields=name%2Clanguage%2Cstatus%2Ccategory%2Ccomponents"),
        "{}",
        requests[0].query
    );
    assert!(requests[0].query.contains("limit=100"));
    assert!(requests[1].query.contains("after=page-1"));
    assert!(requests[2].query.contains("after=page-2"));
    for r in &requests {
        assert_eq!(r.header("authorization"), Some(&*format!("Bearer {TOKEN}")));
        assert!(!r.query.contains("access_token"), "{}", r.query);
    }

    let written = std::fs::read_to_string(project.templates_path()).unwrap();
    assert!(
        written.starts_with(
            "# Synced by `flowgate templates sync` from channel `main` (WABA 100000000000001) at "
        ),
        "{written}"
    );
    let registry = project.load();
    let summary: Vec<String> = registry
        .templates
        .iter()
        .map(|t| {
            format!(
                "{} {} {:?} {}",
                t.name,
                t.language,
                t.status,
                t.param_count()
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            // The file's order first, replaced in place or kept…
            "order_shipped en_US Approved 2",
            "welcome_back en_US Approved 1",
            // …then what is new, by name and language.
            "login_code en_US Approved 1",
            "order_ready en_US Approved 2",
            "order_shipped es Paused 2",
            "spring_sale en_US Rejected 2",
            "winter_sale en_US Disabled 0",
        ]
    );
    let shipped = registry.find("order_shipped", "en_US").unwrap();
    assert_eq!(shipped.header.as_deref(), Some("Order {{1}}"));
    assert_eq!(shipped.footer.as_deref(), Some("Reply STOP to opt out"));
    assert_eq!(shipped.buttons[0].quick_reply.as_deref(), Some("Track it"));
    let sale = registry.find("spring_sale", "en_US").unwrap();
    assert_eq!(sale.header.as_deref(), Some("{{IMAGE}}"));
    assert_eq!(sale.category, Category::Marketing);
    assert_eq!(
        sale.buttons[1].url.as_deref(),
        Some("https://shop.example/sale")
    );
    assert_eq!(
        registry.find("login_code", "en_US").unwrap().category,
        Category::Authentication
    );

    // A second sync changes nothing but the time it says.
    let again = project.sync(&[]).await;
    assert!(again.status.success(), "{}", text(&again.stderr));
    let rewritten = std::fs::read_to_string(project.templates_path()).unwrap();
    let without_first_line = |s: &str| s.split_once('\n').unwrap().1.to_string();
    assert_eq!(without_first_line(&rewritten), without_first_line(&written));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_exits_1_and_leaves_the_file() {
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, TOKEN)).await;
    fake.serve_templates(WABA, three_pages());
    let project = Project::new(&fake.cloud_api_base(), "an-expired-token-77");

    let out = project.sync(&["--channel", "main"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("templates sync from channel `main` failed"),
        "{stderr}"
    );
    assert!(stderr.contains("WhatsApp error 190 (HTTP 401)"), "{stderr}");
    assert!(
        stderr.contains("the access token of channel `main` was refused"),
        "{stderr}"
    );
    assert!(!stderr.contains("an-expired-token-77"), "{stderr}");
    assert!(text(&out.stdout).is_empty());
    assert_eq!(
        std::fs::read_to_string(project.templates_path()).unwrap(),
        HAND_WRITTEN,
        "the registry is untouched"
    );
    assert_eq!(fake.template_requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_template_is_skipped_with_a_warning() {
    let fake = FakeGraph::start(FakeAuth::cloud_api(PHONE, TOKEN)).await;
    let mut pages = three_pages();
    pages[1].insert(
        1,
        json!({"name": "broken_promo", "language": "fr", "status": "APPROVED",
               "category": "MARKETING", "components": [{"type": "HEADER", "format": "TEXT"}]}),
    );
    fake.serve_templates(WABA, pages);
    let project = Project::new(&fake.cloud_api_base(), TOKEN);

    let out = project.sync(&[]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "warning: skipped template `broken_promo` (fr): its text header has no `text`"
        ),
        "{stderr}"
    );
    assert!(stdout.contains("synced 6 templates"), "{stdout}");
    assert!(stdout.contains("; 1 skipped;"), "{stdout}");
    let registry = project.load();
    assert!(registry.find("broken_promo", "fr").is_none());
    assert!(registry.find("spring_sale", "en_US").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_without_waba_id_says_which_key_is_missing() {
    let project = Project::new("http://127.0.0.1:9/v25.0", TOKEN);
    let config = project.dir.path().join("flowgate.yaml");
    let text_before = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text_before.replace(&format!("    waba_id: \"{WABA}\"\n"), ""),
    )
    .unwrap();

    let out = project.sync(&[]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "channel `main` in {} needs `waba_id`",
            config.display()
        )),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(project.templates_path()).unwrap(),
        HAND_WRITTEN
    );
}
