//! Request extractors shared by the key service and the sidecar.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::abuse::{BodyBounds, nesting};
use crate::error::ApiError;

/// A JSON request body, read within the request's [`BodyBounds`] (time and
/// nesting depth; defaults if no abuse layer set them) and the router's
/// body size limit. Rejections are our JSON errors: `unsupported_media_type`
/// (415), `body_too_large` (413), `body_timeout` (408), `json_too_deep`
/// and `malformed_json` (400), `invalid_request` (422, wrong shape).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (bytes, max_depth) = read_body(request, state).await?;
        parse(&bytes, max_depth).map(ApiJson)
    }
}

/// A JSON request body, read within its bounds like [`ApiJson`]'s but
/// parsed by the handler ([`ApiBody::parse`]) into a type that may borrow
/// from it: the sidecar takes records as text (`&RawValue`) instead of
/// copying each into a tree.
#[derive(Debug)]
pub struct ApiBody {
    bytes: Bytes,
    max_depth: usize,
    nesting: usize,
}

impl ApiBody {
    /// The body parsed as `T`, with [`ApiJson`]'s errors.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, ApiError> {
        parse_measured(&self.bytes, self.nesting, self.max_depth)
    }

    /// How deeply the body nests arrays and objects (counted up to one
    /// level past the limit): what is inside it nests less.
    pub fn nesting(&self) -> usize {
        self.nesting
    }

    /// The body's length in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (bytes, max_depth) = read_body(request, state).await?;
        let nesting = nesting(&bytes, max_depth);
        Ok(Self { bytes, max_depth, nesting })
    }
}

/// A JSON request's body, read within its bounds, and the nesting depth
/// it may have.
async fn read_body<S: Send + Sync>(
    request: Request,
    state: &S,
) -> Result<(Bytes, usize), ApiError> {
    if !is_json(request.headers()) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json",
        ));
    }
    let max_depth = request.extensions().get::<BodyBounds>().copied().unwrap_or_default().max_depth;
    Ok((read_bytes(request, state).await?, max_depth))
}

/// A request's body of any media type, read within its time bound and the
/// router's size limit, with [`ApiJson`]'s errors for those.
pub async fn read_bytes<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
    let bounds = request.extensions().get::<BodyBounds>().copied().unwrap_or_default();
    let read = tokio::time::timeout(bounds.read_timeout, Bytes::from_request(request, state));
    match read.await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(rejection)) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the request body is too large",
            ))
        }
        Ok(Err(_)) => {
            Err(ApiError::bad_request("invalid_request", "the request body could not be read"))
        }
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "the request body did not arrive in time",
        )),
    }
}

/// A query string (`axum::extract::Query`) whose rejection is our JSON
/// error (400 `invalid_request`) instead of plain text.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| ApiQuery(query.0))
            .map_err(|rejection| ApiError::bad_request("invalid_request", rejection.body_text()))
    }
}

/// A path parameter (`axum::extract::Path`) whose rejection (a segment that
/// is not valid percent-encoded UTF-8, say) is our JSON error (400
/// `invalid_request`) instead of plain text.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| ApiPath(path.0))
            .map_err(|rejection| ApiError::bad_request("invalid_request", rejection.body_text()))
    }
}

/// Parses a JSON body after checking its nesting depth. Public for the
/// fuzz targets, which feed it every request type of both APIs.
pub fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], max_depth: usize) -> Result<T, ApiError> {
    parse_measured(bytes, nesting(bytes, max_depth), max_depth)
}

/// [`parse`] of a body whose [`nesting`] is known.
fn parse_measured<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    nesting: usize,
    max_depth: usize,
) -> Result<T, ApiError> {
    if nesting > max_depth {
        return Err(ApiError::bad_request(
            "json_too_deep",
            format!("the request body nests deeper than {max_depth} levels"),
        ));
    }
    let malformed =
        || ApiError::bad_request("malformed_json", "the request body is not valid JSON");
    // Validated as UTF-8 once, in one pass: parsing from `&str` then takes
    // each string as it is, where parsing bytes validates every string
    // separately (3 % of the sidecar's batch decrypt profile).
    let text = std::str::from_utf8(bytes).map_err(|_| malformed())?;
    let value = serde_json::from_str(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", e.to_string())
        }
        _ => malformed(),
    })?;
    // Every request body is an object; serde would also read a struct from
    // an array of its fields in order (`[1]` as `{"count": 1}`).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "the request body must be a JSON object",
        ));
    }
    Ok(value)
}

