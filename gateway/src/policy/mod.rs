//! Access policy: who may do what to which tenant, and which field classes
//! they see in clear (DESIGN §6). Pure logic, no I/O except
//! [`PolicyHandle`] reading its file.
//!
//! **Default deny.** An identity no grant matches may do nothing; a role,
//! tenant, class or purpose a grant does not name is not granted.
//!
//! The identity is the client certificate's one URI SAN (for example
//! `spiffe://prod/ns/onc/sa/api`, scheme and authority lowercased), else its
//! first DNS SAN, lowercased (`tls::identity_of`). It is compared byte for
//! byte, so patterns must be lowercase where identities are.
//!
//! # File format
//!
//! ```toml
//! [[grant]]
//! identity = "spiffe://prod/ns/onc/sa/api"   # exact, or a prefix ending in "*": "spiffe://prod/ns/onc/*"
//! tenants  = ["onc", "onc-*"]                # tenant id, prefix with trailing "*", or "*" for all
//! roles    = ["encryptor", "decryptor"]
//! classes  = ["phi.clinical", "pii.*"]       # field classes revealed in clear
//! masked   = ["phi.identifier"]              # field classes shown masked (optional)
//! purposes = ["treatment", "operations"]     # purposes allowed for decrypt ("*": any)
//!
//! [[grant]]
//! identity = "spiffe://prod/ns/sec/*"
//! tenants  = ["*"]
//! roles    = ["auditor"]
//! ```
//!
//! Each `[[grant]]` gives the identities it matches the `roles` on the
//! tenants it matches; grants add up, none takes anything away. Keys:
//!
//! - `identity` (required): an exact identity, or a prefix ending in `*`.
//!   `*` may appear only at the end, and a bare `"*"` (every client) is
//!   refused. No whitespace or control characters; no uppercase in a URI's
//!   scheme and authority or in a DNS name (identities never have any).
//! - `tenants` (required, non-empty): `"*"` (every tenant, including ones
//!   created later), a tenant id (`[a-z0-9][a-z0-9_-]{0,62}`), or a tenant id
//!   prefix ending in `*` (`"onc-*"` matches `onc-a`, not `onc`).
//! - `roles` (required, non-empty): `encryptor`, `decryptor`, `admin`,
//!   `security_officer`, `auditor`. Endpoints not scoped to one tenant
//!   (listing tenants, master rotation, audit export) need the role through a
//!   grant with `tenants = ["*"]`.
//! - `classes`, `masked`, `purposes`: only in grants with role `decryptor`
//!   (elsewhere they would have no effect, so they are an error). A decryptor
//!   grant must list `classes` or `masked` (or both) and must list
//!   `purposes`.
//!   - `classes`: field classes the caller sees in clear. A class pattern is
//!     an exact class (`"phi"` matches only `phi`), a class followed by `.*`
//!     (`"phi.*"` matches `phi.x` and `phi.x.y`, not `phi` nor `phix.y`), or
//!     `"*"` for every class.
//!   - `masked`: class patterns the caller sees masked, where the schema
//!     defines a mask for the field; the sidecar withholds the field if it
//!     has none. `classes` wins over `masked`.
//!   - `purposes`: the purposes of use (`[a-z0-9][a-z0-9_-]{0,62}`) for
//!     which `classes` and `masked` apply; `"*"` allows any purpose, and is
//!     the only way to allow a decrypt that states no purpose. For any other
//!     purpose this grant discloses nothing.
//!
//! Unknown keys are errors; duplicate entries are allowed. An empty file is
//! the empty policy (deny all). Files over [`MAX_POLICY_BYTES`] are refused.
//! Every error names the file and the line and column of the offending value
//! (`policy.toml: line 7, column 3: grant 2: invalid role "decrypter": …`).
//!
//! # Decisions
//!
//! ```
//! use gateway::policy::{FieldAccess, Policy, Role};
//! use kms_core::TenantId;
//!
//! let policy = Policy::from_toml(
//!     r#"
//! [[grant]]
//! identity = "spiffe://prod/ns/onc/*"
//! tenants  = ["onc"]
//! roles    = ["decryptor"]
//! classes  = ["phi.*"]
//! masked   = ["pii.*"]
//! purposes = ["treatment"]
//! "#,
//!     "policy.toml",
//! )?;
//! let onc = TenantId::new("onc")?;
//! let api = "spiffe://prod/ns/onc/sa/api";
//! assert!(policy.authorize(api, &onc, Role::Decryptor));
//! assert!(!policy.authorize(api, &onc, Role::Encryptor));
//! assert_eq!(policy.disclosure(api, &onc, "phi.clinical", Some("treatment")), FieldAccess::Reveal);
//! assert_eq!(policy.disclosure(api, &onc, "pii.contact", Some("treatment")), FieldAccess::Mask);
//! assert_eq!(policy.disclosure(api, &onc, "phi.clinical", Some("research")), FieldAccess::Withhold);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`Policy::effective`] selects the grants that apply to one identity, for
//! `GET /v1/policy/self`; the resulting [`EffectiveGrants`] serializes to
//! JSON and, deserialized in a sidecar, makes the same decisions.

