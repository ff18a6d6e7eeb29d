//! Roles, grants, and the decisions made over a list of grants.
//!
//! [`Policy`](super::Policy) and [`EffectiveGrants`] both decide with the
//! functions at the end of this file, so the key service and a sidecar
//! holding the caller's effective grants always agree.

use std::fmt;

use kms_core::TenantId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::pattern::{ClassPattern, IdentityPattern, InvalidValue, PurposePattern, TenantPattern};

/// What a grant allows its identity to do (DESIGN §4 names the role of
/// every endpoint).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Role {
    /// Issue and rewrap data keys, derive index keys.
    Encryptor,
    /// Unwrap data keys (and see the field classes its grant lists).
    Decryptor,
    /// Manage tenants, key versions and the master key.
    Admin,
    /// Approve destructive requests made by someone else.
    SecurityOfficer,
    /// Read tenant metadata and export and verify the audit log.
    Auditor,
}

impl Role {
    /// Every role, in the order the policy file documents them.
    pub const ALL: [Role; 5] =
        [Role::Encryptor, Role::Decryptor, Role::Admin, Role::SecurityOfficer, Role::Auditor];

    /// The role's name in the policy file and in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Encryptor => "encryptor",
            Role::Decryptor => "decryptor",
            Role::Admin => "admin",
            Role::SecurityOfficer => "security_officer",
            Role::Auditor => "auditor",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = InvalidValue;

    fn from_str(name: &str) -> Result<Self, InvalidValue> {
        Role::ALL.into_iter().find(|role| role.as_str() == name).ok_or_else(|| {
            InvalidValue::new(
                "role",
                name,
                "expected encryptor, decryptor, admin, security_officer or auditor",
            )
        })
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a field of some class is disclosed to a caller. Ordered from least
/// to most revealing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldAccess {
    /// Nothing of the field is returned.
    Withhold,
    /// The masked value, where the schema defines a mask for the field;
    /// otherwise the sidecar must withhold it.
    Mask,
    /// The plaintext.
    Reveal,
}

/// One validated grant: roles for matching identities on matching tenants,
/// and, for decryptors, which field classes they see and for which purposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Grant {
    /// The identities this grant applies to.
    #[schema(value_type = String)]
    pub identity: IdentityPattern,
    /// The tenants it applies to.
    #[schema(value_type = Vec<String>)]
    pub tenants: Vec<TenantPattern>,
    /// The roles it grants (never empty when parsed from a policy file).
    pub roles: Vec<Role>,
    /// Field classes revealed in clear (decryptor grants only).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub classes: Vec<ClassPattern>,
    /// Field classes shown masked (decryptor grants only).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub masked: Vec<ClassPattern>,
    /// Purposes for which `classes` and `masked` apply (decryptor grants
    /// only; an empty list allows no purpose).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub purposes: Vec<PurposePattern>,
}

impl Grant {
    fn covers(&self, identity: &str, tenant: &TenantId, role: Role) -> bool {
        self.identity.matches(identity)
            && self.roles.contains(&role)
            && self.tenants.iter().any(|t| t.matches_tenant(tenant))
    }

    fn access(&self, class: &str, purpose: Option<&str>) -> FieldAccess {
        if !self.purposes.iter().any(|p| p.allows(purpose)) {
            FieldAccess::Withhold
        } else if self.classes.iter().any(|c| c.matches(class)) {
            FieldAccess::Reveal
        } else if self.masked.iter().any(|c| c.matches(class)) {
            FieldAccess::Mask
        } else {
            FieldAccess::Withhold
        }
    }
}

/// The grants that apply to one identity: what `GET /v1/policy/self`
/// returns, and what a sidecar deserializes to enforce field classes
/// locally. Decides exactly as [`Policy`](super::Policy) does for
/// `identity`.
///
/// Deserialization validates every pattern and refuses unknown keys, so a
/// newer, stricter format is never half-understood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct EffectiveGrants {
    /// The identity the grants were selected for.
    pub identity: String,
    /// Every grant whose identity pattern matches `identity`, in file order.
    pub grants: Vec<Grant>,
}

