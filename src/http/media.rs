//! `GET /media/{id}?expires=…&sig=…`: a customer's file, for whoever holds a link a flow
//! was given (`photo.url`). The link is the credential: its signature (checked in constant
//! time) and its expiry are checked before the store is read; a bad or expired link is 403.

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error;
use crate::media::LinkRefusal;
use crate::state::AppState;

/// The link's query.
#[derive(Debug, Deserialize)]
pub struct LinkQuery {
    expires: Option<i64>,
    sig: Option<String>,
}

/// Serves one stored file by its signed link.
pub async fn serve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<LinkQuery>,
) -> Response {
    let runtime = &state.runtime;
    let Some(media) = &runtime.media else {
        return error(StatusCode::NOT_FOUND, "not_found", "no media store");
    };
    let Ok(id) = id.parse::<i64>() else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such file");
    };
    let (Some(expires), Some(sig)) = (query.expires, query.sig) else {
        return error(
            StatusCode::FORBIDDEN,
            "invalid_link",
            "a media link needs `expires` and `sig`",
        );
    };
    match media.signer.check(id, expires, &sig, runtime.clock.now()) {
        Ok(()) => {}
        Err(LinkRefusal::BadSignature) => {
            return error(
                StatusCode::FORBIDDEN,
                "invalid_link",
                "the link's signature is wrong",
            );
        }
        Err(LinkRefusal::Expired) => {
            return error(
                StatusCode::FORBIDDEN,
                "expired_link",
                "the link has expired: the flow gets a new one each time",
            );
        }
    }
    let row = match runtime.db.media(id).await {
        Ok(Some(row)) => row,
        Ok(None) => return error(StatusCode::NOT_FOUND, "not_found", "no such file"),
        Err(e) => {
            tracing::error!(media = id, error = %e, "reading a media row failed");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "reading the file failed",
            );
        }
    };
    let Some(key) = row.store_key.filter(|_| row.status == "ok") else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the file was not downloaded",
        );
    };
    match media.store.get(&key).await {
        Ok(Some(bytes)) => (
            [
                (
                    header::CONTENT_TYPE,
                    row.mime
                        .unwrap_or_else(|| "application/octet-stream".into()),
                ),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff".into()),
                (header::CACHE_CONTROL, "private, no-store".into()),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "the file is no longer stored",
        ),
        Err(e) => {
            tracing::error!(media = id, error = %e, "reading a stored file failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "reading the file failed",
            )
        }
    }
}
