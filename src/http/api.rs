//! The admin API as one documented whole: the `/api` router built from the handlers'
//! `#[utoipa::path]` annotations (so a route cannot be served without being documented),
//! the OpenAPI 3.1 document it yields (`GET /api/openapi.json`), the one error shape (and
//! how an [`OperatorError`] becomes it), the extractors whose rejections are that shape
//! too, and JSON answers for unknown routes and methods.
//!
//! Every route goes through [`OpenApiRouter::routes`] with `utoipa_axum::routes!`: the
//! path an annotation names is the path the router serves, and the document is what the
//! router was built from (`tests/integration/api_openapi.rs` compares the two).

use std::sync::Arc;

use axum::extract::OriginalUri;
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
use crate::operator::{self, OperatorError, Refusal};
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
    let router = router
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed);
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
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", body = Object),
        (status = 401, description = "No or a wrong bearer token", body = ErrorBody),
    ))]
async fn openapi_json(Extension(document): Extension<Arc<Document>>) -> Response {
    Json(document.as_ref()).into_response()
}

/// An operator's result as the answer: `status` with its value, or the error.
pub fn answer<T: Serialize>(status: StatusCode, result: Result<T, OperatorError>) -> Response {
    match result {
        Ok(value) => (status, Json(value)).into_response(),
        Err(e) => *Refused::from(e),
    }
}

/// [`answer`] with `200`.
pub fn answer_ok<T: Serialize>(result: Result<T, OperatorError>) -> Response {
    answer(StatusCode::OK, result)
}

/// An operator's error as the API's: the refusal's status and code, or a 500 whose
/// detail goes to the log, not to the caller.
impl From<OperatorError> for Refused {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::Refused {
                kind,
                code,
                message,
            } => {
                let status = match kind {
                    Refusal::Invalid => StatusCode::BAD_REQUEST,
                    Refusal::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
                    Refusal::NotFound => StatusCode::NOT_FOUND,
                    Refusal::Conflict => StatusCode::CONFLICT,
                    Refusal::Upstream => StatusCode::BAD_GATEWAY,
                };
                refused(status, code, message)
            }
            OperatorError::Diagnosed {
                code,
                message,
                diagnostics,
            } => Box::new(
                (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(serde_json::json!({"error": {
                        "code": code, "message": message, "diagnostics": diagnostics,
                    }})),
                )
                    .into_response(),
            ),
            OperatorError::Failed { what, detail } => Box::new(internal(what, detail)),
        }
    }
}

/// A 500 for a failure of ours: the detail goes to the log, not to the caller.
pub fn internal(what: &str, e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "{what}");
    super::error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server failed; see its log",
    )
}

/// A JSON body read as `T`, or `invalid_body` (400) saying what was expected (`shape`)
/// and what is wrong.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| {
        refused(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body must be {shape}: {e}"),
        )
    })
}

/// [`json_body`] for a body that may be empty (then `T::default()`).
pub fn optional_json_body<T>(body: &[u8], shape: &str) -> Result<T, Refused>
where
    T: serde::de::DeserializeOwned + Default,
{
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    json_body(body, shape)
}

/// The request's `Idempotency-Key`, if it has one, checked ([`operator::checked_key`]).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Refused> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = String::from_utf8_lossy(value.as_bytes());
    Ok(Some(operator::checked_key(&key)?))
}

/// What `/api` answers for a path it does not serve: 404 `unknown_route`.
async fn unknown_route(OriginalUri(uri): OriginalUri) -> Response {
    super::error(
        StatusCode::NOT_FOUND,
        "unknown_route",
        format!(
            "there is no route {}: `GET /api/openapi.json` lists them",
            uri.path()
        ),
    )
}

/// What `/api` answers for a method a path does not take: 405 `method_not_allowed` (the
/// `Allow` header lists those it takes).
async fn method_not_allowed(method: axum::http::Method, OriginalUri(uri): OriginalUri) -> Response {
    super::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not take {method}: see `GET /api/openapi.json`",
            uri.path()
        ),
    )
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

/// The largest JSON body a route takes (an agent's message, tags, a resume): far above any
/// valid one.
pub const MAX_JSON_BODY: usize = 256 * 1024;

/// A request's body as bytes, at most [`MAX_JSON_BODY`]; a larger or unreadable one is
/// the API's JSON error (`body_too_large`, `invalid_body`).
#[derive(Debug)]
pub struct ApiBody(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for ApiBody {
    type Rejection = Response;

    async fn from_request(request: axum::extract::Request, _: &S) -> Result<Self, Response> {
        let body = request.into_body();
        match axum::body::to_bytes(body, MAX_JSON_BODY).await {
            Ok(bytes) => Ok(Self(bytes)),
            Err(e) => {
                // axum's error for the limit says so (its type is not ours to name).
                let too_large = e.to_string().contains("length limit");
                Err(if too_large {
                    super::error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("the body is larger than {} KiB", MAX_JSON_BODY / 1024),
                    )
                } else {
                    super::error(
                        StatusCode::BAD_REQUEST,
                        "invalid_body",
                        format!("the body could not be read: {e}"),
                    )
                })
            }
        }
    }
}