impl EffectiveGrants {
    /// Selects the grants of `grants` that apply to `identity`.
    pub(super) fn select(grants: &[Grant], identity: &str) -> Self {
        Self {
            identity: identity.to_owned(),
            grants: applicable(grants, identity).cloned().collect(),
        }
    }

    /// Whether this identity holds `role` on `tenant`.
    pub fn authorize(&self, tenant: &TenantId, role: Role) -> bool {
        authorize(&self.grants, &self.identity, tenant, role)
    }

    /// Whether this identity holds `role` on every tenant (`tenants = ["*"]`).
    pub fn authorize_any_tenant(&self, role: Role) -> bool {
        authorize_any_tenant(&self.grants, &self.identity, role)
    }

    /// How a field of `class` in a record of `tenant` is disclosed to this
    /// identity, decrypting for `purpose`.
    pub fn disclosure(&self, tenant: &TenantId, class: &str, purpose: Option<&str>) -> FieldAccess {
        disclosure(&self.grants, &self.identity, tenant, class, purpose)
    }
}

fn applicable<'a>(grants: &'a [Grant], identity: &'a str) -> impl Iterator<Item = &'a Grant> {
    grants.iter().filter(move |g| g.identity.matches(identity))
}

pub(super) fn authorize(grants: &[Grant], identity: &str, tenant: &TenantId, role: Role) -> bool {
    grants.iter().any(|g| g.covers(identity, tenant, role))
}

pub(super) fn authorize_any_tenant(grants: &[Grant], identity: &str, role: Role) -> bool {
    applicable(grants, identity)
        .any(|g| g.roles.contains(&role) && g.tenants.iter().any(TenantPattern::is_all))
}

pub(super) fn disclosure(
    grants: &[Grant],
    identity: &str,
    tenant: &TenantId,
    class: &str,
    purpose: Option<&str>,
) -> FieldAccess {
    grants
        .iter()
        .filter(|g| g.covers(identity, tenant, Role::Decryptor))
        .map(|g| g.access(class, purpose))
        .max()
        .unwrap_or(FieldAccess::Withhold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(serde_json::to_string(&role).unwrap(), format!("\"{role}\""));
        }
        assert!("decrypter".parse::<Role>().is_err());
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn field_access_order() {
        assert!(
            FieldAccess::Withhold < FieldAccess::Mask && FieldAccess::Mask < FieldAccess::Reveal
        );
    }

    #[test]
    fn deserialization_refuses_bad_patterns_and_unknown_keys() {
        let good =
            r#"{"identity":"x","grants":[{"identity":"x*","tenants":["*"],"roles":["auditor"]}]}"#;
        let grants: EffectiveGrants = serde_json::from_str(good).unwrap();
        assert!(grants.authorize_any_tenant(Role::Auditor));
        let bad_class = r#"{"identity":"x","grants":[{"identity":"x","tenants":["*"],"roles":["decryptor"],"classes":["phi*"]}]}"#;
        assert!(serde_json::from_str::<EffectiveGrants>(bad_class).is_err());
        let unknown = r#"{"identity":"x","grants":[{"identity":"x","tenants":["*"],"roles":["admin"],"until":1}]}"#;
        assert!(serde_json::from_str::<EffectiveGrants>(unknown).is_err());
        let bad_role =
            r#"{"identity":"x","grants":[{"identity":"x","tenants":["*"],"roles":["root"]}]}"#;
        assert!(serde_json::from_str::<EffectiveGrants>(bad_role).is_err());
    }

    #[test]
    fn grants_for_another_identity_never_apply() {
        let json = r#"{"identity":"spiffe://a","grants":[{"identity":"spiffe://b","tenants":["*"],"roles":["admin"]}]}"#;
        let grants: EffectiveGrants = serde_json::from_str(json).unwrap();
        assert!(!grants.authorize_any_tenant(Role::Admin));
        assert!(!grants.authorize(&TenantId::new("onc").unwrap(), Role::Admin));
    }
}
