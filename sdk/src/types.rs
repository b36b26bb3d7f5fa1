//! Plain Rust views of requests, responses and completions, and the decisions a plugin returns.

use std::cell::OnceCell;

use crate::__bindings::sluice::plugin::types as wit;

/// The request as a plugin sees it (read-only). It reflects the edits of the plugins that ran
/// before this one.
///
/// In a component, each part is fetched from the host the first time the plugin asks for it,
/// and kept for the rest of the hook: a hook pays only for what it reads (a plugin that looks
/// at one header does not copy the path, the method and every other header into its memory).
/// In native tests, [`Request::new`] builds one with every part already there.
#[derive(Clone)]
pub struct Request<'a> {
    /// The host's view, while a hook runs; `None` for a request built by a test.
    host: Option<&'a wit::Request>,
    method: OnceCell<String>,
    scheme: OnceCell<String>,
    authority: OnceCell<String>,
    path: OnceCell<String>,
    pub(crate) headers: OnceCell<Vec<(String, Vec<u8>)>>,
    request_id: OnceCell<String>,
    hostname: OnceCell<String>,
    ingress_rule: OnceCell<u32>,
    pub(crate) client_addr: OnceCell<Option<String>>,
    /// Headers asked for by name before (or instead of) the whole list: a lookup copies one
    /// header's values out of the host, not every header of the request.
    lookups: [OnceCell<(String, Vec<Vec<u8>>)>; LOOKUPS],
}

/// Headers a hook may look up by name before the request's whole header list is fetched.
const LOOKUPS: usize = 4;

impl Request<'static> {
    /// A request for `url` (`https://host/path?query`), for tests. As in production, the
    /// authority is in [`Request::authority`] and [`Request::hostname`], not in a `host`
    /// header; the view is what a plugin with every grant sees (see
    /// [`crate::testing::granted`] for what the host hides otherwise).
    pub fn new(method: &str, url: &str) -> Request<'static> {
        let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let hostname = authority
            .rsplit_once(':')
            .map_or(authority, |(h, _)| h)
            .to_ascii_lowercase();
        Request {
            host: None,
            method: method.to_string().into(),
            scheme: scheme.to_string().into(),
            authority: authority.to_string().into(),
            path: path.to_string().into(),
            headers: Vec::new().into(),
            request_id: String::from("00000000000000000000000000000000").into(),
            hostname: hostname.into(),
            ingress_rule: 0.into(),
            client_addr: None.into(),
            lookups: Default::default(),
        }
    }

    /// Adds a header (for tests).
    pub fn with_header(mut self, name: &str, value: &str) -> Request<'static> {
        self.headers
            .get_mut()
            .expect("set by Request::new")
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the client address (for tests).
    pub fn with_client_addr(mut self, addr: &str) -> Request<'static> {
        self.client_addr = Some(addr.to_string()).into();
        self
    }

    /// Sets the request id (for tests; [`Request::new`] uses 32 zeros).
    pub fn with_request_id(mut self, id: &str) -> Request<'static> {
        self.request_id = id.to_string().into();
        self
    }
}

impl<'a> Request<'a> {
    pub(crate) fn from_wit(req: &'a wit::Request) -> Request<'a> {
        Request {
            host: Some(req),
            method: OnceCell::new(),
            scheme: OnceCell::new(),
            authority: OnceCell::new(),
            path: OnceCell::new(),
            headers: OnceCell::new(),
            request_id: OnceCell::new(),
            hostname: OnceCell::new(),
            ingress_rule: OnceCell::new(),
            client_addr: OnceCell::new(),
            lookups: Default::default(),
        }
    }

    /// The host's view; every part of a request built by a test is already set.
    fn host(&self) -> &'a wit::Request {
        self.host
            .expect("a request built by a test has every part set")
    }

    /// Method, such as `GET`.
    pub fn method(&self) -> &str {
        self.method.get_or_init(|| self.host().method())
    }

    /// `http` or `https`, as the client spoke to the edge.
    pub fn scheme(&self) -> &str {
        self.scheme.get_or_init(|| self.host().scheme())
    }

    /// The Host the client asked for, port included if given.
    pub fn authority(&self) -> &str {
        self.authority.get_or_init(|| self.host().authority())
    }

