//! FastAPI-shaped HTTP errors and request-body validation.
//!
//! Errors are `{"detail": "..."}`; request validation failures are 422 with
//! `{"detail": [{"type", "loc", "msg"}, ...]}` like FastAPI's, except that
//! the offending `input` is never echoed (FastAPI copies it, so a large
//! invalid body came back whole): an answer's size does not depend on
//! what was sent. Text details are cut at [`MAX_DETAIL_CHARS`].

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use indexmap::IndexMap;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Number, Value};

/// Longest text detail sent (characters; longer ones end with `…`).
pub(crate) const MAX_DETAIL_CHARS: usize = 300;

/// Longest location element echoed (a field name or key from the body).
const MAX_LOC_CHARS: usize = 64;

/// One FastAPI/pydantic validation error (without its `input`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Issue {
    #[serde(rename = "type")]
    kind: &'static str,
    loc: Vec<Value>,
    msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx: Option<Value>,
}

/// Cuts `text` to `max` characters (then `…`).
pub(crate) fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

impl Issue {
    /// An issue at `loc`. `_input` (the offending value) is not kept: it is
    /// never echoed.
    pub(crate) fn new(kind: &'static str, loc: Vec<Value>, msg: impl Into<String>, _input: Value) -> Self {
        let loc = loc
            .into_iter()
            .map(|part| match part {
                Value::String(s) => Value::String(clip(&s, MAX_LOC_CHARS)),
                other => other,
            })
            .collect();
        Self {
            kind,
            loc,
            msg: msg.into(),
            ctx: None,
        }
    }

    pub(crate) fn with_ctx(mut self, ctx: Value) -> Self {
        self.ctx = Some(ctx);
        self
    }

    pub(crate) fn missing(loc: Vec<Value>) -> Self {
        Self::new("missing", loc, "Field required", Value::Null)
    }
}

#[derive(Debug, Clone)]
enum Detail {
    Text(String),
    Issues(Vec<Issue>),
}

/// An error response.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    status: StatusCode,
    detail: Detail,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self {
            status,
            detail: Detail::Text(detail.into()),
        }
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    pub(crate) fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }

    pub(crate) fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, detail)
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, detail)
    }

    pub(crate) fn unprocessable(issues: Vec<Issue>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            detail: Detail::Issues(issues),
        }
    }

    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The HTTP status.
    pub(crate) fn status_code(&self) -> StatusCode {
        self.status
    }

    /// The detail, when it is text.
    pub(crate) fn text(&self) -> Option<&str> {
        match &self.detail {
            Detail::Text(text) => Some(text),
            Detail::Issues(_) => None,
        }
    }
}

#[derive(Serialize)]
struct TextBody<'a> {
    detail: &'a str,
}

#[derive(Serialize)]
struct IssuesBody<'a> {
    detail: &'a [Issue],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self.detail {
            Detail::Text(text) => (
                self.status,
                Json(TextBody {
                    detail: &clip(text, MAX_DETAIL_CHARS),
                }),
            )
                .into_response(),
            Detail::Issues(issues) => (self.status, Json(IssuesBody { detail: issues })).into_response(),
        }
    }
}

pub(crate) async fn not_found_fallback() -> ApiError {
    ApiError::not_found("Not Found")
}

pub(crate) async fn method_not_allowed_fallback() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}

fn body_loc(field: &str) -> Vec<Value> {
    vec![Value::from("body"), Value::from(field)]
}

/// A JSON request body split into its top-level fields (raw, in order).
pub(crate) type RawObject = IndexMap<String, Box<RawValue>>;

/// Reads a JSON object body; 413 when over the limit, 422 otherwise.
pub(crate) fn json_object(body: Result<axum::body::Bytes, BytesRejection>) -> Result<RawObject, ApiError> {
    let bytes = body.map_err(|rejection| {
        ApiError::new(
            rejection.status(),
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                "Request body too large".to_owned()
            } else {
                rejection.body_text()
            },
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::unprocessable(vec![Issue::missing(vec![Value::from("body")])]));
    }
    let raw: &RawValue = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::unprocessable(vec![Issue::new(
            "json_invalid",
            vec![Value::from("body"), Value::from(e.column())],
            "JSON decode error",
            Value::Object(serde_json::Map::new()),
        )
        .with_ctx(serde_json::json!({ "error": e.to_string() }))])
    })?;
    if !raw.get().trim_start().starts_with('{') {
        let input = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
        return Err(ApiError::unprocessable(vec![Issue::new(
            "model_attributes_type",
            vec![Value::from("body")],
            "Input should be a valid dictionary or object to extract fields from",
            input,
        )]));
    }
    serde_json::from_str(raw.get()).map_err(|e| {
        ApiError::unprocessable(vec![Issue::new(
            "json_invalid",
            vec![Value::from("body"), Value::from(e.column())],
            "JSON decode error",
            Value::Object(serde_json::Map::new()),
        )])
    })
}