use kms_core::TenantId;

mod grant;
mod handle;
mod parse;
mod pattern;

pub use self::grant::{EffectiveGrants, FieldAccess, Grant, Role};
pub use self::handle::{PolicyHandle, Refused as PolicyRefused};
pub use self::parse::{MAX_POLICY_BYTES, PolicyError};
pub use self::pattern::{
    ClassPattern, IdentityPattern, InvalidValue, PurposePattern, TenantPattern,
};

/// A parsed, validated, immutable policy. Swap whole policies (see
/// [`PolicyHandle`]), never edit one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    grants: Vec<Grant>,
}

impl Policy {
    /// The policy that grants nothing.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Parses and validates a policy file's text. `source` names the file in
    /// errors.
    pub fn from_toml(text: &str, source: &str) -> Result<Self, PolicyError> {
        Ok(Self { grants: parse::parse_grants(text, source)? })
    }

    /// Every grant, in file order.
    pub fn grants(&self) -> &[Grant] {
        &self.grants
    }

    /// Whether `identity` holds `role` on `tenant`: true if any grant
    /// matching both names the role.
    pub fn authorize(&self, identity: &str, tenant: &TenantId, role: Role) -> bool {
        grant::authorize(&self.grants, identity, tenant, role)
    }

    /// Whether `identity` holds `role` on every tenant, for endpoints not
    /// scoped to one (listing tenants, exporting the audit log): true only if
    /// a grant naming the role has the tenant pattern `"*"`.
    pub fn authorize_any_tenant(&self, identity: &str, role: Role) -> bool {
        grant::authorize_any_tenant(&self.grants, identity, role)
    }

    /// How a field of `class` in a record of `tenant` is disclosed to
    /// `identity` decrypting for `purpose`: the most revealing answer of the
    /// decryptor grants matching identity and tenant.
    pub fn disclosure(
        &self,
        identity: &str,
        tenant: &TenantId,
        class: &str,
        purpose: Option<&str>,
    ) -> FieldAccess {
        grant::disclosure(&self.grants, identity, tenant, class, purpose)
    }