    /// Normalised path with the query (`/a/b?c=d`).
    pub fn path(&self) -> &str {
        self.path.get_or_init(|| self.host().path())
    }

    /// Every header, lowercase names, in order; a repeated header appears several times.
    pub fn headers(&self) -> &[(String, Vec<u8>)] {
        self.headers.get_or_init(|| {
            self.host()
                .headers()
                .into_iter()
                .map(|h| (h.name, h.value))
                .collect()
        })
    }

    /// The request id (`sluice-request-id`).
    pub fn request_id(&self) -> &str {
        self.request_id.get_or_init(|| self.host().request_id())
    }

    /// The tunnel's public hostname for this request (lowercase, no port).
    pub fn hostname(&self) -> &str {
        self.hostname.get_or_init(|| self.host().hostname())
    }

    /// Index of the ingress rule that matched, in the connector's file.
    pub fn ingress_rule(&self) -> u32 {
        *self.ingress_rule.get_or_init(|| self.host().ingress_rule())
    }

    /// The client's address (`ip:port`), if the operator granted `client-addr`.
    pub fn client_addr(&self) -> Option<&str> {
        self.client_addr
            .get_or_init(|| self.host().client_addr())
            .as_deref()
    }

    /// The first value of header `name`, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        let value = match self.looked_up(name) {
            Some(values) => values.first().map(Vec::as_slice),
            None => self
                .headers()
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_slice()),
        };
        value.and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Every value of header `name`, in order.
    pub fn header_bytes<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        let looked_up = self.looked_up(name);
        let listed = match looked_up {
            Some(_) => None,
            None => Some(
                self.headers()
                    .iter()
                    .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.as_slice()),
            ),
        };
        let looked_up = looked_up.into_iter().flatten().map(Vec::as_slice);
        looked_up.chain(listed.into_iter().flatten())
    }

    /// The values of header `name` asked of the host by name, while the whole list has not
    /// been fetched and a lookup slot is free (or already holds it); `None` otherwise.
    fn looked_up(&self, name: &str) -> Option<&[Vec<u8>]> {
        let host = self.host?;
        if self.headers.get().is_some() {
            return None;
        }
        for slot in &self.lookups {
            match slot.get() {
                Some((n, values)) if n.eq_ignore_ascii_case(name) => return Some(values),
                Some(_) => continue,
                None => {
                    let name = name.to_ascii_lowercase();
                    let values = host.header(&name);
                    return Some(&slot.get_or_init(|| (name, values)).1);
                }
            }
        }
        None
    }

    /// The value of cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.header_bytes("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The path without the query.
    pub fn path_only(&self) -> &str {
        self.path().split('?').next().unwrap_or("/")
    }

    /// The client's IP address (without port), if granted.
    pub fn client_ip(&self) -> Option<&str> {
        let addr = self.client_addr()?;
        Some(match addr.rsplit_once(':') {
            Some((ip, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                ip.trim_start_matches('[').trim_end_matches(']')
            }
            _ => addr,
        })
    }
}

impl std::fmt::Debug for Request<'_> {
    /// Shows the parts read so far (a debug print never calls the host).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method.get())
            .field("authority", &self.authority.get())
            .field("path", &self.path.get())
            .field("headers", &self.headers.get())
            .field("request_id", &self.request_id.get())
            .finish_non_exhaustive()
    }
}

/// The response head, in `on-response`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, lowercase names, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Response {
    /// The first value of header `name`, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub(crate) fn from_wit(r: wit::Response) -> Response {
        Response {
            status: r.status,
            headers: r.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        }
    }
}

/// How a request ended, in `on-complete`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// The status the client got.
    pub status: u16,
    /// The origin that answered, if one did.
    pub origin: Option<String>,
    /// Microseconds from the connector receiving the request to the end of the response.
    pub duration_us: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

impl Completion {
    pub(crate) fn from_wit(c: wit::Completion) -> Completion {
        Completion {
            status: c.status,
            origin: c.origin,
            duration_us: c.duration_us,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            error: c.error,
        }
    }
}

/// One change to a set of headers. Names are lowercased by the builders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace every value of the header.
    Set(String, Vec<u8>),
    /// Add a value after the existing ones.
    Append(String, Vec<u8>),
    /// Remove the header.
    Remove(String),
}