/// `application/json` or `application/<something>+json`, any parameters.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    // Compared without lowercasing into a new string: this runs per request.
    headers.get(header::CONTENT_TYPE).and_then(essence).is_some_and(|essence| {
        let Some((kind, subtype)) = essence.split_once('/') else { return false };
        let suffix = subtype.len().checked_sub(5).and_then(|at| subtype.get(at..));
        kind.eq_ignore_ascii_case("application")
            && (subtype.eq_ignore_ascii_case("json")
                || suffix.is_some_and(|s| s.eq_ignore_ascii_case("+json")))
    })
}

/// Whether the request's `Content-Type` is `expected` (lower case), with
/// any parameters.
pub fn has_media_type(headers: &axum::http::HeaderMap, expected: &str) -> bool {
    is_media_type(headers.get(header::CONTENT_TYPE), expected)
}

/// Whether a `Content-Type` value is `expected` (lower case), with any
/// parameters (a proxy may add a charset).
pub fn is_media_type(value: Option<&axum::http::HeaderValue>, expected: &str) -> bool {
    value.and_then(essence).is_some_and(|essence| essence.eq_ignore_ascii_case(expected))
}

/// A media type's type and subtype, without its parameters.
fn essence(value: &axum::http::HeaderValue) -> Option<&str> {
    Some(value.to_str().ok()?.split(';').next().unwrap_or_default().trim())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Count {
        #[allow(dead_code)]
        count: u32,
    }

    #[test]
    fn errors_have_codes() {
        let code = |body: &[u8]| parse::<Count>(body, 4).map(|_| "ok").unwrap_or_else(|e| e.code());
        assert_eq!(code(br#"{"count": 1}"#), "ok");
        assert_eq!(code(br#"{"count": "#), "malformed_json");
        assert_eq!(code(br#"{"count": "x"}"#), "invalid_request");
        assert_eq!(code(br#"{"count": 1, "x": 2}"#), "invalid_request");
        assert_eq!(code(br#"{"count": 1, "x": [[[[1]]]]}"#), "json_too_deep");
        // A struct is not read from an array of its fields.
        assert_eq!(code(b" [1]"), "invalid_request");
        assert_eq!(code(b"[1"), "malformed_json");
        assert_eq!(code(b"1"), "invalid_request");
        let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(code(deep.as_bytes()), "json_too_deep");
    }

    #[test]
    fn text_that_is_not_utf8_is_malformed() {
        let code = |body: &[u8]| parse::<Value>(body, 4).map(|_| "ok").unwrap_or_else(|e| e.code());
        assert_eq!(code("{\"name\": \"Zoë 😀\"}".as_bytes()), "ok");
        // A lone continuation byte, an overlong '/', a UTF-16 surrogate
        // encoded as UTF-8 and a truncated sequence: inside a string, in a
        // key, and outside any string.
        for bad in [&b"\x80"[..], b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82"] {
            let in_value = [&b"{\"a\": \""[..], bad, b"\"}"].concat();
            let in_key = [&b"{\""[..], bad, b"\": 1}"].concat();
            let outside = [&b"{\"a\": 1}"[..], bad].concat();
            for body in [in_value, in_key, outside] {
                assert_eq!(code(&body), "malformed_json", "{body:?}");
            }
        }
        // An escaped lone surrogate is valid UTF-8 text but not a string.
        assert_eq!(code(br#"{"a": "\ud800"}"#), "malformed_json");
    }

    #[test]
    fn content_types() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!is_json(&h));
        for (value, ok) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("application/jsonx", false),
        ] {
            h.insert(header::CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_json(&h), ok, "{value}");
        }
    }
}
