//! The sidecar's OpenAPI document (see [`crate::openapi`]).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::api::{
    DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse, FieldReport, IndexRequest,
    IndexResponse, PseudonymRequest, PseudonymResponse, RecordReport, RewrapRequest,
    RewrapResponse,
};
use super::{handlers, run};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate sidecar",
        description = "Field-level encryption for the application beside it (DESIGN §5), on a \
                       unix socket or a loopback address. With `token_file` set, every /v1 call \
                       needs `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        handlers::encrypt,
        handlers::decrypt,
        handlers::rewrap,
        handlers::index,
        handlers::pseudonymize,
        openapi_json,
        run::healthz,
        run::readyz,
        run::metrics,
    ),
    components(schemas(
        DecryptRequest<'_>, DecryptResponse, EncryptRequest<'_>, EncryptResponse, FieldReport,
        IndexRequest, IndexResponse, PseudonymRequest, PseudonymResponse, RecordReport,
        RewrapRequest<'_>, RewrapResponse, crate::openapi::ErrorBody,
    )),
    modifiers(&BearerToken),
    security((), ("bearer_token" = [])),
)]
struct SidecarApi;

/// Declares the optional bearer token.
struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    SidecarApi::openapi()
}

/// `GET /v1/openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI 3 document of this API", body = Object)),
)]
pub(crate) async fn openapi_json() -> axum::response::Response {
    crate::openapi::serve(&document())
}
