//! The OpenAPI document at `GET /api/openapi.json`: a valid OpenAPI 3.1 document, every
//! route the server's router serves under `/api` in it (read from the router itself), every
//! route of the admin API's contract in it, and every documented route served behind the
//! bearer token; an unknown route or method is a JSON error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use flowgate::clock::SystemClock;
use serde_json::Value;

use crate::api_routes::{Api, TOKEN};

/// The admin API's contract: every route it must serve, as `METHOD /api/path`.
const ROUTES: &[&str] = &[
    "GET /api/openapi.json",
    "GET /api/flows",
    "POST /api/flows/reload",
    "GET /api/flows/{flow}/splits/{step}",
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
    "GET /api/campaigns/{name}/report",
];

const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// The document's routes, as `METHOD /api/path`.
fn documented(document: &Value) -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                routes.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    routes
}

/// The routes a router serves, as `METHOD /path` (HEAD left out: axum serves it beside
/// every GET), read from its `Debug` text: axum has no other public view of its table. The
/// text pairs each route id with its path (`RouteId(3): "/api/flows"`) and each route id
/// with its method router, whose `allow_header` lists the methods it takes.
fn served(router: &axum::Router) -> BTreeSet<String> {
    let text = format!("{router:?}");
    let path_of = regex::Regex::new(r#"RouteId\((\d+)\): "([^"]*)""#).unwrap();
    let paths: BTreeMap<&str, &str> = path_of
        .captures_iter(&text)
        .map(|c| (c.get(1).unwrap().as_str(), c.get(2).unwrap().as_str()))
        .collect();
    let methods_of = regex::Regex::new(
        r#"RouteId\((\d+)\): MethodRouter\(MethodRouter \{.*?allow_header: Bytes\(b"([A-Z,]*)"\)"#,
    )
    .unwrap();
    let mut routes = BTreeSet::new();
    for c in methods_of.captures_iter(&text) {
        let id = c.get(1).unwrap().as_str();
        let path = paths
            .get(id)
            .unwrap_or_else(|| panic!("route {id} has no path in {text}"));
        for method in c.get(2).unwrap().as_str().split(',') {
            if method != "HEAD" {
                routes.insert(format!("{method} {path}"));
            }
        }
    }
    assert!(
        routes.len() >= 5,
        "the router's Debug text no longer reads as expected (axum changed?): {text}"
    );
    routes
}

/// Every `$ref` in `value`.
fn refs<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("$ref", Value::String(r)) => found.push(r),
                    _ => refs(v, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

/// What OpenAPI 3.1 requires of a document, and what this API promises in it: the
/// version, `info` with a title and version, operations each with an id, responses with a
/// description, every path parameter declared and required, every `$ref` resolving, every
/// operation documenting the 401 of the bearer token.
fn check_openapi_3_1(document: &Value) {
    let version = document["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert!(document["info"]["title"].is_string(), "info.title");
    assert!(document["info"]["version"].is_string(), "info.version");
    let schemas = &document["components"]["schemas"];
    assert!(schemas["ErrorBody"].is_object(), "{schemas}");
    assert!(
        document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer",
        "{}",
        document["components"]
    );
    assert_eq!(document["security"][0]["bearer"], serde_json::json!([]));

    let mut operation_ids = BTreeSet::new();
    for (path, item) in document["paths"].as_object().expect("`paths` is an object") {
        assert!(path.starts_with("/api/"), "{path}");
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            let route = format!("{} {path}", method.to_uppercase());
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{route}: operationId"));
            assert!(
                operation_ids.insert(id.to_string()),
                "{route}: operationId {id} twice"
            );
            let responses = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{route}"));
            assert!(!responses.is_empty(), "{route}: no responses");
            for (status, response) in responses {
                assert!(
                    response["description"].is_string(),
                    "{route} {status}: no description"
                );
            }
            assert!(
                responses.contains_key("401"),
                "{route}: the 401 is not documented"
            );
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .inspect(|p| assert_eq!(p["required"], true, "{route}: {p}"))
                        .map(|p| p["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(declared, in_path, "{route}: path parameters");
        }
    }
    let mut found = Vec::new();
    refs(document, &mut found);
    assert!(!found.is_empty());
    for r in found {
        assert!(
            referenced(schemas, r).is_object(),
            "$ref {r} resolves to nothing"
        );
    }
}

/// The schema a `$ref` names, in `components.schemas` (`Null` when it names none).
fn referenced<'a>(schemas: &'a Value, r: &str) -> &'a Value {
    let name = r
        .strip_prefix("#/components/schemas/")
        .unwrap_or_else(|| panic!("$ref {r} outside components.schemas"));
    &schemas[name]
}

/// Every property a schema describes, through its `$ref` and `allOf` parts (a flattened
/// field's struct is one of them), by name.
fn properties<'a>(schemas: &'a Value, schema: &'a Value) -> BTreeMap<&'a str, &'a Value> {
    let mut found = BTreeMap::new();
    let mut parts = vec![(schema, 0)];
    while let Some((part, depth)) = parts.pop() {
        assert!(depth < 8, "$ref or allOf nested too deep: {schema}");
        if let Some(r) = part["$ref"].as_str() {
            parts.push((referenced(schemas, r), depth + 1));
        }
        for item in part["allOf"].as_array().into_iter().flatten() {
            parts.push((item, depth + 1));
        }
        for (name, property) in part["properties"].as_object().into_iter().flatten() {
            found.insert(name.as_str(), property);
        }
    }
    found
}

#[tokio::test]
async fn the_document_is_openapi_3_1_and_lists_every_route_the_router_serves() {
    let api = Api::start().await;
    let (status, document) = api.get("/openapi.json").await;
    assert_eq!(status, 200, "{document}");
    check_openapi_3_1(&document);
    let documented = documented(&document);

    // The server's own router, built as `serve` builds it: every route it serves under
    // /api is in the document, and nothing else is.
    let db = format!("sqlite://{}", api.dir.path().join("other.sqlite").display());
    let application =
        flowgate::app::Application::build(&api.loaded, &db, "127.0.0.1:0", Arc::new(SystemClock))
            .await
            .unwrap();
    let router = flowgate::http::router(application.state(), application.doors().clone());
    let served: BTreeSet<String> = served(&router)
        .into_iter()
        .filter(|r| r.split_once(' ').unwrap().1.starts_with("/api/"))
        .filter(|r| !r.contains("__private__"))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not documented: {undocumented:?}"
    );
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        unserved.is_empty(),
        "documented but not served: {unserved:?}"
    );

    // The contract: every route the admin API promises.
    let expected: BTreeSet<String> = ROUTES.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        documented, expected,
        "the document and the API's contract differ"
    );
    api.server.shutdown().await;
}