/// Typed access to body fields that records pydantic-style issues instead
/// of failing at the first one; [`Fields::finish`] turns them into a 422.
pub(crate) struct Fields<'a> {
    object: &'a RawObject,
    pub(crate) issues: Vec<Issue>,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(object: &'a RawObject) -> Self {
        Self {
            object,
            issues: Vec::new(),
        }
    }

    fn missing(&mut self, name: &str) {
        self.issues.push(Issue::missing(body_loc(name)));
    }

    /// The field as sent (for error reports).
    pub(crate) fn raw(&self, name: &str) -> Value {
        self.value(name).unwrap_or(Value::Null)
    }

    fn value(&self, name: &str) -> Option<Value> {
        self.object
            .get(name)
            .map(|raw| serde_json::from_str(raw.get()).unwrap_or(Value::Null))
    }

    fn string_issue(&mut self, loc: Vec<Value>, input: Value) {
        self.issues
            .push(Issue::new("string_type", loc, "Input should be a valid string", input));
    }

    /// A required string.
    pub(crate) fn string(&mut self, name: &str) -> String {
        match self.value(name) {
            None => {
                self.missing(name);
                String::new()
            }
            Some(Value::String(s)) => s,
            Some(other) => {
                self.string_issue(body_loc(name), other);
                String::new()
            }
        }
    }

    /// A string with a default when absent.
    pub(crate) fn string_or(&mut self, name: &str, default: &str) -> String {
        if self.object.contains_key(name) {
            self.string(name)
        } else {
            default.to_owned()
        }
    }

    /// A string that may be absent or null.
    pub(crate) fn optional_string(&mut self, name: &str) -> Option<String> {
        match self.value(name) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.string_issue(body_loc(name), other);
                None
            }
        }
    }

    /// A number (pydantic `float`).
    pub(crate) fn float(&mut self, name: &str) -> f64 {
        match self.value(name) {
            None => {
                self.missing(name);
                0.0
            }
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            Some(other) => {
                self.issues.push(Issue::new(
                    "float_type",
                    body_loc(name),
                    "Input should be a valid number",
                    other,
                ));
                0.0
            }
        }
    }

    /// `list[str]`, empty when absent.
    pub(crate) fn string_list(&mut self, name: &str) -> Vec<String> {
        let Some(value) = self.value(name) else {
            return Vec::new();
        };
        let Value::Array(items) = value else {
            self.issues.push(Issue::new(
                "list_type",
                body_loc(name),
                "Input should be a valid list",
                value,
            ));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            match item {
                Value::String(s) => out.push(s),
                other => {
                    let loc = vec![Value::from("body"), Value::from(name), Value::from(i)];
                    self.string_issue(loc, other);
                }
            }
        }
        out
    }

    fn raw_object(&mut self, loc: Vec<Value>, raw: &RawValue) -> Option<IndexMap<String, Value>> {
        if raw.get().trim_start().starts_with('{') {
            if let Ok(map) = serde_json::from_str::<IndexMap<String, Value>>(raw.get()) {
                return Some(map);
            }
        }
        let input = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
        self.issues.push(Issue::new(
            "dict_type",
            loc,
            "Input should be a valid dictionary",
            input,
        ));
        None
    }

    /// `dict[str, str]` in document order, empty when absent.
    pub(crate) fn string_map(&mut self, name: &str) -> IndexMap<String, String> {
        let Some(raw) = self.object.get(name) else {
            return IndexMap::new();
        };
        let Some(map) = self.raw_object(body_loc(name), raw) else {
            return IndexMap::new();
        };
        let mut out = IndexMap::with_capacity(map.len());
        for (key, value) in map {
            match value {
                Value::String(s) => {
                    out.insert(key, s);
                }
                other => {
                    let loc = vec![Value::from("body"), Value::from(name), Value::from(key)];
                    self.string_issue(loc, other);
                }
            }
        }
        out
    }

    /// A required `dict[str, Any]` in document order.
    pub(crate) fn object(&mut self, name: &str) -> IndexMap<String, Value> {
        let Some(raw) = self.object.get(name) else {
            self.missing(name);
            return IndexMap::new();
        };
        self.raw_object(body_loc(name), raw).unwrap_or_default()
    }

    /// `list[dict[str, Any]]` in document order, empty when absent.
    pub(crate) fn object_list(&mut self, name: &str) -> Vec<IndexMap<String, Value>> {
        let Some(raw) = self.object.get(name) else {
            return Vec::new();
        };
        let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(raw.get()) else {
            let input = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
            self.issues.push(Issue::new(
                "list_type",
                body_loc(name),
                "Input should be a valid list",
                input,
            ));
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let loc = vec![Value::from("body"), Value::from(name), Value::from(i)];
            if let Some(map) = self.raw_object(loc, item) {
                out.push(map);
            }
        }
        out
    }

    /// Fails with 422 when any accessor recorded an issue.
    pub(crate) fn finish(self) -> Result<(), ApiError> {
        if self.issues.is_empty() {
            Ok(())
        } else {
            Err(ApiError::unprocessable(self.issues))
        }
    }
}

/// Whether a JSON value is an integer (what the reference clients send as
/// key ids).
pub(crate) fn as_integer(value: &Value) -> Option<Number> {
    match value {
        Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;

    fn parse(text: &'static str) -> Result<RawObject, ApiError> {
        json_object(Ok(Bytes::from_static(text.as_bytes())))
    }

    #[test]
    fn bodies_that_are_not_objects_are_422() {
        for text in ["", "  ", "{", "[1]", "\"x\"", "nul"] {
            assert_eq!(
                parse(text).err().map(|e| e.status()),
                Some(StatusCode::UNPROCESSABLE_ENTITY),
                "{text}"
            );
        }
    }

    #[test]
    fn fields_record_issues() {
        let object = parse(r#"{"a": 1, "m": {"z": "1", "a": "2"}, "l": ["x", 2]}"#).unwrap_or_default();
        let mut fields = Fields::new(&object);
        assert_eq!(fields.string("a"), "");
        assert_eq!(fields.string("missing"), "");
        let map = fields.string_map("m");
        assert_eq!(map.keys().collect::<Vec<_>>(), ["z", "a"]);
        assert_eq!(fields.string_list("l"), ["x"]);
        assert_eq!(fields.issues.len(), 3);
        assert!(fields.finish().is_err());
    }
}
