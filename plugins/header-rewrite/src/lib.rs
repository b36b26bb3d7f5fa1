//! header-rewrite: sets, appends and removes request and response headers, with the
//! variables `{request_id}`, `{client_ip}` and `{host}` in values.

use std::collections::BTreeMap;

use serde::Deserialize;
use sluice_sdk::{
    export_plugin, HeaderEdit, Hook, Plugin, Request, RequestDecision, Response, ResponseDecision,
};

/// The plugin's configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Edits to requests (towards the origin).
    #[serde(default)]
    pub request: Edits,
    /// Edits to responses (towards the client).
    #[serde(default)]
    pub response: Edits,
}

/// One direction's edits, applied as: remove, then set, then append.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edits {
    /// Headers to set (replacing existing values).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values to append.
    #[serde(default)]
    pub append: BTreeMap<String, String>,
    /// Headers to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// The plugin: each side's edits with their values parsed once, at load.
#[derive(Debug)]
pub struct HeaderRewrite {
    request: Compiled,
    response: Compiled,
}

/// One side's edits, ready to apply.
#[derive(Debug, Default)]
struct Compiled {
    remove: Vec<String>,
    set: Vec<(String, Template)>,
    append: Vec<(String, Template)>,
}

impl Compiled {
    /// `e` after [`check`], its values parsed; `Err` says which side's value is wrong.
    fn new(e: &Edits, side: &str) -> Result<Compiled, String> {
        check(e, side)?;
        let parse = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(n, v)| {
                    Ok((
                        n.clone(),
                        Template::parse(v).map_err(|e| format!("{side}: {e}"))?,
                    ))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Compiled {
            remove: e.remove.clone(),
            set: parse(&e.set)?,
            append: parse(&e.append)?,
        })
    }

    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.append.is_empty()
    }
}

/// A header value: text and variables, in order.
#[derive(Debug, PartialEq)]
struct Template(Vec<Part>);

#[derive(Debug, PartialEq)]
enum Part {
    Text(String),
    RequestId,
    ClientIp,
    Host,
}

impl Template {
    /// Parses a value: `Err` names an unclosed `{` or an unknown variable.
    fn parse(value: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = value;
        while let Some(start) = rest.find('{') {
            let end = start
                + rest[start..]
                    .find('}')
                    .ok_or_else(|| format!("unclosed '{{' in {value:?}"))?;
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_string()));
            }
            parts.push(match &rest[start + 1..end] {
                "request_id" => Part::RequestId,
                "client_ip" => Part::ClientIp,
                "host" => Part::Host,
                var => return Err(format!("unknown variable {{{var}}} in {value:?} (known: {{request_id}}, {{client_ip}}, {{host}})")),
            });
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        Ok(Template(parts))
    }

    /// The value for `req`. Asks the host only for the variables the value uses; what a
    /// variable expands to is not scanned for variables again.
    fn expand(&self, req: &Request) -> Vec<u8> {
        let mut out = String::new();
        for part in &self.0 {
            out.push_str(match part {
                Part::Text(t) => t,
                Part::RequestId => req.request_id(),
                Part::ClientIp => req.client_ip().unwrap_or("unknown"),
                Part::Host => req.hostname(),
            });
        }
        out.into_bytes()
    }
}

/// Headers the host never lets a plugin change: refused here, at load, rather than as a 502 on
/// every request.
const MANAGED: &[&str] = &[
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "sluice-request-id",
];

fn check(edits: &Edits, side: &str) -> Result<(), String> {
    let names = edits
        .set
        .keys()
        .chain(edits.append.keys())
        .chain(edits.remove.iter());
    for name in names {
        if MANAGED.contains(&name.as_str()) || name.starts_with("proxy-") {
            return Err(format!(
                "{side}: header {name:?} is managed by sluice and cannot be changed"
            ));
        }
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "{side}: header name {name:?} must be lowercase letters, digits, '-' or '_'"
            ));
        }
    }
    for value in edits.set.values().chain(edits.append.values()) {
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!(
                "{side}: value {value:?} contains control characters"
            ));
        }
    }
    Ok(())
}

