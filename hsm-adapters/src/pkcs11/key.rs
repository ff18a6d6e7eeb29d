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

/// The handle of the one secret key labelled `label`.
pub(super) fn find(
    session: &Session,
    token: &str,
    label: &str,
) -> Result<ObjectHandle, Pkcs11Error> {
    let found = session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])?;
    match found.as_slice() {
        [key] => Ok(*key),
        [] => Err(Pkcs11Error::KeyNotFound { token: token.to_owned(), key: label.to_owned() }),
        many => Err(Pkcs11Error::DuplicateKey {
            token: token.to_owned(),
            key: label.to_owned(),
            count: many.len(),
        }),
    }
}

/// Checks that `key` is an AES-256 key that may encrypt and decrypt and
/// can never leave the token (sensitive, not extractable).
pub(super) fn check_suitable(
    session: &Session,
    key: ObjectHandle,
    token: &str,
    label: &str,
) -> Result<(), Pkcs11Error> {
    let attributes = session.get_attributes(
        key,
        &[
            AttributeType::KeyType,
            AttributeType::ValueLen,
            AttributeType::Encrypt,
            AttributeType::Decrypt,
            AttributeType::Sensitive,
            AttributeType::Extractable,
        ],
    )?;
    let mut key_type = None;
    let mut value_len = None;
    let (mut encrypt, mut decrypt, mut sensitive, mut extractable) = (false, false, false, true);
    for attribute in attributes {
        match attribute {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::ValueLen(len) => value_len = Some(usize::from(len)),
            Attribute::Encrypt(b) => encrypt = b,
            Attribute::Decrypt(b) => decrypt = b,
            Attribute::Sensitive(b) => sensitive = b,
            Attribute::Extractable(b) => extractable = b,
            _ => {}
        }
    }
    let reason = if key_type != Some(KeyType::AES) {
        Some("it is not an AES key")
    } else if value_len != Some(KEY_LEN) {
        Some("it is not a 256-bit key")
    } else if !(encrypt && decrypt) {
        Some("it may not encrypt and decrypt (CKA_ENCRYPT and CKA_DECRYPT must be true)")
    } else if extractable {
        Some("it is extractable (CKA_EXTRACTABLE is true), so it could leave the token")
    } else if !sensitive {
        Some("it is not sensitive (CKA_SENSITIVE is false), so its value could be read")
    } else {
        None
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

/// Generates the master key in the token (on a read-write session, logged
/// in as the user): AES-256, on the token, private, sensitive, never
/// extractable, usable only to encrypt and decrypt. Refuses to create a
/// second object with the same label.
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
