//! Request bodies: a JSON extractor whose rejections are [`ApiError`]s, and
//! the base64 encoding of binary fields.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest JSON request body envd reads (stdin is carried inline, base64).
pub const MAX_JSON_BODY_BYTES: usize = 64 << 20;

/// A JSON request body. Unlike axum's `Json`, a missing content type is
/// accepted and every rejection is a 400/413 in envd's error shape, naming
/// the field serde stopped at.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = axum::body::to_bytes(req.into_body(), MAX_JSON_BODY_BYTES)
            .await
            .map_err(|e| {
                ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body unreadable or over {MAX_JSON_BODY_BYTES} bytes: {e}"),
                )
            })?;
        let _ = state;
        parse(&body).map(ApiJson)
    }
}

/// Parses a JSON body; an empty body is parsed as `{}`.
pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("invalid request body: {e}")))
}

/// Serde helpers for `Vec<u8>` fields carried as standard base64 strings.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Encodes bytes as a base64 string.
    pub fn serialize<S: Serializer, T: AsRef<[u8]> + ?Sized>(
        bytes: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes.as_ref()))
    }

    /// Decodes a base64 string; bad base64 is a deserialisation error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }

    /// The same for optional fields.
    pub mod option {
        use super::*;

        /// Decodes an optional base64 string.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            let s: Option<String> = Option::deserialize(d)?;
            s.map(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s.as_bytes())
                    .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
            })
            .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Input {
        #[serde(with = "b64")]
        data: Vec<u8>,
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let ok: Input = parse(&Bytes::from_static(br#"{"data":"aGk="}"#)).unwrap();
        assert_eq!(ok.data, b"hi");
        let bad = parse::<Input>(&Bytes::from_static(br#"{"data":"!!"}"#)).unwrap_err();
        assert_eq!(bad.code, "invalid_json");
        assert!(bad.message.contains("base64"), "{}", bad.message);
        let wrong_type = parse::<Input>(&Bytes::from_static(br#"{"data":1}"#)).unwrap_err();
        assert_eq!(wrong_type.status, axum::http::StatusCode::BAD_REQUEST);
        let unknown = parse::<Input>(&Bytes::from_static(br#"{"data":"","x":1}"#)).unwrap_err();
        assert!(
            unknown.message.contains("unknown field"),
            "{}",
            unknown.message
        );
    }
}
