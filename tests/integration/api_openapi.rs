//! The OpenAPI document at `GET /api/openapi.json`: version 3.1, every route of the admin
//! API in it, and every path in it served by the router, behind the bearer token.

use serde_json::Value;

use crate::api_routes::{Api, TOKEN};

/// Every route of the admin API, as `METHOD /api/path`.
const ROUTES: &[&str] = &[
    "GET /api/openapi.json",
    "GET /api/flows",
    "POST /api/flows/reload",
    "GET /api/contacts",
    "GET /api/contacts/{contact}",
    "POST /api/contacts/{contact}/tags",
    "DELETE /api/contacts/{contact}/tags/{tag}",
    "POST /api/contacts/import",
    "GET /api/conversations",
    "GET /api/conversations/{contact}",
    "POST /api/conversations/{contact}/messages",
    "POST /api/conversations/{contact}/resume",
    "GET /api/messages/{id}",
    "GET /api/outbox",
    "GET /api/queue",
    "POST /api/queue/{id}/retry",
    "POST /api/queue/{id}/cancel",
    "GET /api/templates",
    "POST /api/templates/sync",
    "GET /api/channels",
    "POST /api/channels/{name}/resume",
    "GET /api/campaigns",
    "POST /api/campaigns",
    "GET /api/campaigns/{name}",
    "PUT /api/campaigns/{name}",
    "DELETE /api/campaigns/{name}",
    "POST /api/campaigns/{name}/pause",
    "POST /api/campaigns/{name}/resume",
    "POST /api/campaigns/{name}/cancel",
    "POST /api/campaigns/{name}/run-now",
    "GET /api/campaigns/{name}/runs",
    "GET /api/campaigns/{name}/runs/{id}",
];

/// The document's routes, as `METHOD /api/path`.
fn documented(document: &Value) -> Vec<String> {
    let mut routes = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in ["get", "post", "put", "delete", "patch"] {
            if item.get(method).is_some() {
                routes.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    routes.sort();
    routes
}

#[tokio::test]
async fn the_document_has_every_route_and_the_router_serves_every_documented_one() {
    let api = Api::start().await;
    let (status, document) = api.get("/openapi.json").await;
    assert_eq!(status, 200, "{document}");
    assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    let routes = documented(&document);
    let mut expected: Vec<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    expected.sort();
    assert_eq!(routes, expected, "the document and the API's routes differ");
    assert!(
        document["components"]["securitySchemes"]["bearer"].is_object(),
        "{}",
        document["components"]
    );
    assert!(document["components"]["schemas"]["ErrorBody"].is_object());

    let client = &api.server.client;
    for route in &routes {
        let (method, path) = route.split_once(' ').unwrap();
        let concrete = path
            .replace("{contact}", "15550009999")
            .replace("{tag}", "vip")
            .replace("{name}", "nothing_here")
            .replace("{id}", "999999");
        let url = format!("{}{concrete}", api.server.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        // Without the token every route refuses, with the API's error.
        let r = client.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{route} without a token");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "missing_token", "{route}");
        // With it, the router serves the route: whatever the answer, never the router's
        // own 404 or 405 (an unrouted path has no JSON body).
        let r = client
            .request(method, &url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_ne!(status, 405, "{route}");
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            body.is_object(),
            "{route} answered {status} without a JSON body: not routed?"
        );
    }
    api.server.shutdown().await;
}
