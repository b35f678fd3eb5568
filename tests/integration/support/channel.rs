//! Channel `main` at the fake Graph API, on Meta's Cloud API or through 360dialog, as the
//! media tests set it up: the fake started with the channel's credentials, the channel's
//! entry in the config, and a customer's message posted as the provider authenticates it.

use serde_json::{Value, json};

use super::Running;
use super::fake_graph::{FakeAuth, FakeGraph};

/// The Cloud API channel's phone number id (webhooks name it; uploads go to its path).
pub const PHONE_NUMBER_ID: &str = "110000000000001";
const ACCESS_TOKEN: &str = "test-access-token";
const APP_SECRET: &str = "test-app-secret";
const API_KEY: &str = "test-api-key";
const WEBHOOK_SECRET: &str = "test-webhook-secret";

/// Which provider channel `main` is on.
#[derive(Debug, Clone, Copy)]
pub struct MainChannel {
    pub dialog360: bool,
}

impl MainChannel {
    /// The fake Graph API, taking only this channel's credentials.
    pub async fn fake(self) -> FakeGraph {
        FakeGraph::start(if self.dialog360 {
            FakeAuth::dialog360(API_KEY)
        } else {
            FakeAuth::cloud_api(PHONE_NUMBER_ID, ACCESS_TOKEN)
        })
        .await
    }

    /// The channel's entry under the config's `channels:`, at `fake`.
    pub fn config(self, fake: &FakeGraph) -> String {
        if self.dialog360 {
            format!(
                "  - name: main\n    provider: dialog360\n    api_key: {API_KEY}\n    \
                 webhook_secret: {WEBHOOK_SECRET}\n    api_base: {}\n",
                fake.url
            )
        } else {
            format!(
                "  - name: main\n    provider: cloud_api\n    phone_number_id: \"{PHONE_NUMBER_ID}\"\n    \
                 access_token: {ACCESS_TOKEN}\n    app_secret: {APP_SECRET}\n    verify_token: v\n    \
                 api_base: {}\n",
                fake.cloud_api_base()
            )
        }
    }

    /// Posts the customer's `message` (with its `from`) to `server`'s webhook, signed with
    /// the app secret (Cloud API) or carrying the webhook secret (360dialog); asserts that
    /// it is taken.
    pub async fn post_message(self, server: &Running, message: Value) {
        let body = super::envelope(
            PHONE_NUMBER_ID,
            json!({
                "contacts": [{"profile": {"name": "Ana"}, "wa_id": message["from"]}],
                "messages": [message],
            }),
        );
        let request = server
            .client
            .post(format!("{}/webhook/main", server.base))
            .header("content-type", "application/json");
        let request = if self.dialog360 {
            request.header("x-flowgate-secret", WEBHOOK_SECRET)
        } else {
            request.header("x-hub-signature-256", super::sign(APP_SECRET, &body))
        };
        let answer = request.body(body).send().await.unwrap();
        assert_eq!(answer.status(), 200, "the webhook is taken");
    }
}
