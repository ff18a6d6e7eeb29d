//! `POST /v1/index` and `POST /v1/pseudonym`: values to look records up by.

use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::Error;
use crate::operation::Operation;
use crate::schema_ref::SchemaRef;

/// `{"tenant", "schema", "schema_version"?, "path", "value", "purpose"?}`.
#[derive(Serialize)]
struct IndexRequest<'a, V: ?Sized> {
    tenant: &'a str,
    schema: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema_version: Option<u32>,
    path: &'a str,
    value: &'a V,
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<&'a str>,
}

#[derive(Deserialize)]
struct IndexAnswer {
    token: String,
}

/// `{"tenant", "namespace", "value"}`.
#[derive(Serialize)]
struct PseudonymRequest<'a, V: ?Sized> {
    tenant: &'a str,
    namespace: &'a str,
    value: &'a V,
}

#[derive(Deserialize)]
struct PseudonymAnswer {
    pseudonym: String,
}

impl Client {
    /// The token to find records by the field at `path` (a JSON pointer such
    /// as `/email`) having `value`: its blind index, or its deterministic
    /// ciphertext, whichever `schema` (a name for its latest version, or a
    /// [`SchemaRef::pinned`] version) uses for that field (`kg1b:…`). Query
    /// the database for the stored field equal to this token.
    ///
    /// The schema's normalisation applies first, so `" Jane.Roe@Example.org"`
    /// and `"jane.roe@example.org"` give the same token when the field
    /// normalises by trimming and lowercasing.
    ///
    /// A caller that may decrypt but not encrypt the tenant's records gets
    /// the token only of a field decrypt would show it (in clear or masked)
    /// for `purpose`, as in [`decrypt`](Self::decrypt); else
    /// [`ErrorCode::Forbidden`](crate::ErrorCode::Forbidden).
    pub async fn index<'s>(
        &self,
        tenant: &str,
        schema: impl Into<SchemaRef<'s>>,
        path: &str,
        value: &(impl Serialize + ?Sized),
        purpose: Option<&str>,
    ) -> Result<String, Error> {
        let schema = schema.into();
        let request = IndexRequest {
            tenant,
            schema: schema.name(),
            schema_version: schema.version(),
            path,
            value,
            purpose,
        };
        let answer: IndexAnswer = self.post(Operation::Index, &request).await?;
        Ok(answer.token)
    }

    /// The stable pseudonym of `value` in `namespace` (`kgp:…`): the same
    /// value always gives the same pseudonym, and it cannot be reversed.
    /// Records keep pseudonymized fields as such; use this to find them.
    ///
    /// Only an identity with `encryptor` on the tenant gets one (else
    /// [`ErrorCode::Forbidden`](crate::ErrorCode::Forbidden)): a pseudonym
    /// of a guess would re-identify a record to a reader shown only its
    /// pseudonym.
    pub async fn pseudonym(
        &self,
        tenant: &str,
        namespace: &str,
        value: &(impl Serialize + ?Sized),
    ) -> Result<String, Error> {
        let request = PseudonymRequest { tenant, namespace, value };
        let answer: PseudonymAnswer = self.post(Operation::Pseudonym, &request).await?;
        Ok(answer.pseudonym)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn request_bodies() {
        let index = IndexRequest {
            tenant: "demo",
            schema: "patient",
            schema_version: None,
            path: "/email",
            value: "a@b.org",
            purpose: None,
        };
        assert_eq!(
            serde_json::to_value(&index).unwrap(),
            json!({"tenant": "demo", "schema": "patient", "path": "/email", "value": "a@b.org"})
        );
        let pinned = IndexRequest { schema_version: Some(2), ..index };
        assert_eq!(serde_json::to_value(&pinned).unwrap()["schema_version"], 2);
        let treatment = IndexRequest { purpose: Some("treatment"), ..index };
        assert_eq!(serde_json::to_value(&treatment).unwrap()["purpose"], "treatment");
        let pseudonym = PseudonymRequest { tenant: "demo", namespace: "patient", value: &42 };
        assert_eq!(
            serde_json::to_value(&pseudonym).unwrap(),
            json!({"tenant": "demo", "namespace": "patient", "value": 42})
        );
    }
}
