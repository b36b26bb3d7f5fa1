//! Built-in origins: `hello` echoes the request it received as JSON, `status:NNN` answers
//! with a fixed status.

use std::collections::BTreeMap;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::Serialize;

use crate::relay::{self, HttpBody};

#[derive(Serialize)]
struct Echo {
    method: String,
    path: String,
    headers: BTreeMap<String, Vec<String>>,
    body_bytes: u64,
}

/// Reads (and discards) the body, then describes the request as JSON.
pub(super) async fn hello(req: Request<HttpBody>) -> Response<HttpBody> {
    let (parts, mut body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let echo = Echo {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers,
        body_bytes,
    };
    // Serializing a map of strings cannot fail.
    let mut json = serde_json::to_vec_pretty(&echo).unwrap_or_default();
    json.push(b'\n');
    let len = json.len();
    let mut resp = Response::new(relay::full(json));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// A response with `status` and no body.
pub(super) fn status(status: StatusCode) -> Response<HttpBody> {
    let mut resp = Response::new(relay::empty());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}
