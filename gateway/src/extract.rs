//! Request extractors shared by the key service and the sidecar.

use axum::extract::FromRequest;

use crate::error::ApiError;

/// `Json<T>` whose rejections become our JSON errors (`malformed_json`,
/// `invalid_request`, `body_too_large`, `json_too_deep`, …).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);
