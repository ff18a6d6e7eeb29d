//! The master key object in the token: finding it, checking that it is fit
//! to be a master key, and creating one.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use kms_core::KEY_LEN;
use kms_core::crypto::rng;

use super::error::Pkcs11Error;

/// Length of the random `CKA_ID` given to a created key.
const KEY_ID_LEN: usize = 16;

/// The master key made by [`Pkcs11RootKey::create_master_key`](super::Pkcs11RootKey::create_master_key): safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MasterKeyInfo {
    /// The token's label.
    pub token_label: String,
    /// The key's label (`CKA_LABEL`).
    pub key_label: String,
    /// The key's `CKA_ID`, in hex (random, for operators' records).
    pub key_id: String,
}

/// The handle of the one private AES key stored in the token and labelled
/// `label`.
///
/// Objects that could not be the master key are not even looked at: a
/// public object (`CKA_PRIVATE` false), which anyone who can open a
/// session may create without the PIN, or a session object, cannot shadow
/// the master key or make its label ambiguous. If there is no such key,
/// another secret key under the label is checked to say why it is not
/// fit ([`check_suitable`]); else the key is not found.
pub(super) fn find(
    session: &Session,
    token: &str,
    label: &str,
) -> Result<ObjectHandle, Pkcs11Error> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [key] => Ok(*key),
        [] => Err(why_not_found(session, token, label)),
        many => Err(Pkcs11Error::DuplicateKey {
            token: token.to_owned(),
            key: label.to_owned(),
            count: many.len(),
        }),
    }
}

/// Why [`find`] found no key labelled `label`: the reason the one other
/// secret key under the label is unfit (public, a session object, not
/// AES), or [`Pkcs11Error::KeyNotFound`].
fn why_not_found(session: &Session, token: &str, label: &str) -> Pkcs11Error {
    let not_found = || Pkcs11Error::KeyNotFound { token: token.to_owned(), key: label.to_owned() };
    let others = match session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ]) {
        Ok(others) => others,
        Err(e) => return e.into(),
    };
    match others.as_slice() {
        [other] => check_suitable(session, *other, token, label).err().unwrap_or_else(not_found),
        _ => not_found(),
    }
}

/// A boolean attribute a master key must have, with the value it must
/// have and what it means otherwise.
struct RequiredFlag {
    attribute: AttributeType,
    required: bool,
    /// Why a key with the other value is refused.
    otherwise: &'static str,
    /// Why a key without the attribute is refused.
    missing: &'static str,
}

/// What [`check_suitable`] requires, in the order it checks.
const REQUIRED_FLAGS: [RequiredFlag; 9] = [
    RequiredFlag {
        attribute: AttributeType::Encrypt,
        required: true,
        otherwise: "it may not encrypt (CKA_ENCRYPT must be true)",
        missing: "the token does not report CKA_ENCRYPT",
    },
    RequiredFlag {
        attribute: AttributeType::Decrypt,
        required: true,
        otherwise: "it may not decrypt (CKA_DECRYPT must be true)",
        missing: "the token does not report CKA_DECRYPT",
    },
    RequiredFlag {
        attribute: AttributeType::Extractable,
        required: false,
        otherwise: "it is extractable (CKA_EXTRACTABLE is true), so it could leave the token",
        missing: "the token does not report CKA_EXTRACTABLE, so the key might leave the token",
    },
    RequiredFlag {
        attribute: AttributeType::Sensitive,
        required: true,
        otherwise: "it is not sensitive (CKA_SENSITIVE is false), so its value could be read",
        missing: "the token does not report CKA_SENSITIVE, so the key's value might be readable",
    },
    RequiredFlag {
        attribute: AttributeType::AlwaysSensitive,
        required: true,
        otherwise: "it has not always been sensitive (CKA_ALWAYS_SENSITIVE is false: imported \
                    in plaintext, or readable once), so copies of it may exist outside the token",
        missing: "the token does not report CKA_ALWAYS_SENSITIVE, so the key's history is unknown",
    },
    RequiredFlag {
        attribute: AttributeType::NeverExtractable,
        required: true,
        otherwise: "it was extractable once (CKA_NEVER_EXTRACTABLE is false), so copies of it \
                    may exist outside the token",
        missing: "the token does not report CKA_NEVER_EXTRACTABLE, so the key's history is unknown",
    },
    RequiredFlag {
        attribute: AttributeType::Private,
        required: true,
        otherwise: "it is not private (CKA_PRIVATE is false), so it can be used without logging in",
        missing: "the token does not report CKA_PRIVATE, so the key might be usable without login",
    },
    RequiredFlag {
        attribute: AttributeType::Token,
        required: true,
        otherwise: "it is a session object (CKA_TOKEN is false), not a key stored in the token",
        missing: "the token does not report CKA_TOKEN",
    },
    RequiredFlag {
        attribute: AttributeType::Derive,
        required: false,
        otherwise: "it may derive other keys (CKA_DERIVE is true), whose values could depend on \
                    it and leave the token",
        missing: "the token does not report CKA_DERIVE, so the key might derive other keys",
    },
];

