//! The sidecar operations, one file each, as `impl Client` blocks, and the
//! request shapes they share.

pub(crate) mod decrypt;
pub(crate) mod encrypt;
pub(crate) mod lookup;
pub(crate) mod probe;
pub(crate) mod rewrap;

use serde::Serialize;

use crate::error::Error;
use crate::operation::Operation;

/// The single-record form of a request: `"record": {…}`.
#[derive(Serialize)]
pub(crate) struct One<'a, R: ?Sized> {
    pub(crate) record: &'a R,
}

/// The batch form of a request: `"records": [{…}, …]`.
#[derive(Serialize)]
pub(crate) struct Many<'a, R> {
    pub(crate) records: &'a [R],
}

/// A batch answer must hold exactly one `what` per record sent.
pub(crate) fn check_count(op: Operation, sent: usize, what: &str, got: usize) -> Result<(), Error> {
    if sent == got {
        return Ok(());
    }
    Err(Error::Decode { op, detail: format!("{sent} records sent but {got} {what} returned") })
}