impl HeaderEdit {
    fn into_wit(self) -> wit::HeaderEdit {
        match self {
            HeaderEdit::Set(name, value) => wit::HeaderEdit::Set(wit::HeaderResult { name, value }),
            HeaderEdit::Append(name, value) => {
                wit::HeaderEdit::Append(wit::HeaderResult { name, value })
            }
            HeaderEdit::Remove(name) => wit::HeaderEdit::Remove(name),
        }
    }
}

/// A response produced by the plugin instead of the origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// Status code (200..=599).
    pub status: u16,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body (at most 256 KiB).
    pub body: Vec<u8>,
}

impl LocalResponse {
    /// A response with `status` and no body.
    pub fn new(status: u16) -> LocalResponse {
        LocalResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> LocalResponse {
        self.headers
            .push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// Sets a plain-text body (and its content type).
    pub fn text(self, body: &str) -> LocalResponse {
        self.header("content-type", "text/plain; charset=utf-8")
            .body(body.as_bytes())
    }

    /// Sets an HTML body (and its content type).
    pub fn html(self, body: &str) -> LocalResponse {
        self.header("content-type", "text/html; charset=utf-8")
            .body(body.as_bytes())
    }

    /// Sets the body as bytes; add a `content-type` with [`LocalResponse::header`]. The host
    /// sets `content-length`.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> LocalResponse {
        self.body = body.into();
        self
    }
}

/// What `on-request` decided. The default changes nothing.
///
/// The host refuses (and applies the plugin's `on-error` policy to) a decision that sets or
/// removes hop-by-hop or framing headers (`connection`, `keep-alive`, `transfer-encoding`,
/// `content-length`, `te`, `trailer`, `upgrade`, `proxy-*`) or `sluice-request-id`, uses an
/// invalid header name or value, rewrites to a path not starting with `/`, names an origin
/// the operator did not configure, or answers with a status outside 200..=599 or a body over
/// 256 KiB.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestDecision {
    /// Header edits, applied in order.
    pub headers: Vec<HeaderEdit>,
    /// New path (and query) for the origin.
    pub path: Option<String>,
    /// A configured origin to send the request to.
    pub origin: Option<String>,
    /// Answer locally instead of proxying.
    pub respond: Option<LocalResponse>,
}

impl RequestDecision {
    /// A decision that changes nothing.
    pub fn new() -> RequestDecision {
        RequestDecision::default()
    }

    /// Sets header `name` to `value`, replacing existing values.
    pub fn set_header(mut self, name: &str, value: &str) -> RequestDecision {
        self.headers.push(HeaderEdit::Set(
            name.to_ascii_lowercase(),
            value.as_bytes().to_vec(),
        ));
        self
    }

    /// Appends a value to header `name`.
    pub fn append_header(mut self, name: &str, value: &str) -> RequestDecision {
        self.headers.push(HeaderEdit::Append(
            name.to_ascii_lowercase(),
            value.as_bytes().to_vec(),
        ));
        self
    }

    /// Removes header `name`.
    pub fn remove_header(mut self, name: &str) -> RequestDecision {
        self.headers
            .push(HeaderEdit::Remove(name.to_ascii_lowercase()));
        self
    }

    /// Sends the request to `path` (with query) instead.
    pub fn rewrite_path(mut self, path: &str) -> RequestDecision {
        self.path = Some(path.to_string());
        self
    }

    /// Sends the request to the configured origin `name`.
    pub fn route_to(mut self, name: &str) -> RequestDecision {
        self.origin = Some(name.to_string());
        self
    }

    /// Answers locally.
    pub fn respond(mut self, response: LocalResponse) -> RequestDecision {
        self.respond = Some(response);
        self
    }

    pub(crate) fn into_wit(self) -> wit::RequestDecision {
        wit::RequestDecision {
            headers: self.headers.into_iter().map(HeaderEdit::into_wit).collect(),
            path: self.path,
            origin: self.origin,
            respond: self.respond.map(LocalResponse::into_wit),
        }
    }
}

impl LocalResponse {
    pub(crate) fn into_wit(self) -> wit::LocalResponse {
        wit::LocalResponse {
            status: self.status,
            headers: self
                .headers
                .into_iter()
                .map(|(name, value)| wit::HeaderResult { name, value })
                .collect(),
            body: self.body,
        }
    }
}

