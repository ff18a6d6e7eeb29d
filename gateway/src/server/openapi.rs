//! The key service's OpenAPI document (see [`crate::openapi`]).

use utoipa::openapi::security::SecurityScheme;
use utoipa::{Modify, OpenApi};

use super::api::{
    ApprovalList, ApprovalView, AuditHead, AuditHeads, AutoRotate, AutoRotateView, BatchRequest,
    ChangeState, ConnectionView, CreateTenant, DecideRequest, DecisionBody, DerivedField,
    DerivedKey, DerivedKeys, DerivedMode, ExpectedRequest, IssueRequest, IssueResponse, IssuedKey,
    MasterEntry, MasterRotateRequest, MasterRotateView, MasterView, MastersView, Recorded,
    ReportedEvent, ReportedEvents, RewrapResponse, RewrapResult, RewrappedCounts, ShredRequest,
    StateAction, TenantView, UnwrapResponse, UnwrapResult, UsageView, VerifyReport,
    VersionUsageView, VersionView, WrappedItem,
};
use super::handlers::{audit, compliance, datakeys, lifecycle, master, ops, tenants};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keygate key service",
        description = "Tenant keys, data keys and audit over mutual TLS (DESIGN §4). The caller's \
                       identity is its client certificate's URI SAN (else DNS SAN); every call is \
                       authorized by the policy and audited.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        tenants::create,
        tenants::list,
        tenants::show,
        tenants::rotate,
        tenants::change_state,
        lifecycle::usage,
        lifecycle::auto_rotate,
        lifecycle::request_shred,
        lifecycle::list_approvals,
        lifecycle::decide,
        master::show,
        master::rotate,
        master::connect,
        datakeys::issue,
        datakeys::unwrap,
        datakeys::rewrap,
        datakeys::derived,
        audit::policy_self,
        audit::ingest,
        audit::export,
        audit::heads,
        audit::verify,
        audit::verify_anchored,
        compliance::report,
        openapi_json,
        ops::healthz,
        ops::readyz,
        ops::metrics,
    ),
    components(schemas(
        BatchRequest, ChangeState, CreateTenant, DerivedField, DerivedKey, DerivedKeys,
        DerivedMode, IssueRequest, IssueResponse<'_>, IssuedKey<'_>, Recorded, ReportedEvent,
        ReportedEvents, RewrapResponse, RewrapResult, StateAction, TenantView, UnwrapResponse,
        UnwrapResult, VerifyReport, VersionView, WrappedItem, crate::openapi::ErrorBody,
        ApprovalList, ApprovalView, AutoRotate, AutoRotateView, DecideRequest, DecisionBody,
        ExpectedRequest, ConnectionView, MasterEntry, MasterRotateRequest, MasterRotateView, MasterView, MastersView,
        RewrappedCounts, ShredRequest, UsageView, VersionUsageView, AuditHeads, AuditHead,
    )),
    modifiers(&MutualTls),
    security(("client_certificate" = [])),
)]
struct KeyServiceApi;

/// Declares the mutual TLS requirement.
struct MutualTls;

impl Modify for MutualTls {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "A client certificate chaining to the configured CA; its URI SAN (else DNS \
                     SAN) is the identity the policy grants roles to."
                        .to_owned(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
    }
}

/// The document.
pub(crate) fn document() -> utoipa::openapi::OpenApi {
    KeyServiceApi::openapi()
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
