//! The admin API as one documented whole: the `/api` router built from the handlers'
//! `#[utoipa::path]` annotations (so a route cannot be served without being documented),
//! the OpenAPI 3.1 document it yields (`GET /api/openapi.json`), the one error shape, and
//! the paging every list shares.
//!
//! Every route goes through [`OpenApiRouter::routes`] with `utoipa_axum::routes!`: the
//! path an annotation names is the path the router serves, and the document is what the
//! router was built from.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use serde::Serialize;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Refused, refused};
use crate::state::AppState;

/// Every error of the API: `{"error": {"code", "message"}}`, `code` stable for programs,
/// `message` saying what is wrong and what to do. Some errors add fields (`diagnostics`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `unknown_contact`, `missing_token`, `invalid_body`, …
    pub code: String,
    /// For people: what is wrong and what to do.
    pub message: String,
}

/// The title, version and bearer auth of the document; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "flowgate admin API",
        description = "The admin API of `flowgate serve`. Send `Authorization: Bearer <admin.token>`. \
            Errors are `{\"error\": {\"code\", \"message\"}}` with a stable `code`. \
            Lists page by cursor: pass the answer's `next_cursor` as `after` until it is null."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The `/api` router (to nest at `/api`) and its document, built from one list of
/// annotated handlers.
pub fn router(state: AppState) -> (Router<AppState>, Arc<Document>) {
    let (router, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_json))
        .merge(super::admin::routes())
        .merge(super::campaigns::routes())
        .merge(super::contacts::routes())
        .merge(super::outbox::routes())
        .merge(super::channels::routes())
        .split_for_parts();
    document.paths.paths = std::mem::take(&mut document.paths.paths)
        .into_iter()
        .map(|(path, item)| (format!("/api{path}"), item))
        .collect();
    let document = Arc::new(document);
    let router =
        router
            .layer(Extension(document.clone()))
            .layer(axum::middleware::from_fn_with_state(
                state,
                super::admin::require_token,
            ));
    (router, document)
}

/// This document: every `/api` route with its parameters, bodies, answers and errors.
#[utoipa::path(get, path = "/openapi.json", tag = "api",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object)))]
async fn openapi_json(Extension(document): Extension<Arc<Document>>) -> Response {
    Json(document.as_ref()).into_response()
}

/// The paging of every list: `after` (the previous answer's `next_cursor`) and `limit`,
/// as each list's query gives them.
#[derive(Debug, Default)]
pub struct Paging {
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

impl Paging {
    pub fn new(after: Option<i64>, limit: Option<i64>) -> Self {
        Self { after, limit }
    }

    /// The cursor to start after and the page size, checked.
    pub fn checked(&self) -> Result<(i64, i64), Refused> {
        let limit = self.limit.unwrap_or(DEFAULT_LIMIT);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                "invalid_limit",
                format!("`limit` must be 1 to {MAX_LIMIT}, got {limit}"),
            ));
        }
        Ok((self.after.unwrap_or(0).max(0), limit))
    }
}

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

/// The cursor after a page that read `read` rows of at most `limit`, the last with id
/// `last`: `None` when the page was not full (nothing more to read).
pub fn next_cursor(read: usize, limit: i64, last: Option<i64>) -> Option<i64> {
    (read as i64 >= limit).then_some(last).flatten()
}

/// A handler's answer: its JSON, or the refusal.
pub type Answer<T> = Result<(StatusCode, Json<T>), Refused>;

/// `200` with `value`.
pub fn ok<T>(value: T) -> Answer<T> {
    Ok((StatusCode::OK, Json(value)))
}

/// Turns an [`Answer`] into the response.
pub fn respond<T: Serialize>(answer: Answer<T>) -> Response {
    match answer {
        Ok(done) => done.into_response(),
        Err(refused) => *refused,
    }
}

/// `Query<T>` whose rejection is the API's JSON error (`invalid_query`), saying which
/// parameter is wrong.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(e) => Err(super::error(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("the query string is wrong: {}", e.body_text()),
            )),
        }
    }
}

/// `Path<T>` whose rejection is the API's JSON error (`invalid_path`).
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(e) => Err(super::error(
                StatusCode::BAD_REQUEST,
                "invalid_path",
                format!("the path is wrong: {}", e.body_text()),
            )),
        }
    }
}
