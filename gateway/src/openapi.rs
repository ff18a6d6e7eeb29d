//! OpenAPI 3 documents of both APIs, generated from the handlers and their
//! request and response types (utoipa): [`key_service`] and [`sidecar`],
//! served by each at `GET /v1/openapi.json` and committed as
//! `docs/openapi/keyservice.json` and `docs/openapi/sidecar.json`. A test
//! fails when the committed files and the code drift; regenerate with
//! `KEYGATE_UPDATE_OPENAPI=1 cargo test -p gateway --lib openapi`.

use axum::Json;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Every error: `{"error":{"code":"…","message":"…"}}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub(crate) error: ErrorDetail,
}

/// A body in the binary form of the unwrap exchange (the operation says
/// its layout).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // only its schema is used
pub(crate) struct BinaryBody(Vec<u8>);

/// A stable, snake_case `code` and a message without secrets.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, snake_case (`forbidden`, `rate_limited`, …).
    pub(crate) code: String,
    /// What the client can act on; never a secret or backend detail.
    pub(crate) message: String,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`.
    pub(crate) status: String,
}

/// `GET /readyz`: `ready` and one `{ok, error?}` per dependency; `error`
/// is a stable code naming what failed (`store_unavailable`,
/// `root_key_unavailable`, `key_service_unavailable`, `audit_unavailable`),
/// and the reason is logged.
#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    pub(crate) ready: bool,
    #[schema(value_type = Object)]
    pub(crate) checks: serde_json::Value,
}

/// The key service's OpenAPI document.
pub fn key_service() -> utoipa::openapi::OpenApi {
    crate::server::openapi_document()
}

/// The sidecar's OpenAPI document.
pub fn sidecar() -> utoipa::openapi::OpenApi {
    crate::sidecar::openapi_document()
}

/// Pretty JSON text of a document, as committed under `docs/openapi/`.
pub fn to_json(document: &utoipa::openapi::OpenApi) -> String {
    let mut text = document.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

/// `GET /v1/openapi.json` for a document.
pub(crate) fn serve(document: &utoipa::openapi::OpenApi) -> Response {
    match serde_json::to_value(document) {
        Ok(value) => ([(header::CACHE_CONTROL, "no-cache")], Json(value)).into_response(),
        Err(e) => crate::error::internal(&e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compares a generated document with its committed file, or rewrites
    /// the file when `KEYGATE_UPDATE_OPENAPI=1`.
    fn matches_committed(name: &str, document: &utoipa::openapi::OpenApi) {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi").join(name);
        let generated = to_json(document);
        if std::env::var("KEYGATE_UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{} differs from the API the code serves. Regenerate it with\n    \
             KEYGATE_UPDATE_OPENAPI=1 cargo test -p gateway --lib openapi\n\
             and commit the result.",
            path.display()
        );
    }

    #[test]
    fn committed_key_service_document_matches_the_code() {
        matches_committed("keyservice.json", &key_service());
    }

    #[test]
    fn committed_sidecar_document_matches_the_code() {
        matches_committed("sidecar.json", &sidecar());
    }

    #[test]
    fn documents_are_openapi_3_with_every_route() {
        let ks = serde_json::to_value(key_service()).unwrap();
        assert!(ks["openapi"].as_str().unwrap().starts_with("3."));
        for path in [
            "/v1/tenants",
            "/v1/tenants/{tenant}",
            "/v1/tenants/{tenant}/keys/rotate",
            "/v1/tenants/{tenant}/keys/{version}/state",
            "/v1/tenants/{tenant}/keys/usage",
            "/v1/tenants/{tenant}/keys/auto-rotate",
            "/v1/tenants/{tenant}/shred",
            "/v1/approvals",
            "/v1/approvals/{id}",
            "/v1/master",
            "/v1/master/rotate",
            "/v1/master/{id}/connect",
            "/v1/tenants/{tenant}/datakeys",
            "/v1/tenants/{tenant}/datakeys/unwrap",
            "/v1/tenants/{tenant}/datakeys/rewrap",
            "/v1/tenants/{tenant}/derived",
            "/v1/policy/self",
            "/v1/audit/events",
            "/v1/audit",
            "/v1/audit/heads",
            "/v1/audit/verify",
            "/v1/compliance",
            "/v1/openapi.json",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(ks["paths"][path].is_object(), "key service documents {path}");
        }
        let sc = serde_json::to_value(sidecar()).unwrap();
        for path in [
            "/v1/encrypt",
            "/v1/decrypt",
            "/v1/rewrap",
            "/v1/index",
            "/v1/pseudonym",
            "/v1/openapi.json",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(sc["paths"][path].is_object(), "sidecar documents {path}");
        }
    }
}