impl Plugin for HeaderRewrite {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        Ok(HeaderRewrite {
            request: Compiled::new(&config.request, "request")?,
            response: Compiled::new(&config.response, "response")?,
        })
    }

    fn on_request(&self, req: &Request) -> RequestDecision {
        if self.request.is_empty() {
            sluice_sdk::decline(Hook::Request);
        }
        RequestDecision {
            headers: edits(&self.request, req),
            ..RequestDecision::default()
        }
    }

    fn on_response(&self, req: &Request, _resp: &Response) -> ResponseDecision {
        // With nothing to do on responses, the host stops calling this.
        if self.response.is_empty() {
            sluice_sdk::decline(Hook::Response);
        }
        ResponseDecision {
            headers: edits(&self.response, req),
            ..ResponseDecision::default()
        }
    }
}

/// One side's edits for `req`: remove, then set, then append.
fn edits(e: &Compiled, req: &Request) -> Vec<HeaderEdit> {
    let remove = e.remove.iter().map(|n| HeaderEdit::Remove(n.clone()));
    let set = e
        .set
        .iter()
        .map(|(n, v)| HeaderEdit::Set(n.clone(), v.expand(req)));
    let append = e
        .append
        .iter()
        .map(|(n, v)| HeaderEdit::Append(n.clone(), v.expand(req)));
    remove.chain(set).chain(append).collect()
}

export_plugin!(HeaderRewrite);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::load;

    #[test]
    fn edits_with_variables() {
        let p: HeaderRewrite = load(
            br#"{"request": {"set": {"x-id": "{request_id}@{host}", "x-ip": "{client_ip}"}, "append": {"via": "sluice"}, "remove": ["x-internal"]},
                 "response": {"set": {"x-served-by": "sluice"}}}"#,
        )
        .unwrap();
        let req = Request::new("GET", "https://App.test/x").with_client_addr("192.0.2.7:5000");
        let d = p.on_request(&req);
        assert_eq!(
            d.headers,
            vec![
                HeaderEdit::Remove("x-internal".into()),
                HeaderEdit::Set(
                    "x-id".into(),
                    format!("{}@app.test", req.request_id()).into_bytes()
                ),
                HeaderEdit::Set("x-ip".into(), b"192.0.2.7".to_vec()),
                HeaderEdit::Append("via".into(), b"sluice".to_vec()),
            ]
        );
        let r = p.on_response(&req, &Response::default());
        assert_eq!(
            r.headers,
            vec![HeaderEdit::Set("x-served-by".into(), b"sluice".to_vec())]
        );
    }

    #[test]
    fn values_are_parsed_once_and_substituted_values_are_not_rescanned() {
        assert_eq!(
            Template::parse("a{host}b{request_id}").unwrap(),
            Template(vec![
                Part::Text("a".into()),
                Part::Host,
                Part::Text("b".into()),
                Part::RequestId,
            ])
        );
        // A client-supplied host naming a variable stays as it is.
        let req = Request::new("GET", "https://{client_ip}.test/");
        assert_eq!(
            Template::parse("{host}!").unwrap().expand(&req),
            b"{client_ip}.test!"
        );
    }

    #[test]
    fn client_ip_without_grant_is_unknown() {
        let p: HeaderRewrite = load(br#"{"request": {"set": {"x-ip": "{client_ip}"}}}"#).unwrap();
        let d = p.on_request(&Request::new("GET", "https://app.test/"));
        assert_eq!(
            d.headers,
            vec![HeaderEdit::Set("x-ip".into(), b"unknown".to_vec())]
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(
            load::<HeaderRewrite>(br#"{"request": {"set": {"X-Upper": "1"}}}"#)
                .unwrap_err()
                .contains("lowercase")
        );
        assert!(
            load::<HeaderRewrite>(br#"{"request": {"set": {"x": "{nope}"}}}"#)
                .unwrap_err()
                .contains("unknown variable {nope}")
        );
        assert!(
            load::<HeaderRewrite>(br#"{"request": {"set": {"content-length": "1"}}}"#)
                .unwrap_err()
                .contains("managed by sluice")
        );
        assert!(
            load::<HeaderRewrite>(br#"{"request": {"set": {"x": "a\nb"}}}"#)
                .unwrap_err()
                .contains("control characters")
        );
        assert!(load::<HeaderRewrite>(br#"{"requests": {}}"#)
            .unwrap_err()
            .contains("unknown field"));
    }
}