/// A campaign's report is described as the API answers it: the run, and the report with a
/// split's per-variant measures.
#[tokio::test]
async fn a_campaign_report_is_described_with_its_variants() {
    let api = Api::start().await;
    let (_, document) = api.get("/openapi.json").await;
    let schemas = &document["components"]["schemas"];
    for path in [
        "/api/campaigns/{name}/report",
        "/api/campaigns/{name}/runs/{id}",
    ] {
        let answer = &document["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"]["$ref"];
        assert_eq!(answer, "#/components/schemas/RunReport", "{path}");
    }
    // The measures a report has for the run and for each variant (flattened in both, so
    // described through `allOf`).
    const MEASURES: [&str; 11] = [
        "planned",
        "pending",
        "outbox",
        "sent",
        "delivered",
        "read",
        "replied",
        "failed",
        "skipped",
        "deferred",
        "cancelled",
    ];
    let report = properties(schemas, &schemas["Report"]);
    let variant = properties(schemas, &schemas["VariantReport"]);
    for (schema, described, own) in [
        ("Report", &report, ["cost", "variants"]),
        ("VariantReport", &variant, ["variant", "share"]),
    ] {
        for property in MEASURES.iter().chain(&own) {
            assert!(
                described.get(property).is_some_and(|p| p.is_object()),
                "{schema} has {property}: {described:?}"
            );
        }
    }
    assert!(
        report["variants"].to_string().contains("VariantReport"),
        "{}",
        report["variants"]
    );
    api.server.shutdown().await;
}

#[tokio::test]
async fn every_documented_route_needs_the_token_and_answers_json() {
    let api = Api::start().await;
    let (_, document) = api.get("/openapi.json").await;
    let client = &api.server.client;
    for route in documented(&document) {
        let (method, path) = route.split_once(' ').unwrap();
        let concrete = path
            .replace("{contact}", "15550009999")
            .replace("{tag}", "vip")
            .replace("{name}", "nothing_here")
            .replace("{id}", "999999");
        let url = format!("{}{concrete}", api.server.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        // Without the token, or with a wrong one, every route refuses with the API's error.
        let r = client.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(r.status(), 401, "{route} without a token");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "missing_token", "{route}");
        let r = client
            .request(method.clone(), &url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{route} with a wrong token");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_token", "{route}");
        // With it, the route is served: whatever the answer, JSON, never the fallback's
        // `unknown_route` or `method_not_allowed`.
        let r = client
            .request(method, &url)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        if status == 204 {
            continue;
        }
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{route} answered {status} without JSON: {text}"));
        assert!(body.is_object(), "{route}: {body}");
        let code = body["error"]["code"].as_str().unwrap_or("");
        assert!(
            code != "unknown_route" && code != "method_not_allowed",
            "{route}: {body}"
        );
    }
    api.server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_route_or_method_under_api_is_a_json_error() {
    let api = Api::start().await;
    let (status, body) = api.get("/nothing/here").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "unknown_route");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/api/nothing/here"),
        "{body}"
    );
    let (status, body) = api.send("DELETE", "/flows", None).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    // The token is checked first: an unknown route does not tell a stranger what exists.
    let r = api
        .server
        .client
        .get(api.url("/nothing/here"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    api.server.shutdown().await;
}