    /// The grants that apply to `identity` (`GET /v1/policy/self`).
    pub fn effective(&self, identity: &str) -> EffectiveGrants {
        EffectiveGrants::select(&self.grants, identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[grant]]
identity = "spiffe://prod/ns/onc/sa/api"
tenants  = ["onc", "onc-*"]
roles    = ["encryptor", "decryptor"]
classes  = ["phi.clinical", "pii.*"]
masked   = ["phi.identifier"]
purposes = ["treatment", "operations"]

[[grant]]
identity = "spiffe://prod/ns/onc/*"
tenants  = ["onc"]
roles    = ["encryptor"]

[[grant]]
identity = "spiffe://prod/ns/sec/auditor"
tenants  = ["*"]
roles    = ["auditor"]

[[grant]]
identity = "spiffe://prod/ns/sec/admin"
tenants  = ["onc"]
roles    = ["admin"]

[[grant]]
identity = "spiffe://prod/ns/research/*"
tenants  = ["*"]
roles    = ["decryptor"]
classes  = ["phi"]
masked   = ["phi.*", "*"]
purposes = ["research"]

[[grant]]
identity = "spiffe://prod/ns/er/app"
tenants  = ["er"]
roles    = ["decryptor"]
classes  = ["*"]
purposes = ["*"]
"#;

    const API: &str = "spiffe://prod/ns/onc/sa/api";
    const WORKER: &str = "spiffe://prod/ns/onc/sa/worker";
    const AUDITOR: &str = "spiffe://prod/ns/sec/auditor";
    const ADMIN: &str = "spiffe://prod/ns/sec/admin";
    const RESEARCH: &str = "spiffe://prod/ns/research/sa/x";
    const ER: &str = "spiffe://prod/ns/er/app";
    const IDENTITIES: [&str; 8] =
        [API, WORKER, AUDITOR, ADMIN, RESEARCH, ER, "spiffe://prod/ns/onc", "dns.example"];

    fn policy() -> Policy {
        Policy::from_toml(EXAMPLE, "policy.toml").unwrap()
    }

    fn t(name: &str) -> TenantId {
        TenantId::new(name).unwrap()
    }

    #[test]
    fn parses_the_example() {
        let p = policy();
        assert_eq!(p.grants().len(), 6);
        let g = &p.grants()[0];
        assert_eq!(g.identity.as_str(), API);
        assert_eq!(g.roles, [Role::Encryptor, Role::Decryptor]);
        assert_eq!(
            g.tenants.iter().map(TenantPattern::as_str).collect::<Vec<_>>(),
            ["onc", "onc-*"]
        );
        assert_eq!(g.classes.len(), 2);
        assert_eq!(g.masked[0].as_str(), "phi.identifier");
        assert_eq!(g.purposes.len(), 2);
        assert!(p.grants()[1].classes.is_empty() && p.grants()[1].purposes.is_empty());
    }

    #[test]
    fn default_deny() {
        let empty = Policy::empty();
        for role in Role::ALL {
            assert!(!empty.authorize(API, &t("onc"), role));
            assert!(!empty.authorize_any_tenant(API, role));
        }
        assert_eq!(empty.disclosure(API, &t("onc"), "phi.clinical", None), FieldAccess::Withhold);
        assert!(empty.effective(API).grants.is_empty());
        let p = policy();
        assert!(!p.authorize("spiffe://prod/ns/other/sa/api", &t("onc"), Role::Encryptor));
        assert!(!p.authorize("", &t("onc"), Role::Encryptor));
        assert!(!p.authorize(API, &t("cardio"), Role::Encryptor));
        assert_eq!(
            p.disclosure(API, &t("cardio"), "phi.clinical", Some("treatment")),
            FieldAccess::Withhold
        );
    }

    #[test]
    fn exact_and_prefix_identities() {
        let p = policy();
        // API holds decryptor by its exact grant; WORKER only encryptor by prefix.
        assert!(p.authorize(API, &t("onc-a"), Role::Decryptor));
        assert!(p.authorize(WORKER, &t("onc"), Role::Encryptor));
        assert!(!p.authorize(WORKER, &t("onc"), Role::Decryptor));
        assert!(!p.authorize("spiffe://prod/ns/onc/sa/api/x", &t("onc"), Role::Decryptor));
        assert!(!p.authorize("spiffe://prod/ns/oncology/sa/api", &t("onc"), Role::Encryptor));
        assert!(!p.authorize("spiffe://prod/ns/onc", &t("onc"), Role::Encryptor));
        assert_eq!(p.effective(API).grants.len(), 2);
        assert_eq!(p.effective(WORKER).grants.len(), 1);
    }

    #[test]
    fn tenant_patterns() {
        let p = policy();
        assert!(p.authorize(API, &t("onc"), Role::Encryptor));
        assert!(p.authorize(API, &t("onc-b"), Role::Encryptor));
        assert!(!p.authorize(API, &t("oncx"), Role::Encryptor));
        assert!(!p.authorize(WORKER, &t("onc-b"), Role::Encryptor));
        assert!(p.authorize(AUDITOR, &t("anything"), Role::Auditor));
        assert!(p.authorize_any_tenant(AUDITOR, Role::Auditor));
        // Admin of one tenant is not admin of all.
        assert!(p.authorize(ADMIN, &t("onc"), Role::Admin));
        assert!(!p.authorize(ADMIN, &t("onc-a"), Role::Admin));
        assert!(!p.authorize_any_tenant(ADMIN, Role::Admin));
        assert!(!p.authorize_any_tenant(API, Role::Encryptor));
    }

    #[test]
    fn roles_are_separate() {
        let p = policy();
        assert!(!p.authorize(WORKER, &t("onc"), Role::Decryptor));
        assert_eq!(
            p.disclosure(WORKER, &t("onc"), "phi.clinical", Some("treatment")),
            FieldAccess::Withhold
        );
        assert!(!p.authorize(AUDITOR, &t("onc"), Role::Encryptor));
        assert!(!p.authorize(AUDITOR, &t("onc"), Role::Admin));
        assert!(!p.authorize_any_tenant(AUDITOR, Role::SecurityOfficer));
        assert!(!p.authorize(ADMIN, &t("onc"), Role::SecurityOfficer));
        assert!(!p.authorize(ADMIN, &t("onc"), Role::Decryptor));
    }

    #[test]
    fn classes_masks_and_purposes() {
        let p = policy();
        let d = |who, tenant: &str, class, purpose| p.disclosure(who, &t(tenant), class, purpose);
        let tr = Some("treatment");
        assert_eq!(d(API, "onc", "phi.clinical", tr), FieldAccess::Reveal);
        assert_eq!(d(API, "onc-z", "pii.contact", Some("operations")), FieldAccess::Reveal);
        assert_eq!(d(API, "onc", "pii.contact.email", tr), FieldAccess::Reveal);
        assert_eq!(d(API, "onc", "pii", tr), FieldAccess::Withhold);
        assert_eq!(d(API, "onc", "piix.y", tr), FieldAccess::Withhold);
        assert_eq!(d(API, "onc", "phi.identifier", tr), FieldAccess::Mask);
        assert_eq!(d(API, "onc", "phi.clinical.notes", tr), FieldAccess::Withhold);
        // A purpose not listed, or none stated: nothing at all.
        assert_eq!(d(API, "onc", "phi.clinical", Some("research")), FieldAccess::Withhold);
        assert_eq!(d(API, "onc", "phi.identifier", Some("research")), FieldAccess::Withhold);
        assert_eq!(d(API, "onc", "phi.clinical", None), FieldAccess::Withhold);
        // "phi" is exact, "phi.*" is strictly below it, "*" is everything.
        let rs = Some("research");
        assert_eq!(d(RESEARCH, "cardio", "phi", rs), FieldAccess::Reveal);
        assert_eq!(d(RESEARCH, "cardio", "phi.x", rs), FieldAccess::Mask);
        assert_eq!(d(RESEARCH, "cardio", "phix.y", rs), FieldAccess::Mask);
        assert_eq!(d(RESEARCH, "cardio", "phi", tr), FieldAccess::Withhold);
        // "*" purposes allow any purpose and none.
        assert_eq!(d(ER, "er", "phi.x.y", None), FieldAccess::Reveal);
        assert_eq!(d(ER, "er", "pii", Some("billing")), FieldAccess::Reveal);
        assert_eq!(d(ER, "onc", "pii", None), FieldAccess::Withhold);
    }

    #[test]
    fn the_most_revealing_grant_wins() {
        let text = format!(
            "{EXAMPLE}\n[[grant]]\nidentity = \"{API}\"\ntenants = [\"onc\"]\nroles = [\"decryptor\"]\nclasses = [\"phi.identifier\"]\npurposes = [\"research\"]\n"
        );
        let p = Policy::from_toml(&text, "p.toml").unwrap();
        let onc = t("onc");
        assert_eq!(p.disclosure(API, &onc, "phi.identifier", Some("treatment")), FieldAccess::Mask);
        assert_eq!(
            p.disclosure(API, &onc, "phi.identifier", Some("research")),
            FieldAccess::Reveal
        );
        assert_eq!(
            p.disclosure(API, &onc, "phi.clinical", Some("research")),
            FieldAccess::Withhold
        );
    }

    #[test]
    fn effective_grants_round_trip_and_decide_the_same() {
        let p = policy();
        let tenants = ["onc", "onc-a", "oncx", "er", "cardio"].map(t);
        let classes =
            ["phi", "phi.clinical", "phi.identifier", "phi.x.y", "pii.contact", "pii", "x"];
        let purposes = [None, Some("treatment"), Some("operations"), Some("research"), Some("x")];
        for who in IDENTITIES {
            let json = serde_json::to_string(&p.effective(who)).unwrap();
            let e: EffectiveGrants = serde_json::from_str(&json).unwrap();
            assert_eq!(e, p.effective(who));
            assert_eq!(e.identity, who);
            for role in Role::ALL {
                assert_eq!(e.authorize_any_tenant(role), p.authorize_any_tenant(who, role));
                for tenant in &tenants {
                    assert_eq!(e.authorize(tenant, role), p.authorize(who, tenant, role));
                }
            }
            for tenant in &tenants {
                for class in classes {
                    for purpose in purposes {
                        assert_eq!(
                            e.disclosure(tenant, class, purpose),
                            p.disclosure(who, tenant, class, purpose),
                            "{who} {tenant} {class} {purpose:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn effective_grants_json_shape() {
        let json = serde_json::to_value(policy().effective(WORKER)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "identity": WORKER,
                "grants": [{
                    "identity": "spiffe://prod/ns/onc/*",
                    "tenants": ["onc"],
                    "roles": ["encryptor"],
                    "classes": [],
                    "masked": [],
                    "purposes": [],
                }],
            })
        );
    }
}