/// Checks that `key` is an AES-256 key that may encrypt and decrypt, is
/// private, stored in the token, may not derive keys, and can never leave
/// the token and never could (sensitive, always sensitive, not extractable,
/// never extractable). An attribute the token does not report fails the
/// check. Runs on every session the provider opens, so that an unfit key
/// swapped in under the same label later is refused too (a fit one is
/// refused by the pool: it is not the key the provider connected to).
pub(super) fn check_suitable(
    session: &Session,
    key: ObjectHandle,
    token: &str,
    label: &str,
) -> Result<(), Pkcs11Error> {
    let mut wanted = vec![AttributeType::KeyType, AttributeType::ValueLen];
    wanted.extend(REQUIRED_FLAGS.iter().map(|flag| flag.attribute));
    // Attributes the token does not have are left out of the answer.
    let attributes = session.get_attributes(key, &wanted)?;
    let mut key_type = None;
    let mut value_len = None;
    let mut flags = Vec::with_capacity(REQUIRED_FLAGS.len());
    for attribute in &attributes {
        match *attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::ValueLen(len) => value_len = Some(usize::from(len)),
            _ => flags.extend(flag_value(attribute).map(|v| (attribute.attribute_type(), v))),
        }
    }
    let reason = if key_type != Some(KeyType::AES) {
        Some("it is not an AES key")
    } else if value_len != Some(KEY_LEN) {
        Some("it is not a 256-bit key")
    } else {
        REQUIRED_FLAGS.iter().find_map(|flag| {
            match flags.iter().find(|(attribute, _)| *attribute == flag.attribute) {
                None => Some(flag.missing),
                Some(&(_, value)) if value != flag.required => Some(flag.otherwise),
                Some(_) => None,
            }
        })
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(Pkcs11Error::UnsuitableKey {
            token: token.to_owned(),
            key: label.to_owned(),
            reason,
        }),
    }
}

/// The value of a boolean attribute of [`REQUIRED_FLAGS`].
fn flag_value(attribute: &Attribute) -> Option<bool> {
    match *attribute {
        Attribute::Encrypt(b)
        | Attribute::Decrypt(b)
        | Attribute::Extractable(b)
        | Attribute::Sensitive(b)
        | Attribute::AlwaysSensitive(b)
        | Attribute::NeverExtractable(b)
        | Attribute::Private(b)
        | Attribute::Token(b)
        | Attribute::Derive(b) => Some(b),
        _ => None,
    }
}

/// Generates the master key in the token (on a read-write session, logged
/// in as the user): AES-256, on the token, private, sensitive, never
/// extractable, usable only to encrypt and decrypt, and not modifiable
/// (no one can later change these attributes or its label). Refuses to
/// create a second object with the same label.
pub(super) fn create(
    session: &Session,
    token: &str,
    label: &str,
) -> Result<MasterKeyInfo, Pkcs11Error> {
    if !session.find_objects(&[Attribute::Label(label.as_bytes().to_vec())])?.is_empty() {
        return Err(Pkcs11Error::KeyExists { token: token.to_owned(), key: label.to_owned() });
    }
    let id: [u8; KEY_ID_LEN] = rng::array()?;
    let key = session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(KEY_LEN.try_into()?),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
            Attribute::Modifiable(false),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Id(id.to_vec()),
        ],
    )?;
    // A token may quietly ignore parts of a template: check what it made,
    // and remove it again if it is not fit to be a master key.
    if let Err(e) = check_suitable(session, key, token, label) {
        if let Err(destroy) = session.destroy_object(key) {
            tracing::warn!(error = %destroy, "could not remove the unsuitable key again");
        }
        return Err(e);
    }
    Ok(MasterKeyInfo {
        token_label: token.to_owned(),
        key_label: label.to_owned(),
        key_id: id.iter().map(|b| format!("{b:02x}")).collect(),
    })
}