/// What a body hook does with the bytes it was given: the new piece of the body, after any
/// bytes it held back before. The default passes them on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BodyAction {
    /// Send them on unchanged.
    #[default]
    Pass,
    /// Keep them: the next call gets them again, followed by the next piece. The host keeps
    /// them, up to the operator's `body-buffer` (1 MiB by default): past it the plugin has
    /// failed. At the end of the body, holding means passing.
    Hold,
    /// Send these bytes instead (empty: drop what was given). At most `body-buffer`.
    Replace(Vec<u8>),
    /// Stop the body. A request body: the client gets this response (unless the origin
    /// already answered) and the origin's request is abandoned. A response body: the response
    /// is cut off (its head already left).
    Reject(LocalResponse),
}

impl BodyAction {
    pub(crate) fn into_wit(self) -> wit::BodyAction {
        match self {
            BodyAction::Pass => wit::BodyAction::Pass,
            BodyAction::Hold => wit::BodyAction::Hold,
            BodyAction::Replace(b) => wit::BodyAction::Replace(b),
            BodyAction::Reject(r) => wit::BodyAction::Reject(r.into_wit()),
        }
    }
}

/// What `on-response` decided. The default changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResponseDecision {
    /// Edits to the response headers, applied in order.
    pub headers: Vec<HeaderEdit>,
    /// A new status for the client (200-599; an accepted upgrade, 101, cannot be changed).
    pub status: Option<u16>,
    /// A body in place of the origin's; the host sets `content-length`.
    pub body: Option<Vec<u8>>,
}

impl ResponseDecision {
    /// A decision that changes nothing.
    pub fn new() -> ResponseDecision {
        ResponseDecision::default()
    }

    /// Sets response header `name`.
    pub fn set_header(mut self, name: &str, value: &str) -> ResponseDecision {
        self.headers.push(HeaderEdit::Set(
            name.to_ascii_lowercase(),
            value.as_bytes().to_vec(),
        ));
        self
    }

    /// Appends a value to response header `name`.
    pub fn append_header(mut self, name: &str, value: &str) -> ResponseDecision {
        self.headers.push(HeaderEdit::Append(
            name.to_ascii_lowercase(),
            value.as_bytes().to_vec(),
        ));
        self
    }

    /// Removes response header `name`.
    pub fn remove_header(mut self, name: &str) -> ResponseDecision {
        self.headers
            .push(HeaderEdit::Remove(name.to_ascii_lowercase()));
        self
    }

    /// Changes the status the client gets (200-599). Later plugins of the response chain see
    /// the new one.
    pub fn status(mut self, status: u16) -> ResponseDecision {
        self.status = Some(status);
        self
    }

    /// Replaces the origin's body (at most 256 KiB; not for a 204 or 304). The origin's body
    /// is discarded; the host sets `content-length`. Set `content-type` too if it changes.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> ResponseDecision {
        self.body = Some(body.into());
        self
    }

    pub(crate) fn into_wit(self) -> wit::ResponseDecision {
        wit::ResponseDecision {
            headers: self.headers.into_iter().map(HeaderEdit::into_wit).collect(),
            status: self.status,
            body: self.body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_responses_set_their_content_type_and_body() {
        let html = LocalResponse::new(200).html("<p>hi</p>");
        assert_eq!(
            html.headers,
            vec![(
                "content-type".to_string(),
                b"text/html; charset=utf-8".to_vec()
            )]
        );
        assert_eq!(html.body, b"<p>hi</p>");
        let raw = LocalResponse::new(200)
            .header("content-type", "application/octet-stream")
            .body(vec![0u8, 255]);
        assert_eq!(raw.body, vec![0u8, 255]);
        assert_eq!(LocalResponse::new(503).text("down").body, b"down");
    }

    #[test]
    fn a_test_request_has_no_host_header_as_in_production() {
        let req = Request::new("GET", "https://App.Test:8443/x?y=1");
        assert_eq!(req.header("host"), None);
        assert_eq!(
            (req.authority(), req.hostname()),
            ("App.Test:8443", "app.test")
        );
    }
}
